"""A policy group's quarantine_retention_days: a message quarantined for its recipients expires
after the group's days (the longest of several groups'), others after quarantine.retention_days."""

from __future__ import annotations

import time
from pathlib import Path

from smtpproxy.addresses import Address
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.message import Message
from smtpproxy.registry import build_chain
from smtpproxy.session import Client, Recipient, Session
from smtpproxy.store import Store
from smtpproxy.store.backends import SQLiteBackend
from smtpproxy.store.quarantine import DatabaseQuarantine
from tests.conftest import make_config

DAY = 86400.0


async def test_the_longest_retention_of_the_recipients_groups_applies(tmp_path: Path) -> None:
    config = make_config(tmp_path, policies=[
        {"name": "short", "recipients": ["short.test"], "quarantine_retention_days": 2},
        {"name": "long", "recipients": ["long.test"], "quarantine_retention_days": 90},
    ])
    chain = build_chain(config.plugins, None, policies=config.policies)
    store = Store(SQLiteBackend(tmp_path / "store.db"))
    await store.migrate()
    quarantine = DatabaseQuarantine(store, node="mx1", retention_days=30)
    expiries = []
    try:
        # A group that changes no plugin shares its transactions with the default group: a
        # message for both is kept for the longer, quarantine.retention_days (30), too.
        for recipients in (["a@short.test"], ["a@short.test", "b@long.test"], ["c@other.test"],
                           ["a@short.test", "c@other.test"], ["c@other.test", "a@short.test"]):
            conversation = Conversation(chain, Rules())
            session = Session(Client("192.0.2.1", 1), transport="offline")
            assert await conversation.mail(session, Address("s@s.test", "s", "s.test"), {}) is None
            transaction = session.transaction
            assert transaction is not None
            for text in recipients:
                local, _, domain = text.partition("@")
                recipient = Recipient(Address(text, local, domain))
                assert await conversation.rcpt(session, transaction, recipient) is None
                conversation.accept(transaction, recipient)
            transaction.message = Message(b"Subject: x\r\n\r\nbody\r\n")
            before = time.time()
            qid = await quarantine.store(session, transaction, transaction.message, "spam")
            held = await store.get(qid)
            assert held is not None
            expiries.append(round((held.expires - before) / DAY))
    finally:
        await store.close()
    assert expiries == [2, 90, 30, 30, 30]
