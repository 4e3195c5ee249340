"""Source policies (task-api.md §2.1): the syntax of their domain entries, which URLs they allow, and
where a synthetic citation they do not allow is moved to (`SourcePolicy`).

An entry is a plain domain (`acme.com`: that host and its subdomains), a domain with a path prefix
(`docs.python.org/3`: matched at segment boundaries, case-sensitive, trailing slashes ignored, dot
segments normalized), or a domain extension (`.gov`, `.co.uk`). Entries carry no scheme, port, query or
fragment (the SDK's `SourcePolicy` docstring); domains compare without regard to case. When
`include_domains` is non-empty it is the whole allowlist and `exclude_domains` is ignored.
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["SourcePolicy", "domain_entry_problem"]

# A DNS label as a domain entry may spell it: letters (any script) and digits, inner hyphens.
_LABEL = re.compile(r"[^\W_](?:[^\W_]|-)*", re.UNICODE)
_MAX_FALLBACKS = 201  # more hosts of distinct extensions than a policy has entries (at most 200)


@dataclass(frozen=True, slots=True)
class _Entry:
    host: str  # lower case; for an extension, without its leading dot
    extension: bool  # `.tld`: any host that ends with it
    path: str  # "" or a normalized "/segment/..." prefix without a trailing slash

    def matches(self, host: str, path: str) -> bool:
        if self.extension:
            return host.endswith("." + self.host)
        if host != self.host and not host.endswith("." + self.host):
            return False
        return not self.path or path == self.path or path.startswith(self.path + "/")


def domain_entry_problem(entry: str) -> str | None:
    """Why `entry` is not a valid source-policy entry, or None when it is one."""
    if not entry or entry != entry.strip() or any(c.isspace() for c in entry):
        return "A domain entry must be a non-empty domain without spaces"
    if "://" in entry:
        return "A domain entry takes no scheme: write 'example.com', not 'https://example.com'"
    if "?" in entry or "#" in entry:
        return "A domain entry takes no query string or fragment"
    host, slash, _ = entry.partition("/")
    if ":" in host or "@" in host:
        return "A domain entry takes no port or user"
    extension = host.startswith(".")
    labels = (host[1:] if extension else host).split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return "A domain entry must be a domain such as 'example.com', 'example.com/path' or '.gov'"
    if extension and slash:
        return "A domain extension such as '.gov' takes no path"
    if not extension and len(labels) < 2:
        return "A domain needs at least two labels ('example.com'); write a domain extension as '.gov'"
    return None


@functools.lru_cache(maxsize=4096)
def _entry(text: str) -> _Entry:
    host, slash, path = text.partition("/")
    extension = host.startswith(".")
    if slash:
        path = posixpath.normpath("/" + path).rstrip("/")
        path = "" if path in ("", "/", "//") else path
    return _Entry(host.lower().lstrip("."), extension, path)


class SourcePolicy:
    """The domain rules of one `source_policy` object: which URLs it allows, and where to move one
    it does not (`place`). Its `after_date` does not affect citations."""

    __slots__ = ("exclude", "include")

    def __init__(self, include: list[str] | None, exclude: list[str] | None) -> None:
        self.include = [_entry(e) for e in include or ()]
        # "When include_domains is non-empty, it is the whole allowlist and exclude_domains is ignored."
        self.exclude = [] if self.include else [_entry(e) for e in exclude or ()]

    @classmethod
    def of(cls, source_policy: Mapping[str, Any] | None) -> SourcePolicy | None:
        """The policy of a (valid) `source_policy` object, or None when it restricts no domain."""
        if not source_policy:
            return None
        policy = cls(source_policy.get("include_domains"), source_policy.get("exclude_domains"))
        return policy if policy.include or policy.exclude else None

    def allows(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        path = parts.path or "/"
        if self.include:
            return any(e.matches(host, path) for e in self.include)
        return not any(e.matches(host, path) for e in self.exclude)

    def place(self, url: str, slug: str, n: int) -> str:
        """`url` if the policy allows it, else the same path (and query) on a host it allows.

        With an allowlist, the host comes from entry `n` (modulo their count): the domain itself, the
        domain with its path prefix put before the path, or `{slug}.{extension}`. With only exclusions,
        the first allowed of a few plausible hosts of the row (`slug`), then of hosts of distinct
        extensions, more than a policy has entries, so one is always allowed.
        """
        if self.allows(url):
            return url
        parts = urlsplit(url)
        rest = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if self.include:
            entry = self.include[n % len(self.include)]
            if entry.extension:
                return f"https://{slug}.{entry.host}{rest}"
            return f"https://{entry.host}{entry.path}{rest}"
        for host in _fallback_hosts(slug):
            moved = f"https://{host}{rest}"
            if self.allows(moved):
                return moved
        raise AssertionError("unreachable: a policy has fewer entries than there are fallback hosts")


def _fallback_hosts(slug: str) -> list[str]:
    return [
        f"www.{slug}.org",
        f"{slug}.example.net",
        f"news.{slug}.io",
        *(f"{slug}.example{k}" for k in range(_MAX_FALLBACKS)),
    ]
