"""Delivery backends: where accepted mail goes, and the proof it got there.

A backend's ``deliver`` returns only once the message is durably someone else's
responsibility (Maildir: written, fsynced and renamed into ``new/``; SMTP: the upstream
answered 250 to the end of DATA). Anything else raises :class:`DeliveryError` carrying the
reply for the client, so the proxy never acknowledges a message it could lose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from smtpproxy.session import Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["Delivered", "Delivery", "DeliveryError"]


class DeliveryError(Exception):
    """The backend did not take the message; ``reply`` is what the client should hear."""

    def __init__(self, reply: Reply, detail: str = ""):
        super().__init__(f"{reply.code} {reply.enhanced or ''} {reply.text} {detail}".strip())
        self.reply = reply
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Delivered:
    """Proof of delivery: the reply to relay to the client, and details for the log."""

    reply: Reply
    destination: str
    tls: str | None = None


class Delivery(Protocol):
    """What the proxy needs of a backend."""

    name: str

    async def start(self) -> None:
        """Prepare (create directories, check reachability); raise to refuse to start."""

    async def deliver(self, session: Session, transaction: Transaction, content: bytes) -> Delivered:
        """Hand over one message for ``transaction.envelope``'s recipients, or raise DeliveryError."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
