"""What a lookup table costs per lookup: a cache hit, and an uncached lookup per backend.

Issue 26 asks for the per-message cost of a cached lookup. This measures, on one event loop:

- ``cached``: a hit in Table's cache (what most lookups of a busy gateway are), for a remote
  table type; the backend is never asked;
- ``inline``: an inline table (in memory, no cache in front);
- ``address_keys``: computing Postfix's search order for one address (done once per address);
- ``sqlite uncached``: a query on an SQLite file in the worker pool (cache_size: 0);
- ``redis uncached``: a GET against a Redis on loopback, when ``--redis URL`` is given.

It is a micro-benchmark, not a test: run it by hand (a few seconds)::

    python bench/tables_cost.py                        # --lookups N (default 20000)
    python bench/tables_cost.py --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpproxy.tables import Table, address_keys
from smtpproxy.tables.memory import InlineBackend
from smtpproxy.tables.redis import RedisBackend
from smtpproxy.tables.sql import SQLiteBackend


async def _measure(call: Callable[[], Awaitable[object]], lookups: int) -> float:
    """Microseconds per call, the best of three rounds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter_ns()
        for _ in range(lookups):
            await call()
        best = min(best, (time.perf_counter_ns() - started) / lookups / 1000)
    return best


async def main(lookups: int, redis_url: str | None) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    entries = {f"user{i}@example.com": (f"login{i}",) for i in range(1000)}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "owners.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE owners (k TEXT PRIMARY KEY, v TEXT)")
            conn.executemany("INSERT INTO owners VALUES (?, ?)", [(k, v[0]) for k, v in entries.items()])
        conn.close()
        query = "SELECT v FROM owners WHERE k = :key"
        cached = Table("cached", SQLiteBackend(db, query), cache_size=10000, cache_ttl=3600)
        await cached.lookup("user7@example.com")
        rows.append(("cached (a hit)", await _measure(lambda: cached.lookup("user7@example.com"), lookups)))
        inline = Table("inline", InlineBackend(entries))
        rows.append(("inline", await _measure(lambda: inline.lookup("user7@example.com"), lookups)))

        async def keys() -> list[str]:
            return address_keys("User+tag@Mail.Example.COM")

        rows.append(("address_keys", await _measure(keys, lookups)))
        uncached = Table("sqlite", SQLiteBackend(db, query))
        rows.append(("sqlite uncached", await _measure(lambda: uncached.lookup("user7@example.com"),
                                                       max(100, lookups // 20))))
    if redis_url:
        redis = Table("redis", RedisBackend(redis_url))
        rows.append(("redis uncached", await _measure(lambda: redis.lookup("user7@example.com"),
                                                      max(100, lookups // 20))))
        await redis.close()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--redis", default=None, help="a Redis URL for the uncached Redis row")
    args = parser.parse_args()
    results = asyncio.run(main(args.lookups, args.redis))
    print(f"Python {platform.python_version()}, {os.cpu_count()} cores, {args.lookups} lookups per row")
    print("| case | µs per lookup |")
    print("| --- | --- |")
    for name, micros in results:
        print(f"| {name} | {micros:.2f} |")
