"""The two SQL back ends behind :class:`smtpproxy.store.Store`: SQLite and PostgreSQL.

Both take the same SQL (``?`` placeholders; PostgreSQL's driver gets ``%s``) and offer the
same three calls: run statements in one transaction (returning each one's row count), run
one query, and bring the schema up to date. Driver errors come out as
:class:`StoreError`, so callers handle one exception whatever the back end.

- SQLite (the standard library's ``sqlite3``) runs on one thread of its own, never on the
  event loop, in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.
- PostgreSQL uses psycopg 3's asyncio API and its connection pool (psycopg_pool); every
  statement has a ``statement_timeout``, so a slow server costs a bounded wait.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = ["Backend", "PostgresBackend", "SQLiteBackend", "StoreError"]

T = TypeVar("T")
Statement = tuple[str, Sequence[Any]]
Row = tuple[Any, ...]


class StoreError(Exception):
    """The store could not do it (unreachable, timed out, refused); nothing was changed."""


class Backend(Protocol):
    name: str

    async def migrate(self, steps: Sequence[Sequence[str]]) -> tuple[int, int]: ...
    async def execute(self, statements: Iterable[Statement]) -> list[int]: ...
    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    async def close(self) -> None: ...


class SQLiteBackend:
    """One SQLite file; its connection lives on a dedicated thread."""

    name = "sqlite"

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtpproxy-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, func, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._conn = conn
        return self._conn

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def migrate(self, steps: Sequence[Sequence[str]]) -> tuple[int, int]:
        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            found = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            for version in range(found + 1, len(steps) + 1):
                for sql in steps[version - 1]:
                    conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            return found, max(found, len(steps))

        return await self._call(self._transaction, work)

    async def execute(self, statements: Iterable[Statement]) -> list[int]:
        def work(conn: sqlite3.Connection) -> list[int]:
            return [conn.execute(sql, tuple(params)).rowcount for sql, params in statements]

        return await self._call(self._transaction, work)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        def work() -> list[Row]:
            return [tuple(row) for row in self._connection().execute(sql, tuple(params)).fetchall()]

        return await self._call(work)

    async def close(self) -> None:
        def work() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(work)
        self._thread.shutdown(wait=True)


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresBackend:
    """A PostgreSQL database shared by every node; connections from a psycopg pool."""

    name = "postgresql"

    def __init__(self, conninfo: str, timeout: float = 10.0, pool_size: int = 5) -> None:
        self.conninfo = conninfo
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool: Any = None

    async def _open(self) -> Any:
        if self._pool is None:
            from psycopg_pool import AsyncConnectionPool

            self._pool = AsyncConnectionPool(
                self.conninfo, min_size=0, max_size=self.pool_size, timeout=self.timeout, open=False,
                kwargs={"connect_timeout": max(1, round(self.timeout)),
                        "options": f"-c statement_timeout={round(self.timeout * 1000)}"},
            )
            await self._pool.open(wait=False)
        return self._pool

    async def _run(self, work: Callable[[Any], Any]) -> Any:
        import psycopg
        import psycopg_pool

        pool = await self._open()
        try:
            async with pool.connection() as conn, conn.transaction():
                return await work(conn)
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            raise StoreError(f"postgresql: {exc}") from exc

    async def migrate(self, steps: Sequence[Sequence[str]]) -> tuple[int, int]:
        async def work(conn: Any) -> tuple[int, int]:
            # One node upgrades; the others wait for it here, then find nothing to do.
            await conn.execute("SELECT pg_advisory_xact_lock(7256388012)")
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            cur = await conn.execute("SELECT max(version) FROM schema_version")
            found = (await cur.fetchone())[0] or 0
            for version in range(found + 1, len(steps) + 1):
                for sql in steps[version - 1]:
                    await conn.execute(sql)
                await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            return int(found), max(int(found), len(steps))

        result: tuple[int, int] = await self._run(work)
        return result

    async def execute(self, statements: Iterable[Statement]) -> list[int]:
        async def work(conn: Any) -> list[int]:
            counts = []
            for sql, params in statements:
                cur = await conn.execute(_pg(sql), tuple(params))
                counts.append(cur.rowcount)
            return counts

        result: list[int] = await self._run(work)
        return result

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async def work(conn: Any) -> list[Row]:
            cur = await conn.execute(_pg(sql), tuple(params))
            return [tuple(row) for row in await cur.fetchall()]

        result: list[Row] = await self._run(work)
        return result

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
