"""The decision rules: what a phase's result means for the client, once for every front end.

The SMTP proxy (:mod:`smtpproxy.inbound`), the milter (:mod:`smtpproxy.milter.session`), the
policy service (:mod:`smtpproxy.policy.service`) and the offline tracer
(:mod:`smtpproxy.tracer`) reach these pure functions through their
:class:`~smtpproxy.conversation.Conversation` (the milter also through
:func:`on_plugin_failure` and :func:`on_not_granted`, for what the MTA's settings decide) and
only map what they return onto their own medium: SMTP replies, milter actions, a trace. So
the rules cannot drift apart, and the tracer decides exactly as the proxy does.

- **Before the message** (connect, helo, mail_from, rcpt_to): a reject or tempfail refuses
  the command with the verdict's reply (at connect: ``554``/``421``, RFC 5321 3.1); a
  discard or quarantine is remembered for the end of the message; anything else proceeds.
- **At the end of the message**: a refusal at ``data`` refuses the message; a discard or
  quarantine at ``data``, or one remembered from before, drops or keeps it; otherwise the
  message is to be delivered, and only the delivery's own answer tells the client ``250``.
- A plugin's error is a tempfail in its name (its ``on_error: tempfail``) everywhere.

:class:`Decision` checks on construction that no refusal carries a positive reply and no
positive reply goes with a message that was not delivered, quarantined or discarded.

**Shadow mode.** Beside the enforced state, the same rules keep what the session and message
would have come to had the shadowed plugins (``enforce: false``) enforced: each phase's
:attr:`~smtpproxy.chain.PhaseResult.would` goes through :func:`before_message` into the
holder's :class:`~smtpproxy.session.WouldBe`, and :func:`would_end_of_message` decides the
message from it as :func:`end_of_message` decides the real one. A recipient that only shadowed
plugins refuse is still accepted; the message would have been refused when every recipient
would have been (:func:`recipients_refused`). That is the ``message`` line's ``would=``
(:func:`would_disposition`) and the tracer's second outcome; it never changes the mail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from smtpproxy.chain import PhaseResult
from smtpproxy.session import Decision, Session, Transaction, WouldBe
from smtpproxy.verdicts import Action, Reply

__all__ = [
    "DELIVERY",
    "ERROR_REJECT",
    "ERROR_TEMPFAIL",
    "MILTER",
    "PROXY",
    "Deliver",
    "Refusal",
    "before_message",
    "connect_reply",
    "end_of_message",
    "on_not_granted",
    "on_plugin_failure",
    "queued_reply",
    "recipients_refused",
    "skips_data_chain",
    "would_disposition",
    "would_end_of_message",
]

PROXY = "proxy"
"""``decided_by`` for a rule of smtpproxy itself (relay, limits, DATA syntax, local errors)."""
ERROR_REJECT = Reply(550, "5.3.0", "Message refused because of a local problem")
"""The refusal for a plugin's failure where the MTA's default action says ``reject``."""
ERROR_TEMPFAIL = Reply(451, "4.3.0", "Temporary local problem, please try again later")
"""The milter's tempfail for a decision it cannot carry out (an action not granted)."""
MILTER = "milter"
"""``decided_by`` when the milter itself refuses: the MTA did not grant what a decision needs."""
DELIVERY = "delivery"
"""``decided_by`` for a message that was handed on: the upstream's (or MTA's) answer counts."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """The client is refused: with this reply, by this plugin (or rule), for this reason."""

    reply: Reply
    decided_by: str
    reason: str = ""
    failed: bool = False
    """True when the refusal stands in for a plugin's error (the milter may map it otherwise)."""

    def __post_init__(self) -> None:
        if self.reply.is_positive:
            raise ValueError(f"a refusal needs a 4xx or 5xx reply, got {self.reply}")

    @property
    def disposition(self) -> Literal["rejected", "tempfailed"]:
        return "tempfailed" if self.reply.is_temporary else "rejected"

    def decision(self, score: float) -> Decision:
        return Decision(self.disposition, self.reply, self.decided_by, self.reason, score)


@dataclass(frozen=True, slots=True)
class Deliver:
    """The message ends well for the client: hand it on, keep it, or drop it as decided."""

    action: Literal["deliver", "discard", "quarantine"]
    decided_by: str
    reason: str = ""

    @property
    def disposition(self) -> Literal["delivered", "discarded", "quarantined"]:
        """The Decision's disposition for :attr:`action`."""
        if self.action == "deliver":
            return "delivered"
        return "discarded" if self.action == "discard" else "quarantined"

    def decision(self, reply: Reply, score: float, reason: str | None = None) -> Decision:
        """The Decision once the front end has done :attr:`action` and got *reply* (2xx)."""
        by = DELIVERY if self.action == "deliver" else self.decided_by
        return Decision(self.disposition, reply, by, self.reason if reason is None else reason, score)


def queued_reply(transaction: Transaction) -> Reply:
    """The proxy's own ``250`` for a message it keeps or drops itself (quarantine, discard):
    worded as an MTA's, so the client cannot tell it from a delivery."""
    return Reply(250, "2.0.0", f"Ok: queued as {transaction.id}")


def connect_reply(reply: Reply) -> Reply:
    """At connect, RFC 5321 3.1: ``554`` refuses the session, ``421`` defers it."""
    if reply.is_temporary:
        return Reply(421, reply.enhanced or "4.7.0", reply.text)
    return Reply(554, reply.enhanced or "5.7.1", reply.text)


def before_message(phase: str, holder: Session | Transaction, result: PhaseResult) -> Refusal | None:
    """connect, helo, mail_from or rcpt_to: the refusal, or None to proceed.

    Proceeding records a discard or quarantine on *holder* (the session at connect and helo,
    so it applies to every message; else the transaction) in the deciding plugin's name.
    """
    refusal = _before_message(phase, result)
    # No shadowed plugin changed how the phase would have ended: the what-if refusal is this one.
    what_if = result if result.would is None else result.would
    what_if_refusal = refusal if what_if is result else _before_message(phase, what_if)
    _would_before_message(phase, holder.would, what_if, what_if_refusal, refused=refusal is not None)
    if refusal is None and result.verdict is not None:
        holder.set_disposition(result.verdict, result.decided_by or "")
    return refusal


def _before_message(phase: str, result: PhaseResult) -> Refusal | None:
    verdict = result.verdict
    if verdict is None or result.decided_by is None or not verdict.is_refusal:
        return None
    assert verdict.reply is not None  # a refusal always has one (Verdict checks it)
    reply = connect_reply(verdict.reply) if phase == "connect" else verdict.reply
    return Refusal(reply, result.decided_by, verdict.reason, result.failed)


def _would_before_message(phase: str, would: WouldBe, result: PhaseResult, refusal: Refusal | None, *,
                          refused: bool) -> None:
    """The what-if state after a phase: the same rules as the enforced one, on ``result.would``
    (*refusal*: what :func:`_before_message` makes of it)."""
    entry = (refusal.reply, refusal.decided_by, refusal.reason) if refusal is not None else None
    if phase == "rcpt_to":
        # Counted once the front end accepts the recipient (a recipient refused for real, or
        # by the upstream, is in neither envelope).
        would.recipient_refusal = None if refused else entry
    elif entry is not None and would.refusal is None:
        would.refusal = entry
    if refusal is None and result.verdict is not None:
        would.set_disposition(result.verdict, result.decided_by or "")


def recipients_refused(refusals: list[Refusal]) -> Refusal:
    """The client's answer when every recipient was refused (it gets no further than RCPT):
    the first permanent refusal when all are permanent (the client gives up), else the first
    temporary one (it retries)."""
    permanent = [r for r in refusals if r.reply.is_permanent]
    if permanent and len(permanent) == len(refusals):
        return permanent[0]
    return next(r for r in refusals if r.reply.is_temporary)


def skips_data_chain(transaction: Transaction) -> bool:
    """A discard decided before the message: the ``data`` chain is not run (nothing to decide)."""
    return transaction.disposition is Action.DISCARD


def end_of_message(transaction: Transaction, result: PhaseResult | None) -> Refusal | Deliver:
    """The end of DATA: refuse, or deliver / discard / quarantine.

    *result* is the ``data`` phase's result, or None when it was skipped
    (:func:`skips_data_chain`). A discard beats a quarantine, and both beat delivery; a
    refusal at ``data`` beats a disposition remembered from an earlier phase.
    """
    return _end_of_message(transaction, result)


def _end_of_message(holder: Transaction | WouldBe, result: PhaseResult | None) -> Refusal | Deliver:
    verdict = result.verdict if result is not None else None
    if verdict is not None and result is not None and result.decided_by is not None:
        if verdict.is_refusal:
            assert verdict.reply is not None
            return Refusal(verdict.reply, result.decided_by, verdict.reason, result.failed)
        if verdict.action is Action.DISCARD:
            return Deliver("discard", result.decided_by, verdict.reason)
        if verdict.action is Action.QUARANTINE and holder.disposition is not Action.DISCARD:
            return Deliver("quarantine", result.decided_by, verdict.reason)
    if holder.disposition is Action.DISCARD:
        return Deliver("discard", holder.disposition_by or PROXY, holder.disposition_reason)
    if holder.disposition is Action.QUARANTINE:
        return Deliver("quarantine", holder.disposition_by or PROXY, holder.disposition_reason)
    return Deliver("deliver", DELIVERY)


def would_end_of_message(transaction: Transaction, result: PhaseResult | None) -> Refusal | Deliver:
    """What :func:`end_of_message` would have said had shadowed plugins enforced.

    *result* is the ``data`` phase's (None when it was not run). A refusal of the session or
    of MAIL beats all; then every accepted recipient refused; then the ``data`` phase's
    would-be end and the would-be disposition, by the rules of :func:`end_of_message`.
    """
    would = transaction.would
    if would.refusal is not None:
        return Refusal(*would.refusal)
    recipients = len(transaction.envelope.recipients)
    if would.refused_recipients and len(would.refused_recipients) >= recipients:
        return recipients_refused([Refusal(*entry) for entry in would.refused_recipients])
    return _end_of_message(would, (result.would or result) if result is not None else None)


def would_disposition(would: Refusal | Deliver | None, enforced: Refusal | Deliver | None,
                      decision: Decision) -> str:
    """The ``message`` line's ``would=``: the disposition the message would have had.

    The same end as the enforced one (or None: no would-be end was worked out) had the same
    fate, the delivery's answer included: the decision's disposition.
    """
    if would is None or would == enforced:
        return decision.disposition
    return would.disposition


FailureAction: TypeAlias = Literal["tempfail", "accept", "reject"]


def on_plugin_failure(phase: str, refusal: Refusal, action: FailureAction) -> Refusal | Deliver:
    """A refusal under a default action for plugin failures (``milter.default_action``, as
    Postfix's ``milter_default_action``).

    A refusal that stands for no failure, or ``tempfail``, stays as it is; ``reject`` refuses
    with :data:`ERROR_REJECT` (``554`` at connect); ``accept`` lets the message pass
    unfiltered, in the failed plugin's name.
    """
    if not refusal.failed or action == "tempfail":
        return refusal
    if action == "accept":
        return Deliver("deliver", refusal.decided_by,
                       f"plugin error; milter.default_action accept: {refusal.reason}")
    reply = connect_reply(ERROR_REJECT) if phase == "connect" else ERROR_REJECT
    return Refusal(reply, refusal.decided_by, refusal.reason, failed=True)


def on_not_granted(outcome: Deliver, missing: list[str], action: FailureAction) -> Refusal | Deliver:
    """A decision the milter cannot carry out: its edits or quarantine need actions the MTA
    did not grant (*missing*). ``accept`` lets the message pass as the MTA has it; else a
    refusal in the milter's name (``milter.not_granted_action``)."""
    reason = f"the MTA did not grant {', '.join(missing)} ({outcome.action} by {outcome.decided_by})"
    if action == "accept":
        return Deliver("deliver", outcome.decided_by, f"{reason}; milter.not_granted_action accept")
    return Refusal(ERROR_TEMPFAIL if action == "tempfail" else ERROR_REJECT, MILTER, reason)
