"""What the proxy does with a message the chain has judged: deliver, keep, drop or refuse.

:func:`smtpproxy.outcome.end_of_message` decides; :func:`carry_out` does it and returns the
:class:`~smtpproxy.session.Decision` that says what the client is told: ``250`` only once
the message is delivered (the delivery's own answer), kept in quarantine, or dropped; a
delivery that fails, or a quarantine that cannot write, refuses the message instead.
(Behind an MTA the milter leaves all of this to the MTA.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from smtpproxy.delivery import Delivered, DeliveryError
from smtpproxy.eventlog import event
from smtpproxy.metrics import NullRecorder
from smtpproxy.outcome import PROXY, Deliver, Refusal, queued_reply
from smtpproxy.quarantine import QuarantineStore
from smtpproxy.session import Decision, Session, Transaction
from smtpproxy.store import StoreError
from smtpproxy.store.quarantine import DatabaseQuarantine
from smtpproxy.verdicts import Reply

__all__ = ["LOCAL_ERROR", "carry_out"]

LOCAL_ERROR = Reply(451, "4.3.0", "Local error, try again later")


async def carry_out(
    session: Session, transaction: Transaction, outcome: Refusal | Deliver, *,
    deliver: Callable[[], Awaitable[Delivered]], quarantine: QuarantineStore | DatabaseQuarantine,
    metrics: NullRecorder, backend: str,
) -> tuple[Decision, str | None]:
    """Do what *outcome* says; *deliver* hands the message to the *backend* delivery. With
    the decision, the quarantine id of a message kept (None otherwise)."""
    assert transaction.message is not None
    score = transaction.score
    if isinstance(outcome, Refusal):
        return outcome.decision(score), None
    if outcome.action == "discard":
        return outcome.decision(queued_reply(transaction), score), None
    if outcome.action == "quarantine":
        try:
            qid = await quarantine.store(session, transaction, transaction.message, outcome.reason,
                                         decided_by=outcome.decided_by)
        except (OSError, StoreError) as exc:  # not durable: the client must retry, never 250
            event("quarantine_failed", level=logging.ERROR, error=repr(exc))
            return Refusal(LOCAL_ERROR, PROXY, f"quarantine failed: {exc}").decision(score), None
        return outcome.decision(queued_reply(transaction), score, f"{outcome.reason} (id {qid})"), qid
    return await _deliver(transaction, outcome, deliver, metrics, backend), None


async def _deliver(transaction: Transaction, outcome: Deliver, deliver: Callable[[], Awaitable[Delivered]],
                   metrics: NullRecorder, backend: str) -> Decision:
    score = transaction.score
    metrics.delivery_started()
    result, delivery_started = "error", time.perf_counter()
    try:
        delivered = await deliver()
        result = "ok"
    except DeliveryError as exc:
        result = "tempfail" if exc.reply.is_temporary else "reject"
        event("delivery_failed", level=logging.WARNING, tx=transaction.id,
              reply=exc.reply.code, detail=exc.detail)
        return Refusal(exc.reply, "delivery", exc.detail).decision(score)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        event("delivery_crashed", level=logging.ERROR, exc_info=True, tx=transaction.id)
        return Refusal(LOCAL_ERROR, "delivery", f"{type(exc).__name__}: {exc}").decision(score)
    finally:
        metrics.delivery_finished(backend, result, time.perf_counter() - delivery_started)
    event("delivered", tx=transaction.id, destination=delivered.destination,
          tls=delivered.tls, reply=delivered.reply.code)
    return outcome.decision(delivered.reply, score, delivered.destination)
