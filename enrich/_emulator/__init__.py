"""A local emulator of Parallel's Task API (../shared/task-api.md), strict where the real service is.

It serves the run and group endpoints with the real wire shapes, status codes, limits and SSE framing,
so a client that works against it works against `https://api.parallel.ai`. Outputs are synthetic and
deterministic (`enrich._emulator.synth`); their basis is compact unless `basis_bytes` makes it the size of
real answers (several KB per field). Citations keep to each run's `source_policy`, a follow-up run
(`previous_interaction_id`) says in its basis which interaction it continues, and an array field gets
one basis entry per element (`field.0`, ...), as SDK 1.3.7 returns them. On top of the API it can
inject what production does to a client: failed runs (`failure_rate`), rate limits (429 +
Retry-After), exhausted credit (402), and transport faults (HTML 5xx, dropped connections, slow
answers, creates whose answer is lost although the runs exist, and 503s marked `x-should-retry:
false`, the `no_retry` kind, drawn only when `faults` names it). It can also be unkind the way real
services and their proxies are, each behaviour off by default (`EmulatorConfig` says how): runs that
end `cancelled` after a spell of `cancelling` (`cancel_rate`) or stop at `action_required`
(`action_required_rate`), 429s and injected 5xx marked `x-should-retry: true`
(`should_retry_header`), creates committed seconds after a 504 or a hung-up client
(`late_commit_seconds`), SSE streams closed on the service's own timer (`stream_close_seconds`), a
quota the client was not told, as a token bucket with a small burst (`rate_burst`, `run_burst`), 429s
without Retry-After (`retry_after_header`), interaction ids that are not the run ids
(`own_interaction_ids`), and, by default, ids that differ across restarts (`seed`).

Three ways to run it:

    app = create_app(EmulatorConfig(latency=0.05))     # a plain ASGI app
    httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emulator")

    with Emulator(latency=0.05) as emu:                  # uvicorn on 127.0.0.1:<free port>, own thread
        httpx.get(emu.url + "/v1/tasks/runs/...", headers={"x-api-key": emu.api_key})

    serve(EmulatorConfig(), port=8787)                   # blocking, for `enrich emulate`

Runs move queued → running → completed|failed (or → cancelling → cancelled, or queued →
action_required, where they stay) on timestamps drawn at creation; state is derived from the clock (one
heap of pending transitions, no timer per run), so a million runs cost memory, not CPU.
Blocking calls (`/result`, the event streams) wait on asyncio timers and futures, never on polling.

`GET /_emulator/stats` (no key needed, never faulted) and `app.stats()` report counters for tests:
requests by route, 429s (and when: seconds after the first request), faults by kind, `late_commits`
(and `late_commits_pending`), `streams_closed_early`, runs and groups created, `duplicate_runs` (runs
created beyond the distinct (input, task_spec, processor) triples) and runs by status (all seven
statuses). No client may need it.

Where the sources leave a question open (task-api.md, "Open questions"), the emulator takes the stricter
reading, so a client that passes here also passes there:

- `/result?timeout=` must be an integer in [0, 3600]; anything else is 422 (not a silent clamp).
- 429 carries `Retry-After` (float seconds), never `retry-after-ms`, and no `x-should-retry` unless
  `should_retry_header` (or the `no_retry` fault's `false`); the windows slide; GETs count toward the
  request limit; an add of N inputs is one request and N runs. Options take the other readings: no
  Retry-After at all, and token buckets whose burst may be below one full add.
- A create or add either happens before its answer or not at all, unless `late_commit_seconds` makes
  it land later than a gateway's 504 or a client's hang-up (a retry then makes duplicates).
- No concurrency cap besides credit. `action_required`, `cancelling` and `cancelled` are produced only
  when `action_required_rate` or `cancel_rate` asks for them (no endpoint cancels a run). A cancelled
  run has no error; `action_required` is not active and never changes; `/result` of either is 404
  "Run failed or run id not found" at once, as for a failed run; both end a run's events stream and
  are a group's non-active events.
- No task spec means `auto`: JSON with `output_schema` filled on `pro` and above, text below `pro`.
- Group `GET …/runs` lists every run, active ones included, with its current status.
- Group create and add-runs answer 200, single-run create 202; `/v1` and `/v1beta` group paths both work.
- SSE never sends `id:` or `retry:` lines; only the group events stream sends `: keepalive` comments.
  Streams last their documented lifetimes (run events 570 s, group events 1 h) unless
  `stream_close_seconds` ends them sooner, as a proxy may.
- Run, group and ref ids are random per emulator unless `seed` is given, so a restarted emulator does
  not hand out the ids of the last one.
- Errors use ErrorResponse, except the group endpoints' 422 (FastAPI shape), unknown routes
  (`{"detail": "Not Found"}`) and injected 5xx (HTML). Results stay fetchable for the app's lifetime.
- Unknown fields in a TaskRunInput, an empty input string, null metadata values, a body that is not
  `application/json`, and query booleans other than `true`/`false` are all 422.
- Per-run fields (task-api.md §2.1) are checked to their stated limits, reading the loose ones
  strictly: at most 200 domain entries in include + exclude together, each a domain, `domain/path` or
  `.tld` with no scheme, port, query or fragment; `after_date` a real YYYY-MM-DD date;
  `location` an assigned ISO 3166-1 alpha-2 code in upper case ("GB", not "UK" or "gb");
  `data_sources` names non-empty, not on a `-fast` processor, none named like an MCP server; at most
  10 MCP servers (the docs' limit), with distinct names and an http(s) URL; a webhook with an http(s)
  URL and `event_types` given (the docs mark it required), only `task_run.status`. Shape errors are
  request validation (FastAPI shape on group endpoints).
- The service's own checks answer 422 as an ErrorResponse whose message names the problem, on group
  endpoints too: `mcp_servers` without `parallel-beta: mcp-server-2025-07-17`, `webhook` without
  `webhook-2025-08-12` (the header is comma-separated, any value allowed, on any endpoint), and a
  `previous_interaction_id` that is not an interaction id this emulator handed out (an interaction of
  any status may be followed up; with `own_interaction_ids`, a run id is not one). Events need no
  `events-sse-2025-07-24`, and the per-element basis comes with or without `field-basis-2025-11-25`,
  as in SDK 1.3.7. Nothing of a refused request is created.
- A source policy shapes citations only: with `include_domains` every citation is on one of its
  entries, with only `exclude_domains` none is on an excluded one. `after_date`, `location`,
  `data_sources`, MCP servers, `memory_scope_key` and `enable_events` change nothing in the answer;
  no webhook is ever called and no MCP tool either (outputs carry no `mcp_tool_calls`).
- `interaction_id` equals `run_id`, as the docs' examples show, unless `own_interaction_ids` gives
  every run an interaction id of its own (`int_<32 hex>`, seeded like the run ids): the service does
  not promise the two are equal, so a client can be tested for never putting one in place of the other.

The package, one module per concept:

- `config.py`: `EmulatorConfig`, every option with its default and its checks, and the seeds of the draws.
- `state.py`: `EmulatorState`: runs, groups, credit, the heap of pending transitions, and the wire shapes
  of runs and groups.
- `validate.py`: the checks of request bodies (TaskRunInput, task specs, output JSON schemas), the
  documented limits they enforce, and the beta each beta field needs.
- `sources.py`: source policies: the syntax of domain entries, which URLs a policy allows, and where a
  citation it does not allow is moved.
- `quota.py`: the per-key rate budgets: a sliding window (`_Window`) or a token bucket (`_Bucket`).
- `wire.py`: HTTP plumbing: request and response records, the route table, SSE framing, error messages,
  the HTML 5xx pages, compact JSON.
- `app.py`: `EmulatorApp`, the ASGI app (routing, auth, rate limits, faults, late commits, the handlers
  and their event streams), and `create_app()`.
- `server.py`: `Emulator` (uvicorn on 127.0.0.1 in a thread) and `serve` (blocking, for `enrich emulate`).
- `synth.py`: the synthetic answers (content and basis), deterministic per (input, task spec, processor
  tier, `basis_bytes`, and for the basis the source policy and `previous_interaction_id`);
  `expected_output()` tells a test what a row's answer is.
"""

from __future__ import annotations

from enrich._emulator.app import EmulatorApp, create_app
from enrich._emulator.config import DEFAULT_FAULTS, FAULT_KINDS, EmulatorConfig
from enrich._emulator.quota import _Bucket as _Bucket
from enrich._emulator.quota import _budget as _budget
from enrich._emulator.quota import _Window as _Window
from enrich._emulator.server import DEMO_API_KEY, Emulator, serve
from enrich._emulator.state import EmulatorState
from enrich._emulator.wire import STATS_PATH

__all__ = [
    "DEFAULT_FAULTS",
    "DEMO_API_KEY",
    "FAULT_KINDS",
    "STATS_PATH",
    "Emulator",
    "EmulatorApp",
    "EmulatorConfig",
    "EmulatorState",
    "create_app",
    "serve",
]
