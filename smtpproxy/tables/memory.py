"""Tables held in memory: inline YAML, a Postfix-style file, a list of regular expressions.

Files are read when the configuration is loaded, and again at each reload (SIGHUP): a file
with an error fails the load or the reload (``file:line: problem``), never half-applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from smtpproxy.tables.base import Backend, Values
from smtpproxy.tables.errors import TableError

__all__ = ["InlineBackend", "RegexpBackend", "parse_regexp", "read_entries"]

_GROUP = re.compile(r"\$(\d|\{\d\})")


class InlineBackend(Backend):
    """Keys and values from the configuration (``entries:``) or a file (``type: file``)."""

    kind = "inline"

    def __init__(self, entries: Mapping[str, Values], *, fold_case: bool = True, kind: str = "inline"):
        self.kind = kind
        self._entries = {(k.lower() if fold_case else k): v for k, v in entries.items()}

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, key: str) -> Values | None:
        return self._entries.get(key)

    def items(self) -> Iterable[tuple[str, Values]]:
        return self._entries.items()


class RegexpBackend(Backend):
    """Postfix's regexp_table: the first pattern that matches answers; ``$1`` in its value is
    the pattern's first group."""

    kind = "regexp"

    def __init__(self, patterns: Iterable[tuple[re.Pattern[str], Values]]):
        self._patterns = tuple(patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    async def lookup(self, key: str) -> Values | None:
        for regex, values in self._patterns:
            match = regex.search(key)
            if match is not None:
                return tuple(_expand(match, v) for v in values)
        return None


def _expand(match: re.Match[str], value: str) -> str:
    """*value* with ``$1`` (``${1}``) replaced by the match's group."""
    return _GROUP.sub(lambda g: match.group(int(g.group(1).strip("{}"))) or "", value)


def inline_values(value: object, where: str) -> Values:
    """A YAML value as the table's values: a string is one value, a list several."""
    if isinstance(value, str):
        values: Values = (value,)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = tuple(value)
    else:
        raise TableError(f"{where}: the value must be a string or a list of strings")
    if not values or any(not v or not v.isprintable() for v in values):
        raise TableError(f"{where}: empty value or control characters")
    return values


def parse_regexp(text: str, values: Values, where: str) -> tuple[re.Pattern[str], Values]:
    """``/pattern/flags`` (flags: ``i`` case-insensitive, the default, or ``I`` case-sensitive)."""
    if len(text) < 2 or not text.startswith("/") or text.rfind("/") == 0:
        raise TableError(f"{where}: {text!r} is not '/pattern/' (with optional flags i or I)")
    end = text.rfind("/")
    body, flags = text[1:end], text[end + 1:]
    if set(flags) - {"i", "I"}:
        raise TableError(f"{where}: {text}: unknown flags {flags!r} (i or I)")
    try:
        regex = re.compile(body, 0 if "I" in flags else re.IGNORECASE)
    except re.error as exc:
        raise TableError(f"{where}: bad pattern {text}: {exc}") from None
    for value in values:
        for group in _GROUP.finditer(value):
            if int(group.group(1).strip("{}")) > regex.groups:
                raise TableError(
                    f"{where}: {text}: {group.group(0)} but the pattern has {regex.groups} groups")
    return regex, values


def logical_lines(path: str | Path) -> list[tuple[int, str]]:
    """The ``(first line number, text)`` entries of a Postfix-style map file: blank lines and
    ``#`` comment lines skipped, a line starting with white space joined to the one before.
    Every map file smtpproxy reads (file and regexp tables, the sender/login map) goes through
    here, so they agree on what a line is; a problem raises TableError naming file:line."""
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TableError(f"{file}: not valid UTF-8 text") from None
    except OSError as exc:
        raise TableError(f"{file}: cannot read: {exc.strerror or exc}") from None
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if not logical:
                raise TableError(f"{file}:{number}: continuation line without an entry")
            first, previous = logical[-1]
            logical[-1] = (first, previous + " " + raw.strip())
        else:
            logical.append((number, raw.strip()))
    return logical


def read_entries(path: str | Path, *, regexp: bool = False) -> list[tuple[str, str, str]]:
    """The ``(key, value, "file:line")`` entries of a Postfix-style table file.

    ``#`` starts a comment line, a line starting with white space continues the one before, and
    the key ends at the first white space (for a regexp file: at the pattern's closing ``/`` and
    its flags). A key without a value, or a key given twice, is an error naming both lines.
    """
    file = str(path)
    logical = logical_lines(file)
    entries: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    for number, line in logical:
        where = f"{file}:{number}"
        if regexp:
            match = re.match(r"(/.*/[iI]*)(?:\s+(.*))?\Z", line)
            if match is None:
                raise TableError(f"{where}: expected '/pattern/ value'")
            key, value = match.group(1), (match.group(2) or "").strip()
        else:
            key, value = _split(line)
        if not value:
            raise TableError(f"{where}: {key!r} has no value")
        if not value.isprintable():
            raise TableError(f"{where}: {key!r}: control characters in the value")
        if not regexp:
            folded = key.lower()
            if folded in seen:
                raise TableError(f"{where}: {key!r} is already on line {seen[folded]}")
            seen[folded] = number
        entries.append((key, value, where))
    return entries


def _split(line: str) -> tuple[str, str]:
    parts = line.split(None, 1)
    return parts[0], parts[1].strip() if len(parts) > 1 else ""
