"""The session model's own rules, shared by every front end (proxy, milter, tracer)."""

from __future__ import annotations

import pytest

from smtpproxy import Address, Client, Envelope, Session, Transaction, Verdict
from smtpproxy.verdicts import Action

NULL = Address("", "", "")


def holders() -> list[Session | Transaction]:
    session = Session(Client("192.0.2.1", 25))
    transaction = session.begin_transaction(Envelope(NULL))
    return [session, transaction]


@pytest.mark.parametrize("index", [0, 1], ids=["session", "transaction"])
def test_a_pending_discard_is_never_weakened_to_quarantine(index: int) -> None:
    holder = holders()[index]
    assert not holder.set_disposition(None)
    assert not holder.set_disposition(Verdict.cont(score=3))
    assert holder.set_disposition(Verdict.quarantine("looks like spam"))
    assert holder.disposition is Action.QUARANTINE
    assert holder.set_disposition(Verdict.discard("known bad sender"))
    assert not holder.set_disposition(Verdict.quarantine("still spam"))
    assert (holder.disposition, holder.disposition_reason) == (Action.DISCARD, "known bad sender")


def test_a_session_disposition_is_inherited_by_each_transaction() -> None:
    session = Session(Client("192.0.2.1", 25))
    session.set_disposition(Verdict.quarantine("listed at connect"))
    first = session.begin_transaction(Envelope(NULL))
    session.end_transaction()
    second = session.begin_transaction(Envelope(NULL))
    assert first.disposition is second.disposition is Action.QUARANTINE
    assert second.disposition_reason == "listed at connect"
