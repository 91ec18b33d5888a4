"""Tracked session parameters: which ones, how clients set them, how a server is brought in line.

PgBouncer keeps a small set of GUC_REPORT parameters per client and per server connection. A
client's values come from its startup packet (and its ``options``) and from every
ParameterStatus a server reports while linked to it; a server's values from its own reports.
When a client gets a server whose values differ, one ``SET k='v';...`` query runs first
(``server_set_query``), so no client ever sees another client's settings (DESIGN invariant 7).
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: Always tracked, as in PgBouncer; names as the server reports them.
BASE_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings",
                "application_name")


class Tracked:
    """The tracked parameter names of one configuration, matched case-insensitively."""

    __slots__ = ("by_lower", "names")

    def __init__(self, extra: Iterable[str]) -> None:
        names = list(BASE_TRACKED) + [n for n in extra if n]
        self.by_lower = {n.lower(): n for n in names}
        self.names = tuple(self.by_lower.values())

    def key(self, params: Mapping[str, str]) -> tuple:
        """The tracked values in a fixed order: equal keys need no SET (checked per link)."""
        return tuple([params.get(n) for n in self.names])

    def canonical(self, name: str) -> str | None:
        """The reported spelling of a tracked parameter, or None when it is not tracked."""
        return self.by_lower.get(name.lower())


def parse_options(options: str) -> list[tuple[str, str]]:
    """Split a startup ``options`` value: only ``-c k=v`` and ``--k=v`` are allowed.

    Raises ValueError with PgBouncer's wording otherwise. Backslash escapes a space.
    """
    words: list[str] = []
    cur: list[str] = []
    escape = False
    for ch in options:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif word.startswith("-c") and len(word) > 2:
            setting = word[2:]
            i += 1
        elif word.startswith("--"):
            setting = word[2:]
            i += 1
        else:
            raise ValueError(
                "unsupported options startup parameter: only '-c config=val' and "
                "'--config=val' are allowed")
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(
                "unsupported options startup parameter: only '-c config=val' and "
                "'--config=val' are allowed")
        pairs.append((key.replace("-", "_"), value))
    return pairs


def quote_literal(value: str) -> str:
    """A SQL literal for ``value`` that is correct whatever standard_conforming_strings is."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def server_set_query(client: Mapping[str, str], server: Mapping[str, str]) -> str | None:
    """The query that gives ``server`` the client's values, or None when they already agree."""
    parts = []
    for name, value in client.items():
        current = server.get(name)
        if current is None or current.lower() != value.lower():
            parts.append("SET %s=%s;" % (name, quote_literal(value)))
    return "".join(parts) or None
