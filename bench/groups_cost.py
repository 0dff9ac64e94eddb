"""What choosing a policy group costs per recipient (issue 26: "the per-message cost of
choosing a group and of a cached lookup").

The groups of docs/multi-domain.md's example (a domain, a wildcard, an LDAP-like table
behind a cache) plus ``--filler`` groups of one domain each before them, built as
``smtpproxy run`` builds them; then, on one event loop, :meth:`Policies.choose` for:

- ``first group (domain)``: the recipient's domain is the first group's;
- ``after N groups (domain)``: a domain group behind the filler groups;
- ``table, cached hit``: a group whose ``table:`` selector answers from the table's cache
  (SQLite behind it, as a stand-in for LDAP);
- ``default (table cached miss)``: no group selects the recipient, the table's negative
  cache answers every key of the address's search order.

A micro-benchmark, not a test: run it by hand (a few seconds)::

    python bench/groups_cost.py                   # --choices N (default 20000), --filler N (20)
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

from smtpproxy.config.policies import PolicyGroup
from smtpproxy.groups import Policies
from smtpproxy.registry import build_chain
from smtpproxy.tables import Table, Tables, install
from smtpproxy.tables.sql import SQLiteBackend


async def _measure(call: Callable[[], Awaitable[object]], count: int) -> float:
    """Microseconds per call, the best of three rounds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter_ns()
        for _ in range(count):
            await call()
        best = min(best, (time.perf_counter_ns() - started) / count / 1000)
    return best


async def main(count: int, filler: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "people.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE people (k TEXT PRIMARY KEY, v TEXT)")
            conn.executemany("INSERT INTO people VALUES (?, ?)",
                             [(f"user{i}@uni.example", "staff") for i in range(1000)])
        conn.close()
        table = Table("people", SQLiteBackend(db, "SELECT v FROM people WHERE k = :key"),
                      cache_size=10000, cache_ttl=3600, negative_ttl=3600)
        install(Tables([table]))
        groups = [PolicyGroup(name="shop", recipients=["shop.example"])]
        groups += [PolicyGroup(name=f"filler{i}", recipients=[f"filler{i}.example"]) for i in range(filler)]
        groups += [PolicyGroup(name="ngo", recipients=["ngo.example", "*.ngo.example"]),
                   PolicyGroup(name="uni", recipients=["table:people"])]
        chain = build_chain([], None, policies=groups)
        policies: Policies = chain.policies
        cases = [("first group (domain)", "anna@shop.example"),
                 (f"after {filler + 1} groups (domain)", "bert@ngo.example"),
                 (f"table, cached hit (after {filler + 2} groups)", "user7@uni.example"),
                 ("default (table cached miss)", "nobody@elsewhere.example")]
        rows = []
        for name, address in cases:
            await policies.choose(address)  # warm the table's cache
            rows.append((name, await _measure(lambda a=address: policies.choose(a), count)))  # type: ignore[misc]
        await table.close()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", type=int, default=20000)
    parser.add_argument("--filler", type=int, default=20, help="one-domain groups before the example's")
    args = parser.parse_args()
    results = asyncio.run(main(args.choices, args.filler))
    print(f"Python {platform.python_version()}, {os.cpu_count()} cores, {args.choices} choices per row")
    print("| case | µs per recipient |")
    print("| --- | --- |")
    for name, micros in results:
        print(f"| {name} | {micros:.2f} |")
