"""`run_options=` and `beta=`: the Task API's per-run fields, checked before anything is sent, rendered
per row from `{column}` templates, on the wire with each run, and part of each row's content key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from enrich import Emulator, EmulatorConfig, JobStats, UsageError, create_app
from enrich._engine import aenrich, plan, spool
from enrich._inputs import keys_and_sizes, row_keys, text_keys_and_sizes
from enrich._run_options import check_run_options

OUT = {"ceo": "Name of the CEO"}


def companies(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "company": [f"Company {i}" for i in range(n)],
            "domain": [f"c{i}.example.com" for i in range(n)],
            "country": ["US", "DE", "JP"] * (n // 3) + ["FR"] * (n % 3),
        }
    )


class Recording(httpx.AsyncBaseTransport):
    """The emulator in-process, with every request's headers and JSON body kept."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.requests: list[tuple[str, str, httpx.Headers, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, request.headers, body))
        return await self.inner.handle_async_request(request)


def run_job(transport: httpx.AsyncBaseTransport, data: Any, **kw: Any) -> Any:
    kw.setdefault("api_key", "test-key")
    kw.setdefault("progress", False)
    kw.setdefault("processor", "lite")
    return asyncio.run(aenrich(data, OUT, base_url="http://emulator", transport=transport, **kw))


def sent_runs(rec: Recording) -> list[dict[str, Any]]:
    """Every TaskRunInput sent to create runs (add-runs and single creates)."""
    out = []
    for method, path, _, body in rec.requests:
        if method == "POST" and path.endswith("/runs") and body is not None:
            out.extend(body.get("inputs", [body]))
    return out


# --- checked before anything is sent ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source_polcy": {}}, "unknown field 'source_polcy'"),
        ({"processor": "base"}, "processor is set by enrich itself"),
        ({"source_policy": {"include_domains": "acme.com"}}, "include_domains must be a list"),
        ({"source_policy": {"include_domans": []}}, "unknown key 'include_domans'"),
        ({"source_policy": {"include_domains": [f"d{i}.com" for i in range(201)]}}, "at most 200"),
        (
            {
                "source_policy": {
                    "include_domains": [f"d{i}.com" for i in range(150)],
                    "exclude_domains": [f"e{i}.com" for i in range(51)],
                }
            },
            "201 domains",
        ),
        ({"source_policy": {"after_date": "2024-02-30"}}, "not a calendar date"),
        ({"source_policy": {"after_date": "01/02/2024"}}, "YYYY-MM-DD"),
        ({"source_policy": {"include_domains": ["https://acme.com/"]}}, "is a URL"),
        ({"advanced_settings": {"location": "us"}}, "upper case ('US')"),
        ({"advanced_settings": {"location": "XX"}}, "ISO 3166-1"),
        ({"mcp_servers": [{"name": "tools"}]}, "needs 'url'"),
        ({"mcp_servers": [{"name": "t", "url": "ftp://x"}]}, "not an http(s) URL"),
        ({"webhook": {"event_types": ["task_run.status"]}}, "needs 'url'"),
        ({"webhook": {"url": "https://h.example", "event_types": ["done"]}}, "not one of 'task_run.status'"),
        ({"webhook": {"url": "https://h.example"}}, "needs 'event_types'"),
        ({"mcp_servers": [{"name": f"s{i}", "url": "https://m.example"} for i in range(11)]}, "at most 10"),
        ({"mcp_servers": [{"name": "s", "url": "https://m.example"}] * 2}, "its own name"),
        ({"source_policy": {"exclude_domains": ["localhost"]}}, "one label"),
        ({"source_policy": {"exclude_domains": ["acme.com:8080"]}}, "no port"),
        ({"advanced_settings": {"data_sources": {"free": ["x"]}}}, "standard processors only"),
        ({"enable_events": "yes"}, "true or false"),
        ({"previous_interaction_id": ""}, "is empty"),
        ({"source_policy": {"include_domains": ["{domian}"]}}, "run_options field column 'domian' not found"),
        ({"previous_interaction_id": "{bad"}, "literal braces"),
        ("source_policy", "must be a mapping"),
    ],
)
def test_a_bad_option_is_refused_in_one_line_before_anything_is_sent(options: Any, message: str) -> None:
    rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    with pytest.raises(UsageError, match="run_options") as info:
        run_job(rec, companies(3), run_options=options, checkpoint=False, processor="lite-fast")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert rec.requests == []


def test_a_bad_beta_is_refused_and_any_other_name_is_kept() -> None:
    with pytest.raises(UsageError, match="not a beta name"):
        check_run_options(None, "two words")
    options = check_run_options(None, ["some-future-beta", "field-basis-2025-11-25, events-sse-2025-07-24"])
    assert options is not None
    assert options.beta == ("events-sse-2025-07-24", "field-basis-2025-11-25", "some-future-beta")
    assert check_run_options({"source_policy": None}, None) is None  # (None: not set)


def test_a_rendered_value_that_fails_names_its_row_and_nothing_is_sent() -> None:
    df = companies(6).with_columns(
        pl.when(pl.int_range(pl.len()) == 4)
        .then(pl.lit("https://c4.example.com"))
        .otherwise("domain")
        .alias("domain")
    )
    rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    with pytest.raises(UsageError, match=r"include_domains\[0\] \(from '\{domain\}'\) at row 4: .* is a URL"):
        run_job(rec, df, run_options={"source_policy": {"include_domains": ["{domain}"]}}, checkpoint=False)
    assert rec.requests == []
    df = companies(3).with_columns(pl.lit(None, dtype=pl.String).alias("domain"))
    with pytest.raises(UsageError, match="at row 0: is empty"):
        plan(df, OUT, run_options={"source_policy": {"include_domains": ["{domain}"]}}, checkpoint=False)


# --- on the wire, per row ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["group", "runs"])
def test_each_row_is_sent_with_its_own_rendered_options(mode: str) -> None:
    df = companies(7)
    options = {
        "source_policy": {"include_domains": ["{domain}", "sec.gov"], "after_date": "2024-01-01"},
        "advanced_settings": {"location": "{country}"},
        "enable_events": False,
        "memory_scope_key": "team-{country}",
    }
    rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    out = run_job(rec, df, run_options=options, checkpoint=False, mode=mode)
    assert out["_status"].to_list() == ["completed"] * 7
    runs = sent_runs(rec)
    assert len(runs) == 7
    by_company = {r["input"]["company"]: r for r in runs}
    for row in df.iter_rows(named=True):
        sent = by_company[row["company"]]
        assert sent["source_policy"] == {
            "include_domains": [row["domain"], "sec.gov"],
            "after_date": "2024-01-01",
        }
        assert sent["advanced_settings"] == {"location": row["country"]}
        assert sent["enable_events"] is False
        assert sent["memory_scope_key"] == f"team-{row['country']}"
        assert "parallel-beta" not in sent  # (the beta values travel in the header, not the body)
    assert all("parallel-beta" not in headers for _, _, headers, _ in rec.requests)


def test_the_emulator_keeps_each_runs_options_as_sent() -> None:
    """Over HTTP, against the emulator as a server: the run's input as the service stored it."""
    df = companies(4)
    with Emulator(latency=0.01) as emu:
        out = asyncio.run(
            aenrich(
                df,
                OUT,
                processor="lite",
                api_key=emu.api_key,
                base_url=emu.url,
                progress=False,
                checkpoint=False,
                run_options={"source_policy": {"include_domains": ["{domain}"]}},
            )
        )
        for row in out.iter_rows(named=True):
            stored = httpx.get(
                f"{emu.url}/v1/tasks/runs/{row['_run_id']}/input", headers={"x-api-key": emu.api_key}
            ).json()
            assert stored["source_policy"]["include_domains"] == [row["domain"]]


def test_beta_values_go_in_the_header_with_those_the_fields_need() -> None:
    rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    options = {"webhook": {"url": "https://hooks.example.com/{country}", "event_types": ["task_run.status"]}}
    run_job(rec, companies(3), run_options=options, beta="field-basis-2025-11-25", checkpoint=False)
    posts = [h for m, p, h, _ in rec.requests if m == "POST" and p.endswith("/runs")]
    assert posts and all(h["parallel-beta"] == "field-basis-2025-11-25,webhook-2025-08-12" for h in posts)
    hooks = sorted(r["webhook"]["url"] for r in sent_runs(rec))
    assert hooks == [
        "https://hooks.example.com/DE",
        "https://hooks.example.com/JP",
        "https://hooks.example.com/US",
    ]


# --- part of the content key --------------------------------------------------------------------------


def test_options_are_part_of_the_key_and_no_options_keep_the_old_keys() -> None:
    spec = {"output_schema": {"type": "text", "description": "CEO"}}
    inputs = [{"company": "Acme"}]
    plain = row_keys(inputs, spec, "base")
    assert keys_and_sizes(inputs, spec, "base", options=None)[0] == plain
    one = keys_and_sizes(inputs, spec, "base", options='{"source_policy":{"include_domains":["acme.com"]}}')[
        0
    ]
    other = keys_and_sizes(
        inputs, spec, "base", options='{"source_policy":{"include_domains":["acme.org"]}}'
    )[0]
    assert len({plain[0], one[0], other[0]}) == 3
    # The polars path (text columns) and the per-row path agree, options included, on every row.
    df = pl.DataFrame({"company": [f"c{i}" for i in range(5_000)]})
    texts = pl.Series([f'{{"x":"{i % 3}"}}' for i in range(5_000)])
    fast = text_keys_and_sizes(df, ["company"], spec, "base", options=texts)
    assert fast is not None
    slow = keys_and_sizes(df.to_dicts(), spec, "base", options=texts)[0]
    assert list(fast[0]) == slow
    assert slow[7] == keys_and_sizes([{"company": "c7"}], spec, "base", options='{"x":"1"}')[0][0]


def test_changed_options_are_new_runs_and_the_same_options_resume(tmp_path: Path) -> None:
    app = create_app(EmulatorConfig(latency=0.01))
    df = companies(6)
    cp = tmp_path / "job.enrich"
    first = {"source_policy": {"include_domains": ["{domain}"]}}
    run_job(httpx.ASGITransport(app=app), df, run_options=first, checkpoint=cp)
    assert app.stats()["runs_created"] == 6
    stats = JobStats()
    again = run_job(httpx.ASGITransport(app=app), df, run_options=first, checkpoint=cp, stats=stats)
    assert app.stats()["runs_created"] == 6 and stats.requests == 0  # resumed: nothing sent
    assert again["_status"].to_list() == ["completed"] * 6
    # Another policy for two rows only (a template on a column changed there): those two are new runs.
    changed = df.with_columns(
        pl.when(pl.int_range(pl.len()) < 2).then(pl.lit("example.org")).otherwise("domain").alias("domain")
    )
    out = run_job(httpx.ASGITransport(app=app), changed, run_options=first, checkpoint=cp)
    assert app.stats()["runs_created"] == 8
    assert out["_run_id"][2:].to_list() == again["_run_id"][2:].to_list()
    assert not set(out["_run_id"][:2].to_list()) & set(again["_run_id"].to_list())
    # A beta added to the same options: every row's key changes.
    run_job(httpx.ASGITransport(app=app), changed, run_options=first, beta="x-beta", checkpoint=cp)
    assert app.stats()["runs_created"] == 14


def test_a_lazy_table_read_in_batches_sends_the_same_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "STREAM_ROWS", 10)
    monkeypatch.setattr(spool, "BATCH_ROWS", 4)
    df = pl.concat([companies(30), companies(30).head(5)])
    options = {
        "source_policy": {"include_domains": ["{domain}"]},
        "advanced_settings": {"location": "{country}"},
    }
    whole_rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    whole = run_job(whole_rec, df, run_options=options, checkpoint=False)
    lazy_rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    lazy = run_job(lazy_rec, df.lazy(), run_options=options, checkpoint=False, _shard_rows=8)
    assert lazy.drop("_run_id", "_interaction_id").equals(whole.drop("_run_id", "_interaction_id"))

    def by_company(rec: Recording) -> dict[str, Any]:
        return {
            r["input"]["company"]: {k: v for k, v in r.items() if k != "metadata"} for r in sent_runs(rec)
        }

    assert len(sent_runs(lazy_rec)) == 30
    assert by_company(lazy_rec) == by_company(whole_rec)


# --- the CLI ----------------------------------------------------------------------------------------------


def test_the_cli_sends_the_shortcuts_and_the_file_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from enrich._cli import main

    src = tmp_path / "in.csv"
    companies(4).write_csv(src)
    (tmp_path / "opts.json").write_text(json.dumps({"enable_events": False, "memory_scope_key": "{company}"}))
    out = tmp_path / "out.parquet"
    with Emulator(latency=0.01) as emu:
        monkeypatch.setenv("PARALLEL_API_KEY", emu.api_key)
        args = [
            "run",
            str(src),
            "-o",
            str(out),
            "--base-url",
            emu.url,
            "--processor",
            "lite",
            "--no-progress",
        ]
        args += ["--field", "ceo=Name of the CEO", "--run-options", str(tmp_path / "opts.json")]
        args += [
            "--include-domains",
            "{domain}, sec.gov",
            "--after-date",
            "2024-01-31",
            "--location",
            "{country}",
        ]
        args += ["--beta", "field-basis-2025-11-25"]
        assert main(args) == 0
        result = pl.read_parquet(out)
        assert result["_status"].to_list() == ["completed"] * 4
        for row in result.iter_rows(named=True):
            stored = httpx.get(
                f"{emu.url}/v1/tasks/runs/{row['_run_id']}/input", headers={"x-api-key": emu.api_key}
            ).json()
            assert stored["source_policy"] == {
                "include_domains": [row["domain"], "sec.gov"],
                "after_date": "2024-01-31",
            }
            assert stored["advanced_settings"] == {"location": row["country"]}
            assert stored["memory_scope_key"] == row["company"]
            assert stored["enable_events"] is False
        # A flag that repeats a field of the file, and a bad value: one line each, nothing sent.
        (tmp_path / "both.json").write_text(json.dumps({"source_policy": {"after_date": "2024-01-01"}}))
        before = httpx.get(f"{emu.url}/_emulator/stats").json()["runs_created"]
        capsys.readouterr()
        bad = [
            *args[:6],
            "--field",
            "ceo=CEO",
            "--run-options",
            str(tmp_path / "both.json"),
            "--after-date",
            "2024-02-01",
        ]
        assert main(bad) == 2
        assert "--after-date and --run-options both set source_policy.after_date" in capsys.readouterr().err
        assert main([*args[:6], "--field", "ceo=CEO", "--location", "Germany"]) == 2
        err = capsys.readouterr().err
        assert "advanced_settings.location" in err and err.count("\n") == 1
        assert httpx.get(f"{emu.url}/_emulator/stats").json()["runs_created"] == before


def test_a_follow_up_refuses_rows_whose_earlier_run_did_not_complete() -> None:
    """Those rows have an interaction id (failed and cancelled runs have one) but no research to build on,
    and a follow-up on them would be paid for all the same: refused, with the count and the first row."""
    rec = Recording(create_app(EmulatorConfig(latency=0.01)))
    df = companies(4).with_columns(
        pl.Series("_status", ["completed", "failed", "completed", "cancelled"]),
        pl.Series("_interaction_id", [f"trun_{i}" for i in range(4)]),
    )
    with pytest.raises(UsageError, match=r"2 rows' earlier runs did not complete \(first: row 1, failed\)"):
        run_job(rec, df, run_options={"previous_interaction_id": "{_interaction_id}"}, checkpoint=False)
    assert rec.requests == []


def test_the_cli_refuses_what_an_emulator_session_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each --emulator run has an emulator of its own: new runs cannot join an earlier session's task
    group, and a follow-up cannot name its interactions. Both are refused before anything is recorded,
    and the first command still works afterwards."""
    from enrich._cli import main

    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    companies(3).write_csv(src)
    base = ["run", str(src), "-o", str(out), "--field", "ceo=CEO", "--processor", "lite", "--emulator"]
    assert main([*base, "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*base, "--no-progress", "--location", "US"]) == 2
    err = capsys.readouterr().err
    assert "earlier --emulator session" in err and "3 new runs" in err and err.count("\n") == 1
    assert main([*base, "--no-progress"]) == 0  # nothing was recorded: the same command resumes
    (tmp_path / "chain.json").write_text('{"previous_interaction_id": "{_interaction_id}"}')
    follow = [
        "run",
        str(out),
        "-o",
        str(tmp_path / "f.parquet"),
        "--field",
        "since:integer=Year",
        "--emulator",
    ]
    assert main([*follow, "--run-options", str(tmp_path / "chain.json"), "--no-progress"]) == 2
    assert "enrich emulate" in capsys.readouterr().err
