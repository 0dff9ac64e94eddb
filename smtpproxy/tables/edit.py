"""Writes to the writable tables: one entry of a key's value added or removed.

Writable are ``redis`` tables (live: proxies see a change once their cached answer expires)
and ``file`` tables (the file rewritten in place, atomically, comments and other lines kept;
the proxy reads it at its next reload). A value's entries are separated by commas or spaces,
as the lists plugin and the sender/login map read them. ``smtpproxy tables add|remove`` and
the console's list pages both edit through here, so they agree on what an edit is.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from enum import Enum
from pathlib import Path

from smtpproxy.tables.memory import read_entries
from smtpproxy.tables.redis import RedisBackend

__all__ = ["WRITABLE", "Edit", "changed", "edit_file", "edit_redis", "file_rows", "one_entry",
           "split_entries"]

WRITABLE = ("redis", "file")
_SPLIT = re.compile(r"[,\s]+")


class Edit(Enum):
    """What an edit did."""

    DONE = "done"
    ALREADY_THERE = "already there"
    NOTHING_TO_REMOVE = "nothing to remove"


def split_entries(values: tuple[str, ...] | list[str] | None) -> list[str]:
    """The entries of a key's values (each value split at commas and white space)."""
    return [e for v in (values or ()) for e in _SPLIT.split(v) if e]


def one_entry(value: str) -> bool:
    """Whether *value* reads back as exactly one entry (no commas, white space or control
    characters): anything else would add several entries, or other ones, than the one meant."""
    return bool(value) and value.isprintable() and not _SPLIT.search(value)


def _check(value: str | None) -> None:
    if value and not one_entry(value):
        raise ValueError(f"{value!r} is not one entry: no commas, spaces or control characters")


def changed(entries: list[str], value: str | None, add: bool) -> list[str] | None:
    """The entries after the edit, or None when it changes nothing (compared without case)."""
    if add:
        assert value is not None
        return None if any(e.lower() == value.lower() for e in entries) else [*entries, value]
    if value is None:
        return [] if entries else None
    kept = [e for e in entries if e.lower() != value.lower()]
    return None if len(kept) == len(entries) else kept


async def edit_redis(backend: RedisBackend, key: str, value: str | None, *, add: bool) -> Edit:
    """Add *value* to (or remove it, or with None the whole key, from) *key* in Redis;
    ValueError when *value* is not :func:`one_entry`."""
    _check(value)
    if backend.structure == "set":
        if add:
            assert value is not None
            await backend.add(key, value)
        elif not await backend.remove(key, value):
            return Edit.NOTHING_TO_REMOVE
        return Edit.DONE
    outcome = Edit.DONE

    def change(current: str | None) -> str | None:
        nonlocal outcome
        after = changed(split_entries(None if current is None else (current,)), value, add)
        if after is None:  # written back unchanged
            outcome = Edit.ALREADY_THERE if add else Edit.NOTHING_TO_REMOVE
            return current
        outcome = Edit.DONE
        return ", ".join(after) or None

    await backend.update(key, change)
    return outcome


def edit_file(path: Path, key: str, value: str | None, *, add: bool) -> Edit:
    """Blocking: rewrite the entry of *key* in a Postfix-style file; every other line stays.
    A file the proxy could not read either is refused (TableError); ValueError when *value*
    is not :func:`one_entry`. Edits of files in one directory take turns, in this process and
    across processes (the console, ``smtpproxy tables``, the CLI's allow sender): each
    reads the file and replaces it, so two at once would lose one. The lock is ``flock`` on
    the directory, since the file itself is replaced by each edit."""
    _check(value)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        return _edit_file(path, key, value, add=add)
    finally:
        os.close(directory)  # and with it the lock


def _edit_file(path: Path, key: str, value: str | None, *, add: bool) -> Edit:
    read_entries(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = end = -1  # the entry's first and last physical line (continuations may follow comments)
    for index, raw in enumerate(lines):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if start >= 0:
                end = index
            continue
        if start >= 0:
            break
        if raw.split(None, 1)[0].lower() == key.lower():
            start = end = index
    entries: list[str] = []
    if start >= 0:
        logical = " ".join(line.strip() for line in lines[start:end + 1]
                           if line.strip() and not line.lstrip().startswith("#"))
        entries = [e for e in _SPLIT.split(logical.split(None, 1)[1] if " " in logical or "\t" in logical
                                          else "") if e]
    after = changed(entries, value, add)
    if after is None:
        return Edit.ALREADY_THERE if add else Edit.NOTHING_TO_REMOVE
    new = [f"{key}  {', '.join(after)}\n"] if after else []
    if start >= 0:
        # The entry's lines go (comment lines among them stay), its new line takes the first's place.
        kept = [line for line in lines[start + 1:end + 1]
                if not line.strip() or line.lstrip().startswith("#")]
        lines[start:end + 1] = new + kept
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += new
    _write_atomically(path, "".join(lines))
    return Edit.DONE


def file_rows(path: Path) -> list[tuple[str, list[str]]]:
    """Blocking: the ``(key, entries)`` of a table file as it is now (TableError if unreadable)."""
    return [(key.lower(), split_entries([value])) for key, value, _ in read_entries(path)]


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
