"""The conversation around the decisions, once for every front end, without any I/O.

A front end (the SMTP proxy, the milter, the Postfix policy service, the offline tracer)
reads its medium, parses what it reads, and asks its :class:`Conversation` at each step of a
session: ``connect``, ``greet`` (HELO/EHLO), ``mail``, ``rcpt`` (then ``accept`` for a
recipient the front end takes), ``end_of_message`` and ``settle``. The conversation runs the
phase on the plugin chain, applies smtpproxy's own rules (the sender/login binding, the
recipient limit, the relay rule, one route per transaction), writes the phase's log line,
decides with :mod:`smtpproxy.outcome`, and at the end writes the one ``message`` line,
records the metrics and tells ``after_message``. The front end only maps what comes back
onto its medium: SMTP replies, milter actions, policy ``action=`` lines, a trace.

:class:`Rules` are built once from the configuration; a :class:`Conversation` is one
session's, on the chain that session runs (a reload changes new sessions only). A
:class:`ConversationObserver` sees every phase begin and end, every plugin call's outcome
and every rule of the proxy that refused, as it happens (the tracer's report).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from smtpproxy.addresses import Address
from smtpproxy.chain import CONTINUED, Chain, PhaseResult
from smtpproxy.eventlog import event
from smtpproxy.groups import Choice, Policies
from smtpproxy.history import HistoryRecorder, entry_for
from smtpproxy.message import Message
from smtpproxy.metrics import NullRecorder
from smtpproxy.outcome import (
    PROXY,
    Deliver,
    Refusal,
    before_message,
    end_of_message,
    skips_data_chain,
    would_disposition,
    would_end_of_message,
)
from smtpproxy.relay import RelayPolicy, refusal_reply
from smtpproxy.routing import ROUTES_NOTE
from smtpproxy.senderlogin import SenderLoginPolicy
from smtpproxy.session import Decision, Envelope, Outcome, Recipient, Session, Transaction
from smtpproxy.tables import TableUnavailable
from smtpproxy.verdicts import Reply

__all__ = [
    "GROUPS_NOTE",
    "GROUP_LOOKUP_FAILED",
    "OTHER_GROUP",
    "OTHER_ROUTE",
    "SENDER_LOGIN_REASON",
    "TOO_MANY_RECIPIENTS",
    "Conversation",
    "ConversationObserver",
    "Rules",
    "verdict_fields",
]

TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
OTHER_ROUTE = Reply(452, "4.5.3", "Recipients for other domains must be sent in a new transaction")
OTHER_GROUP = Reply(452, "4.5.3", "Recipients under another policy must be sent in a new transaction")
GROUP_LOOKUP_FAILED = Reply(451, "4.3.0", "Recipient policy lookup failed, please try again later")
GROUPS_NOTE = "policy_groups"
"""``transaction.notes[GROUPS_NOTE]``: each accepted recipient's policy group, by address."""
RETENTION_NOTE = "quarantine_retention_days"
"""``transaction.notes[RETENTION_NOTE]``: each accepted recipient's group's quarantine retention
in days, by address (None: the group sets none, quarantine.retention_days applies)."""
SENDER_LOGIN_REASON = "sender_login: the login does not own this sender (docs/submission.md)"
_RECIPIENT_LIMIT_REASON = "one transaction per route, or limits.max_recipients"
_RELAY_REASON = "relay rule: the domain is not in relay.domains and the client is not trusted"


@dataclass(frozen=True, slots=True)
class Rules:
    """smtpproxy's own rules around the chain, as one front end applies them."""

    max_recipients: int = 100
    relay: RelayPolicy | None = None
    """None: every recipient passes (the milter: the MTA applies its own relay rule)."""
    route_key: Callable[[Address], str] | None = None
    """The delivery's route rule; recipients of two routes never share a transaction.
    None: no such rule (the MTA routes)."""
    sender_login: SenderLoginPolicy | None = None
    """Which logins may use which senders (smtpproxy.senderlogin); None: not checked."""
    unauthenticated_senders: bool = True
    """Whether :attr:`sender_login` also judges sessions without a login (the proxy does;
    behind an MTA that is the MTA's to judge)."""


class ConversationObserver(Protocol):
    """Sees a conversation as it happens (the tracer's report is built this way)."""

    def phase_started(self, phase: str, subject: str) -> None:
        """A phase begins: its subject is the client, HELO name, sender, recipient or size."""

    def outcome(self, outcome: Outcome) -> None:
        """A plugin's call has been recorded (right after the call: its edits are its own)."""

    def rule_refused(self, refusal: Refusal) -> None:
        """One of smtpproxy's own rules refused in the current phase."""

    # Optional: ``group_chosen(recipient, group, why)``, the policy group chosen for a
    # recipient (with ``policies:``; the tracer's report names it).

    def phase_finished(self, result: PhaseResult, refusal: Refusal | None) -> None:
        """A phase ended, with the refusal it gave before the message, if any (at ``data``
        None: what the message comes to is the front end's to say)."""


def verdict_fields(result: PhaseResult) -> dict[str, Any]:
    """For a phase's log line: the verdict, and when a plugin decided, who, why and the reply."""
    verdict = result.verdict
    if verdict is None:
        return {"verdict": "continue"}
    fields: dict[str, Any] = {"verdict": verdict.action.value, "by": result.decided_by}
    if verdict.reply is not None:
        fields["reply"] = verdict.reply.code
    if verdict.reason:
        fields["reason"] = verdict.reason
    return fields


class Conversation:
    """One session's conversation with the chain; see the module's docstring."""

    __slots__ = ("_choice", "_ends", "_key", "_pending", "_tx_chain", "chain", "history", "metrics",
                 "node", "observer", "policies", "route", "rules", "shadowed")

    def __init__(
        self, chain: Chain, rules: Rules, *, metrics: NullRecorder | None = None,
        observer: ConversationObserver | None = None, history: HistoryRecorder | None = None,
        node: str = "",
    ) -> None:
        self.chain = chain
        self.rules = rules
        self.metrics = metrics if metrics is not None else NullRecorder()
        self.observer = observer
        self.history = history
        """Where each decision is queued for the store's history (None: not kept)."""
        self.node = node
        """This proxy's (or milter's) name in the history."""
        self.route: str | None = None
        """The route of the current transaction's recipients (set by the first accepted)."""
        self._pending: list[asyncio.Task[Any]] = []
        self.policies: Policies | None = chain.policies
        """The policy groups of this session's chain (None: no ``policies:``)."""
        self._choice: tuple[Recipient, Choice] | None = None
        """The group chosen at the last RCPT, until :meth:`accept` takes it."""
        self._key: tuple[Any, ...] | None = None
        """The transaction's key (route and group key), set by its first accepted recipient."""
        self._tx_chain: Chain | None = None
        """The chain of the transaction's data and after_message phases (its first group's)."""
        self._ends: tuple[str, Refusal | Deliver, Refusal | Deliver] | None = None
        """(transaction id, enforced end, would-be end) of the last message, when the chain
        has shadowed plugins."""
        self.shadowed = chain.shadowed_anywhere
        """The plugins in shadow mode (``enforce: false``), globally or in a policy group."""

    # -- running the chain ----------------------------------------------------------------

    async def _run(self, phase: str, subject: str, results: Any, *, chain: Chain | None = None,
                   **kwargs: Any) -> PhaseResult:
        """Run *phase* on *chain* (a policy group's; default: the session's)."""
        chain = chain or self.chain
        observer = self.observer
        if observer is None:
            # A phase no plugin implements: nothing to run (most phases of a small chain).
            return await chain.run(phase, results, **kwargs) if chain.implements(phase) else CONTINUED
        observer.phase_started(phase, subject)
        return await chain.run(phase, results, on_outcome=observer.outcome, **kwargs)

    @property
    def transaction_chain(self) -> Chain:
        """The chain of the current transaction's ``data`` and ``after_message`` phases: its
        first recipient's policy group's, else the session's."""
        return self._tx_chain or self.chain

    def _finished(self, result: PhaseResult, refusal: Refusal | None) -> Refusal | None:
        if self.observer is not None:
            self.observer.phase_finished(result, refusal)
        return refusal

    def _rule(self, refusal: Refusal) -> Refusal:
        if self.observer is not None:
            self.observer.rule_refused(refusal)
        return refusal

    # -- the phases -------------------------------------------------------------------------

    async def connect(self, session: Session) -> Refusal | None:
        """The ``connect`` phase: the refusal that ends the session, or None to greet."""
        result = await self._run("connect", session.client.ip, session.results, session=session)
        refusal = before_message("connect", session, result)
        if refusal is not None:
            event("connect_rejected", reply=refusal.reply.code, by=refusal.decided_by,
                  reason=refusal.reason)
        elif result.verdict is not None:
            event("connect_verdict", **verdict_fields(result))
        return self._finished(result, refusal)

    async def greet(self, session: Session, hostname: str, **log: Any) -> Refusal | None:
        """HELO/EHLO: the ``helo`` phase; the session's ``helo`` is *hostname* once it passed."""
        session.helo = None
        result = await self._run("helo", hostname, session.results, session=session, hostname=hostname)
        event("helo", **log, hostname=hostname, **verdict_fields(result))
        refusal = before_message("helo", session, result)
        if refusal is None:
            session.helo = hostname
        return self._finished(result, refusal)

    async def mail(
        self, session: Session, sender: Address, params: Mapping[str, str | None], **log: Any
    ) -> Refusal | None:
        """MAIL: the sender/login rule, then a new transaction and its ``mail_from`` phase.

        On a plugin's refusal the transaction stays open for the front end to end (a milter
        may let the message pass a plugin's failure).
        """
        rules = self.rules
        if rules.sender_login is not None and (
            rules.unauthenticated_senders or session.auth_user is not None
        ):
            reply = await rules.sender_login.envelope_refusal(sender.text, session.auth_user)
            if reply is not None:
                event("sender_login_mismatch", level=logging.WARNING, field="envelope",
                      sender=sender.text, user=session.auth_user, client=session.client.ip, **log)
                if self.observer is not None:
                    self.observer.phase_started("mail_from", sender.text or "<>")
                return self._rule(Refusal(reply, PROXY, SENDER_LOGIN_REASON))
        self._forget_transaction()
        transaction = session.begin_transaction(Envelope(sender, params))
        result = await self._run("mail_from", sender.text or "<>", transaction.results,
                                 session=session, transaction=transaction, sender=sender)
        event("mail_from", tx=transaction.id, sender=sender.text or "<>",
              **verdict_fields(result), **log)
        return self._finished(result, before_message("mail_from", transaction, result))

    def recipient_limit(self, transaction: Transaction) -> Refusal | None:
        """``limits.max_recipients`` reached: the refusal for any further RCPT."""
        if len(transaction.envelope.recipients) >= self.rules.max_recipients:
            return Refusal(TOO_MANY_RECIPIENTS, PROXY, _RECIPIENT_LIMIT_REASON)
        return None

    async def rcpt(self, session: Session, transaction: Transaction, recipient: Recipient) -> Refusal | None:
        """RCPT: the proxy's rules (limit, relay, route), then the ``rcpt_to`` phase.

        None: the recipient may be accepted; the front end then calls :meth:`accept` (after
        asking the upstream, where it does).
        """
        address, rules = recipient.address, self.rules
        refusal = self.recipient_limit(transaction)
        if refusal is not None:
            self._rule_phase(address)
            return self._rule(refusal)
        why = rules.relay.refusal(address, session.client.ip, session.auth_user) if rules.relay else None
        if why is not None:
            event("rcpt_to", tx=transaction.id, recipient=address.text, verdict=why)
            self._rule_phase(address)
            return self._rule(Refusal(refusal_reply(address, why), PROXY, _RELAY_REASON))
        chain, choice = self.chain, None
        if self.policies is not None:
            try:
                choice = await self.policies.choose(address.text, auth_user=session.auth_user,
                                                    client_ip=session.client.ip,
                                                    local_port=session.local_port)
            except TableUnavailable as exc:
                # Never the default group: a tenant's rules must not become another's.
                event("rcpt_to", level=logging.WARNING, tx=transaction.id, recipient=address.text,
                      verdict="group_lookup_failed", error=str(exc))
                self._rule_phase(address)
                return self._rule(Refusal(GROUP_LOOKUP_FAILED, PROXY, f"policy group lookup: {exc}"))
            chain = choice.group.chain
            group_chosen = getattr(self.observer, "group_chosen", None)
            if group_chosen is not None:
                group_chosen(address.text, choice.group.name, choice.why)
        group_log: dict[str, Any] = {"group": choice.group.name} if choice is not None else {}
        key = self._key_of(address, choice)
        if self._key is not None and key != self._key:
            # One transaction goes to one upstream route and gets one answer to DATA; the
            # client sends these again in a new transaction (RFC 5321 4.5.3.1.10), so every
            # route and every group's data-phase policy answers for itself.
            other = "other_route" if key[0] != self._key[0] else "other_group"
            event("rcpt_to", tx=transaction.id, recipient=address.text, verdict=other, **group_log)
            self._rule_phase(address)
            reply = OTHER_ROUTE if other == "other_route" else OTHER_GROUP
            return self._rule(Refusal(reply, PROXY, _RECIPIENT_LIMIT_REASON))
        self._choice = (recipient, choice) if choice is not None else None
        if choice is not None and choice.group.route is not None and self.rules.route_key is not None:
            # The delivery (and rcpt_mode relay's upstream transaction, opened before accept)
            # takes the group's route for this recipient.
            transaction.notes.setdefault(ROUTES_NOTE, {})[address.text] = choice.group.route
        result = await self._run("rcpt_to", address.text, transaction.results, chain=chain, session=session,
                                 transaction=transaction, recipient=recipient)
        event("rcpt_to", tx=transaction.id, recipient=address.text, **verdict_fields(result), **group_log)
        return self._finished(result, before_message("rcpt_to", transaction, result))

    def _key_of(self, address: Address, choice: Choice | None) -> tuple[Any, ...]:
        """The transaction key of a recipient: its route (its group's, or its domain's), and its
        group's data-phase key."""
        route = None
        if self.rules.route_key is not None:  # None: the MTA routes (the milter, the policy service)
            group_route = choice.group.route if choice is not None else None
            route = group_route or self.rules.route_key(address)
        return (route, choice.group.key if choice is not None else None)

    def _forget_transaction(self) -> None:
        self.route = None
        self._key = None
        self._choice = None
        self._tx_chain = None

    def _rule_phase(self, address: Address) -> None:
        if self.observer is not None:
            self.observer.phase_started("rcpt_to", address.text)

    def accept(self, transaction: Transaction, recipient: Recipient) -> None:
        """The recipient is in the envelope; the transaction keeps to its route from now on."""
        choice = self._choice[1] if self._choice is not None and self._choice[0] is recipient else None
        self._choice = None
        if self._key is None:
            self._key = self._key_of(recipient.address, choice)
            self.route = self._key[0]
            self._tx_chain = choice.group.chain if choice is not None else None
        if choice is not None:
            group = choice.group
            transaction.notes.setdefault(GROUPS_NOTE, {})[recipient.address.text] = group.name
            transaction.notes.setdefault(RETENTION_NOTE, {})[recipient.address.text] = group.retention_days
        transaction.envelope._accept_recipient(recipient)
        transaction.would.accepted()

    def end_transaction(self, session: Session) -> None:
        """Forget the current transaction (RSET, a new HELO, the end of a message), counting
        its plugins' outcomes."""
        if session.transaction is not None:
            self.metrics.outcomes(session.transaction.results)
        session.end_transaction()
        self._forget_transaction()

    async def headers_refusal(self, session: Session, transaction: Transaction, **log: Any) -> Refusal | None:
        """From:/Sender: addresses the login does not own (sender_login.headers)."""
        rules = self.rules
        if rules.sender_login is None or transaction.message is None or (
            session.auth_user is None and not rules.unauthenticated_senders
        ):
            return None
        found = await rules.sender_login.header_refusal(transaction.message, session.auth_user)
        if found is None:
            return None
        reply, shown = found
        event("sender_login_mismatch", level=logging.WARNING, tx=transaction.id, field="header",
              sender=shown, user=session.auth_user, client=session.client.ip, **log, reply=reply.code)
        return self._rule(Refusal(reply, PROXY, SENDER_LOGIN_REASON))

    async def end_of_message(self, session: Session, transaction: Transaction) -> Refusal | Deliver:
        """The ``data`` phase (unless a discard was decided before) and what it decides."""
        message = transaction.message
        assert message is not None
        result: PhaseResult | None = None
        if not skips_data_chain(transaction):
            result = await self._run("data", f"{message.size} bytes", transaction.results,
                                     chain=self._tx_chain, session=session, transaction=transaction,
                                     message=message)
            self._finished(result, None)
        return self._end(transaction, result)

    def end_without_data(self, transaction: Transaction) -> Refusal | Deliver:
        """The end of a message whose body this front end never sees (the policy service):
        no ``data`` phase; what was decided before stands."""
        return self._end(transaction, None)

    def _end(self, transaction: Transaction, result: PhaseResult | None) -> Refusal | Deliver:
        outcome = end_of_message(transaction, result)
        if self.shadowed:
            self._ends = (transaction.id, outcome, would_end_of_message(transaction, result))
        return outcome

    def would(self, transaction: Transaction) -> Refusal | Deliver | None:
        """What the message would have come to had the chain's shadowed plugins (``enforce:
        false``) enforced; None when the chain has none."""
        if not self.shadowed:
            return None
        if self._ends is not None and self._ends[0] == transaction.id:
            return self._ends[2]
        # The message did not reach the data phase's decision (a rule of the proxy refused
        # it): only a refusal of the session or of MAIL would have come before.
        early = transaction.would.refusal
        return Refusal(*early) if early is not None else None

    def _shadow_fields(self, transaction: Transaction, decision: Decision) -> dict[str, Any]:
        """The ``message`` line's ``shadow_score`` and ``would=``, when there are shadowed plugins."""
        if not self.shadowed:
            return {}
        enforced = self._ends[1] if self._ends is not None and self._ends[0] == transaction.id else None
        would = self.would(transaction)
        fields: dict[str, Any] = {"shadow_score": transaction.shadow_score,
                                  "would": would_disposition(would, enforced, decision)}
        if would is not None and would != enforced:
            fields["would_by"] = would.decided_by
        return fields

    async def settle(
        self, session: Session, transaction: Transaction, decision: Decision, started: float,
        quarantine_id: str | None = None, **log: Any,
    ) -> None:
        """The message is over: its one ``message`` line, its metrics, its history entry,
        ``after_message``.

        *started* is the ``time.perf_counter()`` at which the message began (DATA, or the
        milter's MAIL); *quarantine_id* the id of a message the proxy kept; *log* adds
        front-end fields to the line.
        """
        envelope = transaction.envelope
        seconds = time.perf_counter() - started
        self.metrics.message(decision.disposition, seconds)
        groups = sorted(set(transaction.notes.get(GROUPS_NOTE, {}).values()))
        if groups:
            log["group"] = ",".join(groups)
            for group in groups:
                self.metrics.group_message(group, decision.disposition)
        message: Message | None = transaction.message
        event(
            "message", tx=transaction.id, sender=envelope.sender.text or "<>",
            recipients=[r.address.text for r in envelope.recipients],
            size=message.size if message is not None else 0, decision=decision.disposition,
            reply=f"{decision.reply.code} {decision.reply.enhanced or ''}".strip(),
            by=decision.decided_by, reason=decision.reason, score=decision.score,
            **self._shadow_fields(transaction, decision), ms=round(seconds * 1000, 1), **log,
        )
        if self.history is not None:
            self.history.record(entry_for(session, transaction, decision, node=self.node,
                                          quarantine_id=quarantine_id,
                                          groups=transaction.notes.get(GROUPS_NOTE)))
        await self.notify("after_message", session=session, transaction=transaction, decision=decision,
                          chain=self._tx_chain)

    async def notify(self, hook: str, *, chain: Chain | None = None, **kwargs: Any) -> None:
        """Run a notification (on *chain*, default: the session's) so that a client hanging
        up cannot cut it short."""
        chain = chain or self.chain
        if not chain.implements(hook):
            return
        self._pending = [t for t in self._pending if not t.done()]
        task = asyncio.get_running_loop().create_task(chain.notify(hook, **kwargs))
        self._pending.append(task)
        await asyncio.shield(task)

    @property
    def pending(self) -> bool:
        """Notifications still running (a client hung up while ``after_message`` ran)."""
        return bool(self._pending)

    async def disconnect(self, session: Session) -> None:
        """The session is over: wait for pending notifications, then ``disconnect``."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
            self._pending.clear()
        if self.chain.implements("disconnect"):
            await self.chain.notify("disconnect", session=session)
