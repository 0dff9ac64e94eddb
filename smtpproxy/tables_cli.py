"""``smtpproxy tables list|query|add|remove``: look into lookup tables and edit the writable ones.

Writable are ``redis`` tables (the change is live: the proxies see it when their cached
answer expires, ``cache_ttl``/``negative_ttl``) and ``file`` tables (the file is rewritten in
place, atomically, comments and other lines kept; the proxy reads it at the next reload).
``add`` and ``remove`` work on the entries of a value, separated by commas or spaces (what the
lists plugin and the sender/login map read), so ``add allow bob@example.com partner.test`` adds
one entry to bob's list. ``query`` looks one key up exactly as the proxy would (without the
search order), for every table type. Exit codes: 0 done (``query``: found), 1 the backend
failed, 2 usage or configuration error, 3 (``query``) not found.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpproxy.config import Config
from smtpproxy.tables import TableUnavailable, build_tables
from smtpproxy.tables.memory import InlineBackend, read_entries
from smtpproxy.tables.redis import RedisBackend

__all__ = ["edit_entry", "tables_command"]

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3
_SPLIT = re.compile(r"[,\s]+")


def tables_command(config: Config, action: str, name: str, key: str | None, value: str | None) -> int:
    if name not in config.tables:
        known = ", ".join(sorted(config.tables)) or "none"
        return _usage(f"no table named {name!r} in tables ({known})")
    spec = config.tables[name]
    if action in ("query", "add", "remove") and not key:
        return _usage(f"tables {action} needs a key")
    if action == "add" and not value:
        return _usage("tables add needs a key and a value")
    if value is not None and (not value.isprintable() or _SPLIT.search(value)):
        return _usage("a value is one entry: no spaces, commas or control characters")
    if key is not None and (not key.isprintable() or any(c.isspace() for c in key)):
        return _usage("a key has no spaces or control characters")
    if action in ("add", "remove") and spec.type not in ("redis", "file"):
        return _usage(f"table {name} ({spec.type}) is not writable here: only redis and file tables are")
    try:
        return asyncio.run(_run(config, action, name, key, value))
    except TableUnavailable as exc:
        print(f"smtpproxy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a write's own library errors (redis), a file that cannot be written
        print(f"smtpproxy: table {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _usage(text: str) -> int:
    print(f"smtpproxy: {text}", file=sys.stderr)
    return EXIT_USAGE


async def _run(config: Config, action: str, name: str, key: str | None, value: str | None) -> int:
    spec = config.tables[name]
    tables = build_tables({name: spec})
    table = tables[name]
    try:
        if action == "query":
            assert key is not None
            found = await table.lookup(key)
            if found is None:
                print(f"{key}: not found")
                return EXIT_NOT_FOUND
            for v in found:
                print(v)
            return 0
        if action == "list":
            return await _list(table.backend, name, spec.type, key)
        assert key is not None
        return await _edit(table.backend, spec, key, value, add=action == "add", say=print)
    finally:
        await tables.close()


async def edit_entry(config: Config, name: str, key: str, value: str, *, add: bool,
                     say: Callable[[str], None]) -> int:
    """Add (or remove) one entry of a writable (file or redis) table, as ``tables add|remove``
    does, telling *say* what happened; 0 done (or already there), 3 nothing to remove."""
    spec = config.tables[name]
    tables = build_tables({name: spec})
    try:
        return await _edit(tables[name].backend, spec, key, value, add=add, say=say)
    finally:
        await tables.close()


async def _edit(backend: object, spec: Any, key: str, value: str | None, *, add: bool,
                say: Callable[[str], None]) -> int:
    folded = key.lower() if spec.fold_case else key
    if spec.type == "file":
        return await asyncio.to_thread(_edit_file, Path(spec.file), folded, value, add=add, say=say)
    assert isinstance(backend, RedisBackend)
    return await _edit_redis(backend, folded, value, add=add, say=say)


async def _list(backend: object, name: str, kind: str, key: str | None) -> int:
    rows: list[tuple[str, tuple[str, ...]]]
    if isinstance(backend, InlineBackend):
        rows = sorted(backend.items())
    elif isinstance(backend, RedisBackend):
        rows = []
        for k in await backend.keys():
            found = await backend.lookup(k)
            if found is not None:
                rows.append((k, found))
    else:
        return _usage(f"table {name} ({kind}) cannot be listed; use tables query")
    if key is not None:
        rows = [(k, v) for k, v in rows if k == key.lower() or k == key]
    if not rows:
        print(f"table {name} has no entries" + (f" for {key}" if key else ""))
        return 0
    width = max(len(k) for k, _ in rows)
    for k, values in rows:
        print(f"{k:<{width}}  {', '.join(values)}")
    return 0


async def _edit_redis(backend: RedisBackend, key: str, value: str | None, *, add: bool,
                      say: Callable[[str], None]) -> int:
    if backend.structure == "set":
        if add:
            assert value is not None
            await backend.add(key, value)
        elif not await backend.remove(key, value):
            say(f"{key}: nothing to remove")
            return EXIT_NOT_FOUND
        _done(say, key, value, add, note="live: proxies see it once their cached answer expires")
        return 0
    current = await backend.lookup(key)
    entries = [e for v in (current or ()) for e in _SPLIT.split(v) if e]
    changed = _changed(entries, value, add)
    if changed is None:
        say(f"{key}: nothing to remove" if not add else f"{key}: {value} is already there")
        return EXIT_NOT_FOUND if not add else 0
    if changed:
        await backend.add(key, ", ".join(changed))
    else:
        await backend.remove(key)
    _done(say, key, value, add, note="live: proxies see it once their cached answer expires")
    return 0


def _changed(entries: list[str], value: str | None, add: bool) -> list[str] | None:
    """The entries after the edit, or None when it changes nothing."""
    if add:
        assert value is not None
        return None if any(e.lower() == value.lower() for e in entries) else [*entries, value]
    if value is None:
        return [] if entries else None
    kept = [e for e in entries if e.lower() != value.lower()]
    return None if len(kept) == len(entries) else kept


def _edit_file(path: Path, key: str, value: str | None, *, add: bool, say: Callable[[str], None]) -> int:
    """Rewrite the entry of *key* in a Postfix-style file; every other line stays as it is."""
    read_entries(path)  # refuse to edit a file the proxy could not read either
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
    changed = _changed(entries, value, add)
    if changed is None:
        say(f"{key}: nothing to remove" if not add else f"{key}: {value} is already there")
        return EXIT_NOT_FOUND if not add else 0
    new = [f"{key}  {', '.join(changed)}\n"] if changed else []
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
    _done(say, key, value, add,
          note=f"{path} rewritten; the proxy reads it at the next reload (smtpproxy reload)")
    return 0


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


def _done(say: Callable[[str], None], key: str, value: str | None, add: bool, *, note: str) -> None:
    what = f"{value} added to" if add else (f"{value} removed from" if value else "removed:")
    say(f"{what} {key} ({note})")
