"""One milter connection: the MTA's events driving the plugin chain, verdicts going back.

The MTA (Postfix) owns the SMTP conversation and the message; this state machine builds
the same :class:`~smtpproxy.session.Session` the SMTP front end builds, runs the same
hooks at the same moments, and answers each event:

* connect, helo, mail, rcpt: the phase's verdict. Reject/tempfail become SMFIR_REPLYCODE
  with the plugin's reply (at connect 554/421, as the proxy answers). Continue and accept
  become SMFIR_CONTINUE: our ACCEPT ends a *phase*, while SMFIR_ACCEPT would take the
  rest of the message (or connection) away from the filter. Discard and quarantine are
  remembered and applied at the end of the message, as in the proxy. Connect and helo
  events no plugin answers, and mail, get no reply at all (SMFIP_NR_*, :func:`no_reply_steps`;
  RCPT always does); a refusal in such a step reaches the MTA with the next answer it waits
  for (every RCPT of that message, then its end), as Postfix's ``smtpd_delay_reject``.
* headers, body: collected (CRLF line ends) into the raw message, without replies; over
  ``limits.max_message_size`` the message is refused with 552.
* end of message: the ``data`` chain on a :class:`~smtpproxy.message.Message`, then the
  edits (see :mod:`smtpproxy.milter.edits`) and the final SMFIR_ACCEPT, or SMFIR_DISCARD,
  or the reply code. ``after_message`` follows, with a :class:`~smtpproxy.session.Decision`.
* an edit or a quarantine that needs an action the MTA did not grant at negotiation
  (SMFIF_*) is never sent: the message gets ``milter.not_granted_action`` (by default
  ``milter.default_action``) and a ``milter_not_granted`` line.
* a plugin that raised or timed out (with ``on_error: tempfail``) gives
  ``milter.default_action`` instead: tempfail (451), reject (550) or accept (SMFIR_ACCEPT,
  the message passes unfiltered), like Postfix's ``milter_default_action``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from smtpproxy.addresses import Address, AddressError, parse_mail_from, parse_rcpt_to
from smtpproxy.chain import Chain
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.eventlog import current_session, event
from smtpproxy.history import HistoryRecorder
from smtpproxy.message import Message
from smtpproxy.metrics import NullRecorder
from smtpproxy.milter import codec
from smtpproxy.milter.codec import MilterProtocolError, Response
from smtpproxy.milter.edits import body_edits, envelope_edits, header_edits
from smtpproxy.outcome import (
    ERROR_REJECT,
    PROXY,
    Deliver,
    FailureAction,
    Refusal,
    on_not_granted,
    on_plugin_failure,
)
from smtpproxy.senderlogin import SenderLoginPolicy
from smtpproxy.session import Client, Decision, Recipient, Session, TLSInfo, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["ERROR_REJECT", "MilterPolicy", "MilterSession"]

_T = TypeVar("_T")

Send = Callable[[Response], Awaitable[None]]

# What we ask the MTA not to send: DATA and unknown SMTP commands mean nothing to plugins.
_NOT_WANTED = codec.SMFIP_NODATA | codec.SMFIP_NOUNKNOWN
# Extensions we use when offered: exact leading whitespace in header values.
_EXTENSIONS = codec.SMFIP_HDR_LEADSPC
# No reply per header, at the end of the headers or per body chunk: the content is judged at
# the end of the message, and a message over limits.max_message_size is refused there.
_CONTENT_NO_REPLY = codec.SMFIP_NR_HDR | codec.SMFIP_NR_EOH | codec.SMFIP_NR_BODY
# The envelope events, by the hook that answers them.
_ENVELOPE_NO_REPLY = {"connect": codec.SMFIP_NR_CONN, "helo": codec.SMFIP_NR_HELO,
                      "mail_from": codec.SMFIP_NR_MAIL, "rcpt_to": codec.SMFIP_NR_RCPT}
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_WARNED_NO_PORT: weakref.WeakSet[Chain] = weakref.WeakSet()
"""Chains whose ``listeners`` groups were found without {daemon_port}: said once each."""
_ANNOUNCED: weakref.WeakKeyDictionary[Chain, set[tuple[codec.OptNeg, int]]] = weakref.WeakKeyDictionary()
"""The (offer, steps asked) each chain's milter has logged ``milter_negotiated`` for at info:
an MTA makes the same offer on every connection (Postfix opens one per SMTP session), so the
agreement is said at info when it is new and at debug on the other connections."""
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]{1,253}", re.ASCII)
"""What a verified client name may contain (Postfix's valid_hostname() characters)."""

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


@dataclass(frozen=True, slots=True)
class MilterPolicy:
    """What a milter connection needs from the configuration."""

    default_action: FailureAction = "tempfail"
    not_granted_action: Literal["default_action", "tempfail", "accept", "reject"] = "default_action"
    """What a message becomes when its edits or quarantine need an action the MTA did not grant."""
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    progress_interval: float = 10.0
    """Send SMFIR_PROGRESS this often while plugins work, so the MTA keeps waiting."""
    sender_login: SenderLoginPolicy | None = None
    """Hold authenticated sessions' senders to this map (milter.check_sender_login)."""
    history: HistoryRecorder | None = None
    """Where each decision is queued for the store's history (None: no store, or history off)."""
    node: str = ""
    """This milter's name in the store's history."""
    metrics: NullRecorder | None = None
    """Where plugin verdicts and messages are counted (``metrics.enabled``; None: nowhere)."""


def no_reply_steps(chain: Chain, policy: MilterPolicy) -> int:
    """The SMFIP_NR_* steps we ask the MTA not to wait for: the content, and each envelope
    event that no plugin of the chain answers (its hook) and no rule of ours needs at once.

    Postfix then writes those events without waiting (milter8.c: ``skip_reply``) and sends
    them with the next one that waits: connect to RCPT and the DATA macros arrive in one
    write instead of four round trips. RCPT is always answered: smtpproxy's own rules there
    (the recipient limit, the policy groups' split, the address check) refuse one recipient,
    and a refusal kept for the end of the message would refuse all of them, again at every
    retry. MAIL goes without reply even when plugins answer it: a refusal there (a plugin's,
    or an address our parser refuses) is the answer to every RCPT of that message, which is
    where Postfix itself gives its MAIL restrictions' refusals (``smtpd_delay_reject = yes``,
    its default), and the message costs one round trip less. MAIL keeps its reply where
    its answer may be other than a refusal, with ``milter.default_action: accept`` and a
    ``mail_from`` plugin (a failing plugin passes the message: SMFIR_ACCEPT), and with the
    sender/login map (``milter.check_sender_login``), as before. CONNECT and HELO go
    without reply only when no plugin answers them (Postfix treats a refusal at HELO as the
    whole connection's).
    """
    steps = _CONTENT_NO_REPLY
    for hook, step in _ENVELOPE_NO_REPLY.items():
        if hook == "rcpt_to":
            continue
        if hook == "mail_from":
            if policy.sender_login is not None or (
                    policy.default_action == "accept" and chain.implements(hook)):
                continue
        elif chain.implements(hook):
            continue
        steps |= step
    return steps


def slow_steps(chain: Chain, policy: MilterPolicy) -> int:
    """The envelope steps (as their SMFIP_NR_* bits) whose work can keep the MTA waiting, and
    so get SMFIR_PROGRESS while it runs: a plugin's hook, the sender/login map's lookup at
    MAIL, the policy groups' lookup (and a group's own ``rcpt_to`` plugins) at RCPT. The
    others are a few microseconds of smtpproxy's own rules."""
    steps = 0
    for hook, step in _ENVELOPE_NO_REPLY.items():
        if (chain.implements(hook) or (hook == "mail_from" and policy.sender_login is not None)
                or (hook == "rcpt_to" and chain.policies is not None)):
            steps |= step
    return steps


@functools.lru_cache(maxsize=64)
def _negotiation(offer: codec.OptNeg, no_reply: int) -> tuple[codec.OptNeg, dict[str, Any]]:
    """What we agree to for an offer, and the ``milter_negotiated`` line's fields: the MTA
    makes the same offer on every connection (Postfix: one per SMTP session)."""
    agreed = codec.OptNeg(
        min(offer.version, codec.PROTOCOL_VERSION),
        codec.ACTIONS & offer.actions,
        (_NOT_WANTED | _EXTENSIONS | no_reply) & offer.protocol,
    )
    return agreed, {"version": agreed.version, "actions": hex(agreed.actions),
                    "protocol": hex(agreed.protocol), "granted": codec.action_names(agreed.actions),
                    "not_granted": codec.action_names(codec.ACTIONS & ~offer.actions)}


@functools.lru_cache(maxsize=16)
def _connection_plan(chain: Chain, policy: MilterPolicy) -> tuple[int, int, Rules]:
    """(:func:`no_reply_steps`, :func:`slow_steps`, the conversation's rules) of a chain and
    policy, worked out once rather than for every MTA connection."""
    # The MTA judges unauthenticated senders itself (reject_unauthenticated_sender_login_mismatch).
    rules = Rules(max_recipients=policy.max_recipients, sender_login=policy.sender_login,
                  unauthenticated_senders=False)
    return no_reply_steps(chain, policy), slow_steps(chain, policy), rules


def reply_text(reply: Reply) -> str:
    """An SMTP reply in SMFIR_REPLYCODE form: CRLF between lines, ``%`` doubled."""
    return "\r\n".join(reply.lines()).replace("%", "%%")


class MilterSession:
    """The protocol state of one MTA connection (several SMTP sessions with SMFIC_QUIT_NC)."""

    def __init__(self, chain: Chain, policy: MilterPolicy, send: Send, peer: str = "",
                 progress: Callable[[], None] | None = None) -> None:
        self.chain = chain
        self.policy = policy
        self.send = send
        self.peer = peer
        self.progress_now = progress
        """Writes SMFIR_PROGRESS at once (from a timer while plugins work); None: it is sent
        through :attr:`send` from a task that waits beside the step."""
        self.negotiated: codec.OptNeg | None = None
        self._leading_space = False
        """Header values come with their leading whitespace (SMFIP_HDR_LEADSPC agreed)."""
        self._headers_without_reply = False
        """No reply per header field (SMFIP_NR_HDR agreed): :meth:`take` adds them."""
        self._content_without_reply = False
        """No reply to the end of the headers or a body chunk (SMFIP_NR_EOH and _BODY agreed)."""
        self.no_reply, self._slow, rules = _connection_plan(chain, policy)
        """The SMFIP_NR_* steps we ask for (negotiation keeps the part the MTA offers), and
        the steps whose work can keep the MTA waiting (they get SMFIR_PROGRESS)."""
        self.macros = codec.Macros()
        self.session: Session | None = None
        self.conversation = Conversation(chain, rules, metrics=policy.metrics, history=policy.history,
                                         node=policy.node)
        self._reset_message()

    # -- helpers ------------------------------------------------------------------------

    def _end_message(self) -> None:
        """The transaction ended (end of message, abort): its content and macros are forgotten."""
        self.macros.end_transaction()
        self._reset_message()

    def _reset_message(self) -> None:
        self._headers = bytearray()
        self._header_count = 0
        self._body = bytearray()
        self._size = 0
        self._refused: Reply | None = None
        self._started = time.perf_counter()
        self._mta_sender: Address | None = None
        self._mta_recipients: list[Address] = []

    def _replies(self, step: int) -> bool:
        """Whether the MTA waits for our answer to this step (it does unless SMFIP_NR_* was agreed)."""
        return self.negotiated is None or not self.negotiated.protocol & step

    async def _answer(self, step: int, phase: str, refusal: Refusal | None) -> None:
        """A step's answer: the verdict where the MTA waits for it; where it does not
        (SMFIP_NR_*), a refusal is kept for the next answer it waits for and logged now."""
        if self._replies(step):
            await self.send(codec.Continue() if refusal is None else self._refuse(phase, refusal))
        elif refusal is not None:
            self._defer(phase, refusal)

    def _defer(self, phase: str, refusal: Refusal, *, warn: bool = True) -> None:
        """Keep a refusal for the next answer the MTA waits for (every RCPT, then the end of
        the message), under ``milter.default_action`` as :meth:`_refuse` sends one. That
        action is never accept where this runs for a plugin (:func:`no_reply_steps` keeps
        such a step answered), so a failure stays refused. *warn*: a warning line where it
        shows a disagreement with the MTA (it took an address our parser refuses); none for a
        plugin's refusal at MAIL, given at RCPT by design, whose ``mail_from`` line has the
        verdict and reply already."""
        final = self._failure_policy(phase, refusal)
        reply = final.reply if isinstance(final, Refusal) else refusal.reply
        if warn:
            event("milter_refusal_deferred", level=logging.WARNING, phase=phase, reply=reply.code,
                  note="no reply was agreed for this step: "
                       "the next answer the MTA waits for refuses the message")
        if self._refused is None:
            self._refused = reply
            self._body.clear()

    async def _run(self, step: int, work: Awaitable[_T]) -> _T:
        """A step's conversation; with SMFIR_PROGRESS only where the MTA waits for our answer
        (a progress packet it does not expect would be read as the next event's reply) and
        something in the step can take long (:func:`slow_steps`): a task and a timer per
        event otherwise, for nothing."""
        if step & self._slow and self._replies(step):
            return await self._progress(work)
        return await work

    def _require_session(self, what: str) -> Session:
        if self.session is None:
            raise MilterProtocolError(f"{what} before CONNECT")
        return self.session

    def _open_transaction(self, what: str) -> tuple[Session, Transaction] | None:
        """The transaction, or None when its MAIL was refused without a reply (the MTA went
        on: its events are taken in until the end of the message refuses it)."""
        session = self._require_session(what)
        if session.transaction is None and self._refused is not None:
            return None
        return self._require_transaction(what)

    def _require_transaction(self, what: str) -> tuple[Session, Transaction]:
        session = self._require_session(what)
        if session.transaction is None:
            raise MilterProtocolError(f"{what} without MAIL")
        return session, session.transaction

    async def _progress(self, step: Awaitable[_T]) -> _T:
        """Run a step of the conversation, telling the MTA we are alive while slow plugins work.

        With :attr:`progress_now` the step runs in this task and a timer writes the packets
        (one timer per step, none of a task's and a wait's machinery: issue 31's profile).
        """
        write = self.progress_now
        if write is not None:
            loop = asyncio.get_running_loop()
            interval = self.policy.progress_interval

            def tick() -> None:
                write()
                timer[0] = loop.call_later(interval, tick)

            timer = [loop.call_later(interval, tick)]
            try:
                return await step
            finally:
                timer[0].cancel()
                # tick's closure holds tick and the timer: a reference cycle per step, left
                # for the garbage collector (the most of its gen-0 runs with the chain on).
                timer.clear()
                del tick
        task = asyncio.ensure_future(step)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.policy.progress_interval)
                if done:
                    return task.result()
                await self.send(codec.Progress())
        finally:
            if not task.done():
                task.cancel()

    def _failure_policy(self, phase: str, refusal: Refusal) -> Refusal | Deliver:
        """A plugin's failure goes by ``milter.default_action`` (:func:`on_plugin_failure`)."""
        if refusal.failed:
            event("milter_default_action", level=logging.WARNING, phase=phase,
                  action=self.policy.default_action, plugin=refusal.decided_by, reason=refusal.reason)
        return on_plugin_failure(phase, refusal, self.policy.default_action)

    def _refuse(self, phase: str, refusal: Refusal) -> Response:
        """A refusal as the MTA's reply (SMFIR_REPLYCODE), or SMFIR_ACCEPT by default_action."""
        final = self._failure_policy(phase, refusal)
        if isinstance(final, Deliver):
            return codec.Accept()
        return codec.ReplyCode(reply_text(final.reply))

    def _update_identity(self, session: Session) -> None:
        """TLS and SMTP AUTH as the MTA's macros tell them (sent with HELO and MAIL)."""
        version = self.macros.get("tls_version")
        if version is not None:
            bits = self.macros.get("cipher_bits")
            session.tls = TLSInfo(version, self.macros.get("cipher") or "",
                                  int(bits) if bits and bits.isdigit() else None)
        # The MTA sends {auth_authen} with each MAIL of an authenticated client; a transaction
        # without it is not authenticated, whatever an earlier one was.
        session.auth_user = self.macros.get("auth_authen")

    # -- dispatch -----------------------------------------------------------------------

    def take(self, command: codec.Command) -> bool:
        """Act on a command that needs no answer and nothing awaited (macros; a header field,
        the end of the headers and a body chunk when no reply to them was agreed): 27 of the
        33 packets of a message from Postfix, without a coroutine each. False: :meth:`handle` it."""
        kind = type(command)
        if kind is codec.Macro:
            stages = self.macros.stages  # Macros.update, inline: sixteen a message
            stages.pop(command.for_command, None)  # type: ignore[union-attr]
            stages[command.for_command] = command  # type: ignore[union-attr, assignment]
            return True
        if kind is codec.Header and self._headers_without_reply:
            session = self.session
            if session is None or session.transaction is None:
                self._open_transaction("header")
            self._add_header(command.name, command.value)  # type: ignore[union-attr]
            return True
        if kind is codec.Body and self._content_without_reply:
            session = self.session
            if session is None or session.transaction is None:
                self._open_transaction("body")
            self._add_body(command.chunk)  # type: ignore[union-attr]
            return True
        if kind is codec.EndOfHeaders and self._content_without_reply:
            session = self.session
            if session is None or session.transaction is None:
                self._open_transaction("end of headers")
            return True
        return False

    async def handle(self, command: codec.Command) -> bool:
        """Act on one command and answer it; False when the connection is to be closed."""
        # The commands that come here with every message first (take() has the macros, the
        # header fields and the body where no reply is agreed): the cases are tried in order.
        match command:
            case codec.Mail(args):
                await self._mail(args)
            case codec.Rcpt(args):
                await self._rcpt(args)
            case codec.EndOfBody(chunk):
                self._open_transaction("end of message")
                self._add_body(chunk)
                await self._end_of_message()
            case codec.Connect():
                await self._connect(command)
            case codec.Helo(hostname):
                await self._helo(hostname)
            case codec.OptNeg():
                await self._negotiate(command)
            case codec.Quit():
                return False
            case codec.Macro():
                self.macros.update(command)
            case codec.Header(name, value):
                if self.session is None or self.session.transaction is None:
                    self._open_transaction("header")
                self._add_header(name, value)
                if self._replies(codec.SMFIP_NR_HDR):
                    await self.send(self._content_reply())
            case codec.EndOfHeaders():
                self._open_transaction("end of headers")
                if self._replies(codec.SMFIP_NR_EOH):
                    await self.send(self._content_reply())
            case codec.Body(chunk):
                self._open_transaction("body")
                self._add_body(chunk)
                if self._replies(codec.SMFIP_NR_BODY):
                    await self.send(self._content_reply())
            case codec.Abort():
                if self.session is not None and self.session.transaction is not None:
                    event("abort", tx=self.session.transaction.id)
                    self.conversation.end_transaction(self.session)
                self._end_message()
            case codec.QuitNewConnection():
                await self.finish()
                self.macros.clear()
            case codec.Data() | codec.Unknown():
                await self.send(codec.Continue())
        return True

    async def _negotiate(self, offer: codec.OptNeg) -> None:
        if self.negotiated is not None:
            raise MilterProtocolError("second option negotiation on one connection")
        if offer.version < 2:
            raise MilterProtocolError(f"milter protocol version {offer.version} is too old")
        self.negotiated, fields = _negotiation(offer, self.no_reply)
        self._leading_space = bool(self.negotiated.protocol & codec.SMFIP_HDR_LEADSPC)
        self._headers_without_reply = not self._replies(codec.SMFIP_NR_HDR)
        content = codec.SMFIP_NR_EOH | codec.SMFIP_NR_BODY
        self._content_without_reply = self.negotiated.protocol & content == content
        announced = _ANNOUNCED.setdefault(self.chain, set())
        if (offer, self.no_reply) in announced:
            event("milter_negotiated", logging.DEBUG, peer=self.peer, **fields)
        else:
            if len(announced) >= 64:  # bounded, whatever the MTAs offer
                announced.clear()
            announced.add((offer, self.no_reply))
            event("milter_negotiated", peer=self.peer, **fields)
        await self.send(self.negotiated)

    async def _connect(self, info: codec.Connect) -> None:
        if self.negotiated is None:
            raise MilterProtocolError("CONNECT before option negotiation")
        if self.session is not None:
            raise MilterProtocolError("second CONNECT on one connection (QUIT_NC expected first)")
        if info.family in (codec.FAMILY_INET, codec.FAMILY_INET6):
            ip = info.address.removeprefix("IPv6:").removeprefix("ipv6:")
            port = info.port
        else:
            ip, port = "unknown", 0
        hostname = info.hostname if info.hostname and not info.hostname.startswith("[") else None
        if hostname == "unknown" or (hostname is not None and not _HOSTNAME.fullmatch(hostname)):
            hostname = None  # not a name (control characters, spaces): never the client's hostname
        daemon_port = self.macros.get("daemon_port") or ""
        session = Session(Client(ip, port, hostname), transport="milter",
                          local_ip=self.macros.get("daemon_addr") or "",
                          local_port=int(daemon_port) if daemon_port.isdecimal() else 0)
        self.session = session
        current_session.set(session.id)
        event("connect", client=ip, port=port, transport="milter", mta=self.macros.get("j"))
        if not session.local_port:
            self._warn_no_port()
        if not (self.macros.get("v") or "").startswith("Postfix"):
            # SMFIR_PROGRESS before the end of the message only where the MTA says it is
            # Postfix (its ``v`` macro, in milter_connect_macros by default): Postfix reads it
            # at any step (milter8.c), Sendmail only at the end of the message. To Sendmail a
            # progress packet at CONNECT to RCPT is that step's reply, "bogus" (milter.c,
            # milter_send_command): the recipient passes unanswered and the filter is failed.
            self._slow = 0
        refusal = await self._run(codec.SMFIP_NR_CONN, self.conversation.connect(session))
        await self._answer(codec.SMFIP_NR_CONN, "connect", refusal)

    def _warn_no_port(self) -> None:
        """A policy group selects by ``listeners`` but the MTA does not send the port."""
        policies = self.chain.policies
        if policies is None or self.chain in _WARNED_NO_PORT or not any(g.ports for g in policies.groups):
            return
        _WARNED_NO_PORT.add(self.chain)
        event("milter_daemon_port_missing", level=logging.WARNING,
              groups=[g.name for g in policies.groups if g.ports],
              note="the MTA sends no {daemon_port}: no session matches these groups' listeners; "
                   "Postfix: add {daemon_port} to milter_connect_macros (docs/multi-domain.md); "
                   "Sendmail: to confMILTER_MACROS_CONNECT (docs/deploy-milter.md)")

    async def _helo(self, hostname: str) -> None:
        session = self._require_session("HELO")
        self._update_identity(session)
        refusal = await self._run(codec.SMFIP_NR_HELO, self.conversation.greet(session, hostname))
        await self._answer(codec.SMFIP_NR_HELO, "helo", refusal)

    async def _mail(self, args: tuple[str, ...]) -> None:
        session = self._require_session("MAIL")
        if session.transaction is not None:  # no ABORT came: start afresh, like RSET
            self.conversation.end_transaction(session)
        self._reset_message()
        self._update_identity(session)
        try:
            path = parse_mail_from("FROM:" + " ".join(args), smtputf8_enabled=True)
        except AddressError as exc:
            event("mail_from", sender=args[0], verdict="syntax", reply=exc.code)
            await self._answer(codec.SMFIP_NR_MAIL, "mail_from",
                               Refusal(Reply(exc.code, exc.enhanced, exc.text), PROXY, "syntax"))
            return
        refusal = await self._run(codec.SMFIP_NR_MAIL, self.conversation.mail(
            session, path.address, path.params, queue_id=self.macros.get("i")))
        if refusal is not None:
            if self._replies(codec.SMFIP_NR_MAIL):
                response = self._refuse("mail_from", refusal)
                if not isinstance(response, codec.Accept):
                    self.conversation.end_transaction(session)
                await self.send(response)
                return
            self.conversation.end_transaction(session)
            self._defer("mail_from", refusal, warn=False)
        self._mta_sender = path.address
        await self._answer(codec.SMFIP_NR_MAIL, "mail_from", None)

    async def _rcpt(self, args: tuple[str, ...]) -> None:
        opened = self._open_transaction("RCPT")
        if opened is None:  # MAIL was refused without a reply: so is every recipient
            if self._replies(codec.SMFIP_NR_RCPT):
                await self.send(self._content_reply())
            return
        session, transaction = opened
        try:
            path = parse_rcpt_to("TO:" + " ".join(args), smtputf8_enabled=True)
        except AddressError as exc:
            event("rcpt_to", tx=transaction.id, recipient=args[0], verdict="syntax", reply=exc.code)
            await self._answer(codec.SMFIP_NR_RCPT, "rcpt_to",
                               Refusal(Reply(exc.code, exc.enhanced, exc.text), PROXY, "syntax"))
            return
        recipient = Recipient(path.address, dict(path.params))
        refusal = await self._run(codec.SMFIP_NR_RCPT,
                                  self.conversation.rcpt(session, transaction, recipient))
        if refusal is not None:
            if not self._replies(codec.SMFIP_NR_RCPT):
                self._defer("rcpt_to", refusal)
                return
            response = self._refuse("rcpt_to", refusal)
            if isinstance(response, codec.Accept):
                self.conversation.accept(transaction, recipient)
                self._mta_recipients.append(path.address)
            await self.send(response)
            return
        self.conversation.accept(transaction, recipient)
        self._mta_recipients.append(path.address)
        await self._answer(codec.SMFIP_NR_RCPT, "rcpt_to", None)

    # -- content ------------------------------------------------------------------------

    def _add_header(self, name: str, value: str) -> None:
        # Folded values arrive with bare \n between lines; the message keeps CRLF.
        text = value.replace("\r\n", "\n").replace("\n", "\r\n") if "\n" in value else value
        if not self._leading_space:
            text = " " + text  # the MTA ate the space after the colon
        field = (name + ":" + text).encode("utf-8", "surrogateescape") + b"\r\n"
        self._headers += field
        self._header_count += 1
        self._count(len(field))

    def _add_body(self, chunk: bytes) -> None:
        if self._refused is None:
            self._body += chunk
        self._count(len(chunk))

    def _count(self, octets: int) -> None:
        self._size += octets
        if self._refused is None and self._size > self.policy.max_message_size:
            self._refused = TOO_BIG
            self._body.clear()
            event("data_refused", problem="too_big", bytes=self._size, reply=TOO_BIG.code)

    def _content_reply(self) -> Response:
        if self._refused is not None:
            return codec.ReplyCode(reply_text(self._refused))
        return codec.Continue()

    def _message(self) -> Message:
        raw = bytes(self._headers) + b"\r\n" + bytes(self._body)
        try:
            return Message(raw)
        except ValueError:
            # A bare CR or LF inside a line (the MTA passes them through): plugins see CRLF.
            event("bare_newlines_normalized", level=logging.INFO)
            return Message(_BARE_NEWLINE.sub(b"\r\n", raw))

    async def _end_of_message(self) -> None:
        if self._refused is not None:
            await self.send(codec.ReplyCode(reply_text(self._refused)))
            if self.session is not None:
                self.conversation.end_transaction(self.session)
            self._end_message()
            return
        session, transaction = self._require_transaction("end of message")
        message = self._message()
        transaction.message = message
        queue_id = self.macros.get("i")
        refusal = await self.conversation.headers_refusal(session, transaction, queue_id=queue_id)
        if refusal is not None:
            await self.send(codec.ReplyCode(reply_text(refusal.reply)))
            self.conversation.end_transaction(session)
            self._reset_message()
            return
        queued = Reply(250, "2.0.0", f"Ok: queued as {queue_id or transaction.id}")
        step = self.conversation.end_of_message(session, transaction)
        # Without a data plugin (in the transaction's policy group) nothing in this step can
        # keep the MTA waiting: no progress task.
        data_plugins = self.conversation.transaction_chain.implements("data")
        outcome = await (self._progress(step) if data_plugins else step)
        responses: list[Response]
        decision: Decision
        if isinstance(outcome, Refusal):
            final = self._failure_policy("data", outcome)
            if isinstance(final, Deliver):  # milter.default_action: accept, the message passes unfiltered
                responses = [codec.Accept()]
                decision = final.decision(queued, transaction.score)
            else:
                responses = [codec.ReplyCode(reply_text(final.reply))]
                decision = final.decision(transaction.score)
        elif outcome.action == "discard":
            responses = [codec.Discard()]
            decision = outcome.decision(queued, transaction.score)
        else:
            responses = self._edits(transaction, message)
            if outcome.action == "quarantine":
                # Postfix puts the message on hold (postsuper -H releases it).
                responses.append(codec.Quarantine(outcome.reason or "quarantined by smtpproxy"))
            responses.append(codec.Accept())
            decision = outcome.decision(queued, transaction.score)
            fallback = self._not_granted(responses, transaction, outcome, queued)
            if fallback is not None:
                responses, decision = fallback
        for response in responses:
            await self.send(response)
        await self.conversation.settle(session, transaction, decision, self._started,
                                       queue_id=queue_id, edits=len(responses) - 1)
        self.conversation.end_transaction(session)
        self._end_message()

    def _not_granted(self, responses: list[Response], transaction: Transaction, outcome: Deliver,
                     queued: Reply) -> tuple[list[Response], Decision] | None:
        """When an edit or the quarantine needs an action the MTA did not grant (libmilter's
        smfi_* calls fail for those, and Sendmail logs the filter as lying): the responses
        and decision of ``milter.not_granted_action`` instead; None when all were granted."""
        granted = self.negotiated.actions if self.negotiated else 0
        needed = 0
        for response in responses:
            needed |= codec.needed_action(response)
        missing = needed & ~granted
        if not missing:
            return None
        action = self.policy.not_granted_action
        if action == "default_action":
            action = self.policy.default_action
        names = codec.action_names(missing)
        event("milter_not_granted", level=logging.WARNING, tx=transaction.id, missing=names,
              granted=codec.action_names(granted), action=action, by=outcome.decided_by)
        final = on_not_granted(outcome, names, action)
        if isinstance(final, Deliver):  # configured: the message passes as the MTA has it
            return [codec.Accept()], final.decision(queued, transaction.score)
        return [codec.ReplyCode(reply_text(final.reply))], final.decision(transaction.score)

    def _edits(self, transaction: Transaction, message: Message) -> list[Response]:
        """The modification actions for what the plugins changed, headers first (nothing to
        compare, nothing parsed, for a message and envelope nobody changed)."""
        responses: list[Response] = []
        changes = message.changes
        if any(c.op != "replace_body" for c in changes):
            # The message's own field split (edits.split_fields of its header blocks, without
            # cutting them up again: tests/unit/test_message.py compares the two).
            original = message.received_field_bytes
            if len(original) != self._header_count:
                # The edits' header indexes count the fields the MTA sent.
                event("milter_header_mismatch", level=logging.WARNING, received=self._header_count,
                      parsed=len(original))
            v = self.macros.get("v") or ""
            responses += header_edits(
                original, message.header_field_bytes, leading_space=self._leading_space,
                hidden_top=not v or v.startswith("Postfix"),
            )
        if any(c.op == "replace_body" for c in changes):
            responses += body_edits(message.body)
        if self._mta_sender is not None and transaction.envelope.changes:
            actions = self.negotiated.actions if self.negotiated else 0
            responses += envelope_edits(
                self._mta_sender, self._mta_recipients, transaction.envelope,
                with_params=bool(actions & codec.SMFIF_ADDRCPT_PAR),
            )
        return responses

    # -- end ----------------------------------------------------------------------------

    async def finish(self) -> None:
        """The SMTP session is over (QUIT, QUIT_NC or the MTA went away): ``disconnect``."""
        session, self.session = self.session, None
        if session is None:
            return
        current_session.set(session.id)
        self.conversation.end_transaction(session)
        self._end_message()
        await self.conversation.disconnect(session)
        event("disconnect", transactions=session.transaction_count,
              seconds=round(time.time() - session.started, 3))

