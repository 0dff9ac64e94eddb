"""The session model plugins see: who is connected, what they are sending, and what was decided.

These objects belong to no transport. The SMTP proxy fills them from the wire, a milter
fills them from the MTA's macros, and the dry-run tracer builds them from the command
line. Plugins read them, keep their own state in ``notes``, and may edit the envelope
through methods that record every change (so a milter can replay them as actions).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from smtpproxy.addresses import Address
from smtpproxy.message import Message
from smtpproxy.verdicts import Action, Reply, Verdict

__all__ = [
    "Client",
    "Decision",
    "Envelope",
    "EnvelopeChange",
    "Outcome",
    "Phase",
    "Recipient",
    "Results",
    "Session",
    "TLSInfo",
    "Transaction",
]

Phase = str
"""One of ``connect``, ``helo``, ``mail_from``, ``rcpt_to``, ``data``, ``delivered``, ``disconnect``."""


def new_id() -> str:
    """A short random id that is unique enough to grep logs by."""
    return secrets.token_hex(6)


@dataclass(slots=True)
class TLSInfo:
    """The TLS layer the client negotiated (STARTTLS or implicit)."""

    version: str
    cipher: str
    bits: int | None = None


@dataclass(slots=True)
class Client:
    """The remote end of the connection, as the proxy sees it (or as XCLIENT/PROXY told it)."""

    ip: str
    port: int
    hostname: str | None = None
    """Reverse DNS name, when it was resolved and confirmed; None otherwise."""


@dataclass(slots=True)
class Recipient:
    """One accepted recipient with its ESMTP parameters (e.g. NOTIFY, ORCPT)."""

    address: Address
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnvelopeChange:
    """One edit a plugin made to the envelope, in order; a milter replays these."""

    op: str  # "sender" | "add_recipient" | "remove_recipient"
    address: Address


class Envelope:
    """MAIL FROM and the accepted RCPT TOs of one transaction."""

    __slots__ = ("_changes", "recipients", "sender", "sender_params")

    def __init__(self, sender: Address, sender_params: dict[str, str | None] | None = None):
        self.sender = sender
        self.sender_params: dict[str, str | None] = dict(sender_params or {})
        self.recipients: list[Recipient] = []
        self._changes: list[EnvelopeChange] = []

    @property
    def changes(self) -> tuple[EnvelopeChange, ...]:
        return tuple(self._changes)

    @property
    def smtputf8(self) -> bool:
        """True when the client asked for SMTPUTF8 on MAIL FROM."""
        return "SMTPUTF8" in self.sender_params

    def set_sender(self, address: Address) -> None:
        """Rewrite the envelope sender (the upstream sees the new one)."""
        self.sender = address
        self._changes.append(EnvelopeChange("sender", address))

    def add_recipient(self, address: Address, params: dict[str, str | None] | None = None) -> None:
        """Add a recipient (e.g. a BCC archive address)."""
        self.recipients.append(Recipient(address, dict(params or {})))
        self._changes.append(EnvelopeChange("add_recipient", address))

    def remove_recipient(self, address: Address) -> bool:
        """Drop a recipient; returns False when it was not there."""
        for i, rcpt in enumerate(self.recipients):
            if rcpt.address == address:
                del self.recipients[i]
                self._changes.append(EnvelopeChange("remove_recipient", address))
                return True
        return False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one plugin's hook did in one phase: the record behind every decision."""

    plugin: str
    phase: Phase
    action: Action
    duration: float
    reply: Reply | None = None
    reason: str = ""
    score: float = 0.0
    tags: tuple[str, ...] = ()
    error: str | None = None
    """Set when the hook raised or timed out; the action is then the plugin's on_error policy."""


@dataclass(frozen=True, slots=True)
class Decision:
    """How a message ended: what the client was told and who decided it."""

    disposition: str
    """``delivered``, ``rejected``, ``tempfailed``, ``discarded`` or ``quarantined``."""
    reply: Reply
    """The reply the client received for the end of DATA."""
    decided_by: str
    """A plugin name, ``delivery`` (the upstream's answer) or ``proxy`` (a protocol rule)."""
    reason: str = ""


class Results:
    """Every plugin outcome of a session or transaction, in the order they happened."""

    __slots__ = ("outcomes",)

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def __iter__(self) -> Iterator[Outcome]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def score(self) -> float:
        """The sum of every score contribution so far."""
        return sum(o.score for o in self.outcomes)

    @property
    def tags(self) -> set[str]:
        return {t for o in self.outcomes for t in o.tags}

    def for_plugin(self, name: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.plugin == name]


def _takes_disposition(current: Action | None, verdict: Verdict | None) -> bool:
    """DISCARD always; QUARANTINE unless a DISCARD is already pending (dropping beats keeping)."""
    if verdict is None:
        return False
    return verdict.action is Action.DISCARD or (
        verdict.action is Action.QUARANTINE and current is not Action.DISCARD
    )


class Transaction:
    """One MAIL FROM ... DATA exchange. A session may hold several, one after another."""

    __slots__ = (
        "disposition", "disposition_reason", "envelope", "id", "message", "notes", "results",
    )

    def __init__(self, tx_id: str, envelope: Envelope):
        self.id = tx_id
        """``<session id>.<n>``: the n-th transaction of the session; in every log line about it."""
        self.envelope = envelope
        """MAIL FROM and the recipients accepted so far."""
        self.message: Message | None = None
        """The message, once DATA is complete (None before the ``data`` phase)."""
        self.notes: dict[str, Any] = {}
        """Scratch space for plugins, cleared with each new transaction. Key by plugin name."""
        self.results = Results()
        """Outcomes of the mail_from, rcpt_to and data phases of this transaction."""
        self.disposition: Action | None = None
        """Set to DISCARD or QUARANTINE by an earlier phase; applied when the message is complete."""
        self.disposition_reason = ""

    def set_disposition(self, verdict: Verdict | None) -> bool:
        """Remember a DISCARD or QUARANTINE decided before the message is complete.

        Every front end applies it when the message ends. True when it took effect.
        """
        if not _takes_disposition(self.disposition, verdict):
            return False
        assert verdict is not None
        self.disposition, self.disposition_reason = verdict.action, verdict.reason
        return True


class Session:
    """One client connection, from connect to disconnect."""

    def __init__(
        self,
        client: Client,
        *,
        local_ip: str = "",
        local_port: int = 0,
        session_id: str | None = None,
        transport: str = "smtp",
    ):
        self.id = session_id or new_id()
        """A short random id, carried by every log line of the session (``sid=``)."""
        self.client = client
        """The remote end: the real client, also behind a PROXY header or a milter's MTA."""
        self.local_ip = local_ip
        """The address the client connected to."""
        self.local_port = local_port
        """The port the client connected to (25, 465, 587, ...)."""
        self.transport = transport
        """Which front end drives the chain: ``smtp`` (the proxy), ``milter`` or ``offline``."""
        self.started = time.time()
        """When the connection was accepted (Unix time)."""
        self.helo: str | None = None
        """The accepted HELO/EHLO name; None before one was accepted."""
        self.esmtp = False
        """True when the client greeted with EHLO."""
        self.tls: TLSInfo | None = None
        """The TLS layer (STARTTLS or implicit); None on a plaintext connection."""
        self.auth_user: str | None = None
        """The SMTP AUTH login, once authenticated; None otherwise."""
        self.notes: dict[str, Any] = {}
        """Scratch space for plugins that lives as long as the connection. Key by plugin name."""
        self.results = Results()
        """Outcomes of the connect and helo phases."""
        self.transaction: Transaction | None = None
        """The transaction in progress (after MAIL FROM), or None."""
        self.transaction_count = 0
        """How many transactions (MAIL FROM commands accepted) this session had."""
        self.disposition: Action | None = None
        """DISCARD/QUARANTINE decided at connect or helo applies to every transaction."""
        self.disposition_reason = ""

    def set_disposition(self, verdict: Verdict | None) -> bool:
        """Remember a DISCARD or QUARANTINE decided at connect or helo, for every message.

        True when it took effect (see :meth:`Transaction.set_disposition`).
        """
        if not _takes_disposition(self.disposition, verdict):
            return False
        assert verdict is not None
        self.disposition, self.disposition_reason = verdict.action, verdict.reason
        return True

    def begin_transaction(self, envelope: Envelope) -> Transaction:
        self.transaction_count += 1
        self.transaction = Transaction(f"{self.id}.{self.transaction_count}", envelope)
        if self.disposition is not None:
            self.transaction.disposition = self.disposition
            self.transaction.disposition_reason = self.disposition_reason
        return self.transaction

    def end_transaction(self) -> None:
        self.transaction = None
