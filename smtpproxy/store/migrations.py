"""The store's schema, as numbered steps; a store is upgraded in place, one step at a time.

Each step is plain SQL that SQLite and PostgreSQL both accept (TEXT keys, BIGINT,
DOUBLE PRECISION, BYTEA), so both back ends have one schema. A store records the steps it
has in ``schema_version``; opening it applies the missing ones in one transaction (under a
lock, so nodes starting together upgrade it once). Never edit a released step: add one.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "VERSION"]

_V1 = (
    # The history: one row per message decision, as the ``message`` log line has it.
    """CREATE TABLE history (
        id TEXT PRIMARY KEY,
        time DOUBLE PRECISION NOT NULL,
        node TEXT NOT NULL,
        session TEXT,
        client TEXT,
        helo TEXT,
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        message_id TEXT,
        subject TEXT,
        size BIGINT,
        decision TEXT NOT NULL,
        decided_by TEXT,
        score DOUBLE PRECISION,
        reason TEXT,
        reply TEXT,
        quarantine_id TEXT
    )""",
    "CREATE INDEX history_time ON history (time)",
    "CREATE INDEX history_sender ON history (sender)",
    "CREATE INDEX history_message_id ON history (message_id)",
    # One row per recipient, so "everything for bob" and erasing bob are index look-ups.
    "CREATE TABLE history_recipient (entry TEXT NOT NULL, address TEXT NOT NULL)",
    "CREATE INDEX history_recipient_address ON history_recipient (address)",
    "CREATE INDEX history_recipient_entry ON history_recipient (entry)",
    # The quarantine: the record, one row per recipient (each released or kept on its own)
    # and the message itself in chunks of at most 1 MiB.
    """CREATE TABLE quarantine (
        id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        sender TEXT NOT NULL,
        message_id TEXT,
        subject TEXT,
        size BIGINT NOT NULL,
        reason TEXT,
        decided_by TEXT,
        score DOUBLE PRECISION,
        admin_only BIGINT NOT NULL DEFAULT 0,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX quarantine_time ON quarantine (time)",
    "CREATE INDEX quarantine_expires ON quarantine (expires)",
    """CREATE TABLE quarantine_recipient (
        qid TEXT NOT NULL,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        changed DOUBLE PRECISION,
        actor TEXT,
        destination TEXT,
        reply TEXT,
        PRIMARY KEY (qid, address)
    )""",
    "CREATE INDEX quarantine_recipient_address ON quarantine_recipient (address)",
    "CREATE TABLE quarantine_chunk (qid TEXT NOT NULL, seq BIGINT NOT NULL, data BYTEA NOT NULL, "
    "PRIMARY KEY (qid, seq))",
)

_V2 = (
    # Policy groups (a later issue) are recorded with each decision once they exist.
    "ALTER TABLE history ADD COLUMN policy_group TEXT",
    # Release links are single-use: the first use of a link's id is recorded here.
    "CREATE TABLE link_use (id TEXT PRIMARY KEY, used DOUBLE PRECISION NOT NULL, "
    "expires DOUBLE PRECISION NOT NULL)",
)

_V3 = (
    # The web console's audit log: who did what to which message, when (never updated).
    """CREATE TABLE audit (
        time DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        qid TEXT,
        recipients TEXT,
        detail TEXT
    )""",
    "CREATE INDEX audit_time ON audit (time)",
)

_V4 = (
    # Each recipient's policy group (docs/multi-domain.md). A transaction's recipients share
    # a group *key*, not necessarily a group, so the group is kept per recipient (searched
    # by index); history.policy_group (step 2) has the message's groups for display.
    "ALTER TABLE history_recipient ADD COLUMN policy_group TEXT",
    "CREATE INDEX history_recipient_group ON history_recipient (policy_group)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)
"""Step *n* (1-based) brings a store from version n-1 to n."""

VERSION = len(MIGRATIONS)
