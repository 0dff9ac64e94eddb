"""One client transaction's way to the delivery, from its first RCPT to its message.

With ``rcpt_mode: relay`` the upstream transaction follows the client's: each RCPT is
asked of the real server, whose answer the client hears, and the message goes on that
same transaction (unless plugins changed the envelope: then the upstream must see theirs,
in a fresh one). With ``at_data`` a recipient the upstream refused at an earlier delivery
is refused again at RCPT, and the message goes in one go. The front end only holds a
:class:`Handover` for its transaction and never sees which way it is.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from smtpproxy.delivery import Delivered, Delivery, UpstreamTransaction
from smtpproxy.eventlog import event
from smtpproxy.message import Message
from smtpproxy.metrics import NullRecorder
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["Handover"]


class Handover:
    """The delivery's side of one client transaction."""

    __slots__ = ("_delivery", "_metrics", "_session", "_transaction", "_upstream")

    def __init__(self, delivery: Delivery, session: Session, transaction: Transaction,
                 metrics: NullRecorder) -> None:
        self._delivery = delivery
        self._session = session
        self._transaction = transaction
        self._metrics = metrics
        self._upstream: UpstreamTransaction | None = None  # rcpt_mode relay only

    async def rcpt(self, recipient: Recipient, *, ask_upstream: bool = True) -> Reply | None:
        """The delivery's word on a recipient the chain accepted: the upstream's own reply
        (relay mode; positive or not), a refusal it remembers (at_data), or None.

        *ask_upstream* False: the message will not go upstream as it is (a discard or
        quarantine decided already), so the upstream is not asked.
        """
        address, tx = recipient.address, self._transaction
        if self._delivery.rcpt_mode == "relay" and ask_upstream:
            if self._upstream is None:
                self._upstream = self._delivery.open_transaction(self._session, tx)
            reply = await self._upstream.rcpt(address, recipient.params)  # the real server's answer
            event("upstream_rcpt", tx=tx.id, recipient=address.text, reply=reply.code)
            self._metrics.upstream_rcpt(
                "ok" if reply.is_positive else "tempfail" if reply.is_temporary else "reject")
            return reply
        if self._delivery.rcpt_mode == "relay":
            return None
        known = self._delivery.remembered_refusal(tx.envelope.sender, address)
        if known is not None:
            # at_data: the upstream refused this recipient when the client last sent the message
            event("rcpt_to", tx=tx.id, recipient=address.text, verdict="upstream_refused_before",
                  reply=known.code)
        return known

    async def deliver(self, content: Message) -> Delivered:
        """Hand the message over: on the upstream transaction that followed the client's,
        unless plugins edited the envelope; else in one go."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None and upstream.started:
            if not self._transaction.envelope.changes:
                return await upstream.data(content)
            await upstream.abort()  # the upstream must see the envelope the plugins left
        return await self._delivery.deliver(self._session, self._transaction, content)

    def abort(self) -> Coroutine[Any, Any, None] | None:
        """The client's transaction ended without a message: the upstream one's abort to
        run (in the background), or None when there is nothing upstream to end."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None and upstream.started:
            return upstream.abort()
        return None
