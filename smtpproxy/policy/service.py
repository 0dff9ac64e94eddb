"""Policy requests driving the plugin chain: one :class:`Conversation` per Postfix ``instance``.

Postfix asks at a protocol stage (``protocol_state``), most often RCPT and END-OF-MESSAGE;
``instance`` names one mail transaction. The first request of an instance builds its
:class:`~smtpproxy.session.Session` from ``client_address``, ``client_name``,
``helo_name``, ``sasl_username`` and the TLS attributes, and runs ``connect``, ``helo`` and
``mail_from`` once; each RCPT request runs ``rcpt_to`` for its recipient. At END-OF-MESSAGE
there is no message (Postfix sends none): the ``data`` phase is not run, what was decided
before stands, and the message's log line and ``after_message`` follow. Decisions come from
:mod:`smtpproxy.outcome` through the Conversation; this module only maps them to actions:

* proceed: ``DUNNO`` (never ``OK``: that would skip the site's later restrictions);
* a refusal: ``NNN X.Y.Z text`` with the plugin's own code (4xx defers, 5xx rejects);
* discard: ``DISCARD text`` (Postfix drops the whole message, all recipients);
* quarantine: ``HOLD text`` only with ``policy.quarantine_action: hold`` (Postfix's hold
  queue, released with ``postsuper -H``; not smtpproxy's quarantine), else as configured.

A plugin's failure goes by ``policy.default_action`` as the milter's does. Instance state
is bounded (``policy.max_instances``, oldest forgotten first) and expires after
``policy.instance_timeout`` seconds without a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from smtpproxy.addresses import AddressError, parse_mail_from, parse_rcpt_to
from smtpproxy.chain import Chain
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.eventlog import current_session, event
from smtpproxy.history import HistoryRecorder
from smtpproxy.metrics import NullRecorder
from smtpproxy.outcome import Deliver, FailureAction, Refusal, end_of_message, on_plugin_failure
from smtpproxy.session import Client, Recipient, Session, TLSInfo, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["DUNNO", "PolicyService", "PolicySettings", "action_for"]

DUNNO = "DUNNO"
"""Continue with the site's next restriction (``OK`` would skip the rest: never sent)."""

QuarantineAction = Literal["hold", "tempfail", "reject", "dunno"]

_QUARANTINE_REPLIES = {
    "tempfail": Reply(451, "4.7.1", "Message held for review, try again later"),
    "reject": Reply(550, "5.7.1", "Message refused by policy"),
}


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """What the policy front end needs from the configuration."""

    default_action: FailureAction = "tempfail"
    quarantine_action: QuarantineAction = "tempfail"
    max_instances: int = 10000
    instance_timeout: float = 3600.0
    max_recipients: int = 1000
    history: HistoryRecorder | None = None
    node: str = ""
    metrics: NullRecorder | None = None
    """Where plugin verdicts and messages are counted (``metrics.enabled``; None: nowhere)."""


def action_for(outcome: Refusal | Deliver | None, quarantine_action: QuarantineAction = "tempfail") -> str:
    """The ``action=`` value for what the Conversation decided (None: proceed)."""
    if outcome is None:
        return DUNNO
    if isinstance(outcome, Refusal):
        return _reply_action(outcome.reply)
    if outcome.action == "discard":
        return f"DISCARD {outcome.reason or 'discarded by ' + outcome.decided_by}".strip()
    if outcome.action == "quarantine":
        if quarantine_action == "hold":
            return f"HOLD {outcome.reason or 'held by ' + outcome.decided_by}".strip()
        if quarantine_action == "dunno":
            return DUNNO
        return _reply_action(_QUARANTINE_REPLIES[quarantine_action])
    return DUNNO


def _reply_action(reply: Reply) -> str:
    """``NNN X.Y.Z text`` on one line: Postfix answers the client with this code and text."""
    text = " ".join(line.strip() for line in reply.text.splitlines()) or "Refused"
    return f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{text}"


@dataclass(slots=True)
class _Instance:
    """One Postfix ``instance``: its session, conversation and what was already decided."""

    session: Session
    conversation: Conversation
    started: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seen: float = field(default_factory=time.monotonic)
    greeted: bool = False
    refusal: Refusal | None = None
    """A refusal at connect, HELO or MAIL: every later request of the instance gets it."""
    refused_at: str = "connect"
    """The phase of :attr:`refusal` (a plugin failure at connect rejects with 554)."""
    recipients: dict[str, str] = field(default_factory=dict)
    """Action already answered per recipient (Postfix may ask again, e.g. at both stages)."""


class PolicyService:
    """All policy requests of one process (any connection), state kept per instance."""

    def __init__(self, chain: Chain, settings: PolicySettings) -> None:
        self.chain = chain
        self.settings = settings
        self.rules = Rules(max_recipients=settings.max_recipients)
        self._instances: OrderedDict[str, _Instance] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def instances(self) -> int:
        """How many instances are remembered now."""
        return len(self._instances)

    async def answer(self, request: dict[str, str]) -> str:
        """The ``action=`` value for one request."""
        state = request.get("protocol_state", "").upper()
        if request.get("request", "smtpd_access_policy") != "smtpd_access_policy":
            event("policy_request_unknown", level=logging.WARNING, request=request.get("request"))
            return DUNNO
        self._expire()
        key = request.get("instance") or ""
        if state in ("VRFY", "ETRN", "") or not key:
            return DUNNO  # nothing of a message to decide on
        instance = self._instances.get(key)
        if instance is None:
            instance = self._new_instance(request)
            self._instances[key] = instance
            while len(self._instances) > self.settings.max_instances:
                old_key, old = self._instances.popitem(last=False)
                event("policy_instance_forgotten", level=logging.WARNING, instance=old_key,
                      reason="max_instances", max_instances=self.settings.max_instances)
                self._close(old)
        else:
            self._instances.move_to_end(key)
        instance.seen = time.monotonic()
        current_session.set(instance.session.id)
        async with instance.lock:
            action = await self._decide(instance, state, request)
            if state == "END-OF-MESSAGE":
                self._instances.pop(key, None)
                await self._finish(instance)
        return action

    # -- the stages ---------------------------------------------------------------------

    async def _decide(self, instance: _Instance, state: str, request: dict[str, str]) -> str:
        refusal = await self._open(instance, state, request)
        if refusal is not None:
            return self._refused(instance, instance.refused_at, refusal)
        transaction = instance.session.transaction
        if transaction is None:
            return DUNNO  # CONNECT or HELO stage: nothing more yet
        if state == "RCPT" or (state == "END-OF-MESSAGE" and not transaction.envelope.recipients):
            answered = await self._rcpt(instance, transaction, request)
            if answered is not None:
                return answered
        if state == "END-OF-MESSAGE":
            return await self._end(instance, transaction)
        if transaction.disposition is not None and state in ("RCPT", "DATA"):
            # A discard (or quarantine) decided before the message: Postfix acts on the
            # whole message, as the proxy would at its end.
            return action_for(end_of_message(transaction, None), self.settings.quarantine_action)
        return DUNNO

    async def _open(self, instance: _Instance, state: str, request: dict[str, str]) -> Refusal | None:
        """connect, helo and mail_from, once per instance, as far as *state* has come."""
        if instance.refusal is not None:
            return instance.refusal
        session, conversation = instance.session, instance.conversation
        if not instance.greeted:
            instance.greeted = True
            event("connect", client=session.client.ip, port=session.client.port, transport="policy",
                  instance=request.get("instance"), policy_context=request.get("policy_context"))
            refusal = await conversation.connect(session)
            if refusal is None and request.get("helo_name"):
                instance.refused_at = "helo"
                refusal = await conversation.greet(session, request["helo_name"])
            if refusal is not None:
                instance.refusal = refusal
                return refusal
        if session.transaction is None and state not in ("CONNECT", "EHLO", "HELO"):
            try:
                path = parse_mail_from(f"FROM:<{request.get('sender', '')}>", smtputf8_enabled=True)
            except AddressError as exc:
                event("mail_from", sender=request.get("sender"), verdict="syntax", reply=exc.code)
                return None  # Postfix parsed it; what it accepted is its to judge
            params = {"SIZE": request["size"]} if request.get("size", "0") not in ("", "0") else {}
            refusal = await conversation.mail(session, path.address, params,
                                              queue_id=request.get("queue_id") or None)
            if refusal is not None:
                instance.refusal, instance.refused_at = refusal, "mail_from"
                return refusal
        return None

    async def _rcpt(
        self, instance: _Instance, transaction: Transaction, request: dict[str, str]
    ) -> str | None:
        """The ``rcpt_to`` phase for this request's recipient: its action, None to go on."""
        text = request.get("recipient", "")
        if not text:
            return None  # END-OF-MESSAGE of a multi-recipient message: Postfix names none
        if text in instance.recipients:
            return instance.recipients[text] if instance.recipients[text] != DUNNO else None
        try:
            path = parse_rcpt_to(f"TO:<{text}>", smtputf8_enabled=True)
        except AddressError as exc:
            event("rcpt_to", tx=transaction.id, recipient=text, verdict="syntax", reply=exc.code)
            return None
        recipient = Recipient(path.address, {})
        refusal = await instance.conversation.rcpt(instance.session, transaction, recipient)
        # Remembered for a repeated question (END-OF-MESSAGE names the one recipient), as
        # many as Postfix may send: a client that sends more only costs it the lookups.
        remember = len(instance.recipients) < 2 * self.settings.max_recipients
        if refusal is not None:
            action = self._refused(instance, "rcpt_to", refusal, keep=False)
            if action != DUNNO:
                if remember:
                    instance.recipients[text] = action
                return action
        instance.conversation.accept(transaction, recipient)
        if remember:
            instance.recipients[text] = DUNNO
        return None

    def _refused(self, instance: _Instance, phase: str, refusal: Refusal, keep: bool = True) -> str:
        """A refusal under ``policy.default_action`` (a plugin's failure may pass or reject)."""
        final = on_plugin_failure(phase, refusal, self.settings.default_action)
        if refusal.failed:
            event("policy_default_action", level=logging.WARNING, action=self.settings.default_action,
                  plugin=refusal.decided_by, reason=refusal.reason)
        if isinstance(final, Deliver):
            if keep:
                instance.refusal = None
            return DUNNO
        return _reply_action(final.reply)

    async def _end(self, instance: _Instance, transaction: Transaction) -> str:
        """END-OF-MESSAGE: no body comes, so no ``data`` phase; what was decided stands."""
        outcome = instance.conversation.end_without_data(transaction)
        action = action_for(outcome, self.settings.quarantine_action)
        queued = Reply(250, "2.0.0", "Ok")
        if isinstance(outcome, Refusal):  # pragma: no cover - end_of_message(None) never refuses
            decision = outcome.decision(transaction.score)
        elif action.startswith(("4", "5")):
            reply = _QUARANTINE_REPLIES[self.settings.quarantine_action]
            decision = Refusal(reply, outcome.decided_by, outcome.reason).decision(transaction.score)
        else:
            decision = outcome.decision(queued, transaction.score)
        await instance.conversation.settle(instance.session, transaction, decision, instance.started,
                                           action=action.split(" ", 1)[0])
        return action

    # -- state ----------------------------------------------------------------------------

    def _new_instance(self, request: dict[str, str]) -> _Instance:
        name = request.get("client_name") or ""
        port = request.get("client_port", "")
        client = Client(request.get("client_address") or "unknown", int(port) if port.isdigit() else 0,
                        name if name and name != "unknown" else None)
        server_port = request.get("server_port", "")
        session = Session(client, transport="policy", local_ip=request.get("server_address") or "",
                          local_port=int(server_port) if server_port.isdigit() else 0)
        session.auth_user = request.get("sasl_username") or None
        protocol = request.get("encryption_protocol") or ""
        if protocol:
            bits = request.get("encryption_keysize", "")
            session.tls = TLSInfo(protocol, request.get("encryption_cipher") or "",
                                  int(bits) if bits.isdigit() else None)
        session.esmtp = request.get("protocol_name", "").upper() == "ESMTP"
        session.notes["policy"] = {
            k: request[k] for k in ("policy_context", "reverse_client_name", "ccert_subject",
                                    "ccert_issuer", "ccert_fingerprint", "ccert_pubkey_fingerprint",
                                    "sasl_method", "sasl_sender", "stress", "instance")
            if request.get(k)
        }
        conversation = Conversation(self.chain, self.rules, metrics=self.settings.metrics,
                                    history=self.settings.history, node=self.settings.node)
        return _Instance(session, conversation, time.perf_counter())

    def _expire(self) -> None:
        deadline = time.monotonic() - self.settings.instance_timeout
        while self._instances:
            key, oldest = next(iter(self._instances.items()))
            if oldest.seen > deadline:
                break
            del self._instances[key]
            self._close(oldest)

    def _close(self, instance: _Instance) -> None:
        """Forget an instance that will see no END-OF-MESSAGE: its ``disconnect`` runs apart."""
        task = asyncio.get_running_loop().create_task(self._finish(instance))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _finish(self, instance: _Instance) -> None:
        session = instance.session
        instance.conversation.end_transaction(session)
        with contextlib.suppress(Exception):
            await instance.conversation.disconnect(session)
        event("disconnect", transactions=session.transaction_count, transport="policy",
              seconds=round(time.time() - session.started, 3))

    async def close(self) -> None:
        """Shutdown: every remembered instance ends (``disconnect``)."""
        while self._instances:
            _, instance = self._instances.popitem(last=False)
            self._close(instance)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
