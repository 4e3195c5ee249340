"""Deterministic synthetic task outputs, as the emulator serves them.

Every value is derived from a hash of (input, output schema) and nothing else: not the emulator's seed,
not the run id, not the time. The basis also follows the run's `source_policy` (citations only on
domains it allows) and `previous_interaction_id` (a follow-up's reasoning names the interaction). A test
can therefore compute the exact answer of every row with `expected_output()` and compare it to what came
back through the API.

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

The basis has an entry per top-level field and, after an array field's, one per element (`field.0`,
`field.1`, ...), as SDK 1.3.7 returns them; the top-level entries are what they were before the element
entries existed. It is compact by default (one to three citations with one-line excerpts). With
`basis_bytes=N` each entry, element entries included, is about N bytes of JSON, as real core/pro
answers are: several citations with plausible URLs and titles, excerpt passages of varied length, and a
reasoning paragraph, all sliced from fixed text pools by a per-(input, schema, field) hash, so they
stay deterministic and cheap to make.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from enrich._emulator.sources import SourcePolicy

__all__ = [
    "AUTO_SCHEMA",
    "BASIS_BYTES_RANGE",
    "PREMIUM_TIERS",
    "build_output",
    "check_basis_bytes",
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

    def seed(self, path: str) -> int:
        """A 64-bit integer for `path`: the seed of a `_Rng` that makes many cheap draws from one hash."""
        h = self._unit.copy()
        h.update(path.encode())
        return int.from_bytes(h.digest(), "big")

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
def _field_names(field: str, element: int | None = None) -> tuple[str, str]:
    """(label, slug) of a top-level field, or of element `element` of an array field, as its basis
    spells them."""
    label = _words(field) or field
    if element is not None:
        label = f"{label} item {element + 1}"
    return label, _slug(label)


def _entry_name(field: str, element: int | None) -> str:
    """The `field` of a basis entry: the field's name, or `field.N` for element N of an array field."""
    return field if element is None else f"{field}.{element}"


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
    def __init__(
        self,
        input: str | Mapping[str, Any],
        root_schema: Mapping[str, Any],
        draw: _Draw,
        policy: SourcePolicy | None = None,
        previous: str | None = None,
    ) -> None:
        self.echo = _echo(input)
        self.slug = _slug(self.echo)
        self.policy = policy  # where citations may point (`source_policy`)
        self.prefix = f"Following up on interaction {previous}: " if previous else ""
        self.root = root_schema
        self.draw = draw
        self._sources: _RowSources | None = None  # made on the first sized basis of the row

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

    def basis(self, field: str, path: str, basic: bool, element: int | None = None) -> dict[str, Any]:
        d = self.draw
        label, field_slug = _field_names(field, element)
        n = d.int(path + "#sources", 1, 3)
        citations = []
        for i in range(n):
            url = f"https://{self.slug}.example.com/{field_slug}/{i + 1}"
            citations.append(
                {
                    "url": url if self.policy is None else self.policy.place(url, self.slug, i),
                    "title": f"{self.echo} — {label} (source {i + 1})",
                    "excerpts": None if basic else [f"{self.echo}: evidence for {label}."],
                }
            )
        return {
            "field": _entry_name(field, element),
            "reasoning": f"{self.prefix}Synthetic: the {label} of {self.echo} was read from {n} source(s).",
            "citations": citations,
            "confidence": None if basic else d.pick(path + "#confidence", _CONFIDENCE),
        }

    def sized_basis(
        self, field: str, path: str, basic: bool, target: int, value: Any = None, element: int | None = None
    ) -> dict[str, Any]:
        """`basis()` of about `target` bytes of JSON (`basis_bytes`); see `_sized_basis`."""
        src = self._sources
        if src is None:
            src = self._sources = _RowSources(self.echo, self.slug)
        confidence = None if basic else self.draw.pick(path + "#confidence", _CONFIDENCE)
        rng = _Rng(self.draw.seed(path + "#basis"))
        if not self.prefix:
            return _sized_basis(src, field, value, confidence, basic, target, rng, element, self.policy)
        # The follow-up's lead is part of the size: the rest of the entry gets what it leaves.
        target = max(target - _json_size(self.prefix), BASIS_BYTES_RANGE[0] // 2)
        entry = _sized_basis(src, field, value, confidence, basic, target, rng, element, self.policy)
        entry["reasoning"] = self.prefix + entry["reasoning"]
        return entry

    def bases(self, content: Mapping[str, Any], basic: bool, basis_bytes: int | None) -> list[dict[str, Any]]:
        """The basis of a JSON output: one entry per top-level field, each array field's followed by
        one entry per element (`field.0`, `field.1`, ...), as SDK 1.3.7 returns them."""
        out = []
        for key, value in content.items():
            path = "/" + key
            if basis_bytes is None:
                out.append(self.basis(key, path, basic))
            else:
                out.append(self.sized_basis(key, path, basic, basis_bytes, value))
            if not isinstance(value, list):
                continue
            for i, item in enumerate(value):
                # The element's own draw path: what `value()` drew its content from.
                at = f"{path}.{i}"
                if basis_bytes is None:
                    out.append(self.basis(key, at, basic, i))
                else:
                    out.append(self.sized_basis(key, at, basic, basis_bytes, item, i))
        return out


# --------------------------------------------------------------------------------------------------
# Bases of a realistic size (`basis_bytes`). Text is sliced from fixed pools of sentences at offsets a
# per-(input, schema, field) hash draws, so a 4 KB basis costs a few dozen slices, not per-character
# work, and the same inputs give the same bytes on every machine.

#: The `basis_bytes` values accepted, inclusive. Below the floor one citation and a sentence of reasoning
#: no longer fit the size; above the ceiling no answer is plausible.
BASIS_BYTES_RANGE = (512, 1_000_000)


def check_basis_bytes(value: Any) -> int | None:
    """`value` if it is a valid `basis_bytes` (None, or an int in `BASIS_BYTES_RANGE`), else ValueError."""
    if value is None:
        return None
    lo, hi = BASIS_BYTES_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"basis_bytes must be a whole number of bytes from {lo:,} to {hi:,} (the JSON size of each "
            f"field's basis), or None for compact answers; got {value!r}"
        )
    return value


# Sentences as research pages phrase them (excerpts), and as an analyst sums them up (reasoning). Plain
# printable ASCII without quotes or backslashes, so a slice's length is its JSON size.
_PAGE_SENTENCES = (
    "The company was incorporated in Delaware and has its principal executive offices in a leased "
    "building downtown.",
    "According to the most recent annual report, the firm employs staff across engineering, sales, "
    "operations and customer support.",
    "Its leadership team includes a chief executive officer, a chief financial officer and a chief "
    "technology officer, each with more than a decade of industry experience.",
    "The board of directors approved the appointment unanimously at its regular quarterly meeting.",
    "Revenue for the fiscal year grew at a double-digit rate, driven mainly by subscriptions and "
    "professional services.",
    "The press release, issued before the market opened, named a successor and confirmed the date of the "
    "transition.",
    "Founded by two former colleagues, the business began as a small consultancy before it shifted to "
    "software products.",
    "Customers include several Fortune 500 companies as well as public-sector agencies in North America "
    "and Europe.",
    "The filing lists the registered agent, the state of incorporation and the fiscal year end.",
    "Shares began trading on the exchange after an initial public offering that was priced above the "
    "expected range.",
    "In an interview, the chief executive said the company would keep investing in research and development.",
    "The headquarters moved to a larger campus to accommodate a growing workforce.",
    "Analysts covering the stock point to steady margins and a strong balance sheet with little debt.",
    "The product line spans hardware, cloud services and a developer platform used by thousands of teams.",
    "A spokesperson declined to comment on the figures but confirmed that the numbers in the report "
    "were accurate.",
    "The organization reported its headcount as of the end of the year, excluding contractors and "
    "temporary staff.",
    "Its flagship product was launched after three years of development and quickly became the main "
    "source of revenue.",
    "The acquisition, announced last spring, closed after regulators approved it without conditions.",
    "The company operates offices in several countries and serves customers in more than forty markets.",
    "Company records show a change of name shortly after the founding, when the current brand was adopted.",
    "The annual report describes the principal risks, including competition, regulation and the "
    "retention of key personnel.",
    "Industry databases classify the business under the same sector as its closest competitors.",
    "The chief executive previously led a division of a larger technology group and sits on two boards.",
    "The firm raised several rounds of venture funding before it became profitable.",
    "Its website lists the management team, the board and the locations of its main offices.",
    "Local news coverage described the opening of a new facility that added hundreds of jobs.",
    "The statement of operations shows growth in both product and service revenue year over year.",
    "A regulatory filing confirms the identity of the officers and the number of shares each holds.",
    "The company describes itself as a provider of tools for businesses of every size.",
    "Employee reviews mention a collaborative culture, competitive pay and frequent internal moves.",
    "The investor presentation highlights recurring revenue, customer retention and expansion plans.",
    "The founders remain involved in the business, one as chair of the board and one as an adviser.",
    "Its main competitors include larger incumbents and several venture-backed startups.",
    "The company publishes a sustainability report each year alongside its financial statements.",
    "Trade press coverage notes that the firm has expanded its partner network considerably.",
    "Public records show the company as active and in good standing with the state registry.",
    "The newsroom page lists recent announcements about products, partnerships and executive hires.",
    "The most recent quarterly results were in line with guidance issued at the start of the year.",
    "The profile on the business directory gives the founding year, the address and the industry code.",
    "Its products are sold directly and through resellers, with a growing share coming from online channels.",
)

_REASONING_SENTENCES = (
    "I searched the company's official website, its regulatory filings and recent news coverage.",
    "The official website and the most recent annual report agree on this value.",
    "Two independent business directories list the same information, which supports the answer.",
    "One older news article gives a different figure, but it predates the latest official statement.",
    "Where sources disagreed, I preferred primary sources such as filings and the company's own pages.",
    "The value was cross-checked against the investor relations page and a recent press release.",
    "No source contradicts this answer, although some profiles have not been updated recently.",
    "Third-party aggregators repeat the figure, most likely copied from the company's own disclosures.",
    "The most recent source found is from the last fiscal year, so the value may have changed since.",
    "I excluded sources that referred to a different company with a similar name.",
    "The filing is the most authoritative source because it is submitted under legal obligation.",
    "Several profiles list a rounded figure; the exact value comes from the annual report.",
    "The news coverage confirms the date and the circumstances of the change.",
    "The answer is consistent across the company website, a business directory and a financial data "
    "provider.",
    "Confidence is reduced slightly because one of the sources is a user-edited encyclopedia page.",
    "Historical records were used to confirm the earliest date mentioned by the company.",
    "The company's social media profile gives the same information as its website.",
    "Search results for the exact name returned consistent information across the first pages.",
    "Because the company is privately held, fewer audited figures are available than for a listed one.",
    "The sources were read in full rather than relying on search snippets alone.",
)

# How a citation's first excerpt opens: on the row's own name, so every row's excerpts are its own.
_EXCERPT_LEADS: tuple[Callable[[str, str], str], ...] = (
    lambda echo, label: f"{echo} - {label}:",
    lambda echo, label: f"About {echo}.",
    lambda echo, label: f"{echo} at a glance.",
    lambda echo, label: f"Company profile: {echo}.",
    lambda echo, label: f"{echo} ({label}).",
    lambda echo, label: f"Key facts about {echo}.",
)


def _num(x: int) -> int:
    return 100_000 + (x >> 3) % 900_000_000


def _date(x: int) -> str:
    return f"{2015 + x % 10}/{1 + (x >> 4) % 12:02d}/{1 + (x >> 8) % 28:02d}"


# The sources a citation can name: (url of (row, field slug, a 32-bit draw), title of (row, label)).
# f-strings rather than str.format templates: a 4 KB basis of a basic tier names a dozen sources, and
# f-strings never read the row's name as a template. The count is prime, so any step from 1 to the
# count - 1 walks all of them before one repeats.
_SOURCES: tuple[tuple[Callable[[_RowSources, str, int], str], Callable[[_RowSources, str], str]], ...] = (
    (lambda r, f, x: f"https://www.{r.slug}.com/", lambda r, lab: f"{r.echo} | Official Website"),
    (lambda r, f, x: f"https://www.{r.slug}.com/about/{f}", lambda r, lab: f"About {r.echo}: {lab}"),
    (lambda r, f, x: f"https://en.wikipedia.org/wiki/{r.wiki}", lambda r, lab: f"{r.echo} - Wikipedia"),
    (
        lambda r, f, x: f"https://www.crunchbase.com/organization/{r.slug}",
        lambda r, lab: f"{r.echo} - Crunchbase Company Profile & Funding",
    ),
    (
        lambda r, f, x: f"https://www.linkedin.com/company/{r.slug}/about/",
        lambda r, lab: f"{r.echo} | LinkedIn",
    ),
    (
        lambda r, f, x: f"https://www.bloomberg.com/profile/company/{r.ticker}:US",
        lambda r, lab: f"{r.echo} - Company Profile and News - Bloomberg",
    ),
    (
        lambda r, f, x: f"https://www.reuters.com/markets/companies/{r.ticker}.O/",
        lambda r, lab: f"{r.echo} ({r.ticker}) Company Profile | Reuters",
    ),
    (
        lambda r, f, x: f"https://finance.yahoo.com/quote/{r.ticker}/profile/",
        lambda r, lab: f"{r.echo} ({r.ticker}) Profile & Facts - Yahoo Finance",
    ),
    (
        lambda r, f, x: (
            f"https://www.sec.gov/cgi-bin/browse-edgar?action=getcompany&company={r.slug}&type=10-K"
        ),
        lambda r, lab: f"EDGAR Filings: {r.echo} annual reports",
    ),
    (
        lambda r, f, x: f"https://www.forbes.com/companies/{r.slug}/",
        lambda r, lab: f"{r.echo} | Company Overview & News - Forbes",
    ),
    (
        lambda r, f, x: f"https://techcrunch.com/{_date(x)}/{r.slug}-{f}/",
        lambda r, lab: f"{r.echo} and its {lab}: what we know | TechCrunch",
    ),
    (
        lambda r, f, x: f"https://www.businesswire.com/news/home/{_num(x)}/en/",
        lambda r, lab: f"{r.echo} Announces an Update on its {lab} | Business Wire",
    ),
    (
        lambda r, f, x: f"https://pitchbook.com/profiles/company/{_num(x)}-{x % 100}",
        lambda r, lab: f"{r.echo} Company Profile: Valuation & Investors | PitchBook",
    ),
    (
        lambda r, f, x: f"https://www.zoominfo.com/c/{r.slug}/{_num(x)}",
        lambda r, lab: f"{r.echo} - Overview, News & Competitors | ZoomInfo",
    ),
    (
        lambda r, f, x: f"https://opencorporates.com/companies/us_de/{_num(x)}",
        lambda r, lab: f"{r.echo} :: Delaware (US) :: OpenCorporates",
    ),
    (
        lambda r, f, x: f"https://www.glassdoor.com/Overview/Working-at-{r.wiki}-EI_IE{_num(x)}.htm",
        lambda r, lab: f"Working at {r.echo} | Glassdoor",
    ),
    (
        lambda r, f, x: f"https://news.ycombinator.com/item?id={_num(x)}",
        lambda r, lab: f"{r.echo} {lab} discussion | Hacker News",
    ),
    (
        lambda r, f, x: f"https://investors.{r.slug}.com/financial-information/annual-reports",
        lambda r, lab: f"Annual Reports | {r.echo} Investors",
    ),
    (
        lambda r, f, x: f"https://www.{r.slug}.com/newsroom/{_date(x)}/{f}",
        lambda r, lab: f"{r.echo} Newsroom: {lab}",
    ),
)
_N_SOURCES = len(_SOURCES)

_MASK64 = (1 << 64) - 1
_MAX_CITATIONS = 40
_MIN_EXCERPT = 60  # characters
_MIN_REASONING = 60
_REASONING_CAP = 6_000  # premium tiers: beyond it, a larger basis gets more excerpts, not longer reasoning
_CITATION_ESTIMATE = 170  # bytes of a citation without excerpts, to plan how many a basic basis holds
_CHUNK = 2_000  # the longest single slice of a pool


def _json_size(text: str) -> int:
    """Bytes of `text` in compact UTF-8 JSON, without the quotes; a C-speed check for the usual case."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text)
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


_BASIS_SKELETON = len('{"field":"","reasoning":"","citations":[],"confidence":null}')
_CITATION_SKELETON = len('{"url":"","title":"","excerpts":[]}')
_CITATION_SKELETON_BASIC = len('{"url":"","title":"","excerpts":null}')


class _Rng:
    """A 64-bit linear congruential generator (Knuth's MMIX constants) of its own, never the global one:
    one hash seeds the many cheap draws a basis needs."""

    __slots__ = ("_x",)

    def __init__(self, seed: int) -> None:
        self._x = seed & _MASK64

    def below(self, n: int) -> int:
        """An integer in [0, n) (n < 2**32), from the generator's high bits (its low bits are weak)."""
        self._x = x = (self._x * 6364136223846793005 + 1442695040888963407) & _MASK64
        return ((x >> 32) * n) >> 32


class _Pool:
    """Sentences in a fixed order of fixed shuffles, joined into one string, and where each one starts."""

    __slots__ = ("count", "starts", "text")

    def __init__(self, sentences: tuple[str, ...], copies: int) -> None:
        rng = _Rng(0x5EED)
        order = list(range(len(sentences)))
        parts: list[str] = []
        for _ in range(copies):
            for i in range(len(order) - 1, 0, -1):
                j = rng.below(i + 1)
                order[i], order[j] = order[j], order[i]
            parts.extend(sentences[k] for k in order)
        self.text = " ".join(parts)
        starts, at = [], 0
        for part in parts:
            starts.append(at)
            at += len(part) + 1
        # Only sentences a whole chunk can follow, so every slice is full length.
        self.starts = tuple(a for a in starts if a + _CHUNK <= len(self.text))
        self.count = len(self.starts)

    def passage(self, rng: _Rng, length: int, ending: str) -> str:
        """At most `length` characters from a sentence start: whole sentences when one ends within the
        last fifth (at most 160 characters), else cut at a word and closed with `ending`."""
        text, starts = self.text, self.starts
        out = ""
        while length > _CHUNK:  # long text: whole sentences, chunk by chunk
            a = starts[rng.below(self.count)]
            piece = text[a : a + _CHUNK]
            piece = piece[: piece.rfind(". ") + 1]
            out += piece + " "
            length -= len(piece) + 1
        a = starts[rng.below(self.count)]
        piece = text[a : a + length + 1]  # + 1: see whether the slice ends a sentence
        end = piece.rfind(". ", length - min(160, length // 5))
        if end >= 0:
            return out + piece[: end + 1]
        cut = piece.rfind(" ", 0, length - len(ending))
        return out + piece[: max(cut, 1)].rstrip(",;:") + ending


_PAGES = _Pool(_PAGE_SENTENCES, 8)
_ANALYSIS = _Pool(_REASONING_SENTENCES, 16)


@functools.lru_cache(maxsize=4096)
def _field_plan(field: str, element: int | None = None) -> tuple[str, str, int, bool]:
    """(label, slug, JSON size of the entry's name, whether the label is plain) of a top-level field or
    of one element of an array field."""
    label, slug = _field_names(field, element)
    return label, slug, _json_size(_entry_name(field, element)), _json_size(label) == len(label)


class _RowSources:
    """What a row's citations share across its fields: its name, slugs and ticker."""

    __slots__ = ("echo", "plain", "slug", "ticker", "wiki")

    def __init__(self, echo: str, slug: str) -> None:
        self.echo = echo
        self.plain = _json_size(echo) == len(echo)  # so a string with the echo in it measures as its len
        self.slug = slug
        self.wiki = "_".join(w.capitalize() for w in slug.split("-"))
        self.ticker = (re.sub(r"[^A-Z]", "", echo.upper()) or "XYZ")[:4]

    def citation(self, source: int, lap: int, field: str, label: str, rng: _Rng) -> tuple[str, str]:
        """(url, title) of `_SOURCES[source]`; `lap` > 0 when the sources ran out, to keep urls distinct."""
        url_of, title_of = _SOURCES[source]
        url = url_of(self, field, rng.below(1 << 32))
        if lap:
            url += f"{'&' if '?' in url else '?'}page={lap + 1}"
        return url, title_of(self, label)


def _sized_basis(
    src: _RowSources,
    field: str,
    value: Any,
    confidence: str | None,
    basic: bool,
    target: int,
    rng: _Rng,
    element: int | None = None,
    policy: SourcePolicy | None = None,
) -> dict[str, Any]:
    """A FieldBasis of about `target` bytes of compact UTF-8 JSON, shaped like a real one.

    Premium tiers: a few citations (more as `target` grows), each with excerpt passages of varied length,
    and a reasoning paragraph of 10-18 % of the size (at most `_REASONING_CAP`). Basic tiers (no excerpts,
    no confidence): 35-50 % reasoning, the rest in citations. Sizes are counted as the parts are made (a
    string's len, when the row and field names need no JSON escapes), so nothing is encoded; the
    reasoning comes last and fills what is left. `element`: the entry of that element of an array
    field. `policy`: citations it does not allow are moved to hosts it does (`SourcePolicy.place`).
    """
    label, field_slug, field_size, label_plain = _field_plan(field, element)
    size_of = len if src.plain and label_plain else _json_size
    size = _BASIS_SKELETON + field_size + (len(confidence) - 2 if confidence else 0)
    if basic:
        reasoning = target * (35 + rng.below(16)) // 100
        wanted = (target - size - reasoning) // _CITATION_ESTIMATE
        skeleton, least = _CITATION_SKELETON_BASIC, 0
    else:
        reasoning = min(_REASONING_CAP, target * (10 + rng.below(9)) // 100)
        wanted = target // 1200 + 1 + rng.below(3)
        skeleton, least = _CITATION_SKELETON, _MIN_EXCERPT + 2  # a citation needs one excerpt
    wanted = max(1, min(_MAX_CITATIONS, wanted))
    reasoning = max(reasoning, _MIN_REASONING)
    # Distinct sources in an order of the field's own: any step walks them all (their count is prime).
    start, step = rng.below(_N_SOURCES), 1 + rng.below(_N_SOURCES - 1)
    citations: list[dict[str, Any]] = []
    for i in range(wanted):
        url, title = src.citation((start + i * step) % _N_SOURCES, i // _N_SOURCES, field_slug, label, rng)
        if policy is not None:
            url = policy.place(url, src.slug, i)
        cost = skeleton + len(url) + size_of(title) + (1 if citations else 0)
        if citations and size + cost + least + reasoning > target:
            break
        size += cost
        citations.append({"url": url, "title": title, "excerpts": None if basic else []})
    if not basic:
        size += _fill_excerpts(citations, target - reasoning - size, rng, src.echo, label, size_of)
    n = len(citations)
    found = f"The {label} of {src.echo} was found in {n} source(s)."
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 80:
        lead = f"The {label} of {src.echo} is {value}, found in {n} source(s)."
        if size + _json_size(lead) > target:
            lead = found
    else:
        lead = found
    if size + _json_size(lead) > target:  # long names, small target: the shortest reasoning
        lead = f"Found in {n} source(s)."
    rest = target - size - _json_size(lead) - 1
    text = lead if rest < _MIN_EXCERPT else lead + " " + _ANALYSIS.passage(rng, rest, ".")
    return {
        "field": _entry_name(field, element),
        "reasoning": text,
        "citations": citations,
        "confidence": confidence,
    }


def _fill_excerpts(
    citations: list[dict[str, Any]],
    budget: int,
    rng: _Rng,
    echo: str,
    label: str,
    size_of: Callable[[str], int],
) -> int:
    """Give the citations excerpts of varied length until about `budget` bytes are spent; return the bytes.

    Every citation gets one excerpt first, opening on the row's own name; then random ones get more. The
    last excerpt takes what is left rather than leave a crumb. A citation that got none (the budget ran
    out first) is dropped, and its bytes given back.
    """
    spent = 0
    n = len(citations)
    i = 0
    while True:
        left = budget - spent - 3  # the quotes and a comma
        if left < _MIN_EXCERPT:
            break
        x = rng.below(1 << 32)  # one draw for the length, the lead and the citation
        length = 120 + x % 780
        if length > left - _MIN_EXCERPT - 3:
            length = left
        if i < n:
            lead = _EXCERPT_LEADS[(x >> 10) % len(_EXCERPT_LEADS)](echo, label)
            if length - len(lead) - 1 >= _MIN_EXCERPT:
                text = lead + " " + _PAGES.passage(rng, length - len(lead) - 1, "...")
            else:  # no room for the lead
                text = _PAGES.passage(rng, length, "...")
            spent += size_of(text) + 2
            citations[i]["excerpts"].append(text)
        else:
            text = _PAGES.passage(rng, length, "...")
            spent += len(text) + 3
            citations[((x >> 16) * n) >> 16]["excerpts"].append(text)
        i += 1
    while len(citations) > 1 and not citations[-1]["excerpts"]:
        gone = citations.pop()
        spent -= _CITATION_SKELETON + len(gone["url"]) + size_of(gone["title"]) + 1
    return spent


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


def _text(description: str | None, gen: _Gen, basic: bool, basis_bytes: int | None) -> tuple[str, list]:
    draw = gen.draw
    topic = f" Task: {' '.join(description.split())[:120]}" if description else ""
    content = (
        f"{gen.echo}: synthetic research summary ({draw.tag('text')}).{topic} "
        f"{draw.int('text#n', 2, 9)} sources agree on the main points; see the cited pages for details."
    )
    if basis_bytes is None:
        return content, [gen.basis("output", "output", basic)]
    return content, [gen.sized_basis("output", "output", basic, basis_bytes)]


def synth_output(
    input: str | Mapping[str, Any],
    output_schema: Any = None,
    *,
    processor: str | None = None,
    basis_bytes: int | None = None,
    source_policy: Mapping[str, Any] | None = None,
    previous_interaction_id: str | None = None,
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """The (content, basis) the emulator answers for `input` under `output_schema`.

    `output_schema` is the task spec's `output_schema` in any spelling the API accepts: a json
    schema wrapper `{"type": "json", "json_schema": {...}}`, a bare JSON schema `{"type": "object",
    ...}`, a text schema `{"type": "text", "description": ...}`, a bare string (text), `{"type":
    "auto"}`, or None (no task spec, which means auto). Text, and auto below the `pro` tier, give a
    string; json gives a dict that conforms to the schema; auto on `pro` and above gives a dict that
    conforms to `AUTO_SCHEMA`.

    `basis` holds one FieldBasis dict per top-level field (`"output"` for text), and after an array
    field's one entry per element (`"field.0"`, `"field.1"`, ...), as SDK 1.3.7 returns them.
    `processor` only changes the basis: `lite`/`base` give no confidence and no excerpts. `basis_bytes`
    only changes the basis too: None (the default) gives compact entries; an int in `BASIS_BYTES_RANGE`
    makes each entry, element entries included, about that many bytes of compact JSON (see
    `EmulatorConfig.basis_bytes`). The run's `source_policy` and `previous_interaction_id` change the
    basis only: every citation is on a domain the policy allows (`sources.SourcePolicy`), and a
    follow-up's reasoning opens with "Following up on interaction <id>: ". The result depends only on
    these arguments (the processor by its tier), so it is the same on every emulator and run.
    """
    basis_bytes = check_basis_bytes(basis_bytes)
    return _synth(
        input,
        output_schema,
        processor,
        _canonical(output_schema),
        basis_bytes,
        SourcePolicy.of(source_policy),
        previous_interaction_id,
    )


def _synth(
    input: str | Mapping[str, Any],
    output_schema: Any,
    processor: str | None,
    schema_json: str,
    basis_bytes: int | None = None,
    policy: SourcePolicy | None = None,
    previous: str | None = None,
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """`synth_output()` given `schema_json = _canonical(output_schema)`, which a caller may compute once,
    a `basis_bytes` already checked and the source policy parsed."""
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
        gen = _Gen(input, {}, draw, policy, previous)
        return _text(schema if kind == "text" else None, gen, basic, basis_bytes)
    gen = _Gen(input, schema, draw, policy, previous)
    content = gen.obj(gen.resolve(schema), "", 0)
    return content, gen.bases(content, basic, basis_bytes)


def build_output(
    input: str | Mapping[str, Any],
    task_spec: Mapping[str, Any] | None,
    processor: str,
    *,
    basis_bytes: int | None = None,
    source_policy: Mapping[str, Any] | None = None,
    previous_interaction_id: str | None = None,
) -> dict[str, Any]:
    """The wire `output` object (TaskRunJsonOutput or TaskRunTextOutput) of a completed run."""
    output_schema = task_spec.get("output_schema") if task_spec else None
    return output_of(
        input,
        output_schema,
        _canonical(output_schema),
        processor,
        check_basis_bytes(basis_bytes),
        SourcePolicy.of(source_policy),
        previous_interaction_id,
    )


def output_of(
    input: str | Mapping[str, Any],
    output_schema: Any,
    schema_json: str,
    processor: str,
    basis_bytes: int | None = None,
    policy: SourcePolicy | None = None,
    previous: str | None = None,
) -> dict[str, Any]:
    """`build_output()` given the task spec's `output_schema` and `schema_json = _canonical(output_schema)`,
    so a caller answering many runs of one spec (the emulator) encodes the schema once. `basis_bytes` is
    not checked here: the emulator's config did that."""
    content, basis = _synth(input, output_schema, processor, schema_json, basis_bytes, policy, previous)
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
    run_input: Mapping[str, Any],
    *,
    default_task_spec: Mapping[str, Any] | None = None,
    basis_bytes: int | None = None,
) -> dict[str, Any]:
    """The `output` that `GET /v1/tasks/runs/{id}/result` answers for a run created from `run_input`.

    `run_input` is the TaskRunInput as sent (`input`, `processor`, optional `task_spec`, and the
    `source_policy` and `previous_interaction_id` that shape the basis); `default_task_spec` is the
    add-runs request's default, used when the input has no `task_spec`; `basis_bytes` is the
    emulator's `EmulatorConfig.basis_bytes`.

        >>> out = expected_output({"input": "Acme Corp", "processor": "base"})
        >>> out["type"], out["basis"][0]["field"]
        ('text', 'output')
    """
    spec = run_input.get("task_spec") or default_task_spec
    return build_output(
        run_input["input"],
        spec,
        run_input["processor"],
        basis_bytes=basis_bytes,
        source_policy=run_input.get("source_policy"),
        previous_interaction_id=run_input.get("previous_interaction_id"),
    )
