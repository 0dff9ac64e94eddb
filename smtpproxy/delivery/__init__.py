"""Delivery backends: where accepted mail goes, and the proof it got there.

A backend's ``deliver`` returns only once the message is durably someone else's
responsibility (Maildir: written, fsynced and renamed into ``new/``; SMTP: the upstream
answered 250 to the end of DATA). Anything else raises :class:`DeliveryError` carrying the
reply for the client, so the proxy never acknowledges a message it could lose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from smtpproxy.addresses import Address
from smtpproxy.message import Message
from smtpproxy.session import Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["Delivered", "Delivery", "DeliveryError", "DeliveryState", "UpstreamTransaction",
           "deliver_alone"]


class DeliveryError(Exception):
    """The backend did not take the message; ``reply`` is what the client should hear."""

    def __init__(self, reply: Reply, detail: str = "", reason: str = ""):
        super().__init__(f"{reply.code} {reply.enhanced or ''} {reply.text} {detail}".strip())
        self.reply = reply
        self.detail = detail
        self.reason = reason
        """Why a server could not be used (``connect``, ``timeout``, ``greeting``, ``tls``,
        ``tls_verify``, ``auth``); empty for replies about one message."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """Proof of delivery: the reply to relay to the client, and details for the log."""

    reply: Reply
    destination: str
    tls: str | None = None


class UpstreamTransaction(Protocol):
    """An upstream transaction that follows the client's (``rcpt_mode: relay``)."""

    @property
    def started(self) -> bool:
        """True once the upstream has been contacted for this transaction."""
        ...

    async def rcpt(self, address: Address, params: Mapping[str, str | None] | None = None) -> Reply:
        """Ask the upstream about one recipient (with its DSN parameters); its answer is
        relayed to the client."""
        ...

    async def data(self, content: Message) -> Delivered:
        """Send the message; raises DeliveryError when the upstream does not take it."""
        ...

    async def abort(self) -> None:
        """End the upstream transaction without a message (client RSET, QUIT, refusal)."""


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """What a readiness probe found: the backend usable or not, and each upstream's state."""

    usable: bool
    detail: str
    upstreams: dict[str, bool]


class Delivery(Protocol):
    """What the proxy needs of a backend."""

    name: str
    rcpt_mode: str
    """``at_data``, or ``relay`` when RCPTs are asked of the upstream as they come."""

    def route_key(self, address: Address) -> str:
        """Recipients with different keys cannot share a transaction (452 4.5.3 for the others)."""
        ...

    def open_transaction(self, session: Session, transaction: Transaction) -> UpstreamTransaction:
        """Only called when ``rcpt_mode`` is ``relay``."""
        ...

    def offers_dsn(self) -> bool:
        """Whether the client may ask for DSNs (RFC 3461): the backend passes them on."""
        ...

    def offers_8bitmime(self) -> bool:
        """Whether the client may send 8-bit message data (RFC 6152): the backend takes it."""
        ...

    def offers_smtputf8(self) -> bool:
        """Whether the client may use SMTPUTF8 (RFC 6531): the backend takes it."""
        ...

    def size_limit(self) -> int | None:
        """The largest message the backend takes, less what the proxy adds; None: no limit
        of its own (``limits.max_message_size`` applies)."""
        ...

    def reply_bound(self) -> float:
        """How long a message already handed over may still take to be answered (shutdown
        waits this long for the answer the client is owed)."""
        ...

    async def probe(self, greeting_seconds: float) -> DeliveryState:
        """Whether the backend can take mail now, for ``/readyz`` and the up gauges: each
        upstream greeted within *greeting_seconds*, or a local directory writable."""
        ...

    def upstream_names(self) -> list[str]:
        """The upstream servers by name, for metrics labels; empty for a local backend."""
        ...

    def report_to(self, on_down: Callable[[str, str], None],
                  on_identity: Callable[[str, str], None]) -> None:
        """Tell *on_down* (server, reason) when an upstream is found down and *on_identity*
        (server, mechanism) how the client's identity was passed on; a local backend has
        neither to tell."""

    def remembered_refusal(self, sender: Address, recipient: Address) -> Reply | None:
        """The refusal the backend gave *recipient* at an earlier delivery, if it still applies.

        With ``rcpt_mode: at_data`` the client hears it at RCPT when it sends again, so one
        refused recipient does not defer the others on every retry.
        """
        ...

    async def start(self) -> None:
        """Prepare (create directories, check reachability); raise to refuse to start."""

    async def deliver(self, session: Session, transaction: Transaction, content: Message) -> Delivered:
        """Hand over one message for ``transaction.envelope``'s recipients, or raise DeliveryError.

        Write ``content.parts()`` out rather than ``content.raw``: a big message is spooled
        and must not be copied into memory whole.
        """
        ...

    def end_session(self, session: Session) -> None:
        """The client's session is over: let go of what the backend kept for it (upstream
        connections held for its next message: shared, or closed when they spoke for this
        client alone); nothing for a local backend."""

    async def close(self) -> None:
        """Release connections and threads."""


async def deliver_alone(delivery: Delivery, session: Session, transaction: Transaction,
                        content: Message) -> Delivered:
    """Deliver one message outside any client's connection (a release from quarantine, a
    digest): its rebuilt session ends with it, so the backend keeps nothing for it."""
    try:
        return await delivery.deliver(session, transaction, content)
    finally:
        delivery.end_session(session)
