"""The emulator's checks of request bodies, as strict as the service: TaskRunInput fields, metadata,
source policy, advanced settings, MCP servers, webhooks, task specs and their output JSON schemas, with
the documented limits (task-api.md §2.1, §3 and §6), and the beta each beta field needs (`_beta_problems`).

Errors are FastAPI-style dicts {loc, msg, type} collected in an `_Errors` list; the run endpoints wrap
them in an ErrorResponse, the group endpoints answer them as {"detail": [...]}. `_check_task_spec`
records a spec's errors and warnings on its `_Spec` (state.py), once per distinct spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from enrich._emulator.sources import domain_entry_problem
from enrich._emulator.wire import _compact
from enrich._jsonschema import UNSUPPORTED_KEYWORDS

if TYPE_CHECKING:
    from enrich._emulator.state import _Spec

# Limits from task-api.md §3 and §6.
_MAX_INPUTS_PER_ADD = 1_000
_MAX_SPEC_CHARS = 15_000
_MAX_SPEC_INPUT_CHARS = 25_000
_MAX_METADATA_KEY = 16
_MAX_METADATA_VALUE = 512
_MAX_NESTING = 5
_MAX_PROPERTIES = 100
_MAX_ENUM_VALUES = 500
_LARGE_ENUM_VALUES = 250  # an enum of more values than this ...
_LARGE_ENUM_CHARS = 7_500  # ... may hold at most this many characters
_MAX_DOMAINS = 200
_MAX_MCP_SERVERS = 10  # docs.parallel.ai/task-api/mcp-tool-call: "up to 10 MCP servers per request"

#: The beta header value each beta field of a TaskRunInput needs (task-api.md §2.1, §8).
BETA_FIELDS = {"mcp_servers": "mcp-server-2025-07-17", "webhook": "webhook-2025-08-12"}

#: ISO 3166-1 alpha-2: the 249 officially assigned codes (`advanced_settings.location`).
_COUNTRY_TABLE = (
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV "
    "BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES "
    "ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE "
    "IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY "
    "MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU "
    "NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM "
    "SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE "
    "VG VI VN VU WF WS YE YT ZA ZM ZW"
)
_COUNTRY_CODES = frozenset(_COUNTRY_TABLE.split())

_UNSUPPORTED_KEYWORDS = UNSUPPORTED_KEYWORDS  # the one list, shared with the client-side check
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_RESERVED_FIELDS = frozenset(
    {"citations", "confidence", "evidence", "reasoning", "source", "sources", "source_urls"}
)
_RUN_INPUT_FIELDS = frozenset(
    {
        "input",
        "processor",
        "task_spec",
        "metadata",
        "source_policy",
        "advanced_settings",
        "enable_events",
        "mcp_servers",
        "webhook",
        "previous_interaction_id",
        "memory_scope_key",
    }
)


_Loc = tuple[str | int, ...]


class _Errors(list[dict[str, Any]]):
    def add(self, loc: _Loc, msg: str, kind: str) -> None:
        self.append({"loc": list(loc), "msg": msg, "type": kind})


def _check_str(obj: Mapping[str, Any], key: str, loc: _Loc, errs: _Errors, *, required: bool = False) -> None:
    if key not in obj:
        if required:
            errs.add((*loc, key), "Field required", "missing")
        return
    value = obj[key]
    if value is None and not required:
        return
    if not isinstance(value, str):
        errs.add((*loc, key), "Input should be a valid string", "string_type")


def _check_str_list(value: Any, loc: _Loc, errs: _Errors, *, nonempty_items: bool = False) -> int:
    if not isinstance(value, list):
        errs.add(loc, "Input should be a valid list", "list_type")
        return 0
    for i, item in enumerate(value):
        if not isinstance(item, str):
            errs.add((*loc, i), "Input should be a valid string", "string_type")
        elif nonempty_items and not item:
            errs.add((*loc, i), "String should have at least 1 character", "string_too_short")
    return len(value)


def _check_url(obj: Mapping[str, Any], key: str, loc: _Loc, errs: _Errors) -> None:
    """A required absolute http(s) URL with a host."""
    _check_str(obj, key, loc, errs, required=True)
    value = obj.get(key)
    if not isinstance(value, str):
        return
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        errs.add(
            (*loc, key), "Input should be a valid URL with an http or https scheme and a host", "url_parsing"
        )


def _check_extra(
    obj: Mapping[str, Any], allowed: frozenset[str] | set[str], loc: _Loc, errs: _Errors
) -> None:
    for key in obj:
        if key not in allowed:
            errs.add((*loc, key), "Extra inputs are not permitted", "extra_forbidden")


def _check_object(value: Any, loc: _Loc, errs: _Errors) -> bool:
    if not isinstance(value, dict):
        errs.add(loc, "Input should be a valid dictionary or object", "dict_type")
        return False
    return True


def _check_metadata(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    for key, item in value.items():
        if len(key) > _MAX_METADATA_KEY:
            errs.add(
                (*loc, key),
                f"Metadata keys must be at most {_MAX_METADATA_KEY} characters",
                "string_too_long",
            )
        if isinstance(item, str):
            if len(item) > _MAX_METADATA_VALUE:
                errs.add(
                    (*loc, key),
                    f"Metadata values must be at most {_MAX_METADATA_VALUE} characters",
                    "string_too_long",
                )
        elif not isinstance(item, bool | int | float):
            errs.add((*loc, key), "Metadata values must be a string, number or boolean", "scalar_type")


def _check_source_policy(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"include_domains", "exclude_domains", "after_date"}, loc, errs)
    total = 0
    for key in ("include_domains", "exclude_domains"):
        entries = value.get(key)
        if entries is None:
            continue
        total += _check_str_list(entries, (*loc, key), errs)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            problem = domain_entry_problem(entry) if isinstance(entry, str) else None
            if problem is not None:
                errs.add((*loc, key, i), problem, "value_error")
    if total > _MAX_DOMAINS:
        errs.add(
            loc,
            f"At most {_MAX_DOMAINS} domain entries are allowed in include_domains and exclude_domains "
            f"together; got {total}",
            "too_long",
        )
    after = value.get("after_date")
    if after is not None:
        try:
            if not isinstance(after, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", after):
                raise ValueError
            date.fromisoformat(after)
        except ValueError:
            errs.add(
                (*loc, "after_date"),
                "Input should be a valid date in the format YYYY-MM-DD",
                "date_from_datetime_parsing",
            )


def _check_advanced(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"location", "data_sources"}, loc, errs)
    _check_str(value, "location", loc, errs)
    location = value.get("location")
    if isinstance(location, str) and location not in _COUNTRY_CODES:
        errs.add(
            (*loc, "location"),
            "Input should be an ISO 3166-1 alpha-2 country code in upper case, such as 'US' or 'GB'",
            "value_error",
        )
    sources = value.get("data_sources")
    if sources is not None and _check_object(sources, (*loc, "data_sources"), errs):
        _check_extra(sources, {"free", "pay_per_use"}, (*loc, "data_sources"), errs)
        for key in ("free", "pay_per_use"):
            if sources.get(key) is not None:
                _check_str_list(sources[key], (*loc, "data_sources", key), errs, nonempty_items=True)


def _check_mcp_servers(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        errs.add(loc, "Input should be a valid list", "list_type")
        return
    if len(value) > _MAX_MCP_SERVERS:
        errs.add(
            loc,
            f"List should have at most {_MAX_MCP_SERVERS} items after validation, not {len(value)}",
            "too_long",
        )
    names: set[str] = set()
    for i, server in enumerate(value):
        sloc = (*loc, i)
        if not _check_object(server, sloc, errs):
            continue
        _check_extra(server, {"name", "url", "type", "headers", "allowed_tools"}, sloc, errs)
        _check_str(server, "name", sloc, errs, required=True)
        name = server.get("name")
        if name == "":
            errs.add((*sloc, "name"), "String should have at least 1 character", "string_too_short")
        elif isinstance(name, str):
            if name in names:
                errs.add(
                    (*sloc, "name"), f"MCP server names must be distinct; {name!r} repeats", "value_error"
                )
            names.add(name)
        _check_url(server, "url", sloc, errs)
        if "type" in server and server["type"] != "url":
            errs.add((*sloc, "type"), "Input should be 'url'", "literal_error")
        headers = server.get("headers")
        if headers is not None and _check_object(headers, (*sloc, "headers"), errs):
            for key, item in headers.items():
                if not isinstance(item, str):
                    errs.add((*sloc, "headers", key), "Input should be a valid string", "string_type")
        if server.get("allowed_tools") is not None:
            _check_str_list(server["allowed_tools"], (*sloc, "allowed_tools"), errs)


def _check_webhook(value: Any, loc: _Loc, errs: _Errors) -> None:
    if value is None or not _check_object(value, loc, errs):
        return
    _check_extra(value, {"url", "event_types"}, loc, errs)
    _check_url(value, "url", loc, errs)
    # The docs mark event_types required, and only ["task_run.status"] is supported (the OAS gives a
    # default of [], which would never notify): the stricter reading.
    if "event_types" not in value:
        errs.add((*loc, "event_types"), "Field required", "missing")
        return
    kinds = value["event_types"]
    if not isinstance(kinds, list):
        errs.add((*loc, "event_types"), "Input should be a valid list", "list_type")
    elif not kinds:
        errs.add(
            (*loc, "event_types"),
            "List should have at least 1 item after validation, not 0; use ['task_run.status']",
            "too_short",
        )
    else:
        for i, kind in enumerate(kinds):
            if kind != "task_run.status":
                errs.add((*loc, "event_types", i), "Input should be 'task_run.status'", "literal_error")


def _check_data_sources_use(obj: Mapping[str, Any], loc: _Loc, errs: _Errors) -> None:
    """What `advanced_settings.data_sources` asks of the rest of a TaskRunInput (the SDK's docstring:
    "Supported on standard processors only; a selected partner name must not collide with an
    `mcp_servers` entry"). Call it once the fields' own shapes are valid."""
    advanced = obj.get("advanced_settings") or {}
    sources = advanced.get("data_sources") or {}
    chosen = [name for key in ("free", "pay_per_use") for name in sources.get(key) or ()]
    if not chosen:
        return
    sloc = (*loc, "advanced_settings", "data_sources")
    processor = obj.get("processor")
    if isinstance(processor, str) and processor.endswith("-fast"):
        errs.add(
            sloc,
            f"data_sources is supported on standard processors only, not {processor!r}; use "
            f"{processor.removesuffix('-fast')!r}",
            "value_error",
        )
    servers = {s.get("name") for s in obj.get("mcp_servers") or ()}
    clashes = sorted(servers.intersection(chosen))
    if clashes:
        errs.add(sloc, f"data source names must not collide with mcp_servers names: {clashes}", "value_error")


def _beta_problems(obj: Mapping[str, Any], betas: frozenset[str], loc: _Loc) -> _Errors:
    """The beta fields of a TaskRunInput sent without the `parallel-beta` value they need."""
    errs = _Errors()
    for key, beta in BETA_FIELDS.items():
        if obj.get(key) is not None and beta not in betas:
            errs.add((*loc, key), f"{key} needs the beta header 'parallel-beta: {beta}'", "missing_beta")
    return errs


def _parse_betas(header: str) -> frozenset[str]:
    """The values of a `parallel-beta` header: comma-separated, any string allowed."""
    return frozenset(v.strip() for v in header.split(",") if v.strip())


def _check_schema_wrapper(value: Any, loc: _Loc, errs: _Errors, *, output: bool) -> str:
    """Check an output_schema/input_schema spelling; return its kind ("json", "text", "auto", "")."""
    if isinstance(value, str):
        if not value.strip():
            errs.add(loc, "A schema description must not be empty", "string_too_short")
            return ""
        return "text"
    if not _check_object(value, loc, errs):
        return ""
    kind = value.get("type")
    if kind is None:
        kind = "json" if "json_schema" in value else "text" if "description" in value else None
    if kind == "json":
        _check_extra(value, {"type", "json_schema"}, loc, errs)
        if "json_schema" not in value:
            errs.add((*loc, "json_schema"), "Field required", "missing")
            return ""
        if not _check_object(value["json_schema"], (*loc, "json_schema"), errs):
            return ""
        return "json"
    if kind == "text":
        _check_extra(value, {"type", "description"}, loc, errs)
        _check_str(value, "description", loc, errs)
        return "text"
    if kind == "auto" and output:
        _check_extra(value, {"type"}, loc, errs)
        return "auto"
    allowed = "'json', 'text' or 'auto'" if output else "'json' or 'text'"
    errs.add((*loc, "type"), f"Input should be {allowed}", "literal_error")
    return ""


def _check_task_spec(task_spec: Any, rec: _Spec) -> None:
    """Validate a task spec into `rec` (errors with locs relative to the spec, warnings, kind)."""
    errs = _Errors()
    rec.errors = errs
    if task_spec is None:
        return
    if not _check_object(task_spec, (), errs):
        return
    _check_extra(task_spec, {"output_schema", "input_schema"}, (), errs)
    if "output_schema" not in task_spec:
        errs.add(("output_schema",), "Field required", "missing")
        return
    kind = _check_schema_wrapper(task_spec["output_schema"], ("output_schema",), errs, output=True)
    rec.kind = kind or "none"
    if task_spec.get("input_schema") is not None:
        _check_schema_wrapper(task_spec["input_schema"], ("input_schema",), errs, output=False)
    if kind == "json" and not errs:
        rec.warnings = _check_json_schema(task_spec["output_schema"]["json_schema"], errs)
    if rec.size > _MAX_SPEC_CHARS:
        errs.add(
            (), f"The task spec is {rec.size} characters; at most {_MAX_SPEC_CHARS} are allowed", "too_long"
        )


def _check_json_schema(root: dict[str, Any], errs: _Errors) -> list[dict[str, Any]]:
    """Enforce the output json_schema rules of task-api.md §3; return the spec warnings."""
    loc: _Loc = ("output_schema", "json_schema")
    if "anyOf" in root or "oneOf" in root:
        errs.add(loc, "anyOf/oneOf is not allowed at the root of an output schema", "value_error")
    if root.get("type") != "object":
        errs.add((*loc, "type"), "The root of an output schema must have type 'object'", "value_error")
    props = root.get("properties")
    if not isinstance(props, dict) or not props:
        errs.add((*loc, "properties"), "The root of an output schema must define properties", "value_error")
    totals = {"properties": 0, "enum": 0, "depth_error": False}
    no_required: list[str] = []
    open_objects: list[str] = []
    reserved: list[str] = []

    def resolve(ref: str) -> Any:
        if not ref.startswith("#/"):
            return None
        target: Any = root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target

    def walk(node: Any, path: str, depth: int, refs: tuple[str, ...], is_property: bool) -> None:
        # `depth` is the nesting level of the enclosing container. Objects and arrays each open a level
        # and the root object is level 1 (the stricter reading of "nesting <= 5 levels"); $refs are
        # followed, so a referenced object counts where it is used.
        if len(refs) > 32:
            return
        if not isinstance(node, dict):
            errs.add((*loc,), f"{path}: a schema must be an object", "value_error")
            return
        for key in node:
            if key in _UNSUPPORTED_KEYWORDS:
                errs.add((*loc,), f"{path}: unsupported keyword {key!r}", "value_error")
        ref = node.get("$ref")
        if ref is not None:
            target = resolve(ref) if isinstance(ref, str) else None
            if target is None:
                errs.add((*loc,), f"{path}: cannot resolve $ref {ref!r}", "value_error")
            elif ref in refs:
                errs.add((*loc,), f"{path}: recursive $ref {ref!r} is not supported", "value_error")
            else:
                walk(target, path, depth, (*refs, ref), is_property)
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [] if kind is None else [kind]
        if kind is not None:
            if not kinds or any(not isinstance(k, str) or k not in _JSON_TYPES for k in kinds):
                errs.add((*loc,), f"{path}: invalid type {kind!r}", "value_error")
            elif is_property and all(k == "null" for k in kinds):
                errs.add((*loc,), f"{path}: a standalone 'null' type is not supported", "value_error")
        container = "properties" in node or "items" in node or "object" in kinds or "array" in kinds
        level = depth + 1 if container else depth
        if level > _MAX_NESTING:
            if not totals["depth_error"]:
                totals["depth_error"] = True
                errs.add((*loc,), f"{path}: nested deeper than {_MAX_NESTING} levels", "value_error")
            return
        if "enum" in node:
            enum = node["enum"]
            if not isinstance(enum, list) or not enum:
                errs.add((*loc,), f"{path}: enum must be a non-empty list", "value_error")
            else:
                totals["enum"] += len(enum)
                chars = sum(len(v) if isinstance(v, str) else len(_compact(v)) for v in enum)
                if len(enum) > _LARGE_ENUM_VALUES and chars > _LARGE_ENUM_CHARS:
                    errs.add(
                        (*loc,),
                        f"{path}: an enum of more than {_LARGE_ENUM_VALUES} values may hold at most "
                        f"{_LARGE_ENUM_CHARS} characters; this one holds {chars}",
                        "value_error",
                    )
        properties = node.get("properties")
        if properties is not None:
            if not isinstance(properties, dict):
                errs.add((*loc,), f"{path}: properties must be an object", "value_error")
            else:
                totals["properties"] += len(properties)
                required = node.get("required")
                if not isinstance(required, list) or set(properties) - set(required):
                    no_required.append(path)
                if node.get("additionalProperties") is not False:
                    open_objects.append(path)
                for name, sub in properties.items():
                    if name in _RESERVED_FIELDS:
                        reserved.append(f"{path}.{name}")
                    walk(sub, f"{path}.{name}", level, refs, True)
        items = node.get("items")
        if items is not None:
            if isinstance(items, list):
                errs.add((*loc,), f"{path}: tuple-style items are not supported", "value_error")
            else:
                walk(items, f"{path}[]", level, refs, False)
        for key in ("anyOf", "oneOf", "allOf"):
            options = node.get(key)
            if options is not None:
                if not isinstance(options, list) or not options:
                    errs.add((*loc,), f"{path}: {key} must be a non-empty list", "value_error")
                else:
                    for i, option in enumerate(options):
                        walk(option, f"{path}.{key}[{i}]", depth, refs, False)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}.additionalProperties", level, refs, False)

    walk(root, "$", 0, (), False)
    if totals["properties"] > _MAX_PROPERTIES:
        errs.add(
            loc,
            f"The output schema has {totals['properties']} properties; at most {_MAX_PROPERTIES}",
            "value_error",
        )
    if totals["enum"] > _MAX_ENUM_VALUES:
        errs.add(
            loc,
            f"The output schema has {totals['enum']} enum values; at most {_MAX_ENUM_VALUES}",
            "value_error",
        )
    warnings = []
    if no_required:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Every field of an output schema object should be listed in 'required'.",
                "detail": {"paths": no_required[:20]},
            }
        )
    if open_objects:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Every object in an output schema should set 'additionalProperties': false.",
                "detail": {"paths": open_objects[:20]},
            }
        )
    if reserved:
        warnings.append(
            {
                "type": "spec_validation_warning",
                "message": "Output field names that collide with basis fields may be ignored: "
                + ", ".join(sorted(_RESERVED_FIELDS)),
                "detail": {"paths": reserved[:20]},
            }
        )
    return warnings


def _input_warnings(value: Any, spec: _Spec) -> list[dict[str, Any]] | None:
    task_spec = spec.spec
    if not task_spec or not isinstance(task_spec.get("input_schema"), dict):
        return None
    schema = task_spec["input_schema"].get("json_schema")
    if not isinstance(schema, dict):
        return None
    if not isinstance(value, dict):
        return [
            {"type": "input_validation_warning", "message": "The input is not an object.", "detail": None}
        ]
    required = schema.get("required")
    missing = [k for k in required if k not in value] if isinstance(required, list) else []
    if missing:
        return [
            {
                "type": "input_validation_warning",
                "message": "The input lacks fields its input schema requires.",
                "detail": {"missing": missing},
            }
        ]
    return None
