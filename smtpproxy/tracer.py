"""The offline tracer: one message through the plugin chain, without a network or a delivery.

``smtpproxy test-message`` and the pytest plugin drive the chain through connect → helo →
mail_from → rcpt_to (each recipient) → data on the same
:class:`~smtpproxy.conversation.Conversation` as the SMTP front end (:mod:`smtpproxy.inbound`),
observing it as it runs: the same relay rule, per-transaction route rule, DATA limits and
block reader,
the same reading of verdicts per phase, discard/quarantine dispositions carried from earlier
phases, refused recipients left out of the envelope. Nothing is delivered or quarantined;
the result is a :class:`Trace` that says who did what, how long it took, what changed in
the message and envelope, and what the client would have been told.

Plugins run for real: a plugin that asks DNS, Redis or an HTTP service still does. The
session's ``transport`` is ``"offline"`` so a plugin can tell (and, say, not count a trace
against a rate limit). ``after_message`` is told ``delivered`` for a message that would be.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpproxy.addresses import Address, AddressError, parse_mail_from, parse_rcpt_to
from smtpproxy.chain import Chain, PhaseResult, describe_change, describe_envelope_change
from smtpproxy.config import Config, ConfigSource, MaildirDeliveryConfig
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.datareader import END_OF_DATA, DataReader
from smtpproxy.eventlog import current_session
from smtpproxy.message import Message
from smtpproxy.outcome import PROXY, Deliver, Refusal, queued_reply, recipients_refused, skips_data_chain
from smtpproxy.registry import build_chain
from smtpproxy.relay import RelayPolicy
from smtpproxy.routing import DEFAULT_ROUTE, RouteTable, route_of
from smtpproxy.senderlogin import SenderLoginPolicy
from smtpproxy.session import Client, Decision, Outcome, Recipient, Session, TLSInfo, Transaction
from smtpproxy.startup import start_chain
from smtpproxy.tables import Tables, build_tables, install
from smtpproxy.verdicts import Reply

__all__ = [
    "DISPOSITIONS",
    "PhaseTrace",
    "Route",
    "Step",
    "Trace",
    "TraceInputError",
    "TracePolicy",
    "Tracer",
    "data_section",
]

DISPOSITIONS = ("delivered", "rejected", "tempfailed", "discarded", "quarantined")
"""A trace's decision, as :class:`~smtpproxy.session.Decision` says it: ``delivered`` means
the proxy would hand the message to delivery (whose answer the client would then hear)."""


class TraceInputError(ValueError):
    """The message or envelope given to the tracer is unusable (says what to fix)."""


# -- what a trace records ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One plugin's hook call (or one rule of the proxy) in one phase."""

    plugin: str
    phase: str
    action: str
    """``continue``, ``accept``, ``reject``, ``tempfail``, ``discard`` or ``quarantine``."""
    reply: str | None = None
    """The SMTP reply the verdict carries, e.g. ``550 5.7.1 No``."""
    score: float = 0.0
    reason: str = ""
    tags: tuple[str, ...] = ()
    duration_ms: float = 0.0
    error: str | None = None
    """The exception or timeout, when the hook failed (the action is then its on_error policy)."""
    changes: tuple[str, ...] = ()
    """Edits this call made: ``+ Name: value``, ``- Name``, ``= Name: value``, ``body replaced``,
    ``sender <a>``, ``+rcpt <a>``, ``-rcpt <a>``. For a shadowed plugin: the edits it made
    that were undone."""
    shadow: bool = False
    """The plugin runs in shadow mode (``enforce: false``): :attr:`action` is what it would
    have done; nothing of it was applied."""


@dataclass(slots=True)
class PhaseTrace:
    """One phase: its subject (HELO name, sender or recipient), steps, and what the client heard."""

    phase: str
    subject: str
    steps: list[Step] = field(default_factory=list)
    outcome: str = "continue"
    """What the phase ended with: the final verdict's action, or ``continue``."""
    reply: str | None = None
    """The reply the client would get (None where the proxy's normal reply applies)."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where the accepted recipients would go: a Maildir, or a route's upstream servers."""

    name: str
    destination: str
    recipients: tuple[str, ...]


@dataclass(slots=True)
class Trace:
    """Everything one offline run found out about one message."""

    sender: str
    recipients: list[str]
    """The recipients asked for, in order."""
    client_ip: str
    client_port: int
    helo: str
    auth_user: str | None
    tls: bool
    size: int
    phases: list[PhaseTrace] = field(default_factory=list)
    accepted_recipients: list[str] = field(default_factory=list)
    """The envelope's recipients after every phase (plugin edits included)."""
    refused_recipients: list[tuple[str, str, str]] = field(default_factory=list)
    """(recipient, reply, by) for every recipient refused at RCPT."""
    headers_added: list[tuple[str, str]] = field(default_factory=list)
    headers_removed: list[tuple[str, str]] = field(default_factory=list)
    body_replaced: bool = False
    envelope_changes: list[tuple[str, str, str]] = field(default_factory=list)
    """(op, address, plugin): ``sender``, ``add_recipient`` or ``remove_recipient``."""
    routes: list[Route] = field(default_factory=list)
    groups: list[tuple[str, str, str]] = field(default_factory=list)
    """(recipient, policy group, why) for every recipient a group was chosen for (policies:)."""
    decision: str = "rejected"
    """One of :data:`DISPOSITIONS`."""
    reply: str = ""
    """What the client would have been told last (the end-of-data reply if DATA was reached)."""
    decided_by: str = PROXY
    reason: str = ""
    score: float = 0.0
    """The sum of every score contribution (session and transaction), shadowed plugins' not."""
    shadowed: list[str] = field(default_factory=list)
    """The chain's plugins in shadow mode (``enforce: false``); empty: the fields below are
    the enforced ones."""
    shadow_score: float = 0.0
    """The score had shadowed plugins counted (:attr:`score` plus their points)."""
    would: str = ""
    """The decision had shadowed plugins enforced (one of :data:`DISPOSITIONS`)."""
    would_reply: str = ""
    """What the client would then have been told (empty: as :attr:`reply`)."""
    would_by: str = ""
    would_reason: str = ""
    tags: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    """Things the tracer did or could not do that a reader should know (line endings, relay mode)."""
    message: Message | None = field(default=None, repr=False)
    """The message as the plugins left it (None when DATA was not reached)."""

    @property
    def steps(self) -> list[Step]:
        """Every step of every phase, in order."""
        return [s for p in self.phases for s in p.steps]

    def steps_for(self, plugin: str) -> list[Step]:
        return [s for s in self.steps if s.plugin == plugin]

    def phase(self, name: str) -> list[PhaseTrace]:
        """The traces of one phase (``rcpt_to`` has one per recipient)."""
        return [p for p in self.phases if p.phase == name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the message itself is left out; its changes are in)."""
        return {
            "decision": self.decision,
            "reply": self.reply,
            "decided_by": self.decided_by,
            "reason": self.reason,
            "score": self.score,
            "tags": list(self.tags),
            **({"shadow": {"plugins": list(self.shadowed), "score": self.shadow_score,
                           "decision": self.would, "reply": self.would_reply,
                           "decided_by": self.would_by, "reason": self.would_reason}}
               if self.shadowed else {}),
            "envelope": {
                "sender": self.sender,
                "recipients": list(self.recipients),
                "accepted_recipients": list(self.accepted_recipients),
                "refused_recipients": [
                    {"recipient": r, "reply": reply, "by": by} for r, reply, by in self.refused_recipients
                ],
                "changes": [{"op": op, "address": a, "plugin": p} for op, a, p in self.envelope_changes],
                "groups": [{"recipient": r, "group": g, "why": why} for r, g, why in self.groups],
            },
            "client": {
                "ip": self.client_ip, "port": self.client_port, "helo": self.helo,
                "auth_user": self.auth_user, "tls": self.tls,
            },
            "size": self.size,
            "phases": [
                {
                    "phase": p.phase, "subject": p.subject, "outcome": p.outcome, "reply": p.reply,
                    "steps": [
                        {
                            "plugin": s.plugin, "action": s.action, "reply": s.reply, "score": s.score,
                            "reason": s.reason, "tags": list(s.tags),
                            "duration_ms": round(s.duration_ms, 3), "error": s.error,
                            "changes": list(s.changes), **({"shadow": True} if s.shadow else {}),
                        }
                        for s in p.steps
                    ],
                }
                for p in self.phases
            ],
            "headers_added": [{"name": n, "value": v} for n, v in self.headers_added],
            "headers_removed": [{"name": n, "value": v} for n, v in self.headers_removed],
            "body_replaced": self.body_replaced,
            "routes": [
                {"route": r.name, "destination": r.destination, "recipients": list(r.recipients)}
                for r in self.routes
            ],
            "duration_ms": round(self.duration_ms, 3),
            "notes": list(self.notes),
        }


# -- the proxy's rules, as the tracer needs them ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    """How the trace names a route, and where its mail would go."""

    name: str
    destination: str


@dataclass(frozen=True, slots=True)
class TracePolicy:
    """The proxy rules a trace applies besides the plugins (taken from a Config)."""

    relay: RelayPolicy | None = None
    """None: every recipient passes the relay rule (handy when testing one plugin)."""
    max_message_size: int = 26_214_400
    max_line_length: int = 1000
    max_recipients: int = 100
    normalize_bare_newlines: bool = False
    smtputf8: bool = True
    route_table: RouteTable = field(default_factory=RouteTable)
    """The delivery's own route rule (:mod:`smtpproxy.routing`)."""
    routes: Mapping[str, _Route] = field(default_factory=dict)
    """The configured routes by key, for the report."""
    default_destination: str = "delivery"
    rcpt_mode: str = "at_data"
    local_ip: str = "127.0.0.1"
    local_port: int = 25
    sender_login: SenderLoginPolicy | None = None
    """The listener's sender/login binding (smtpproxy.senderlogin); None: not checked."""

    @classmethod
    def from_config(cls, config: Config) -> TracePolicy:
        d = config.delivery
        routes: dict[str, _Route] = {}
        table = RouteTable()
        rcpt_mode = "at_data"
        if isinstance(d, MaildirDeliveryConfig):
            default = f"maildir {d.path}"
        else:
            default = ", ".join(f"{u.host}:{u.port}" for u in d.default_upstreams())
            rcpt_mode = d.rcpt_mode
            table = RouteTable([route.domains for route in d.routes], [route.name for route in d.routes])
            for key, route in zip(table.keys, d.routes, strict=True):
                routes[key] = _Route(f"{key} ({', '.join(route.domains)})",
                                     ", ".join(f"{u.host}:{u.port}" for u in route.upstreams))
        lim, listener = config.limits, config.listeners[0]
        return cls(
            relay=RelayPolicy.of(config.relay),
            max_message_size=lim.max_message_size,
            max_line_length=lim.max_line_length,
            max_recipients=lim.max_recipients,
            normalize_bare_newlines=config.smtp.bare_newlines == "normalize",
            smtputf8=config.smtp.smtputf8,
            route_table=table,
            routes=routes,
            default_destination=default,
            rcpt_mode=rcpt_mode,
            local_ip=listener.address,
            local_port=listener.port,
            sender_login=SenderLoginPolicy.from_section(config.sender_login)
            if config.sender_login is not None and listener.auth and listener.auth.check_sender_login
            else None,
        )

    def rules(self) -> Rules:
        """The rules a :class:`~smtpproxy.conversation.Conversation` applies for the trace."""
        return Rules(max_recipients=self.max_recipients, relay=self.relay,
                     route_key=self.route_table.key_of, sender_login=self.sender_login)

    def route_of(self, address: Address, notes: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """(route name, destination) for a recipient, as the SMTP delivery picks it (*notes*: the
        transaction's, where a policy group may have given the recipient its route)."""
        route = self.routes.get(route_of(notes or {}, address, self.route_table.key_of))
        if route is None:
            return DEFAULT_ROUTE, self.default_destination
        return route.name, route.destination


# -- the driver --------------------------------------------------------------------------------


class _Run:
    """The state of one traced message; it observes the conversation (a
    :class:`~smtpproxy.conversation.ConversationObserver`)."""

    def __init__(self, trace: Trace, session: Session):
        self.trace = trace
        self.session = session
        self.current: PhaseTrace | None = None
        self.message_mark = 0
        self.envelope_mark = 0
        self.reply: Reply | None = None

    def begin(self, phase: str, subject: str) -> PhaseTrace:
        self.current = PhaseTrace(phase, subject)
        self.trace.phases.append(self.current)
        return self.current

    # -- the observer -------------------------------------------------------------------

    def phase_started(self, phase: str, subject: str) -> None:
        if phase == "data" and self.current is not None and self.current.phase == "data":
            self.current.subject = subject  # begun by the tracer itself, to read the message
            return
        self.begin(phase, subject)

    def outcome(self, outcome: Outcome) -> None:
        """The chain adds an outcome right after each plugin's call, so whatever changed in
        the message or envelope since the previous outcome is that plugin's doing."""
        assert self.current is not None
        transaction = self.session.transaction
        message = transaction.message if transaction is not None else None
        envelope = transaction.envelope if transaction is not None else None
        changes = list(outcome.undone)  # a shadowed plugin's: undone, shown as such
        if message is not None:
            changes.extend(describe_change(change) for change in message.changes[self.message_mark:])
            self.message_mark = len(message.changes)
        if envelope is not None:
            for env_change in envelope.changes[self.envelope_mark:]:
                changes.append(describe_envelope_change(env_change))
                self.trace.envelope_changes.append(
                    (env_change.op, env_change.address.text, outcome.plugin)
                )
            self.envelope_mark = len(envelope.changes)
        self.current.steps.append(Step(
            plugin=outcome.plugin, phase=outcome.phase, action=outcome.action.value,
            reply=_text(outcome.reply) if outcome.reply is not None else None,
            score=outcome.score, reason=outcome.reason, tags=outcome.tags,
            duration_ms=outcome.duration * 1000, error=outcome.error, changes=tuple(changes),
            shadow=outcome.shadow,
        ))

    def group_chosen(self, recipient: str, group: str, why: str) -> None:
        """The policy group of a recipient, and why (docs/multi-domain.md)."""
        self.trace.groups.append((recipient, group, why))

    def rule_refused(self, refusal: Refusal) -> None:
        self.proxy_step("reject" if refusal.reply.is_permanent else "tempfail", refusal.reply,
                        refusal.reason)

    def phase_finished(self, result: PhaseResult, refusal: Refusal | None) -> None:
        self.finish_phase(result, refusal.reply if refusal is not None else None)

    def proxy_step(self, action: str, reply: Reply, reason: str) -> None:
        assert self.current is not None
        self.current.steps.append(Step(PROXY, self.current.phase, action, _text(reply), reason=reason))
        self.current.outcome = action
        self.current.reply = _text(reply)

    def finish_phase(
        self, result: PhaseResult | None, reply: Reply | None = None, outcome: str | None = None
    ) -> None:
        assert self.current is not None
        verdict = result.verdict if result is not None else None
        self.current.outcome = outcome or (verdict.action.value if verdict is not None else "continue")
        if reply is not None:
            self.current.reply = _text(reply)

    def refuse(self, refusal: Refusal) -> None:
        """The conversation ended with *refusal* (the client's last answer)."""
        self.decide(refusal.disposition, refusal.reply, refusal.decided_by, refusal.reason)

    def decide(self, kind: str, reply: Reply, by: str, reason: str = "") -> None:
        self.reply = reply
        self.trace.decision = kind
        self.trace.reply = _text(reply)
        self.trace.decided_by = by
        self.trace.reason = reason


def data_section(raw: bytes) -> tuple[bytes, list[str]]:
    """The DATA section a client would send for a message file: CRLF lines, dot-stuffed.

    A file with LF line endings only (how most tools store ``.eml``) is converted to CRLF.
    A file that mixes them is sent as it is, so the proxy's bare-newline rule applies.
    """
    notes = []
    if b"\n" in raw and b"\r" not in raw:
        raw = raw.replace(b"\n", b"\r\n")
        notes.append("the file has LF line endings; sent with CRLF as an SMTP client would")
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    lines = raw.split(b"\r\n")[:-1]
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return stuffed, notes


class Tracer:
    """Runs messages through one chain offline. Use as ``async with`` (startup/shutdown hooks).

    Build it with :meth:`from_config` to get exactly what ``smtpproxy run`` would load, or
    from a :class:`~smtpproxy.chain.Chain` and a :class:`TracePolicy` (the pytest plugin does).
    """

    def __init__(self, chain: Chain, policy: TracePolicy | None = None, *, config: Config | None = None):
        self.chain = chain
        self.policy = policy or TracePolicy()
        self.config = config
        self._started = False
        self._tables: Tables | None = None

    @classmethod
    def from_config(cls, config: Config, source: ConfigSource | None = None) -> Tracer:
        """The chain and rules of a configuration (ConfigError when a plugin cannot load)."""
        chain = build_chain(config.plugins, source, plugin_paths=config.plugin_paths,
                            table_names=config.tables, policies=config.policies)
        return cls(chain, TracePolicy.from_config(config), config=config)

    def _install_tables(self) -> None:
        """The configuration's lookup tables become the process's (plugins find them by name)."""
        if self.config is not None and self.config.tables:
            self._tables = build_tables(self.config.tables)
            install(self._tables)

    async def start(self) -> None:
        """Configure the shared resolver (from a config) and run every ``startup`` hook;
        :class:`~smtpproxy.startup.StartupError` as the proxy would stop on."""
        if self._started:
            return
        self._install_tables()
        await start_chain(self.chain, self.config.dns if self.config is not None else None)
        self._started = True

    async def close(self) -> None:
        """Run every ``shutdown`` hook (once)."""
        if self._started:
            self._started = False
            await self.chain.notify("shutdown")
            if self._tables is not None:
                await self._tables.close()
                self._tables = None

    async def __aenter__(self) -> Tracer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def trace(
        self,
        message: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        client_ip: str = "192.0.2.1",
        client_port: int = 0,
        helo: str = "client.example",
        auth_user: str | None = None,
        tls: bool = False,
        client_hostname: str | None = None,
    ) -> Trace:
        """Run one message through every phase; TraceInputError for a bad sender or recipient."""
        if not recipients:
            raise TraceInputError("at least one recipient is needed (--rcpt)")
        if not helo or any(c.isspace() for c in helo):
            raise TraceInputError(f"HELO name {helo!r} must be one word")
        started = time.perf_counter()
        p = self.policy
        utf8 = p.smtputf8 and not all(a.isascii() for a in (sender, *recipients))
        params = " SMTPUTF8" if utf8 else ""
        try:
            mail = parse_mail_from(f"FROM:<{sender}>{params}", smtputf8_enabled=p.smtputf8)
        except AddressError as exc:
            raise TraceInputError(f"sender {sender!r}: {exc.text}") from None
        rcpts = []
        for text in recipients:
            try:
                rcpts.append(parse_rcpt_to(f"TO:<{text}>", smtputf8_enabled=utf8).address)
            except AddressError as exc:
                raise TraceInputError(f"recipient {text!r}: {exc.text}") from None
        wire, notes = data_section(bytes(message))

        trace = Trace(sender=mail.address.text, recipients=[a.text for a in rcpts], client_ip=client_ip,
                      client_port=client_port, helo=helo, auth_user=auth_user, tls=tls, size=0,
                      notes=notes)
        session = Session(Client(client_ip, client_port, client_hostname), local_ip=p.local_ip,
                          local_port=p.local_port, transport="offline")
        run = _Run(trace, session)
        conversation = Conversation(self.chain, p.rules(), observer=run)
        if tls:
            session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
        token = current_session.set(session.id)
        try:
            transaction = await self._session(
                conversation, run, session, helo=helo, auth_user=auth_user, sender=mail.address,
                sender_params=mail.params, rcpts=rcpts, wire=wire,
            )
            if transaction is not None and transaction.message is not None and run.reply is not None:
                decision = Decision(trace.decision, run.reply, trace.decided_by, trace.reason,
                                    transaction.score)
                await conversation.settle(session, transaction, decision, started)
            await conversation.disconnect(session)
        finally:
            current_session.reset(token)
        trace.score = transaction.score if transaction is not None else session.results.score
        trace.tags = sorted(session.results.tags | (transaction.results.tags if transaction else set()))
        if conversation.shadowed:
            _shadow(trace, conversation, session, transaction)
        trace.duration_ms = (time.perf_counter() - started) * 1000
        return trace

    async def _session(
        self, conversation: Conversation, run: _Run, session: Session, *, helo: str,
        auth_user: str | None, sender: Address, sender_params: dict[str, str | None],
        rcpts: list[Address], wire: bytes,
    ) -> Transaction | None:
        """connect → helo → mail → rcpt* → data; returns the transaction if MAIL was accepted."""
        p, trace = self.policy, run.trace
        refusal = await conversation.connect(session)
        if refusal is None:
            refusal = await conversation.greet(session, helo)
        if refusal is not None:
            run.refuse(refusal)
            return None
        session.esmtp = True
        session.auth_user = auth_user  # AUTH comes after EHLO
        refusal = await conversation.mail(session, sender, sender_params)
        if refusal is not None:
            run.refuse(refusal)
            conversation.end_transaction(session)
            return None
        transaction = session.transaction
        assert transaction is not None
        # rcpt_to, each
        refusals: list[Refusal] = []
        if p.rcpt_mode == "relay":
            trace.notes.append("rcpt_mode relay: the upstream's answer to each RCPT is not asked offline")
        for address in rcpts:
            recipient = Recipient(address, {})
            refusal = await conversation.rcpt(session, transaction, recipient)
            if refusal is not None:
                refusals.append(refusal)
                trace.refused_recipients.append((address.text, _text(refusal.reply), refusal.decided_by))
                continue
            conversation.accept(transaction, recipient)
        if not transaction.envelope.recipients:
            # The client gets no further than RCPT; its refusals are the answer: the first
            # permanent one when all are permanent (the client gives up), else a temporary one.
            run.refuse(recipients_refused(refusals))
            return transaction
        # data
        phase = run.begin("data", "")
        refused = self._read_data(wire)
        if isinstance(refused, Reply):
            run.proxy_step("reject", refused, "the proxy's DATA rules (size, line length, bare CR/LF)")
            run.decide("rejected", refused, PROXY, "DATA refused while reading")
            return transaction
        message = transaction.message = Message(refused)
        trace.size = message.size
        phase.subject = f"{message.size} bytes"
        original = message.headers
        refusal = await conversation.headers_refusal(session, transaction)
        if refusal is not None:
            run.refuse(refusal)
            return transaction
        outcome = await conversation.end_of_message(session, transaction)
        if isinstance(outcome, Refusal):
            run.refuse(outcome)
        else:
            reply = WOULD_DELIVER if outcome.action == "deliver" else queued_reply(transaction)
            decision = outcome.decision(reply, transaction.score)
            run.decide(decision.disposition, reply, decision.decided_by, decision.reason)
        assert run.reply is not None
        phase.reply = _text(run.reply)
        if skips_data_chain(transaction):  # as it is for a discard decided earlier
            phase.outcome = "discard"
        trace.message = message
        final = message.headers
        trace.headers_added = _minus(final, original)
        trace.headers_removed = _minus(original, final)
        trace.body_replaced = any(c.op == "replace_body" for c in message.changes)
        trace.accepted_recipients = [r.address.text for r in transaction.envelope.recipients]
        if trace.decision == "delivered":
            groups: dict[str, tuple[str, list[str]]] = {}
            for rcpt in transaction.envelope.recipients:
                name, destination = p.route_of(rcpt.address, transaction.notes)
                groups.setdefault(name, (destination, []))[1].append(rcpt.address.text)
            trace.routes = [Route(n, d, tuple(r)) for n, (d, r) in groups.items()]
        return transaction

    def _read_data(self, wire: bytes) -> bytes | mmap.mmap | Reply:
        """The message as the proxy's DATA reader would take it, or the reply refusing it."""
        p = self.policy
        reader = DataReader(p.max_message_size, p.max_line_length,
                            normalize_bare_newlines=p.normalize_bare_newlines)
        reader.feed_section(wire + END_OF_DATA)
        if reader.problem is not None:
            return reader.problem.reply(p.max_message_size, p.max_line_length)
        return reader.content()


def _shadow(trace: Trace, conversation: Conversation, session: Session,
            transaction: Transaction | None) -> None:
    """The trace's second outcome: what shadowed plugins would have made of the message."""
    trace.shadowed = list(conversation.shadowed)
    if transaction is None:
        results = session.results
        trace.shadow_score = results.score + results.shadow_score
        early = session.would.refusal
        would: Refusal | Deliver | None = Refusal(*early) if early is not None else None
    else:
        trace.shadow_score = transaction.shadow_score
        would = conversation.would(transaction)
    if would is None:  # as it was
        trace.would, trace.would_by, trace.would_reason = trace.decision, trace.decided_by, trace.reason
    else:
        trace.would, trace.would_by, trace.would_reason = would.disposition, would.decided_by, would.reason
        if isinstance(would, Refusal):
            trace.would_reply = _text(would.reply)


def _minus(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The header fields of *a* not in *b* (as a multiset, in *a*'s order)."""
    remaining = list(b)
    out = []
    for item in a:
        if item in remaining:
            remaining.remove(item)
        else:
            out.append(item)
    return out


def _text(reply: Reply) -> str:
    """A reply as one string: its wire lines joined by newlines (no CR)."""
    return "\n".join(reply.lines())


WOULD_DELIVER = Reply(250, "2.0.0", "Ok: would be delivered")
"""The tracer's stand-in for the upstream's answer (nothing is delivered offline)."""
