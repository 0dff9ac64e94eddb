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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpproxy.config import Config
from smtpproxy.tables import TableUnavailable, build_tables
from smtpproxy.tables.edit import WRITABLE, Edit, edit_file, edit_redis, one_entry
from smtpproxy.tables.memory import InlineBackend
from smtpproxy.tables.redis import RedisBackend

__all__ = ["edit_entry", "tables_command"]

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 3


def tables_command(config: Config, action: str, name: str, key: str | None, value: str | None) -> int:
    if name not in config.tables:
        known = ", ".join(sorted(config.tables)) or "none"
        return _usage(f"no table named {name!r} in tables ({known})")
    spec = config.tables[name]
    if action in ("query", "add", "remove") and not key:
        return _usage(f"tables {action} needs a key")
    if action == "add" and not value:
        return _usage("tables add needs a key and a value")
    if value and not one_entry(value):
        return _usage("a value is one entry: no spaces, commas or control characters")
    if key is not None and (not key.isprintable() or any(c.isspace() for c in key)):
        return _usage("a key has no spaces or control characters")
    if action in ("add", "remove") and spec.type not in WRITABLE:
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
        result = await asyncio.to_thread(edit_file, Path(spec.file), folded, value, add=add)
        note = f"{spec.file} rewritten; the proxy reads it at the next reload (smtpproxy reload)"
    else:
        assert isinstance(backend, RedisBackend)
        result = await edit_redis(backend, folded, value, add=add)
        note = "live: proxies see it once their cached answer expires"
    if result is Edit.DONE:
        _done(say, folded, value, add, note=note)
        return 0
    if result is Edit.ALREADY_THERE:
        say(f"{folded}: {value} is already there")
        return 0
    say(f"{folded}: nothing to remove")
    return EXIT_NOT_FOUND


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


def _done(say: Callable[[str], None], key: str, value: str | None, add: bool, *, note: str) -> None:
    what = f"{value} added to" if add else (f"{value} removed from" if value else "removed:")
    say(f"{what} {key} ({note})")
