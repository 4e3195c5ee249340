"""Answers the size of real ones: the emulator's `basis_bytes` option (`EmulatorConfig`, `enrich emulate`).

The synthesis is checked directly (`synth_output`), then through the ASGI app, then through a real
`enrich emulate --basis-bytes` process on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_emulator import SPEC, app_with, body, client, run

from enrich._cli import main
from enrich._emulator import EmulatorConfig
from enrich._emulator.synth import build_output, expected_output, synth_output
from enrich._models import FieldBasis

SAMPLE_SCHEMA = json.loads(
    (Path(__file__).parent.parent / "sample_data" / "companies_schema.json").read_text()
)
SCHEMAS: dict[str, Any] = {
    "sample": {"type": "json", "json_schema": SAMPLE_SCHEMA},
    "nested": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {
                "hq": {"type": "object", "properties": {"city": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string"}},
                "größe_der_belegschaft": {"type": "integer"},
                "a_rather_long_field_name_that_takes_up_some_of_the_basis_budget": {"type": "number"},
            },
        },
    },
    "text": {"type": "text", "description": "A short summary of the company."},
    "auto": None,  # structured on pro and above, text below
}
INPUTS: list[Any] = [
    {"company": "Acme Corp"},
    {"company": 'Société "Générale" \\ 株式会社'},  # escapes and multi-byte characters in the JSON
    "What does Initech make?",
    {"company": "X" * 200},  # the longest echo and slug
]
PREMIUM = ("core", "pro", "ultra-fast")
BASIC = ("lite", "base-fast")


def entry_names(content: dict[str, Any]) -> list[str]:
    """The basis entries a JSON output has: each field, and after an array field each element's."""
    names = []
    for name, value in content.items():
        names.append(name)
        if isinstance(value, list):
            names += [f"{name}.{i}" for i in range(len(value))]
    return names


def size(value: Any) -> int:
    """Bytes of `value` as the emulator sends it: compact UTF-8 JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("schema", list(SCHEMAS))
@pytest.mark.parametrize("processor", PREMIUM + BASIC)
@pytest.mark.parametrize("target", [512, 4_000, 20_000])
def test_each_field_basis_is_about_basis_bytes(schema: str, processor: str, target: int) -> None:
    for given in INPUTS:
        content, basis = synth_output(given, SCHEMAS[schema], processor=processor, basis_bytes=target)
        fields = ["output"] if isinstance(content, str) else entry_names(content)
        assert [b["field"] for b in basis] == fields
        for entry in basis:
            assert 0.8 * target <= size(entry) <= 1.2 * target, (given, entry["field"], size(entry))


def test_a_huge_basis_is_about_its_size_too() -> None:
    for processor in ("core", "lite"):
        _, basis = synth_output(
            {"company": "Acme"}, SCHEMAS["text"], processor=processor, basis_bytes=1_000_000
        )
        assert 800_000 <= size(basis[0]) <= 1_000_000


def test_sized_answers_are_byte_identical_for_the_same_input_schema_and_processor() -> None:
    def answers() -> list[bytes]:
        return [
            canonical(build_output(given, {"output_schema": SCHEMAS["sample"]}, p, basis_bytes=4_000))
            for given in INPUTS
            for p in ("core", "lite")
        ]

    first = answers()
    assert answers() == first
    assert len(set(first)) == len(first)  # each input and tier its own
    # Nothing rides on Python's per-process hash seed or on global random state.
    code = (
        "import hashlib, json, random, sys; random.seed(99)\n"
        "from enrich._emulator.synth import build_output\n"
        "a = json.loads(sys.argv[1])\n"
        "out = build_output(a['input'], {'output_schema': a['schema']}, 'core', basis_bytes=4000)\n"
        "print(hashlib.sha256(json.dumps(out, sort_keys=True, separators=(',', ':'),"
        " ensure_ascii=False).encode()).hexdigest())"
    )
    arg = json.dumps({"input": INPUTS[1], "schema": SCHEMAS["sample"]})
    digests = {
        subprocess.run(
            [sys.executable, "-c", code, arg],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert digests == {hashlib.sha256(first[2]).hexdigest()}


def test_the_basis_size_changes_the_basis_only() -> None:
    for schema in SCHEMAS.values():
        for p in PREMIUM + BASIC:
            compact = synth_output(INPUTS[0], schema, processor=p)
            sized = synth_output(INPUTS[0], schema, processor=p, basis_bytes=4_000)
            assert sized[0] == compact[0]
            confidences = [b["confidence"] for b in compact[1]]
            assert [b["confidence"] for b in sized[1]] == confidences  # same draw, same confidence


@pytest.mark.parametrize("processor", PREMIUM + BASIC)
def test_a_sized_basis_round_trips_through_the_clients_field_basis(processor: str) -> None:
    _, basis = synth_output(INPUTS[1], SCHEMAS["sample"], processor=processor, basis_bytes=4_000)
    for entry in basis:
        parsed = FieldBasis.from_json(entry)
        wire = {**entry, "citations": [{**c, "excerpts": c["excerpts"] or []} for c in entry["citations"]]}
        assert parsed.to_json() == wire
        assert parsed.field == entry["field"] and parsed.reasoning and parsed.citations
        urls = [c.url for c in parsed.citations]
        assert len(set(urls)) == len(urls) and all(u.startswith("https://") for u in urls)
        assert all(c.title for c in parsed.citations)


@pytest.mark.parametrize("processor", PREMIUM)
def test_premium_tiers_give_several_citations_excerpts_of_varied_length_and_confidence(
    processor: str,
) -> None:
    _, basis = synth_output(INPUTS[0], SCHEMAS["sample"], processor=processor, basis_bytes=4_000)
    lengths = []
    for entry in basis:
        assert entry["confidence"] in ("low", "medium", "high")
        assert len(entry["citations"]) >= 2
        assert 200 <= len(entry["reasoning"]) < 2_000
        for citation in entry["citations"]:
            assert citation["excerpts"] and all(isinstance(e, str) and e for e in citation["excerpts"])
            lengths += [len(e) for e in citation["excerpts"]]
        assert "Acme Corp" in entry["reasoning"]
        assert any("Acme Corp" in e for c in entry["citations"] for e in c["excerpts"])
    assert len(set(lengths)) > len(lengths) // 2 and max(lengths) > 2 * min(lengths)


@pytest.mark.parametrize("processor", BASIC)
def test_lite_and_base_give_no_excerpts_and_no_confidence_at_any_size(processor: str) -> None:
    for target in (None, 512, 4_000, 50_000):
        for schema in SCHEMAS.values():
            _, basis = synth_output(INPUTS[0], schema, processor=processor, basis_bytes=target)
            for entry in basis:
                assert entry["confidence"] is None
                assert all(c["excerpts"] is None for c in entry["citations"])
    # Their size comes from more citations and a longer reasoning than a premium tier's.
    _, basic = synth_output(INPUTS[0], SCHEMAS["sample"], processor=processor, basis_bytes=4_000)
    _, premium = synth_output(INPUTS[0], SCHEMAS["sample"], processor="core", basis_bytes=4_000)
    for b, p in zip(basic, premium, strict=True):
        assert len(b["citations"]) > len(p["citations"]) and len(b["reasoning"]) > len(p["reasoning"])


def test_the_default_answers_are_unchanged() -> None:
    assert EmulatorConfig().basis_bytes is None
    outs = [
        build_output(given, spec, p)
        for p in ("lite", "base", "core", "pro", "ultra-fast")
        for given in ({"company": "Acme Corp"}, {"company": "Société Générale"}, "What does Initech make?")
        for spec in ({"output_schema": SCHEMAS["sample"]}, None)
    ]
    assert outs == [
        build_output(given, spec, p, basis_bytes=None)
        for p in ("lite", "base", "core", "pro", "ultra-fast")
        for given in ({"company": "Acme Corp"}, {"company": "Société Générale"}, "What does Initech make?")
        for spec in ({"output_schema": SCHEMAS["sample"]}, None)
    ]
    # The digest of these answers as the emulator gave them before `basis_bytes` existed, and before
    # array fields got one basis entry per element: without those entries they are byte for byte the same.
    digest = "3336e9b4608ce6e213ab44bc7a79e20590dce7f25d051a789c0bbc83b48e6b86"
    assert any("." in b["field"] for out in outs for b in out["basis"])
    top_level = [{**out, "basis": [b for b in out["basis"] if "." not in b["field"]]} for out in outs]
    assert hashlib.sha256(canonical(top_level)).hexdigest() == digest


@pytest.mark.parametrize("value", [0, -4_000, 511, 1_000_001, 10**12, True, 4_000.0, "4000"])
def test_bad_basis_bytes_are_refused_with_one_line(value: Any) -> None:
    for make in (
        lambda: EmulatorConfig(basis_bytes=value),
        lambda: synth_output("Acme", processor="core", basis_bytes=value),
        lambda: expected_output({"input": "Acme", "processor": "core"}, basis_bytes=value),
    ):
        with pytest.raises(
            ValueError, match=r"basis_bytes must be a whole number of bytes from 512 to 1,000,000"
        ):
            make()
        with pytest.raises(ValueError) as info:
            make()
        assert "\n" not in str(info.value) and repr(value) in str(info.value)


def test_the_emulator_serves_sized_answers() -> None:
    app = app_with(basis_bytes=3_000)
    requests = [body("core", task_spec=SPEC), body("lite", task_spec=SPEC), body("base")]

    async def go() -> list[dict[str, Any]]:
        async with client(app) as c:
            ids = [(await c.post("/v1/tasks/runs", json=r)).json()["run_id"] for r in requests]
            return [
                (await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 10})).json()["output"]
                for rid in ids
            ]

    for request, output in zip(requests, run(go()), strict=True):
        assert output == expected_output(request, basis_bytes=3_000)
        assert output["content"] == expected_output(request)["content"]
        assert all(2_400 <= size(entry) <= 3_600 for entry in output["basis"])


def test_cli_emulate_maps_basis_bytes_to_the_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[EmulatorConfig] = []
    monkeypatch.setattr("enrich._emulator.serve", lambda config, host, port: served.append(config))
    assert (
        main(["emulate", "--port", "0", "--basis-bytes", "4000"]) == 0 and served.pop().basis_bytes == 4_000
    )
    assert main(["emulate", "--port", "0"]) == 0 and served.pop().basis_bytes is None
    capsys.readouterr()
    assert main(["emulate", "--basis-bytes", "0"]) == 2 and served == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("enrich: error: basis_bytes must be")


def test_enrich_emulate_basis_bytes_serves_sized_answers_over_http(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "enrich", "emulate", "--port", str(port), "--latency", "0.05"]
    log = tmp_path / "emulate.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([*cmd, "--basis-bytes", "2500"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        request = body("core", task_spec=SPEC)
        with httpx.Client(base_url=url, headers={"x-api-key": "k"}, timeout=10) as c:
            rid = c.post("/v1/tasks/runs", json=request).json()["run_id"]
            output = c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 5}).json()["output"]
        assert output == expected_output(request, basis_bytes=2_500)
        assert all(2_000 <= size(entry) <= 3_000 for entry in output["basis"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


def test_answers_made_while_runs_run_are_the_answers_made_when_read() -> None:
    """The emulator makes a run's answer while it runs (`prepare_answers`) and gives it up at its first
    read: what is read is what it would have made at the read, and nothing is kept once read."""
    import asyncio

    import httpx

    from enrich import EmulatorConfig, create_app
    from enrich._emulator import state as emulator_state

    app = create_app(EmulatorConfig(latency=0.05, api_key=None, basis_bytes=2000))

    async def main() -> tuple[list[dict], list[dict]]:
        kw = {"transport": httpx.ASGITransport(app=app), "headers": {"x-api-key": "k"}}
        async with httpx.AsyncClient(base_url="http://emulator", **kw) as http:
            group = (await http.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
            inputs = [{"input": f"Company {i}", "processor": "core"} for i in range(40)]
            await http.post(f"/v1/tasks/groups/{group}/runs", json={"inputs": inputs})
            await asyncio.sleep(0.3)  # (made meanwhile, between requests; the runs end)
            runs = list(app.state.groups[group].runs)
            assert all(r.answer for r in runs) and app.state.answer_bytes > 0
            made = [(await http.get(f"/v1/tasks/runs/{r.run_id}/result")).json()["output"] for r in runs]
            assert app.state.answer_bytes == 0  # given up at the first read
            again = [(await http.get(f"/v1/tasks/runs/{r.run_id}/result")).json()["output"] for r in runs]
            return made, again

    made, again = asyncio.run(main())
    assert made == again and made[0]["basis"]  # (made again at the second read: the same answer)
    assert emulator_state.ANSWER_CACHE_BYTES >= 1 << 20
