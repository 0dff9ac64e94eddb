"""The store: message history, the quarantine and release-link state, in SQLite or PostgreSQL.

One machine uses an SQLite file (nothing to install); several proxies share one PostgreSQL
database (``store.postgresql``), so any node lists, searches and releases what any other
kept. Quarantined messages are kept in the database itself, in chunks of at most 1 MiB
(``quarantine_chunk``): written and read a chunk at a time, committed together with their
record (a message is either wholly there or not at all), and in every backup of the
database (docs/operations.md, "The store").

Opening a store brings its schema up to date (:mod:`smtpproxy.store.migrations`). Every
call raises :class:`StoreError` when the store cannot do it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpproxy.message import Buffer
from smtpproxy.store.backends import Backend, PostgresBackend, SQLiteBackend, Statement, StoreError
from smtpproxy.store.migrations import MIGRATIONS

if TYPE_CHECKING:
    from smtpproxy.config import Config

__all__ = [
    "CHUNK",
    "AuditEntry",
    "Held",
    "HistoryEntry",
    "Search",
    "Store",
    "StoreError",
    "Summary",
    "open_store",
    "store_from_config",
]

CHUNK = 1 << 20
"""Bytes of a quarantined message per database row."""


@dataclass(slots=True)
class HistoryEntry:
    """One decision about one message: what the ``message`` log line says."""

    id: str
    time: float
    node: str
    sender: str
    recipients: list[str]
    decision: str
    session: str | None = None
    client: str | None = None
    helo: str | None = None
    message_id: str | None = None
    subject: str | None = None
    size: int | None = None
    decided_by: str | None = None
    score: float | None = None
    reason: str | None = None
    reply: str | None = None
    quarantine_id: str | None = None
    policy_group: str | None = None
    """The recipients' policy groups, sorted and joined by "," (the ``message`` line's
    ``group``); None when no ``policies:`` are configured (or for entries recorded
    before the history kept groups)."""
    groups: dict[str, str] = field(default_factory=dict)
    """Each recipient's policy group, by address (kept in ``history_recipient``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_HISTORY_COLUMNS = tuple(f.name for f in fields(HistoryEntry) if f.name != "groups")
_IN_BATCH = 500
"""History entries per query when their recipients' groups are read."""


@dataclass(slots=True)
class Search:
    """Filters for history and quarantine listings; unset ones do not filter."""

    sender: str | None = None
    recipient: str | None = None
    since: float | None = None
    until: float | None = None
    node: str | None = None
    decision: str | None = None
    decided_by: str | None = None
    client: str | None = None
    message_id: str | None = None
    subject: str | None = None
    """A substring, compared without case."""
    reason: str | None = None
    """A substring, compared without case."""
    policy_group: str | None = None
    """Only messages with a recipient in this policy group; with ``recipient`` or ``domains``
    set, that recipient (one in those domains) must be the one in it. History only."""
    domains: tuple[str, ...] | None = None
    """Only messages with a recipient in one of these domains (a domain admin's view)."""
    limit: int = 1000


@dataclass(slots=True)
class AuditEntry:
    """One action in the web console: who did what to which message (and recipients), when."""

    time: float
    actor: str
    action: str
    qid: str | None = None
    recipients: list[str] = field(default_factory=list)
    detail: str | None = None


@dataclass(slots=True)
class Summary:
    """What the console's overview shows: decisions per day and the most frequent senders,
    reasons and deciding plugins (each a list of (value, count), most frequent first)."""

    per_day: list[tuple[str, str, int]]
    """(day as YYYY-MM-DD in UTC, decision, count)."""
    senders: list[tuple[str, int]]
    reasons: list[tuple[str, int]]
    deciders: list[tuple[str, int]]


@dataclass(slots=True)
class Held:
    """A quarantined message's record and what became of each recipient."""

    id: str
    node: str
    time: float
    expires: float
    sender: str
    size: int
    record: dict[str, Any]
    recipients: dict[str, str] = field(default_factory=dict)
    """Address → ``held``, ``releasing``, ``released`` or ``deleted``."""
    message_id: str | None = None
    subject: str | None = None
    reason: str | None = None
    decided_by: str | None = None
    score: float | None = None
    admin_only: bool = False

    @property
    def held(self) -> list[str]:
        return [a for a, state in self.recipients.items() if state == "held"]


_HELD_COLUMNS = ("id", "node", "time", "expires", "sender", "size", "record", "message_id", "subject",
                 "reason", "decided_by", "score", "admin_only")
_STALE_CLAIM = 900.0
"""A release that claimed recipients and then died gives them back after this many seconds."""


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(search: Search, *, table: str, recipients: str, owner: str) -> tuple[str, list[Any]]:
    """The WHERE clause of *search* over *table* (its recipients in table *recipients*)."""
    clauses: list[str] = []
    params: list[Any] = []
    exact = {"sender": search.sender, "node": search.node, "message_id": search.message_id}
    if table == "history":
        exact |= {"decision": search.decision, "decided_by": search.decided_by, "client": search.client}
    elif search.decided_by is not None:
        exact["decided_by"] = search.decided_by
    for column, value in exact.items():
        if value is not None:
            clauses.append(f"{table}.{column} = ?")
            params.append(value)
    if search.since is not None:
        clauses.append(f"{table}.time >= ?")
        params.append(search.since)
    if search.until is not None:
        clauses.append(f"{table}.time < ?")
        params.append(search.until)
    for column, value in (("subject", search.subject), ("reason", search.reason)):
        if value is not None:
            clauses.append(f"LOWER({table}.{column}) LIKE ? ESCAPE '\\'")
            params.append(_like(value))
    if search.recipient is not None:
        clauses.append(f"{table}.id IN (SELECT {owner} FROM {recipients} WHERE address = ?)")
        params.append(search.recipient)
    in_domains = " OR ".join("LOWER(address) LIKE ? ESCAPE '\\'" for _ in search.domains or ())
    domain_params = ["%" + _like("@" + d)[1:-1] for d in search.domains or ()]  # ends with @domain
    if search.domains is not None:
        if not search.domains:
            clauses.append("1 = 0")
        else:
            clauses.append(f"{table}.id IN (SELECT {owner} FROM {recipients} WHERE {in_domains})")
            params += domain_params
    if search.policy_group is not None and table == "history":
        # The group of a recipient the search (and the viewer's scope) names: a domain admin
        # finds a message by their recipients' group, never by another tenant's.
        group = ["policy_group = ?"]
        params.append(search.policy_group)
        if search.recipient is not None:
            group.append("address = ?")
            params.append(search.recipient)
        if search.domains:
            group.append(f"({in_domains})")
            params += domain_params
        clauses.append(f"{table}.id IN (SELECT {owner} FROM {recipients} WHERE {' AND '.join(group)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class Store:
    """History, quarantine and link state on one back end (see the module docstring)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._ready = False
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.backend.name

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date; (version found, version now)."""
        async with self._lock:
            found, now = await self.backend.migrate(MIGRATIONS)
            self._ready = True
            return found, now

    async def _ready_backend(self) -> Backend:
        if not self._ready:
            await self.migrate()
        return self.backend

    async def _execute(self, statements: Iterable[Statement]) -> list[int]:
        return await (await self._ready_backend()).execute(statements)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await (await self._ready_backend()).query(sql, params)

    async def version(self) -> int:
        rows = await self._query("SELECT max(version) FROM schema_version")
        return int(rows[0][0] or 0)

    async def close(self) -> None:
        await self.backend.close()

    # -- history ------------------------------------------------------------------------

    async def add_history(self, entries: Sequence[HistoryEntry]) -> None:
        """Record a batch of decisions in one transaction."""
        columns = ", ".join(_HISTORY_COLUMNS)
        marks = ", ".join("?" for _ in _HISTORY_COLUMNS)

        def statements() -> Iterator[Statement]:
            for e in entries:
                values = [getattr(e, c) for c in _HISTORY_COLUMNS]
                values[_HISTORY_COLUMNS.index("recipients")] = "\n".join(e.recipients)
                yield f"INSERT INTO history ({columns}) VALUES ({marks})", values
                for address in dict.fromkeys(e.recipients):
                    yield ("INSERT INTO history_recipient (entry, address, policy_group) VALUES (?, ?, ?)",
                           (e.id, address, e.groups.get(address)))

        await self._execute(statements())

    async def search_history(self, search: Search) -> list[HistoryEntry]:
        """Matching decisions, newest first, at most ``search.limit``."""
        where, params = _where(search, table="history", recipients="history_recipient", owner="entry")
        rows = await self._query(
            f"SELECT {', '.join(_HISTORY_COLUMNS)} FROM history{where} ORDER BY time DESC, id LIMIT ?",
            [*params, search.limit],
        )
        entries = []
        for row in rows:
            values = dict(zip(_HISTORY_COLUMNS, row, strict=True))
            values["recipients"] = [r for r in str(values["recipients"] or "").split("\n") if r]
            entries.append(HistoryEntry(**values))
        await self._groups(entries)
        return entries

    async def _groups(self, entries: list[HistoryEntry]) -> None:
        """Fill each entry's recipients' policy groups (none for entries recorded without)."""
        by_id = {e.id: e for e in entries if e.policy_group is not None}
        ids = list(by_id)
        for start in range(0, len(ids), _IN_BATCH):
            batch = ids[start:start + _IN_BATCH]
            rows = await self._query(
                f"SELECT entry, address, policy_group FROM history_recipient WHERE entry IN "
                f"({', '.join('?' for _ in batch)}) AND policy_group IS NOT NULL", batch)
            for entry, address, group in rows:
                by_id[entry].groups[address] = group

    async def summarize_history(self, search: Search, top: int = 10) -> Summary:
        """Counts for the console's overview over the decisions *search* matches."""
        where, params = _where(search, table="history", recipients="history_recipient", owner="entry")

        async def top_of(column: str) -> list[tuple[str, int]]:
            rows = await self._query(
                f"SELECT {column}, COUNT(*) AS n FROM history{where} GROUP BY {column} "
                f"ORDER BY n DESC, {column} LIMIT ?", [*params, top])
            return [(str(value) if value is not None else "-", int(n)) for value, n in rows]

        rows = await self._query(f"SELECT time, decision FROM history{where} ORDER BY time", params)
        days: dict[tuple[str, str], int] = {}
        for when, decision in rows:
            key = (time.strftime("%Y-%m-%d", time.gmtime(float(when))), str(decision))
            days[key] = days.get(key, 0) + 1
        return Summary(per_day=[(d, dec, n) for (d, dec), n in days.items()],
                       senders=await top_of("sender"), reasons=await top_of("reason"),
                       deciders=await top_of("decided_by"))

    # -- audit log ------------------------------------------------------------------------

    async def audit(self, entry: AuditEntry) -> None:
        """Record one console action (the audit log is only ever added to)."""
        await self._execute([(
            "INSERT INTO audit (time, actor, action, qid, recipients, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (entry.time, entry.actor, entry.action, entry.qid, "\n".join(entry.recipients), entry.detail))])

    async def audit_log(self, *, qid: str | None = None, actor: str | None = None,
                        limit: int = 500) -> list[AuditEntry]:
        """Audit entries, newest first, optionally about one message or by one actor."""
        clauses, params = [], []
        for column, value in (("qid", qid), ("actor", actor)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = await self._query(
            f"SELECT time, actor, action, qid, recipients, detail FROM audit{where} "
            "ORDER BY time DESC LIMIT ?", [*params, limit])
        return [AuditEntry(float(t), a, act, q, [r for r in (rc or "").split("\n") if r], d)
                for t, a, act, q, rc, d in rows]

    async def erase_address(self, address: str) -> tuple[int, int]:
        """Remove every history entry and quarantined message that names *address* as sender
        or recipient (a privacy request); (history entries, quarantined messages) removed."""
        rows = await self._query(
            "SELECT id FROM quarantine WHERE sender = ? "
            "UNION SELECT qid FROM quarantine_recipient WHERE address = ?",
            (address, address))
        qids = [row[0] for row in rows]
        entry_ids = "SELECT entry FROM history_recipient WHERE address = ?"
        statements: list[Statement] = [
            (f"DELETE FROM history WHERE sender = ? OR id IN ({entry_ids})", (address, address)),
            ("DELETE FROM history_recipient WHERE entry NOT IN (SELECT id FROM history)", ()),
        ]
        for qid in qids:
            statements += [("DELETE FROM quarantine_chunk WHERE qid = ?", (qid,)),
                           ("DELETE FROM quarantine_recipient WHERE qid = ?", (qid,)),
                           ("DELETE FROM quarantine WHERE id = ?", (qid,))]
        counts = await self._execute(statements)
        return counts[0], sum(counts[4::3])

    async def expire_history(self, before: float) -> int:
        """Remove decisions older than *before*; how many."""
        counts = await self._execute([
            ("DELETE FROM history_recipient WHERE entry IN (SELECT id FROM history WHERE time < ?)",
             (before,)),
            ("DELETE FROM history WHERE time < ?", (before,)),
        ])
        return counts[1]

    # -- quarantine -----------------------------------------------------------------------

    async def hold(self, held: Held, content: Sequence[Buffer]) -> None:
        """Keep a message: record, recipients and content in one transaction, so it is
        wholly there (and durable: the commit returned) or not at all."""

        def chunks() -> Iterator[bytes]:
            pending = bytearray()
            for part in content:
                view = memoryview(part)
                while view:
                    take = CHUNK - len(pending)
                    pending += view[:take]
                    view = view[take:]
                    if len(pending) == CHUNK:
                        yield bytes(pending)
                        pending.clear()
            if pending:
                yield bytes(pending)

        def statements() -> Iterator[Statement]:
            values = [getattr(held, c) for c in _HELD_COLUMNS]
            values[_HELD_COLUMNS.index("record")] = json.dumps(held.record)
            values[_HELD_COLUMNS.index("admin_only")] = int(held.admin_only)
            yield (f"INSERT INTO quarantine ({', '.join(_HELD_COLUMNS)}) "
                   f"VALUES ({', '.join('?' for _ in _HELD_COLUMNS)})", values)
            for address in dict.fromkeys(held.recipients):
                yield ("INSERT INTO quarantine_recipient (qid, address, state, changed) VALUES (?, ?, ?, ?)",
                       (held.id, address, "held", held.time))
            for seq, chunk in enumerate(chunks()):
                yield "INSERT INTO quarantine_chunk (qid, seq, data) VALUES (?, ?, ?)", (held.id, seq, chunk)

        await self._execute(statements())

    async def held(self, search: Search, *, include_done: bool = False) -> list[Held]:
        """Quarantined messages matching *search*, oldest first; by default only those with
        a recipient still held."""
        where, params = _where(search, table="quarantine", recipients="quarantine_recipient", owner="qid")
        if not include_done:
            where += (" AND " if where else " WHERE ") + (
                "quarantine.id IN (SELECT qid FROM quarantine_recipient WHERE state = 'held')")
        rows = await self._query(
            f"SELECT {', '.join(_HELD_COLUMNS)} FROM quarantine{where} ORDER BY time, id LIMIT ?",
            [*params, search.limit],
        )
        found = [self._held(row) for row in rows]
        if found:
            await self._recipients(found)
        return found

    @staticmethod
    def _held(row: Sequence[Any]) -> Held:
        values = dict(zip(_HELD_COLUMNS, row, strict=True))
        values["record"] = json.loads(values["record"])
        values["admin_only"] = bool(values["admin_only"])
        return Held(**values)

    async def _recipients(self, found: list[Held]) -> None:
        by_id = {h.id: h for h in found}
        marks = ", ".join("?" for _ in by_id)
        rows = await self._query(
            f"SELECT qid, address, state, changed FROM quarantine_recipient WHERE qid IN ({marks}) "
            "ORDER BY qid, address", list(by_id))
        now = time.time()
        for qid, address, state, changed in rows:
            stale = state == "releasing" and (changed or 0) < now - _STALE_CLAIM
            by_id[qid].recipients[address] = "held" if stale else state

    async def get(self, qid: str) -> Held | None:
        rows = await self._query(f"SELECT {', '.join(_HELD_COLUMNS)} FROM quarantine WHERE id = ?", (qid,))
        if not rows:
            return None
        held = self._held(rows[0])
        await self._recipients([held])
        return held

    async def content(self, qid: str) -> bytes:
        """The message, read a chunk at a time."""
        out = bytearray()
        seq = 0
        while True:
            rows = await self._query("SELECT data FROM quarantine_chunk WHERE qid = ? AND seq = ?",
                                     (qid, seq))
            if not rows:
                return bytes(out)
            out += bytes(rows[0][0])
            seq += 1

    async def claim(self, qid: str, recipients: Sequence[str], actor: str) -> list[str]:
        """Mark these recipients ``releasing`` (only those still held); the ones claimed.
        Two nodes releasing at once each get a disjoint share, so none is delivered twice."""
        now = time.time()
        claimed = []
        for address in recipients:
            counts = await self._execute([(
                "UPDATE quarantine_recipient SET state = 'releasing', changed = ?, actor = ? "
                "WHERE qid = ? AND address = ? AND (state = 'held' OR (state = 'releasing' AND changed < ?))",
                (now, actor, qid, address, now - _STALE_CLAIM),
            )])
            if counts[0] == 1:
                claimed.append(address)
        return claimed

    async def settle(self, qid: str, recipients: Sequence[str], state: str, *, actor: str,
                     destination: str | None = None, reply: str | None = None) -> None:
        """Record what became of claimed recipients (``released``, ``deleted``, or ``held``
        again after a failed delivery)."""
        await self._execute([
            ("UPDATE quarantine_recipient SET state = ?, changed = ?, actor = ?, destination = ?, reply = ? "
             "WHERE qid = ? AND address = ?", (state, time.time(), actor, destination, reply, qid, address))
            for address in recipients
        ])
        if state != "held":
            await self._drop_content_when_done([qid])

    async def _drop_content_when_done(self, qids: Sequence[str]) -> None:
        """A message with no recipient left held (or releasing) keeps its record, not its body."""
        for qid in qids:
            await self._execute([(
                "DELETE FROM quarantine_chunk WHERE qid = ? AND NOT EXISTS (SELECT 1 FROM "
                "quarantine_recipient WHERE qid = ? AND state IN ('held', 'releasing'))", (qid, qid))])

    async def delete(self, qid: str) -> None:
        """Remove a quarantined message, record and all."""
        await self._execute([
            ("DELETE FROM quarantine_chunk WHERE qid = ?", (qid,)),
            ("DELETE FROM quarantine_recipient WHERE qid = ?", (qid,)),
            ("DELETE FROM quarantine WHERE id = ?", (qid,)),
        ])

    async def expire_quarantine(self, now: float) -> int:
        """Remove messages whose retention ran out; how many."""
        expired = "SELECT id FROM quarantine WHERE expires < ?"
        counts = await self._execute([
            (f"DELETE FROM quarantine_chunk WHERE qid IN ({expired})", (now,)),
            (f"DELETE FROM quarantine_recipient WHERE qid IN ({expired})", (now,)),
            ("DELETE FROM quarantine WHERE expires < ?", (now,)),
            ("DELETE FROM link_use WHERE expires < ?", (now,)),
        ])
        return counts[2]

    # -- release links ------------------------------------------------------------------------

    async def use_link(self, link_id: str, expires: float) -> bool:
        """Record the first use of a single-use link; False if it was used before."""
        counts = await self._execute([(
            "INSERT INTO link_use (id, used, expires) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (link_id, time.time(), expires))])
        return counts[0] == 1

    async def forget_link(self, link_id: str) -> None:
        """Undo :meth:`use_link` when the action behind it failed, so the link can be retried."""
        await self._execute([("DELETE FROM link_use WHERE id = ?", (link_id,))])


def open_store(*, sqlite: Path | None = None, postgresql: str | None = None, timeout: float = 10.0,
               pool_size: int = 5) -> Store:
    """A store on the back end configured (it connects, and migrates, on first use)."""
    if postgresql is not None:
        return Store(PostgresBackend(postgresql, timeout, pool_size))
    if sqlite is not None:
        return Store(SQLiteBackend(sqlite, timeout))
    raise ValueError("a store needs an SQLite path or a PostgreSQL connection string")



def store_from_config(config: Config) -> Store | None:
    """The store ``config.store`` describes; None when none is configured."""
    s = config.store
    if not s.configured:
        return None
    return open_store(sqlite=s.sqlite, postgresql=s.postgresql, timeout=s.timeout, pool_size=s.pool_size)
