"""Backup and restore of the store, as docs/operations.md ("Backup and restore") says:
``pg_dump``/``pg_restore`` for PostgreSQL, ``sqlite3 .backup`` (or Python's
``sqlite3.Connection.backup``) for SQLite. The restored copy has every record and body."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from smtpproxy.store import Held, HistoryEntry, Search, Store, open_store
from smtpproxy.store.migrations import VERSION
from tests.postgres_server import PostgresServer, postgres_bindir

pytestmark = pytest.mark.asyncio

BODY = bytes(range(256)) * 20_000  # 5 MB: several chunks


async def fill(store: Store) -> None:
    await store.add_history([HistoryEntry(id=f"h{n}", time=float(n), node="mx1", sender="a@a.test",
                                          recipients=["b@b.test"], decision="delivered") for n in range(50)])
    await store.hold(Held(id="q1", node="mx1", time=1.0, expires=2e9, sender="s@x.test", size=len(BODY),
                          record={"id": "q1"}, recipients={"b@b.test": "held"}), [BODY])
    assert await store.use_link("L", 2e9)


async def check(store: Store) -> None:
    assert len(await store.search_history(Search())) == 50
    [held] = await store.held(Search())
    assert held.recipients == {"b@b.test": "held"}
    assert await store.content("q1") == BODY
    assert await store.use_link("L", 2e9) is False  # used links stay used
    await store.close()


async def test_sqlite_backup_and_restore(tmp_path: Path) -> None:
    live = open_store(sqlite=tmp_path / "store.db")
    await fill(live)
    sqlite3_cli = shutil.which("sqlite3")
    if sqlite3_cli is not None:  # the documented command, while the store is open
        await asyncio.to_thread(subprocess.run, [sqlite3_cli, str(tmp_path / "store.db"),
                                                 f".backup {tmp_path / 'cli.db'}"], check=True)
        await check(open_store(sqlite=tmp_path / "cli.db"))
    with sqlite3.connect(tmp_path / "store.db") as source, sqlite3.connect(tmp_path / "py.db") as target:
        source.backup(target)
    await live.close()
    await check(open_store(sqlite=tmp_path / "py.db"))


async def test_postgresql_dump_and_restore(postgres_server: PostgresServer, tmp_path: Path) -> None:
    bindir = postgres_bindir()
    assert bindir is not None
    source = postgres_server.url(postgres_server.create_database())
    live = open_store(postgresql=source)
    await fill(live)
    dump = tmp_path / "store.dump"
    await asyncio.to_thread(subprocess.run, [str(bindir / "pg_dump"), "--format=custom", f"--file={dump}",
                                             f"--dbname={source}"], check=True)
    await live.close()
    target = postgres_server.url(postgres_server.create_database())
    await asyncio.to_thread(subprocess.run, [str(bindir / "pg_restore"), "--no-owner", f"--dbname={target}",
                                             str(dump)], check=True)
    restored = open_store(postgresql=target)
    assert await restored.migrate() == (VERSION, VERSION)  # nothing to upgrade: the schema came along
    await check(restored)
