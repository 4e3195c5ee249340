"""Per-run options (`run_options=`, `beta=`): the Task API's fields of a run besides its input.

A run may say where to look (`source_policy`), from where (`advanced_settings.location`), what to build
on (`previous_interaction_id`), which tools to use (`mcp_servers`), and how to report (`enable_events`,
`webhook`, `memory_scope_key`) (task-api.md §2.1; SDK 1.3.7 `TaskRunCreateParams`). `check_run_options`
refuses, before anything is sent, every field the API does not know, every value of the wrong shape,
and the documented limits (200 source-policy domains, `YYYY-MM-DD` dates, ISO 3166-1 country codes,
http(s) URLs), each with one line naming the place: `run_options source_policy.after_date: ...`.

Any string in the options may be a `{column}` template, rendered per row as `prompt=` is
(`{"source_policy": {"include_domains": ["{website}"]}}` keeps each row to its own site). A rendered
value is checked like a literal one, and a row whose value fails is named: nothing is sent.

The options a row is sent with are part of its content key (`_inputs.keys_and_sizes`): the canonical
JSON of its rendered options, with the `parallel-beta` values under the key `"parallel-beta"`. A
changed policy (or beta) is a new run, never a cached answer of another one. Without options the key
is what it always was, so checkpoints written before options existed keep their runs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from ._exceptions import UsageError

__all__ = ["KNOWN_BETAS", "RUN_OPTION_FIELDS", "RunOptions", "check_run_options"]

#: The per-run fields of a TaskRunInput besides `input`, `processor`, `task_spec` and `metadata`.
RUN_OPTION_FIELDS = (
    "advanced_settings",
    "enable_events",
    "mcp_servers",
    "memory_scope_key",
    "previous_interaction_id",
    "source_policy",
    "webhook",
)

#: `parallel-beta` values the API documents (SDK 1.3.7 `ParallelBeta`); any other string is sent as given.
KNOWN_BETAS = (
    "events-sse-2025-07-24",
    "field-basis-2025-11-25",
    "findall-2025-09-15",
    "mcp-server-2025-07-17",
    "search-extract-2025-10-10",
    "webhook-2025-08-12",
)

#: Fields that work only with a beta: the beta is added to the header when the field is used.
_NEEDS_BETA = {"mcp_servers": "mcp-server-2025-07-17", "webhook": "webhook-2025-08-12"}

MAX_DOMAINS = 200  # include_domains and exclude_domains together (task-api.md §2.1)
MAX_MCP_SERVERS = 10  # docs.parallel.ai/task-api/mcp-tool-call: "up to 10 MCP servers per request"

#: The key under which the beta values enter a row's content key (never a TaskRunInput field).
BETA_KEY = "parallel-beta"

# ISO 3166-1 alpha-2, the officially assigned codes.
_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT
    BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH
    ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT
    HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS
    LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI
    NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG
    SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG
    UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW""".split()  # noqa: SIM905
)

_Check = Callable[[str], "str | None"]  # a string value's problem, or None


def _text(value: str) -> str | None:
    return "is empty" if not value.strip() else None


_LABEL = re.compile(r"[^\W_](?:[^\W_]|-)*")


def _domain(value: str) -> str | None:
    if not value.strip():
        return "is empty (a domain such as example.com, a path such as example.com/blog, or a .tld)"
    if "://" in value:
        return (
            f"{value!r} is a URL; give the domain alone (example.com), e.g. a column made with "
            "pl.col(...).str.replace(r'^https?://(www\\.)?', '').str.strip_chars_end('/')"
        )
    host, slash, _ = value.partition("/")
    extension = host.startswith(".")
    labels = (host[1:] if extension else host).split(".")
    if any(c.isspace() for c in value) or "?" in value or "#" in value or ":" in host or "@" in host:
        return f"{value!r} is not a domain (example.com, example.com/blog, or .tld: no port, query or user)"
    if not all(_LABEL.fullmatch(label) for label in labels):
        return f"{value!r} is not a domain (example.com, example.com/blog, or .tld)"
    if extension and slash:
        return f"{value!r}: a domain extension such as .gov takes no path"
    if not extension and len(labels) < 2:
        return f"{value!r} has one label; write a domain (example.com) or an extension (.gov)"
    return None


def _date(value: str) -> str | None:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return f"{value!r} is not a date written YYYY-MM-DD"
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return f"{value!r} is not a calendar date"
    return None


def _country(value: str) -> str | None:
    if value.upper() in _COUNTRIES and value != value.upper():
        return f"{value!r}: write the country code in upper case ({value.upper()!r})"
    if value not in _COUNTRIES:
        return f"{value!r} is not an ISO 3166-1 alpha-2 country code (such as 'US', 'DE', 'JP')"
    return None


def _url(value: str) -> str | None:
    if not re.match(r"https?://[^/\s]+", value) or any(c.isspace() for c in value):
        return f"{value!r} is not an http(s) URL"
    return None


def _one_of(*allowed: str) -> _Check:
    def check(value: str) -> str | None:
        return None if value in allowed else f"{value!r} is not one of {', '.join(map(repr, allowed))}"

    return check


# The shape of each field: ("object", {key: shape}, required keys), ("list", shape), ("map", shape),
# "bool", or a check of a string (which may be a template).
_Shape = Any
_SHAPES: dict[str, _Shape] = {
    "source_policy": (
        "object",
        {"include_domains": ("list", _domain), "exclude_domains": ("list", _domain), "after_date": _date},
        (),
    ),
    "advanced_settings": (
        "object",
        {
            "location": _country,
            "data_sources": ("object", {"free": ("list", _text), "pay_per_use": ("list", _text)}, ()),
        },
        (),
    ),
    "previous_interaction_id": _text,
    "memory_scope_key": _text,
    "enable_events": "bool",
    "mcp_servers": (
        "list",
        (
            "object",
            {
                "name": _text,
                "url": _url,
                "type": _one_of("url"),
                "headers": ("map", lambda _value: None),
                "allowed_tools": ("list", _text),
            },
            ("name", "url"),
        ),
    ),
    "webhook": (
        "object",
        {"url": _url, "event_types": ("list", _one_of("task_run.status"))},
        ("url", "event_types"),
    ),
}

_Path = tuple[str | int, ...]


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True)
class _Leaf:
    path: _Path
    template: str  # names at least one column
    check: _Check


@dataclass(frozen=True)
class RunOptions:
    """Checked per-run options: `given` (None values left out; templates still in), the beta values
    sent (`beta`, sorted: those given and those the fields need), and the template strings (`leaves`)
    with the columns they name (`columns`)."""

    given: dict[str, Any]
    beta: tuple[str, ...]
    leaves: tuple[_Leaf, ...]
    columns: tuple[str, ...]

    @property
    def templated(self) -> bool:
        """True when some value differs from row to row."""
        return bool(self.leaves)

    def keyed(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """What a row's key holds of `options` (rendered): them, and the beta values."""
        return {**options, BETA_KEY: list(self.beta)} if self.beta else dict(options)

    def static_text(self) -> str:
        """The canonical JSON of the options of every row (no templates)."""
        from ._inputs import canonical_json

        return canonical_json(self.keyed(self.given))

    def render(self, df: pl.DataFrame, first_row: int = 0) -> pl.Series:
        """Each row's options (and beta values) as canonical JSON, rendered from its columns and checked.
        A value that fails its check is a `UsageError` naming the place, the row and the value."""
        from ._inputs import _render_prompt, canonical_json

        marks = {leaf.path: f"\x00{n}\x00" for n, leaf in enumerate(self.leaves)}
        text = canonical_json(self.keyed(_replace(self.given, marks)))
        # (the leaves in the order the canonical JSON, keys sorted, puts them)
        at = {n: text.index(json.dumps(f"\x00{n}\x00")) for n in range(len(self.leaves))}
        pieces: list[pl.Expr] = []
        rendered: dict[str, list[str]] = {}
        rest = text
        for n in sorted(at, key=at.__getitem__):
            leaf = self.leaves[n]
            before, _, rest = rest.partition(json.dumps(f"\x00{n}\x00"))
            pieces.append(pl.lit(before))
            where = f"run_options {_dotted(leaf.path)}"
            if "_interaction_id" in _fields(leaf.template) and "_status" in df.columns:
                _check_finished(df, where, leaf.template, first_row)
            values = _render_prompt(df, df.columns, leaf.template, first_row, what=where)
            for row, value in enumerate(values):
                problem = leaf.check(value)
                if problem:
                    hint = "fix that row's value or filter the row out"
                    if "_interaction_id" in _fields(leaf.template):
                        hint = "its earlier run did not complete: keep the rows whose _status is 'completed'"
                    raise UsageError(
                        f"{where} (from {leaf.template!r}) at row {first_row + row}: {problem}; {hint}"
                    )
            name = f"_leaf{n}"
            rendered[name] = [canonical_json(v) for v in values]
            pieces.append(pl.col(name))
        pieces.append(pl.lit(rest))
        frame = pl.DataFrame(rendered, schema={name: pl.String for name in rendered})
        return frame.select(pl.concat_str(pieces).alias("options"))["options"]

    def decode(self, text: str) -> dict[str, Any]:
        """A row's options to send, from its canonical JSON (`render`, `static_text`)."""
        options = json.loads(text)
        options.pop(BETA_KEY, None)
        return options


def _check_finished(df: pl.DataFrame, where: str, template: str, first_row: int) -> None:
    """A follow-up builds on an earlier run's research: a row whose earlier run did not complete (failed,
    cancelled, ...) has an interaction but nothing to build on, and would be paid for all the same."""
    unfinished = df.select(pl.arg_where(pl.col("_status").fill_null("pending") != "completed"))
    if unfinished.height:
        row = int(unfinished.item(0, 0))
        status = df["_status"][row] or "pending"
        raise UsageError(
            f"{where} (from {template!r}): {unfinished.height:,} rows' earlier runs did not complete (first: "
            f"row {first_row + row}, {status}), so there is no research to follow up on; keep the rows whose "
            "_status is 'completed' (df.filter(pl.col('_status') == 'completed'), or filter the file first)"
        )


def _replace(value: Any, marks: Mapping[_Path, str], path: _Path = ()) -> Any:
    if path in marks:
        return marks[path]
    if isinstance(value, Mapping):
        return {k: _replace(v, marks, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, marks, (*path, i)) for i, v in enumerate(value)]
    return value


def check_run_options(
    run_options: Mapping[str, Any] | None,
    beta: str | Sequence[str] | None = None,
    processor: str | None = None,
) -> RunOptions | None:
    """`run_options` and `beta` checked (see the module docstring), for runs on `processor` (some
    fields depend on it): None when there are none."""
    if run_options is None:
        run_options = {}
    if not isinstance(run_options, Mapping):
        raise UsageError(
            f"run_options must be a mapping of the Task API's run fields ({', '.join(RUN_OPTION_FIELDS)}), "
            f"got {type(run_options).__name__}"
        )
    leaves: list[_Leaf] = []
    given: dict[str, Any] = {}
    for name, value in run_options.items():
        if name not in _SHAPES:
            from ._inputs import _did_you_mean

            hint = _did_you_mean(str(name), list(RUN_OPTION_FIELDS))
            if name in ("input", "processor", "task_spec", "metadata"):
                hint = f" ({name} is set by enrich itself: use the argument of that name)"
            raise UsageError(
                f"run_options: unknown field {name!r}; the API's run fields are "
                f"{', '.join(RUN_OPTION_FIELDS)}.{hint}"
            )
        if value is None:
            continue
        given[name] = _checked(value, _SHAPES[name], (name,), leaves)
    if "source_policy" in given:
        policy = given["source_policy"]
        count = len(policy.get("include_domains", [])) + len(policy.get("exclude_domains", []))
        if count > MAX_DOMAINS:
            raise UsageError(
                f"run_options source_policy: {count} domains in include_domains and exclude_domains; "
                f"the API takes at most {MAX_DOMAINS} in all"
            )
    servers = given.get("mcp_servers", [])
    if len(servers) > MAX_MCP_SERVERS:
        raise UsageError(
            f"run_options mcp_servers: {len(servers)} servers; the API takes at most {MAX_MCP_SERVERS}"
        )
    names = [server["name"] for server in servers]
    if len(set(names)) < len(names):
        raise UsageError(f"run_options mcp_servers: each server needs its own name; {names} repeats one")
    sources = given.get("advanced_settings", {}).get("data_sources", {})
    chosen = [name for key in ("free", "pay_per_use") for name in sources.get(key, [])]
    if chosen and processor is not None and processor.endswith("-fast"):
        raise UsageError(
            f"run_options advanced_settings.data_sources works on standard processors only, not "
            f"{processor!r}: use {processor.removesuffix('-fast')!r}"
        )
    clash = sorted(set(chosen) & set(names))
    if clash:
        raise UsageError(
            f"run_options advanced_settings.data_sources: {clash} also name mcp_servers; rename one"
        )
    betas = _checked_beta(beta)
    for name, needed in _NEEDS_BETA.items():
        if name in given:
            betas.add(needed)
    if not given and not betas:
        return None
    columns = tuple(dict.fromkeys(c for leaf in leaves for c in _fields(leaf.template)))
    return RunOptions(given, tuple(sorted(betas)), tuple(leaves), columns)


def _checked_beta(beta: str | Sequence[str] | None) -> set[str]:
    if beta is None:
        return set()
    values = [beta] if isinstance(beta, str) else beta
    if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"beta must be a string or a list of strings (such as {KNOWN_BETAS[0]!r})")
    out: set[str] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part or any(c.isspace() for c in part):
                raise UsageError(
                    f"beta: {value!r} is not a beta name; known ones: {', '.join(KNOWN_BETAS)} (any other "
                    "name is sent as given)"
                )
            out.add(part)
    return out


def _checked(value: Any, shape: _Shape, path: _Path, leaves: list[_Leaf]) -> Any:
    where = f"run_options {_dotted(path)}"
    if shape == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if callable(shape):
        if not isinstance(value, str):
            raise UsageError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        try:
            fields = _fields(value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}; write {{{{ and }}}} for literal braces") from None
        if fields:
            leaves.append(_Leaf(path, value, shape))
            return value
        literal = value.replace("{{", "{").replace("}}", "}")
        problem = shape(literal)
        if problem:
            raise UsageError(f"{where}: {problem}")
        return literal
    kind = shape[0]
    if kind == "list":
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise UsageError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return [_checked(v, shape[1], (*path, i), leaves) for i, v in enumerate(value)]
    if kind == "map":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"{where} must be a mapping of strings, got {value!r}")
        return {k: _checked(v, shape[1], (*path, k), leaves) for k, v in value.items()}
    _, keys, required = shape
    if not isinstance(value, Mapping):
        raise UsageError(f"{where} must be a mapping with keys {', '.join(keys)}, got {value!r}")
    out = {}
    for key, item in value.items():
        if key not in keys:
            raise UsageError(f"{where}: unknown key {key!r}; known: {', '.join(keys)}")
        if item is not None:
            out[key] = _checked(item, keys[key], (*path, key), leaves)
    missing = [k for k in required if k not in out]
    if missing:
        raise UsageError(f"{where} needs {', '.join(map(repr, missing))}")
    return out


def _fields(template: str) -> list[str]:
    """The column names a template string's `{fields}` name (ValueError for a malformed one)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
