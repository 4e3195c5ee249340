"""The emulator and the per-run options of the Task API (task-api.md §2.1, §3, §4, §5, §8).

The `cancelled`, `cancelling` and `action_required` statuses and the `x-should-retry` header come from
options that are off by default; array fields get one basis entry per element; each bad per-run field
is a 422 that names it, for a single create and inside a group add; beta fields need their
`parallel-beta` value; a `previous_interaction_id` must name an interaction the emulator handed out,
and a follow-up's basis says which; citations keep to the run's `source_policy`. Everything goes over
HTTP: the ASGI app in-process (`httpx.ASGITransport`), and `Emulator` on 127.0.0.1 where the SDK is
the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from parallel import InternalServerError, Parallel
from parallel.types import TaskRun
from test_emulator import (
    SPEC,
    app_with,
    assert_error,
    assert_fastapi_422,
    body,
    client,
    run,
    sse,
    wait_done,
)

from enrich._emulator import DEFAULT_FAULTS, FAULT_KINDS, Emulator, EmulatorApp, EmulatorConfig
from enrich._emulator.synth import expected_output

BETAS = {"parallel-beta": "mcp-server-2025-07-17,webhook-2025-08-12"}
MCP = {"name": "crm", "url": "https://mcp.example.com/mcp", "type": "url"}
HOOK = {"url": "https://hooks.example.com/parallel", "event_types": ["task_run.status"]}
ARRAYS = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {
                "ceo": {"type": "string"},
                "products": {"type": "array", "items": {"type": "string"}},
                "offices": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            },
            "required": ["ceo", "products", "offices"],
            "additionalProperties": False,
        },
    }
}


async def create(c: httpx.AsyncClient, request: dict[str, Any], headers: Any = None) -> httpx.Response:
    return await c.post("/v1/tasks/runs", json=request, headers=headers)


async def add(
    c: httpx.AsyncClient, inputs: list[dict[str, Any]], headers: Any = None, **extra: Any
) -> tuple[str, httpx.Response]:
    gid = (await c.post("/v1/tasks/groups", json={})).json()["taskgroup_id"]
    return gid, await c.post(
        f"/v1/tasks/groups/{gid}/runs", json={"inputs": inputs, **extra}, headers=headers
    )


def size(entry: dict[str, Any]) -> int:
    """Bytes of a basis entry as the emulator sends it: compact UTF-8 JSON."""
    return len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode())


def citations(output: dict[str, Any]) -> list[str]:
    return [c["url"] for entry in output["basis"] for c in entry["citations"]]


def on(url: str, entry: str) -> bool:
    """Whether `url` is on a source-policy entry, read straight from task-api.md §2.1."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if entry.startswith("."):
        return host.endswith(entry.lower())
    domain, _, path = entry.partition("/")
    if host != domain.lower() and not host.endswith("." + domain.lower()):
        return False
    prefix = "/" + path.rstrip("/")
    return not path or parts.path == prefix or parts.path.startswith(prefix + "/")


# --------------------------------------------------------------------------------------------------
# cancelled, cancelling, action_required


def test_a_cancelled_run_goes_through_cancelling_and_never_has_a_result() -> None:
    app = app_with(latency=0.3, cancel_rate=1.0)
    now = [time.monotonic()]
    app.state.now = lambda: now[0]  # type: ignore[method-assign]  # the emulator's clock, set by the test

    async def go() -> None:
        async with client(app) as c:
            created = (await create(c, body())).json()
            rid, rec = created["run_id"], app.state.runs[created["run_id"]]

            async def at(t: float) -> dict[str, Any]:
                now[0] = t
                return (await c.get(f"/v1/tasks/runs/{rid}")).json()

            assert created["status"] == "queued"
            running = await at((rec.start + rec.cancel_at) / 2)
            assert running["status"] == "running" and running["is_active"] is True
            cancelling = await at((rec.cancel_at + rec.end) / 2)
            assert cancelling["status"] == "cancelling" and cancelling["is_active"] is True
            assert cancelling["modified_at"] > running["modified_at"] and cancelling["error"] is None
            assert_error(await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 0}), 408)
            # On the real clock again, /result waits out the cancelling, then answers as for a failed run.
            del app.state.now
            r = await asyncio.wait_for(c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 30}), 30)
            assert_error(r, 404, "Run failed or run id not found")
            done = (await c.get(f"/v1/tasks/runs/{rid}")).json()
            assert done["status"] == "cancelled" and done["is_active"] is False and done["error"] is None
            assert done["modified_at"] > cancelling["modified_at"]
            events = sse((await c.get(f"/v1/tasks/runs/{rid}/events")).text)
            assert events[-1]["run"]["status"] == "cancelled" and events[-1]["output"] is None
        by_status = app.stats()["runs_by_status"]
        assert by_status["cancelled"] == 1 and by_status["completed"] == 0

    run(go())


def test_an_action_required_run_stops_there_and_its_result_is_404_at_once() -> None:
    app = app_with(latency=0.1, action_required_rate=1.0)
    now = [time.monotonic()]
    app.state.now = lambda: now[0]  # type: ignore[method-assign]  # the emulator's clock, set by the test

    async def go() -> None:
        async with client(app) as c:
            created = (await create(c, body())).json()
            rid, rec = created["run_id"], app.state.runs[created["run_id"]]
            assert created["status"] == "queued" and created["is_active"] is True
            now[0] = rec.start  # where it would have started running
            got = (await c.get(f"/v1/tasks/runs/{rid}")).json()
            assert got["status"] == "action_required" and got["is_active"] is False and got["error"] is None
            assert got["modified_at"] > got["created_at"]
            # Not active: /result answers at once, whatever wait it is given (the guard only stops a hang).
            r = await asyncio.wait_for(c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 600}), 10)
            assert_error(r, 404, "Run failed or run id not found")
            events = sse((await asyncio.wait_for(c.get(f"/v1/tasks/runs/{rid}/events"), 10)).text)
            assert events[-1]["run"]["status"] == "action_required" and events[-1]["output"] is None
            now[0] = rec.start + 3_600  # an hour on, it is still waiting for an action
            assert (await c.get(f"/v1/tasks/runs/{rid}")).json()["status"] == "action_required"
        stats = app.stats()
        assert stats["runs_by_status"]["action_required"] == 1 and stats["active_runs"] == 0

    run(go())


def test_groups_count_list_and_stream_the_new_statuses_like_the_others() -> None:
    app = app_with(latency=0.05, failure_rate=0.25, cancel_rate=0.25, action_required_rate=0.25, seed=4)

    async def go() -> None:
        async with client(app) as c:
            gid, r = await add(c, [body(metadata={"row": i}) for i in range(40)])
            ids = r.json()["run_ids"]
            events = sse((await c.get(f"/v1/tasks/groups/{gid}/events", params={"timeout": 30})).text)
            finished = [e for e in events if e["type"] == "task_run.state"]
            assert sorted(e["run"]["run_id"] for e in finished) == sorted(ids)  # every run's non-active event
            assert all(e["run"]["is_active"] is False for e in finished)
            assert events[-1]["type"] == "task_group_status" and events[-1]["status"]["is_active"] is False
            counts = events[-1]["status"]["task_run_status_counts"]
            assert set(counts) == {"completed", "failed", "cancelled", "action_required"}, counts
            assert sum(counts.values()) == 40 and min(counts.values()) >= 3
            status = (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]
            assert status["task_run_status_counts"] == counts and status["is_active"] is False
            listed = sse((await c.get(f"/v1/tasks/groups/{gid}/runs")).text)
            assert [e["run"]["run_id"] for e in listed] == ids
            for name, n in counts.items():
                only = sse((await c.get(f"/v1/tasks/groups/{gid}/runs", params={"status": name})).text)
                assert len(only) == n and all(e["run"]["status"] == name for e in only)
            by_status = {e["run"]["status"]: 0 for e in finished}
            for e in finished:
                by_status[e["run"]["status"]] += 1
            assert by_status == counts
            assert all(e["run"]["error"] is None for e in finished if e["run"]["status"] != "failed")
        stats = app.stats()["runs_by_status"]
        assert {k: v for k, v in stats.items() if v} == counts

    run(go())


def test_cancels_and_action_required_leave_a_seeds_failures_as_they_were() -> None:
    # The failures of this seed, as the emulator drew them before cancel_rate and action_required_rate.
    pattern = "...F..F...FF......F....FFF...."

    def statuses(app: EmulatorApp) -> list[str]:
        async def go() -> list[str]:
            async with client(app) as c:
                gid, r = await add(c, [body(metadata={"row": i}) for i in range(30)])
                await c.get(
                    f"/v1/tasks/groups/{gid}/events", params={"timeout": 30}
                )  # ends when none is active
                return [
                    (await c.get(f"/v1/tasks/runs/{rid}")).json()["status"] for rid in r.json()["run_ids"]
                ]

        return run(go())

    plain = statuses(app_with(failure_rate=0.3, seed=5))
    assert "".join("F" if s == "failed" else "." for s in plain) == pattern
    mixed = statuses(app_with(failure_rate=0.3, cancel_rate=0.2, action_required_rate=0.2, seed=5))
    assert [s == "failed" for s in mixed] == [s == "failed" for s in plain]
    assert {"cancelled", "action_required", "completed"} <= set(mixed)


@pytest.mark.parametrize(
    "options",
    [
        {"cancel_rate": -0.1},
        {"cancel_rate": 1.5},
        {"action_required_rate": 2},
        {"failure_rate": 0.5, "cancel_rate": 0.3, "action_required_rate": 0.3},
    ],
)
def test_status_rates_are_checked(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="rate"):
        EmulatorConfig(**options)


def test_status_rates_are_off_by_default() -> None:
    config = EmulatorConfig()
    assert config.cancel_rate == 0.0 and config.action_required_rate == 0.0
    assert EmulatorConfig(failure_rate=0.5, cancel_rate=0.25, action_required_rate=0.25).cancel_rate == 0.25


# --------------------------------------------------------------------------------------------------
# x-should-retry


def test_no_retry_fault_is_a_503_error_response_that_says_do_not_retry_and_does_nothing() -> None:
    app = app_with(fault_rate=1.0, faults=frozenset({"no_retry"}))

    async def go() -> None:
        async with client(app) as c:
            for request in (
                c.post("/v1/tasks/runs", json=body()),
                c.post("/v1/tasks/groups", json={}),
                c.get("/v1/tasks/runs/trun_x"),
            ):
                r = await request
                error = assert_error(r, 503)
                assert r.headers["x-should-retry"] == "false" and error["message"]
        stats = app.stats()
        assert (
            stats["runs_created"] == 0 and stats["groups_created"] == 0 and stats["faults"]["no_retry"] == 3
        )

    run(go())


def test_the_default_faults_are_the_four_of_before_and_draw_as_they_did() -> None:
    assert EmulatorConfig().faults == DEFAULT_FAULTS == FAULT_KINDS - {"no_retry"}
    # The kinds this seed drew for 40 creates before `no_retry` existed ("-": no fault).
    drawn_before = (
        "drop - lost_create html_5xx html_5xx html_5xx - - - slow html_5xx drop - - - slow drop lost_create "
        "drop - - lost_create - - - - drop - - - slow - - drop slow - - html_5xx lost_create html_5xx"
    )
    app = app_with(fault_rate=0.5, seed=7, slow_seconds=0.0)

    async def go() -> list[str]:
        drawn = []
        async with client(app) as c:
            for _ in range(40):
                seen = dict(app.stats()["faults"])
                try:
                    await c.post("/v1/tasks/runs", json={"input": "x", "processor": "base"})
                except httpx.RemoteProtocolError:
                    pass
                now = app.stats()["faults"]
                drawn.append(next((k for k in now if now[k] != seen[k]), "-"))
        return drawn

    assert run(go()) == drawn_before.split()


def test_should_retry_header_marks_429s_and_injected_5xx_but_not_no_retry() -> None:
    def retry_headers(**options: Any) -> dict[str, str | None]:
        async def go() -> dict[str, str | None]:
            seen: dict[str, str | None] = {}
            limited = app_with(rate_limit=1, **options)
            async with client(limited) as c:
                await c.get("/v1/tasks/runs/trun_x")
                r = await c.get("/v1/tasks/runs/trun_x")
                assert r.status_code == 429
                seen["429"] = r.headers.get("x-should-retry")
            for kind in ("html_5xx", "lost_create", "no_retry"):
                async with client(app_with(fault_rate=1.0, faults=frozenset({kind}), **options)) as c:
                    r = await c.post("/v1/tasks/runs", json=body())
                    assert r.status_code >= 500
                    seen[kind] = r.headers.get("x-should-retry")
            async with client(app_with(late_commit_seconds=0.05, **options)) as c:
                r = await c.post("/v1/tasks/runs", json=body())
                assert r.status_code == 504
                seen["late commit"] = r.headers.get("x-should-retry")
                await asyncio.sleep(0.1)
            return seen

        return run(go())

    assert retry_headers() == {
        "429": None,
        "html_5xx": None,
        "lost_create": None,
        "no_retry": "false",
        "late commit": None,
    }
    assert retry_headers(should_retry_header=True) == {
        "429": "true",
        "html_5xx": "true",
        "lost_create": "true",
        "no_retry": "false",
        "late commit": "true",
    }


def test_the_sdk_never_retries_a_no_retry_fault() -> None:
    with Emulator(latency=0.05, fault_rate=1.0, faults=frozenset({"no_retry"})) as emu:
        sdk = Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=2)
        with pytest.raises(InternalServerError):
            sdk.task_run.create(input="Acme", processor="base")
        stats = emu.stats()
    assert stats["requests"] == {"POST /v1/tasks/runs": 1} and stats["runs_created"] == 0


def test_the_sdk_parses_the_new_statuses() -> None:
    with Emulator(latency=0.05, action_required_rate=0.5, cancel_rate=0.5, seed=1) as emu:
        sdk = Parallel(api_key=emu.api_key, base_url=emu.url, max_retries=0)
        group = sdk.task_group.create()
        added = sdk.task_group.add_runs(
            group.task_group_id, inputs=[{"input": f"c{i}", "processor": "lite"} for i in range(8)]
        )
        events = list(sdk.task_group.events(group.task_group_id, api_timeout=30))
        # Validated, not just built: the SDK builds its models without checking the status Literal.
        statuses = {
            TaskRun.model_validate(sdk.task_run.with_raw_response.retrieve(rid).http_response.json()).status
            for rid in added.run_ids
        }
    assert statuses == {"cancelled", "action_required"}
    assert events[-1].status.task_run_status_counts.keys() == statuses  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# One basis entry per array element


def entry_names(content: dict[str, Any]) -> list[str]:
    names = []
    for name, value in content.items():
        names += [name, *(f"{name}.{i}" for i in range(len(value)))] if isinstance(value, list) else [name]
    return names


@pytest.mark.parametrize("basis_bytes", [None, 2_000])
def test_array_fields_get_one_basis_entry_per_element(basis_bytes: int | None) -> None:
    app = app_with(basis_bytes=basis_bytes)
    requests = [body(p, task_spec=ARRAYS) for p in ("lite", "core")] + [body("pro")]

    async def go() -> None:
        async with client(app) as c:
            for request in requests:
                output = (await wait_done(c, (await create(c, request)).json()["run_id"]))["output"]
                assert output == expected_output(request, basis_bytes=basis_bytes)
                names = [b["field"] for b in output["basis"]]
                assert names == entry_names(output["content"])
                arrays = [k for k, v in output["content"].items() if isinstance(v, list)]
                assert arrays and all(f"{k}.0" in names for k in arrays)
                for entry in output["basis"]:
                    assert (
                        set(entry) == {"field", "reasoning", "citations", "confidence"} and entry["citations"]
                    )
                    if basis_bytes is not None:
                        assert 0.8 * basis_bytes <= size(entry) <= 1.2 * basis_bytes
                elements = [b for b in output["basis"] if "." in b["field"]]
                assert len({b["reasoning"] for b in elements}) == len(elements)  # each element its own

    run(go())


# --------------------------------------------------------------------------------------------------
# Per-run fields: each bad one is a 422 naming it, on both ways of creating runs

BAD_FIELDS: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "over 200 domain entries across include and exclude": (
        {
            "source_policy": {
                "include_domains": [f"a{i}.com" for i in range(150)],
                "exclude_domains": [f"b{i}.com" for i in range(51)],
            }
        },
        ["source_policy"],
    ),
    "after_date not a real date": (
        {"source_policy": {"after_date": "2024-02-30"}},
        ["source_policy", "after_date"],
    ),
    "after_date not YYYY-MM-DD": (
        {"source_policy": {"after_date": "2024/01/31"}},
        ["source_policy", "after_date"],
    ),
    "after_date without zero padding": (
        {"source_policy": {"after_date": "2024-1-5"}},
        ["source_policy", "after_date"],
    ),
    "after_date a datetime": (
        {"source_policy": {"after_date": "2024-01-05T00:00:00Z"}},
        ["source_policy", "after_date"],
    ),
    "domain with a scheme": (
        {"source_policy": {"include_domains": ["https://acme.com"]}},
        ["source_policy", "include_domains", 0],
    ),
    "domain with a port": (
        {"source_policy": {"exclude_domains": ["ok.com", "acme.com:443"]}},
        ["source_policy", "exclude_domains", 1],
    ),
    "domain with a query": (
        {"source_policy": {"include_domains": ["acme.com/news?page=2"]}},
        ["source_policy", "include_domains", 0],
    ),
    "empty domain": ({"source_policy": {"include_domains": [""]}}, ["source_policy", "include_domains", 0]),
    "domain of one label": (
        {"source_policy": {"include_domains": ["acme"]}},
        ["source_policy", "include_domains", 0],
    ),
    "domain extension with a path": (
        {"source_policy": {"exclude_domains": [".gov/x"]}},
        ["source_policy", "exclude_domains", 0],
    ),
    "domain not a string": (
        {"source_policy": {"include_domains": [7]}},
        ["source_policy", "include_domains", 0],
    ),
    "unknown source_policy field": ({"source_policy": {"domains": ["a.com"]}}, ["source_policy", "domains"]),
    "location in lower case": ({"advanced_settings": {"location": "us"}}, ["advanced_settings", "location"]),
    "location UK (the code is GB)": (
        {"advanced_settings": {"location": "UK"}},
        ["advanced_settings", "location"],
    ),
    "location alpha-3": ({"advanced_settings": {"location": "USA"}}, ["advanced_settings", "location"]),
    "location not a string": ({"advanced_settings": {"location": 840}}, ["advanced_settings", "location"]),
    "data_sources not a list": (
        {"advanced_settings": {"data_sources": {"free": "news"}}},
        ["advanced_settings", "data_sources", "free"],
    ),
    "data_sources empty name": (
        {"advanced_settings": {"data_sources": {"pay_per_use": [""]}}},
        ["advanced_settings", "data_sources", "pay_per_use", 0],
    ),
    "data_sources unknown kind": (
        {"advanced_settings": {"data_sources": {"paid": ["x"]}}},
        ["advanced_settings", "data_sources", "paid"],
    ),
    "data_sources on a fast processor": (
        {"processor": "core-fast", "advanced_settings": {"data_sources": {"free": ["news"]}}},
        ["advanced_settings", "data_sources"],
    ),
    "data_sources named like an MCP server": (
        {"mcp_servers": [MCP], "advanced_settings": {"data_sources": {"free": ["crm"]}}},
        ["advanced_settings", "data_sources"],
    ),
    "mcp server without a name": ({"mcp_servers": [{"url": MCP["url"]}]}, ["mcp_servers", 0, "name"]),
    "mcp server with an empty name": ({"mcp_servers": [{**MCP, "name": ""}]}, ["mcp_servers", 0, "name"]),
    "mcp server without a url": ({"mcp_servers": [{"name": "crm"}]}, ["mcp_servers", 0, "url"]),
    "mcp server url not http": (
        {"mcp_servers": [{**MCP, "url": "ftp://mcp.example.com"}]},
        ["mcp_servers", 0, "url"],
    ),
    "mcp server url not a url": ({"mcp_servers": [{**MCP, "url": "mcp server"}]}, ["mcp_servers", 0, "url"]),
    "mcp server of another type": ({"mcp_servers": [{**MCP, "type": "stdio"}]}, ["mcp_servers", 0, "type"]),
    "mcp header not a string": (
        {"mcp_servers": [{**MCP, "headers": {"x-api-key": 1}}]},
        ["mcp_servers", 0, "headers", "x-api-key"],
    ),
    "mcp allowed_tools not a list": (
        {"mcp_servers": [{**MCP, "allowed_tools": "search"}]},
        ["mcp_servers", 0, "allowed_tools"],
    ),
    "mcp server names repeat": (
        {"mcp_servers": [MCP, {**MCP, "url": "https://b.example.com"}]},
        ["mcp_servers", 1, "name"],
    ),
    "more than 10 mcp servers": (
        {"mcp_servers": [{**MCP, "name": f"s{i}"} for i in range(11)]},
        ["mcp_servers"],
    ),
    "mcp_servers not a list": ({"mcp_servers": MCP}, ["mcp_servers"]),
    "webhook without a url": ({"webhook": {"event_types": ["task_run.status"]}}, ["webhook", "url"]),
    "webhook url not a url": ({"webhook": {**HOOK, "url": "hooks.example.com"}}, ["webhook", "url"]),
    "webhook without event_types": ({"webhook": {"url": HOOK["url"]}}, ["webhook", "event_types"]),
    "webhook with no event_types": ({"webhook": {**HOOK, "event_types": []}}, ["webhook", "event_types"]),
    "webhook of another event type": (
        {"webhook": {**HOOK, "event_types": ["task_run.progress"]}},
        ["webhook", "event_types", 0],
    ),
    "webhook with a secret": ({"webhook": {**HOOK, "secret": "s"}}, ["webhook", "secret"]),
    "enable_events not a bool": ({"enable_events": "true"}, ["enable_events"]),
    "previous_interaction_id not a string": ({"previous_interaction_id": 12}, ["previous_interaction_id"]),
    "memory_scope_key not a string": ({"memory_scope_key": ["a"]}, ["memory_scope_key"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_a_bad_per_run_field_is_a_422_naming_it_and_creates_nothing(case: str) -> None:
    fields, loc = BAD_FIELDS[case]
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            error = assert_error(await create(c, body(**fields), BETAS), 422)
            assert any(e["loc"] == ["body", *loc] for e in error["detail"]["errors"]), error
            _, r = await add(c, [body(), body(**fields)], BETAS)
            assert_fastapi_422(r, ["body", "inputs", 1, *loc])
        assert app.stats()["runs_created"] == 0

    run(go())


GOOD_FIELDS: dict[str, dict[str, Any]] = {
    "exactly 200 domain entries across include and exclude": {
        "source_policy": {
            "include_domains": [f"a{i}.com" for i in range(150)],
            "exclude_domains": [f"b{i}.com" for i in range(50)],
        }
    },
    "every kind of domain entry": {
        "source_policy": {
            "include_domains": [
                "acme.com",
                "docs.python.org/3",
                "docs.python.org/3/",
                ".gov",
                ".co.uk",
                "münchen.de",
            ],
            "after_date": "2024-02-29",
        }
    },
    "a location and data sources": {
        "advanced_settings": {"location": "GB", "data_sources": {"free": ["news"], "pay_per_use": []}}
    },
    "ten mcp servers with headers and tools": {
        "mcp_servers": [
            {**MCP, "name": f"s{i}", "headers": {"authorization": "Bearer t"}, "allowed_tools": ["q"]}
            for i in range(10)
        ]
    },
    "an mcp server as the docs spell it": {
        "mcp_servers": [{"type": "url", "url": "https://dummy_mcp_server", "name": "dummy_mcp_server"}]
    },
    "a webhook": {"webhook": HOOK},
    "null options": {
        "source_policy": None,
        "advanced_settings": None,
        "mcp_servers": None,
        "webhook": None,
        "previous_interaction_id": None,
        "memory_scope_key": None,
        "enable_events": None,
    },
}


@pytest.mark.parametrize("case", sorted(GOOD_FIELDS))
def test_valid_per_run_fields_are_accepted_on_both_ways_of_creating_runs(case: str) -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            r = await create(c, body(**GOOD_FIELDS[case]), BETAS)
            assert r.status_code == 202, r.text
            _, r = await add(c, [body(**GOOD_FIELDS[case])], BETAS)
            assert r.status_code == 200, r.text
            sent = (await c.get(f"/v1/tasks/runs/{r.json()['run_ids'][0]}/input")).json()
            assert sent == body(**GOOD_FIELDS[case])  # kept as sent, nulls included
        assert app.stats()["runs_created"] == 2

    run(go())


# --------------------------------------------------------------------------------------------------
# Beta fields need their parallel-beta value


@pytest.mark.parametrize(
    ("field", "value", "beta"),
    [("mcp_servers", [MCP], "mcp-server-2025-07-17"), ("webhook", HOOK, "webhook-2025-08-12")],
)
def test_a_beta_field_without_its_beta_header_is_a_422_naming_the_beta(
    field: str, value: Any, beta: str
) -> None:
    app = app_with()
    other = "events-sse-2025-07-24,field-basis-2025-11-25"

    async def go() -> None:
        async with client(app) as c:
            for headers in (None, {"parallel-beta": other}):
                error = assert_error(await create(c, body(**{field: value}), headers), 422)
                assert field in error["message"] and beta in error["message"]
                assert error["detail"]["errors"][0]["loc"] == ["body", field]
                _, r = await add(c, [body(), body(**{field: value})], headers)
                error = assert_error(r, 422)  # a service check, not request validation: an ErrorResponse
                assert beta in error["message"]
                assert error["detail"]["errors"][0]["loc"] == ["body", "inputs", 1, field]
            assert app.stats()["runs_created"] == 0
            # Comma-separated, spaces allowed, unknown values allowed, or one value per header line.
            for headers in (
                {"parallel-beta": f"{other}, {beta}"},
                {"parallel-beta": f"some-future-beta,{beta}"},
                [("parallel-beta", other), ("parallel-beta", beta)],
            ):
                assert (await create(c, body(**{field: value}), headers)).status_code == 202
                _, r = await add(c, [body(**{field: value})], headers)
                assert r.status_code == 200
            # Null is no use of the field: no beta needed.
            assert (await create(c, body(**{field: None}))).status_code == 202

    run(go())


def test_a_beta_header_is_accepted_on_every_endpoint() -> None:
    app = app_with()
    headers = {"parallel-beta": "events-sse-2025-07-24,field-basis-2025-11-25,anything-else"}

    async def go() -> None:
        async with client(app) as c:
            rid = (await create(c, body(), headers)).json()["run_id"]
            assert (
                await c.get(f"/v1/tasks/runs/{rid}/result", params={"timeout": 10}, headers=headers)
            ).status_code == 200
            assert (await c.get(f"/v1/tasks/runs/{rid}/events", headers=headers)).status_code == 200
            gid, r = await add(c, [body()], headers)
            assert r.status_code == 200
            assert (await c.get(f"/v1/tasks/groups/{gid}", headers=headers)).status_code == 200

    run(go())


# --------------------------------------------------------------------------------------------------
# previous_interaction_id must name an interaction the emulator handed out


def test_an_unknown_previous_interaction_is_a_422_naming_the_field_and_creates_nothing() -> None:
    elsewhere, app = app_with(), app_with()

    async def go() -> None:
        async with client(elsewhere) as c:
            foreign = (await create(c, body())).json()["interaction_id"]  # handed out by another emulator
        async with client(app) as c:
            for previous in (foreign, "trun_" + "0" * 32, "not-an-id"):
                error = assert_error(await create(c, body(previous_interaction_id=previous)), 422)
                assert "previous_interaction_id" in error["message"] and previous in error["message"]
                assert error["detail"]["errors"][0]["loc"] == ["body", "previous_interaction_id"]
                gid, r = await add(c, [body(), body(previous_interaction_id=previous)])
                error = assert_error(r, 422)
                assert "previous_interaction_id" in error["message"]
                assert error["detail"]["errors"][0]["loc"] == ["body", "inputs", 1, "previous_interaction_id"]
                assert (await c.get(f"/v1/tasks/groups/{gid}")).json()["status"]["num_task_runs"] == 0
        assert app.stats()["runs_created"] == 0

    run(go())


# --------------------------------------------------------------------------------------------------
# Follow-ups say which interaction they continue


def test_a_follow_up_continues_the_interaction_it_names_and_its_basis_says_so() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            first = (await create(c, body("core", task_spec=ARRAYS))).json()
            assert first["interaction_id"] == first["run_id"]
            # An interaction can be followed up before it ends, from a single run or in a group.
            follow = body("core", task_spec=ARRAYS, previous_interaction_id=first["interaction_id"])
            r = await create(c, follow)
            assert (
                r.status_code == 202 and r.json()["interaction_id"] == r.json()["run_id"] != first["run_id"]
            )
            chained = (await wait_done(c, r.json()["run_id"]))["output"]
            lead = f"Following up on interaction {first['interaction_id']}:"
            assert chained["basis"] and all(b["reasoning"].startswith(lead) for b in chained["basis"])
            assert chained == expected_output(follow)
            plain = (await wait_done(c, first["run_id"]))["output"]
            assert chained["content"] == plain["content"]  # the same research, followed up
            assert not any(b["reasoning"].startswith("Following up") for b in plain["basis"])
            # A group run's interaction chains too, into another group; the answer is deterministic.
            _, r = await add(c, [follow, follow])
            a, b = r.json()["run_ids"]
            group_follow = body("base", previous_interaction_id=a)
            _, r = await add(c, [group_follow])
            assert r.status_code == 200
            again = (await wait_done(c, r.json()["run_ids"][0]))["output"]
            assert again == expected_output(group_follow)
            assert again["basis"][0]["reasoning"].startswith(f"Following up on interaction {a}:")
            assert (await wait_done(c, a))["output"] == (await wait_done(c, b))["output"] == chained

    run(go())


def test_a_follow_up_of_a_sized_answer_keeps_its_size() -> None:
    app = app_with(basis_bytes=3_000)

    async def go() -> None:
        async with client(app) as c:
            rid = (await create(c, body("core", task_spec=SPEC))).json()["run_id"]
            follow = body("core", task_spec=SPEC, previous_interaction_id=rid)
            output = (await wait_done(c, (await create(c, follow)).json()["run_id"]))["output"]
            assert output == expected_output(follow, basis_bytes=3_000)
            for entry in output["basis"]:
                assert entry["reasoning"].startswith(f"Following up on interaction {rid}:")
                assert 2_400 <= size(entry) <= 3_600

    run(go())


# --------------------------------------------------------------------------------------------------
# source_policy in citations


EXCLUDED = ["example.com", ".org", ".net", ".io", ".com", *(f".example{k}" for k in range(195))]
POLICIES: dict[str, tuple[dict[str, Any], Any]] = {
    # (source_policy, the check each citation must pass)
    "one domain": ({"include_domains": ["acme.com"]}, lambda u: on(u, "acme.com")),
    "a subdomain": ({"include_domains": ["investors.acme.com"]}, lambda u: on(u, "investors.acme.com")),
    "a domain and path": ({"include_domains": ["docs.python.org/3/"]}, lambda u: on(u, "docs.python.org/3")),
    "an extension": ({"include_domains": [".gov"]}, lambda u: on(u, ".gov")),
    "several, exclusions ignored": (
        {"include_domains": ["acme.com", ".co.uk"], "exclude_domains": ["acme.com"]},
        lambda u: on(u, "acme.com") or on(u, ".co.uk"),
    ),
    "the compact host and two sources excluded": (
        {"exclude_domains": ["example.com", "wikipedia.org", "crunchbase.com"]},
        lambda u: not any(on(u, e) for e in ("example.com", "wikipedia.org", "crunchbase.com")),
    ),
    "common hosts excluded": (
        {"exclude_domains": [".com", "wikipedia.org", "linkedin.com/company"]},
        lambda u: not any(on(u, e) for e in (".com", "wikipedia.org", "linkedin.com/company")),
    ),
    "200 exclusions": ({"exclude_domains": EXCLUDED}, lambda u: not any(on(u, e) for e in EXCLUDED)),
}


@pytest.mark.parametrize("basis_bytes", [None, 4_000])
@pytest.mark.parametrize("case", sorted(POLICIES))
def test_every_citation_keeps_to_the_runs_source_policy(case: str, basis_bytes: int | None) -> None:
    policy, allowed = POLICIES[case]
    app = app_with(basis_bytes=basis_bytes)
    requests = [
        body("core", task_spec=ARRAYS, source_policy=policy),
        body("lite", task_spec=ARRAYS, source_policy=policy),
        {"input": "What does Acme Corp make?", "processor": "base", "source_policy": policy},
        body("pro", source_policy=policy),  # auto schema: an array field too
    ]

    async def go() -> None:
        async with client(app) as c:
            singles = [(await create(c, r)).json()["run_id"] for r in requests]
            gid, added = await add(c, requests)
            for request, rid in zip(requests, singles, strict=True):
                output = (await wait_done(c, rid))["output"]
                assert output == expected_output(request, basis_bytes=basis_bytes)
                urls = citations(output)
                assert urls and all(allowed(u) for u in urls), [u for u in urls if not allowed(u)]
                assert all(u.startswith("https://") for u in urls)
            await asyncio.gather(*(wait_done(c, rid) for rid in added.json()["run_ids"]))
            listed = sse(
                (await c.get(f"/v1/tasks/groups/{gid}/runs", params={"include_output": "true"})).text
            )
            for request, event in zip(requests, listed, strict=True):
                assert event["output"] == expected_output(request, basis_bytes=basis_bytes)

    run(go())


def test_without_a_policy_citations_are_as_before_and_a_policy_changes_only_citations() -> None:
    app = app_with()

    async def go() -> None:
        async with client(app) as c:
            free = (await wait_done(c, (await create(c, body("core", task_spec=SPEC))).json()["run_id"]))[
                "output"
            ]
            assert any(on(u, "example.com") for u in citations(free))  # the compact basis's own host
            bound_request = body("core", task_spec=SPEC, source_policy={"include_domains": ["acme.com"]})
            bound = (await wait_done(c, (await create(c, bound_request)).json()["run_id"]))["output"]
            assert bound["content"] == free["content"]
            assert [b["reasoning"] for b in bound["basis"]] == [b["reasoning"] for b in free["basis"]]
            assert citations(bound) != citations(free) and all(on(u, "acme.com") for u in citations(bound))
            dated = body("core", task_spec=SPEC, source_policy={"after_date": "2024-01-01"})
            assert (await wait_done(c, (await create(c, dated)).json()["run_id"]))["output"] == free

    run(go())
