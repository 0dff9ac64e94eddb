"""The session model plugins see: who is connected, what they are sending, and what was decided.

These objects belong to no transport. The SMTP proxy fills them from the wire, a milter
fills them from the MTA's macros, and the dry-run tracer builds them from the command
line. Plugins read them, keep their own state in ``notes``, and may edit the envelope
through methods that record every change (so a milter can replay them as actions).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
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
    "WouldBe",
]

Phase = str
"""The hook an outcome was recorded for: ``connect``, ``helo``, ``mail_from``, ``rcpt_to`` or ``data``."""

_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+")  # RFC 5321 esmtp-value (+ UTF-8, RFC 6531)


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
    """The client's forward-confirmed reverse DNS name; None when unknown. Set by the ``iprev``
    plugin in the proxy and the tracer, and from the MTA's verified name in milter mode."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient with its ESMTP parameters (e.g. NOTIFY, ORCPT). Immutable: plugins change
    the envelope through :class:`Envelope`'s methods, never by editing a recipient."""

    address: Address
    params: Mapping[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.address, Address):
            raise TypeError(f"a recipient's address must be an Address, got {type(self.address).__name__}")
        object.__setattr__(self, "params", MappingProxyType(_checked_params(self.params)))


def _checked_params(params: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """A copy of ESMTP parameters; keyword/value checked so nothing odd reaches the wire."""
    checked: dict[str, str | None] = {}
    for key, value in (params or {}).items():
        if not isinstance(key, str) or not _ESMTP_KEYWORD.fullmatch(key):
            raise ValueError(f"ESMTP parameter name {key!r} is not a keyword (RFC 5321 4.1.2)")
        if value is not None and (not isinstance(value, str) or not _ESMTP_VALUE.fullmatch(value)):
            raise ValueError(f"ESMTP parameter {key}={value!r} has characters not allowed in a value")
        checked[key] = value
    return checked


@dataclass(frozen=True, slots=True)
class EnvelopeChange:
    """One edit a plugin made to the envelope, in order; a milter replays these."""

    op: str  # "sender" | "add_recipient" | "remove_recipient"
    address: Address


class Envelope:
    """MAIL FROM and the accepted RCPT TOs of one transaction.

    Read-only to plugins except through :meth:`set_sender`, :meth:`add_recipient` and
    :meth:`remove_recipient`, which record every change (the SMTP front end then opens a
    fresh upstream transaction, a milter replays them as actions). ``sender`` and
    ``recipients`` cannot be assigned: an edit that bypassed the record would be lost.
    """

    __slots__ = ("_changes", "_recipients", "_sender", "_sender_params")

    def __init__(self, sender: Address, sender_params: Mapping[str, str | None] | None = None):
        self._sender = _address(sender)
        self._sender_params = MappingProxyType(_checked_params(sender_params))
        self._recipients: list[Recipient] = []
        self._changes: list[EnvelopeChange] = []

    @property
    def sender(self) -> Address:
        """The envelope sender (its ``is_null`` is True for the null reverse-path ``<>``)."""
        return self._sender

    @property
    def sender_params(self) -> Mapping[str, str | None]:
        """MAIL FROM's ESMTP parameters (read-only)."""
        return self._sender_params

    @property
    def recipients(self) -> tuple[Recipient, ...]:
        """The recipients accepted so far, in order (read-only; edit with the methods)."""
        return tuple(self._recipients)

    @property
    def changes(self) -> tuple[EnvelopeChange, ...]:
        return tuple(self._changes)

    @property
    def smtputf8(self) -> bool:
        """True when the client asked for SMTPUTF8 on MAIL FROM."""
        return "SMTPUTF8" in self._sender_params

    def set_sender(self, address: Address) -> None:
        """Rewrite the envelope sender (the upstream sees the new one)."""
        self._sender = _address(address)
        self._changes.append(EnvelopeChange("sender", address))

    def add_recipient(self, address: Address, params: Mapping[str, str | None] | None = None) -> None:
        """Add a recipient (e.g. a BCC archive address)."""
        self._recipients.append(Recipient(_address(address), dict(params or {})))
        self._changes.append(EnvelopeChange("add_recipient", address))

    def remove_recipient(self, address: Address) -> bool:
        """Drop a recipient; returns False when it was not there."""
        for i, rcpt in enumerate(self._recipients):
            if rcpt.address == address:
                del self._recipients[i]
                self._changes.append(EnvelopeChange("remove_recipient", address))
                return True
        return False

    def _savepoint(self) -> tuple[Address, list[Recipient], int]:
        """The envelope now, for :meth:`_rollback` (a shadowed plugin's edits are undone)."""
        return self._sender, list(self._recipients), len(self._changes)

    def _rollback(self, savepoint: tuple[Address, list[Recipient], int]) -> tuple[EnvelopeChange, ...]:
        """Back to *savepoint*; returns the changes made since, which are no longer applied."""
        sender, recipients, count = savepoint
        undone = tuple(self._changes[count:])
        if undone:
            self._sender, self._recipients = sender, recipients
            del self._changes[count:]
        return undone

    def _accept_recipient(self, recipient: Recipient) -> None:
        """For front ends only: a recipient the client gave and the chain accepted (no change)."""
        self._recipients.append(recipient)


def _address(address: object) -> Address:
    if not isinstance(address, Address):
        raise TypeError(f"expected an Address (use Address.parse(text)), got {type(address).__name__}")
    return address


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
    shadow: bool = False
    """The plugin runs in shadow mode (``enforce: false``): its action was not applied, its score
    and tags count only towards the shadow total (:attr:`Results.shadow_score`)."""
    undone: tuple[str, ...] = ()
    """A shadowed plugin's edits of the message or envelope, undone after its call (as the
    tracer shows changes: ``+ Name: value``, ``- Name``, ``= Name: value``, ``body replaced``,
    ``sender <a>``, ``+rcpt <a>``, ``-rcpt <a>``)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """How a message ended: what the client was told and who decided it."""

    disposition: str
    """``delivered``, ``rejected``, ``tempfailed``, ``discarded`` or ``quarantined``."""
    reply: Reply
    """The reply the client received for the end of DATA."""
    decided_by: str
    """A plugin name, ``delivery`` (the message was handed on: the upstream's or the MTA's
    answer) or ``proxy`` (a rule of smtpproxy itself)."""
    reason: str = ""
    score: float = 0.0
    """The message's score: every contribution of the session and the transaction."""

    def __post_init__(self) -> None:
        # The client hears 2xx only for a message that was delivered, quarantined or dropped
        # as a plugin said, and a refusal is never positive: checked here, for every front end.
        expected = _DISPOSITION_CLASS.get(self.disposition)
        if expected is None:
            raise ValueError(f"unknown disposition {self.disposition!r}")
        if self.reply.code // 100 != expected:
            raise ValueError(f"a {self.disposition} message cannot be answered {self.reply}")


_DISPOSITION_CLASS = {
    "delivered": 2, "quarantined": 2, "discarded": 2, "rejected": 5, "tempfailed": 4,
}


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
        """The sum of every enforced score contribution so far (shadowed plugins' not)."""
        return sum(o.score for o in self.outcomes if not o.shadow)

    @property
    def shadow_score(self) -> float:
        """The sum of the shadowed plugins' score contributions (``enforce: false``)."""
        return sum(o.score for o in self.outcomes if o.shadow)

    @property
    def tags(self) -> set[str]:
        """The tags enforced plugins set (a shadowed plugin's count in :attr:`shadow_tags`)."""
        return {t for o in self.outcomes if not o.shadow for t in o.tags}

    @property
    def shadow_tags(self) -> set[str]:
        """The tags shadowed plugins set."""
        return {t for o in self.outcomes if o.shadow for t in o.tags}

    @property
    def shadowed(self) -> bool:
        """True when a shadowed plugin ran here."""
        return any(o.shadow for o in self.outcomes)

    def for_plugin(self, name: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.plugin == name]


def _takes_disposition(current: Action | None, verdict: Verdict | None) -> bool:
    """DISCARD always; QUARANTINE unless a DISCARD is already pending (dropping beats keeping)."""
    if verdict is None:
        return False
    return verdict.action is Action.DISCARD or (
        verdict.action is Action.QUARANTINE and current is not Action.DISCARD
    )


class _Disposition:
    """A DISCARD or QUARANTINE decided before the message is complete, and who decided it."""

    __slots__ = ("disposition", "disposition_by", "disposition_reason")

    def __init__(self) -> None:
        self.disposition: Action | None = None
        """DISCARD or QUARANTINE, applied when the message is complete; None otherwise."""
        self.disposition_reason = ""
        self.disposition_by = ""
        """The plugin whose verdict set :attr:`disposition`."""

    def set_disposition(self, verdict: Verdict | None, by: str = "") -> bool:
        """Remember a DISCARD or QUARANTINE for the end of the message. True when it took effect.

        Every front end calls this (through :mod:`smtpproxy.outcome`) and applies it when the
        message ends, so the rule lives once.
        """
        if not _takes_disposition(self.disposition, verdict):
            return False
        assert verdict is not None
        self.disposition, self.disposition_reason, self.disposition_by = (
            verdict.action, verdict.reason, by
        )
        return True


class WouldBe(_Disposition):
    """What the session or transaction would have come to had shadowed plugins enforced.

    Kept beside the enforced state by :mod:`smtpproxy.outcome` with the same rules; it never
    changes what happens to the mail, only what the ``message`` line's ``would=`` and the
    tracer report.
    """

    __slots__ = ("recipient_refusal", "refusal", "refused_recipients")

    def __init__(self) -> None:
        super().__init__()
        self.refusal: tuple[Reply, str, str] | None = None
        """(reply, by, reason) of the first refusal of the whole session or message (connect,
        helo, mail_from) that would have been given; None when none."""
        self.refused_recipients: list[tuple[Reply, str, str]] = []
        """Recipients in the envelope that would have been refused."""
        self.recipient_refusal: tuple[Reply, str, str] | None = None
        """The would-be refusal of the recipient being asked about; it counts in
        :attr:`refused_recipients` once the front end accepts the recipient (:meth:`accepted`)."""

    def accepted(self) -> None:
        """The recipient just asked about is in the envelope."""
        if self.recipient_refusal is not None:
            self.refused_recipients.append(self.recipient_refusal)
            self.recipient_refusal = None

    def inherit(self, other: WouldBe) -> None:
        """Start a transaction from the session's what-if state (as :meth:`Session.begin_transaction`)."""
        self.disposition, self.disposition_reason, self.disposition_by = (
            other.disposition, other.disposition_reason, other.disposition_by
        )
        self.refusal = other.refusal


class Transaction(_Disposition):
    """One MAIL FROM ... DATA exchange. A session may hold several, one after another."""

    __slots__ = ("_session_results", "envelope", "id", "message", "notes", "results", "would")

    def __init__(self, tx_id: str, envelope: Envelope, session_results: Results | None = None):
        super().__init__()
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
        self.would = WouldBe()
        """What it would have come to had shadowed plugins (``enforce: false``) enforced."""
        self._session_results = session_results

    @property
    def score(self) -> float:
        """The message's one score: the session's (connect, helo) plus this transaction's.

        Logs, metrics, the quarantine record, the tracer and the score plugin all use it.
        """
        earlier = self._session_results.score if self._session_results is not None else 0.0
        return earlier + self.results.score

    @property
    def shadow_score(self) -> float:
        """The score had shadowed plugins (``enforce: false``) counted: :attr:`score` plus
        their points, of the session and this transaction."""
        earlier = self._session_results if self._session_results is not None else Results()
        return self.score + earlier.shadow_score + self.results.shadow_score

    @property
    def shadowed(self) -> bool:
        """True when a shadowed plugin ran in the session or this transaction."""
        return self.results.shadowed or (
            self._session_results is not None and self._session_results.shadowed
        )


class Session(_Disposition):
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
        super().__init__()
        self.id = session_id or new_id()
        """A short random id, carried by every log line of the session (``sid=``)."""
        self.client = client
        """The remote end: the real client, also behind a PROXY header or a milter's MTA."""
        self.local_ip = local_ip
        """The address the client connected to."""
        self.local_port = local_port
        """The port the client connected to (25, 465, 587, ...)."""
        self.transport = transport
        """Which front end drives the chain: ``smtp`` (the proxy), ``milter``, ``policy`` or ``offline``."""
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
        self.would = WouldBe()
        """What the session would have come to had shadowed plugins (``enforce: false``) enforced."""
        self.transaction: Transaction | None = None
        """The transaction in progress (after MAIL FROM), or None."""
        self.transaction_count = 0
        """How many transactions (MAIL FROM commands accepted) this session had."""

    def begin_transaction(self, envelope: Envelope) -> Transaction:
        """Start a transaction; a DISCARD/QUARANTINE decided at connect or helo carries over."""
        self.transaction_count += 1
        transaction = Transaction(f"{self.id}.{self.transaction_count}", envelope, self.results)
        transaction.disposition = self.disposition
        transaction.disposition_reason = self.disposition_reason
        transaction.disposition_by = self.disposition_by
        transaction.would.inherit(self.would)
        self.transaction = transaction
        return transaction

    def end_transaction(self) -> None:
        self.transaction = None
