"""Tables in SQL: SQLite (a file, the stdlib driver in a worker thread) and PostgreSQL
(psycopg 3's native asyncio API with its pool, the driver the history store uses too).

The query names the key ``:key`` and it is always a bound parameter, never text pasted into
the SQL. Each row's first column is one value (NULLs skipped); no row means "not there".
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.request import pathname2url

from smtpproxy.blocking import run_blocking
from smtpproxy.tables.base import Backend, Values
from smtpproxy.tables.errors import TableError

__all__ = ["PostgresBackend", "SQLiteBackend", "check_query", "pyformat"]

_PLACEHOLDER = re.compile(r"(?<![:\w]):key\b")


def check_query(query: str) -> str:
    """The query, if it names the key as ``:key``; TableError otherwise."""
    if not _PLACEHOLDER.search(query):
        raise TableError("the query must name the key as :key (a bound parameter)")
    return query


def pyformat(query: str) -> str:
    """The query in psycopg's parameter style: ``:key`` -> ``%(key)s``, a literal % doubled."""
    return "%(key)s".join(part.replace("%", "%%") for part in _PLACEHOLDER.split(query))


def _values(rows: list[Any]) -> Values | None:
    values = tuple(str(row[0]) for row in rows if row and row[0] is not None)
    return values or None


class SQLiteBackend(Backend):
    kind = "sqlite"
    remote = True

    def __init__(self, path: Path, query: str, *, timeout: float = 2.0):
        self.path = path
        self.query = check_query(query)
        self.timeout = timeout

    def _run(self, key: str) -> Values | None:
        # Read-only, and per lookup: sqlite3 connections belong to one thread, and opening
        # one is cheap next to a query; answers are cached by Table.
        uri = f"file:{pathname2url(str(self.path))}?mode=ro"  # '?' or '#' in a path stay a path
        with sqlite3.connect(uri, uri=True, timeout=self.timeout) as conn:
            rows = conn.execute(self.query, {"key": key}).fetchall()
        conn.close()
        return _values(rows)

    async def lookup(self, key: str) -> Values | None:
        return await run_blocking(self._run, key)


class PostgresBackend(Backend):
    kind = "postgresql"
    remote = True

    def __init__(self, url: str, query: str, *, timeout: float = 2.0, pool_size: int = 4):
        self.url = url
        self.query = pyformat(check_query(query))
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool: Any = None

    async def _connect(self) -> Any:
        if self._pool is None:
            try:
                from psycopg_pool import AsyncConnectionPool
            except ImportError:
                raise TableError("needs psycopg: pip install 'smtpproxy[postgresql]'") from None
            pool = AsyncConnectionPool(
                self.url, min_size=0, max_size=self.pool_size, open=False, timeout=self.timeout,
                kwargs={"connect_timeout": max(1, round(self.timeout)), "autocommit": True},
            )
            await pool.open(wait=False)
            self._pool = pool
        return self._pool

    async def lookup(self, key: str) -> Values | None:
        pool = await self._connect()
        async with pool.connection() as conn:
            cursor = await conn.execute(self.query, {"key": key}, prepare=True)
            return _values(await cursor.fetchall())

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
