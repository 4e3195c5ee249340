"""Source policies (task-api.md §2.1): the syntax of their domain entries (`domain_entry_problem`).

An entry is a plain domain (`acme.com`: that host and its subdomains), a domain with a path prefix
(`docs.python.org/3`: matched at segment boundaries, case-sensitive, trailing slashes ignored, dot
segments normalized), or a domain extension (`.gov`, `.co.uk`). Entries carry no scheme, port, query or
fragment (the SDK's `SourcePolicy` docstring); domains compare without regard to case. When
`include_domains` is non-empty it is the whole allowlist and `exclude_domains` is ignored.
"""

from __future__ import annotations

import re

__all__ = ["domain_entry_problem"]

# A DNS label as a domain entry may spell it: letters (any script) and digits, inner hyphens.
_LABEL = re.compile(r"[^\W_](?:[^\W_]|-)*", re.UNICODE)


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
