"""Deterministic synthetic task outputs, as the emulator serves them.

Every value is derived from a hash of (input, output schema) and nothing else: not the emulator's seed,
not the run id, not the time. A test can therefore compute the exact answer of every row with
`expected_output()` and compare it to what came back through the API.

    >>> content, basis = synth_output(
    ...     {"company": "Acme Corp"},
    ...     {"type": "json", "json_schema": {"type": "object", "properties": {"ceo": {"type": "string"}}}},
    ... )
    >>> sorted(content), basis[0]["field"]
    (['ceo'], 'ceo')

The generator honours the JSON-schema subset the Task API accepts (task-api.md §3): objects, arrays (of
scalars and of objects), strings, integers, numbers, booleans, `enum`, `const`, nullable types
(`["string", "null"]`, `anyOf` with null), local `$ref`s into `$defs`/`definitions`, and `allOf`
(merged). Field names and descriptions steer the values: a field named like `year` gets a plausible
year, `website` a URL, `employees` a head count. Strings echo the row's first input value, so each row
is recognisably its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AUTO_SCHEMA",
    "PREMIUM_TIERS",
    "build_output",
    "expected_output",
    "synth_output",
]

#: Tiers that answer an `auto` output schema (or no task spec) with structured JSON; the others
#: answer with text (docs.parallel.ai/task-api/guides/specify-a-task: "auto" is pro and above).
PREMIUM_TIERS = frozenset({"pro", "ultra", "ultra2x", "ultra4x", "ultra8x"})

#: Tiers whose basis carries no confidence and no excerpts (choose-a-processor: lite/base give
#: citations and reasoning only).
_BASIC_TIERS = frozenset({"lite", "base"})

#: The schema a premium processor "infers" for an auto-schema run; echoed in `output.output_schema`.
AUTO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "description": "A short research summary of the input."},
        "key_facts": {
            "type": "array",
            "description": "Key facts found about the input.",
            "items": {"type": "string"},
        },
        "sources_consulted": {"type": "integer", "description": "Number of sources consulted."},
    },
    "required": ["summary", "key_facts", "sources_consulted"],
    "additionalProperties": False,
}

_COUNTRIES = ["United States", "Germany", "France", "Japan", "Canada", "Brazil", "India", "Australia"]
_CITIES = ["San Francisco", "Berlin", "Paris", "Tokyo", "Toronto", "São Paulo", "Bangalore", "Sydney"]
_PEOPLE = ["Alex Morgan", "Priya Shah", "Jonas Weber", "Mei Tanaka", "Lucas Silva", "Emma Dubois"]
_INDUSTRIES = ["Software", "Biotechnology", "Logistics", "Retail", "Financial services", "Energy"]
_CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CAD", "BRL"]
_CONFIDENCE = ["high", "high", "medium", "low"]
_MAX_NESTING = 12  # a guard against self-referencing $refs; the API refuses them anyway


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class _Draw:
    """Deterministic pseudo-random draws keyed by a path below one (input, schema) digest."""

    __slots__ = ("_root", "_unit")

    def __init__(self, root: bytes) -> None:
        self._root = root
        # The keyed hash state after the key block; copying it is cheaper than keying a new hash per draw
        # (and gives the same digest as `blake2b(path, key=root, digest_size=8)`).
        self._unit = hashlib.blake2b(key=root, digest_size=8)

    def unit(self, path: str) -> float:
        """A float in [0, 1) for `path`."""
        h = self._unit.copy()
        h.update(path.encode())
        return int.from_bytes(h.digest(), "big") / 2.0**64

    def int(self, path: str, lo: int, hi: int) -> int:
        """An integer in [lo, hi] for `path`."""
        return lo + int(self.unit(path) * (hi - lo + 1))

    def pick(self, path: str, options: list[Any]) -> Any:
        return options[int(self.unit(path) * len(options))]

    def tag(self, path: str) -> str:
        return hashlib.blake2b(path.encode(), key=self._root, digest_size=2).hexdigest()


def _echo(input: str | Mapping[str, Any]) -> str:
    """The row's first input value, as a short single-line string."""
    if isinstance(input, Mapping):
        first = next(iter(input.values()), "")
        text = first if isinstance(first, str) else _canonical(first)
    else:
        text = str(input)
    text = " ".join(text.split())
    if len(text) > 60:
        text = text[:57] + "..."
    return text or "input"


_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_WORD_BREAK = re.compile(r"[_\W]+|(?<=[a-z])(?=[A-Z])")


def _slug(text: str) -> str:
    slug = _NOT_SLUG.sub("-", text.lower()).strip("-")
    return slug[:40].strip("-") or "item"


@functools.lru_cache(maxsize=4096)
def _words(name: str) -> str:
    # Field names repeat across every row of a job: cached (the result is an immutable str).
    return " ".join(part for part in _WORD_BREAK.split(name) if part).lower()


@functools.lru_cache(maxsize=4096)
def _hint(name: str, description: str) -> str:
    return (_words(name) + " " + description).lower()


@functools.lru_cache(maxsize=4096)
def _field_names(field: str) -> tuple[str, str]:
    """(label, slug) of a top-level field, as its basis spells them."""
    label = _words(field) or field
    return label, _slug(label)


# What a string field holds, from its name and hint alone (the first rule that matches wins); cached,
# since the same few fields are generated for every row.
@functools.lru_cache(maxsize=4096)
def _string_kind(name: str, hint: str) -> str:
    words = hint.split()
    if "year" in hint:
        return "year"
    if any(w in hint for w in ("url", "website", "homepage", "link", "domain")):
        return "url"
    if "email" in hint:
        return "email"
    if "phone" in hint:
        return "phone"
    if "date" in hint or name.endswith("_at"):
        return "date"
    if "country" in hint:
        return "country"
    if any(w in hint for w in ("city", "headquarter", "location", "hq")):
        return "city"
    if any(w in words for w in ("ceo", "founder", "person", "author", "contact", "owner")):
        return "person"
    if any(w in hint for w in ("industry", "sector")):
        return "industry"
    if "currency" in hint:
        return "currency"
    if any(w in hint for w in ("ticker", "symbol")):
        return "ticker"
    if _words(name) in ("name", "company", "company name", "title", "entity"):
        return "echo"
    return "tag"


class _Gen:
    def __init__(self, input: str | Mapping[str, Any], root_schema: Mapping[str, Any], draw: _Draw) -> None:
        self.echo = _echo(input)
        self.slug = _slug(self.echo)
        self.root = root_schema
        self.draw = draw

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow a local `$ref` and merge `allOf`, so the caller sees one plain schema."""
        for _ in range(_MAX_NESTING):
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                break
            target: Any = self.root
            for part in ref.removeprefix("#/").split("/"):
                target = target.get(part, {}) if isinstance(target, Mapping) and part else target
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, Mapping) else rest
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in all_of:
                if isinstance(sub, Mapping):
                    merged = {**self.resolve(sub), **merged}
            schema = merged
        return schema

    def value(self, schema: Mapping[str, Any], name: str, path: str, depth: int = 0) -> Any:
        schema = self.resolve(schema)
        if depth > _MAX_NESTING:
            return None
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self.draw.pick(path + "#enum", enum)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                branches = [self.resolve(o) for o in options if isinstance(o, Mapping)]
                concrete = [b for b in branches if b.get("type") != "null"]
                if len(concrete) < len(branches) and self._null(path):
                    return None
                if not concrete:
                    return None
                branch = concrete[0] if len(concrete) == 1 else self.draw.pick(path + "#branch", concrete)
                merged = {**{k: v for k, v in schema.items() if k not in (key,)}, **branch}
                return self.value(merged, name, path, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            concrete_kinds = [k for k in kind if k != "null"]
            if len(concrete_kinds) < len(kind) and self._null(path):
                return None
            kind = concrete_kinds[0] if concrete_kinds else "null"
        if kind is None:
            if "properties" in schema:
                kind = "object"
            elif "items" in schema:
                kind = "array"
            else:
                kind = "string"
        description = schema.get("description") or ""
        hint = (
            _hint(name, description)
            if isinstance(description, str)
            else (_words(name) + " " + str(description)).lower()
        )
        if kind == "object":
            return self.obj(schema, path, depth)
        if kind == "array":
            items = schema.get("items")
            items = items if isinstance(items, Mapping) else {"type": "string"}
            count = self.draw.int(path + "#len", 1, 3)
            return [self.value(items, name, f"{path}.{i}", depth + 1) for i in range(count)]
        if kind == "integer":
            return self.integer(hint, path)
        if kind == "number":
            return self.number(hint, path)
        if kind == "boolean":
            return self.draw.unit(path) < 0.5
        if kind == "null":
            return None
        return self.string(name, hint, path)

    def obj(self, schema: Mapping[str, Any], path: str, depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        if not isinstance(props, Mapping):
            return {}
        return {
            key: self.value(sub if isinstance(sub, Mapping) else {}, key, f"{path}/{key}", depth + 1)
            for key, sub in props.items()
        }

    def _null(self, path: str) -> bool:
        # About one nullable value in eight comes back null, so clients meet nulls in every job.
        return self.draw.unit(path + "#null") < 0.125

    def integer(self, hint: str, path: str) -> int:
        d = self.draw
        if "year" in hint or "founded" in hint:
            return d.int(path, 1950, 2024)
        if any(w in hint for w in ("employee", "headcount", "staff", "workforce")):
            return d.int(path, 10, 50_000)
        if "population" in hint:
            return d.int(path, 1_000, 10_000_000)
        if "age" in hint.split():
            return d.int(path, 18, 90)
        if any(w in hint for w in ("percent", "pct", "rank")):
            return d.int(path, 1, 100)
        return d.int(path, 0, 1_000)

    def number(self, hint: str, path: str) -> float:
        u = self.draw.unit(path)
        if any(w in hint for w in ("price", "revenue", "amount", "cost", "usd", "valuation", "funding")):
            return round(1_000 + u * 9_999_000, 2)
        if any(w in hint for w in ("percent", "rate", "share", "ratio", "margin", "growth")):
            return round(u * 100, 1)
        if "lat" in hint.split() or "latitude" in hint:
            return round(-90 + u * 180, 4)
        if any(w in hint.split() for w in ("lon", "lng", "longitude")):
            return round(-180 + u * 360, 4)
        if any(w in hint for w in ("score", "rating")):
            return round(u * 5, 1)
        return round(u * 1_000, 2)

    def string(self, name: str, hint: str, path: str) -> str:
        d = self.draw
        kind = _string_kind(name, hint)
        if kind == "year":
            return str(d.int(path, 1950, 2024))
        if kind == "url":
            return f"https://{self.slug}.example.com/{_slug(_words(name))}"
        if kind == "email":
            return f"contact@{self.slug}.example.com"
        if kind == "phone":
            return f"+1-555-01{d.int(path, 0, 99):02d}"
        if kind == "date":
            return f"{d.int(path, 1990, 2024)}-{d.int(path + 'm', 1, 12):02d}-{d.int(path + 'd', 1, 28):02d}"
        if kind == "country":
            return d.pick(path, _COUNTRIES)
        if kind == "city":
            return d.pick(path, _CITIES)
        if kind == "person":
            return d.pick(path, _PEOPLE)
        if kind == "industry":
            return d.pick(path, _INDUSTRIES)
        if kind == "currency":
            return d.pick(path, _CURRENCIES)
        if kind == "ticker":
            letters = re.sub(r"[^A-Z]", "", self.echo.upper()) or "XYZ"
            return letters[:4]
        if kind == "echo":
            return self.echo
        return f"{self.echo}: {_words(name) or 'value'} ({d.tag(path)})"

    def basis(self, field: str, path: str, basic: bool) -> dict[str, Any]:
        d = self.draw
        label, field_slug = _field_names(field)
        n = d.int(path + "#sources", 1, 3)
        citations = []
        for i in range(n):
            citations.append(
                {
                    "url": f"https://{self.slug}.example.com/{field_slug}/{i + 1}",
                    "title": f"{self.echo} — {label} (source {i + 1})",
                    "excerpts": None if basic else [f"{self.echo}: evidence for {label}."],
                }
            )
        return {
            "field": field,
            "reasoning": f"Synthetic: the {label} of {self.echo} was read from {n} source(s).",
            "citations": citations,
            "confidence": None if basic else d.pick(path + "#confidence", _CONFIDENCE),
        }


def _tier(processor: str | None) -> str | None:
    return processor.removesuffix("-fast") if processor else None


def _normalize(output_schema: Any) -> tuple[str, Any]:
    """("json", json_schema) | ("text", description) | ("auto", None) for any accepted spelling."""
    if output_schema is None:
        return "auto", None
    if isinstance(output_schema, str):
        return "text", output_schema
    if isinstance(output_schema, Mapping):
        if "json_schema" in output_schema:
            return "json", output_schema["json_schema"]
        kind = output_schema.get("type")
        if kind == "text":
            return "text", output_schema.get("description")
        if kind == "auto":
            return "auto", None
        if kind == "object" or "properties" in output_schema:
            return "json", output_schema
        if kind in (None, "json"):
            return "text", output_schema.get("description")
    raise ValueError(f"not an output schema: {output_schema!r}")


def _text(
    input: str | Mapping[str, Any], description: str | None, draw: _Draw, basic: bool
) -> tuple[str, list]:
    gen = _Gen(input, {}, draw)
    topic = f" Task: {' '.join(description.split())[:120]}" if description else ""
    content = (
        f"{gen.echo}: synthetic research summary ({draw.tag('text')}).{topic} "
        f"{draw.int('text#n', 2, 9)} sources agree on the main points; see the cited pages for details."
    )
    return content, [gen.basis("output", "output", basic)]


def synth_output(
    input: str | Mapping[str, Any],
    output_schema: Any = None,
    *,
    processor: str | None = None,
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """The (content, basis) the emulator answers for `input` under `output_schema`.

    `output_schema` is the task spec's `output_schema` in any spelling the API accepts: a json
    schema wrapper `{"type": "json", "json_schema": {...}}`, a bare JSON schema `{"type": "object",
    ...}`, a text schema `{"type": "text", "description": ...}`, a bare string (text), `{"type":
    "auto"}`, or None (no task spec, which means auto). Text, and auto below the `pro` tier, give a
    string; json gives a dict that conforms to the schema; auto on `pro` and above gives a dict that
    conforms to `AUTO_SCHEMA`.

    `basis` holds one FieldBasis dict per top-level field (`"output"` for text). `processor` only
    changes the basis: `lite`/`base` give no confidence and no excerpts. The result depends only on
    (input, output_schema) and the processor's tier, so it is the same on every emulator and run.
    """
    return _synth(input, output_schema, processor, _canonical(output_schema))


def _synth(
    input: str | Mapping[str, Any], output_schema: Any, processor: str | None, schema_json: str
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """`synth_output()` given `schema_json = _canonical(output_schema)`, which a caller may compute once."""
    kind, schema = _normalize(output_schema)
    tier = _tier(processor)
    basic = tier in _BASIC_TIERS
    # `_canonical([input, output_schema])`, spelled out so the schema's part is encoded once per schema.
    draw = _Draw(
        hashlib.blake2b(("[" + _canonical(input) + "," + schema_json + "]").encode(), digest_size=32).digest()
    )
    if kind == "auto" and tier in PREMIUM_TIERS:
        kind, schema = "json", AUTO_SCHEMA
    if kind != "json":
        return _text(input, schema if kind == "text" else None, draw, basic)
    gen = _Gen(input, schema, draw)
    content = gen.obj(gen.resolve(schema), "", 0)
    basis = [gen.basis(key, "/" + key, basic) for key in content]
    return content, basis


def build_output(
    input: str | Mapping[str, Any], task_spec: Mapping[str, Any] | None, processor: str
) -> dict[str, Any]:
    """The wire `output` object (TaskRunJsonOutput or TaskRunTextOutput) of a completed run."""
    output_schema = task_spec.get("output_schema") if task_spec else None
    return output_of(input, output_schema, _canonical(output_schema), processor)


def output_of(
    input: str | Mapping[str, Any], output_schema: Any, schema_json: str, processor: str
) -> dict[str, Any]:
    """`build_output()` given the task spec's `output_schema` and `schema_json = _canonical(output_schema)`,
    so a caller answering many runs of one spec (the emulator) encodes the schema once."""
    content, basis = _synth(input, output_schema, processor, schema_json)
    if isinstance(content, str):
        return {"type": "text", "content": content, "basis": basis}
    auto = _normalize(output_schema)[0] == "auto"
    return {
        "type": "json",
        "content": content,
        "basis": basis,
        "output_schema": AUTO_SCHEMA if auto else None,
    }


def expected_output(
    run_input: Mapping[str, Any], *, default_task_spec: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `output` that `GET /v1/tasks/runs/{id}/result` answers for a run created from `run_input`.

    `run_input` is the TaskRunInput as sent (`input`, `processor`, optional `task_spec`);
    `default_task_spec` is the add-runs request's default, used when the input has no `task_spec`.

        >>> out = expected_output({"input": "Acme Corp", "processor": "base"})
        >>> out["type"], out["basis"][0]["field"]
        ('text', 'output')
    """
    spec = run_input.get("task_spec") or default_task_spec
    return build_output(run_input["input"], spec, run_input["processor"])
