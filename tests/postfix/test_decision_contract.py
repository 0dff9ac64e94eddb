"""One contract, every front end: the live proxy, the milter and the offline tracer decide alike.

Each front end only does I/O around one :class:`~smtpproxy.conversation.Conversation`;
every scenario (each action in each phase, each way a plugin can fail, session-level
dispositions) runs through the bare Conversation (the seam a new front end builds on), and
through each front end, checked to have run its phases through its Conversation:

- the SMTP proxy on a real socket, delivering to a real capturing upstream (aiosmtpd);
- the milter, driven by the protocol-level fake MTA of tests/wire/test_milter.py over loopback;
- ``Tracer`` (what ``smtpproxy test-message`` and the pytest fixtures use);
- the policy service (``smtpproxy policy``), asked as Postfix's check_policy_service asks at
  RCPT and END-OF-MESSAGE, with ``policy.quarantine_action: hold``. Its ``data`` cells are
  explicitly not applicable (:data:`NOT_APPLICABLE`): Postfix sends a policy service no
  message, so a plugin's ``data`` hook cannot run there; it is named instead.

All three must give the same disposition, reply class, ``decided_by`` and score, and the
proxy must have delivered (or quarantined) exactly what it said. The milter's answers are
also checked where a real MTA acts on them: 24 of the scenarios go through a real Postfix
with ``smtpd_milters``, whose replies, hold queue and mailbox must agree. The expected values come
from the rules stated in docs/verdicts.md, not from any front end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Decision, Verdict, hookimpl
from smtpproxy.addresses import Address
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.message import Message
from smtpproxy.milter import codec
from smtpproxy.outcome import Refusal
from smtpproxy.policy.applicability import message_plugins
from smtpproxy.policy.service import DUNNO, PolicyService, PolicySettings
from smtpproxy.session import Client, Recipient, Session
from smtpproxy.tracer import Tracer
from smtpproxy.verdicts import Action, Reply
from tests.conftest import ProxyFactory, Sink, Talk, chain_of, port_of
from tests.wire.test_milter import BODY, HEADERS, FakeMTA
from tests.wire.test_milter import Factory as MilterFactory
from tests.wire.test_milter import milter as milter  # noqa: PLC0414 - the fixture

PHASES = ("connect", "helo", "mail_from", "rcpt_to", "data")
TIMEOUT = 0.3  # the judge's timeout; blocking scenarios overrun it by 0.3 s
MESSAGE = b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello\r\n\r\n" + BODY


def _tampered() -> Verdict:
    verdict = Verdict.reject("no")
    object.__setattr__(verdict, "reply", Reply(250, None, "fake ok"))  # after construction
    return verdict


async def _hang() -> None:
    await asyncio.sleep(30)


def _raise(exc: BaseException) -> Callable[[], Any]:
    def hook() -> Any:
        raise exc
    return hook


# name -> (is async, body returning the hook's result)
BEHAVIOURS: dict[str, tuple[bool, Callable[[], Any]]] = {
    "reject": (True, lambda: Verdict.reject("No thanks", code=550, enhanced="5.7.1")),
    "tempfail": (True, lambda: Verdict.tempfail("Later", code=450, enhanced="4.7.1")),
    "discard": (True, lambda: Verdict.discard("trap")),
    "quarantine": (True, lambda: Verdict.quarantine("suspicious")),
    "accept": (True, lambda: Verdict.accept("known good")),
    "continue": (True, lambda: Verdict.cont(score=0.5, reason="meh")),
    "plain-reject": (False, lambda: Verdict.reject("No thanks")),
    "raises": (True, _raise(ValueError("boom"))),
    "keyboard-interrupt": (True, _raise(KeyboardInterrupt())),
    "system-exit": (False, _raise(SystemExit(3))),
    "cancelled": (True, _raise(asyncio.CancelledError())),
    "hangs": (True, _hang),
    "blocks-thread": (False, lambda: time.sleep(2 * TIMEOUT)),
    "blocks-loop": (True, lambda: time.sleep(2 * TIMEOUT) or Verdict.accept()),
    "returns-junk": (True, lambda: "250 ok"),
    "tampered-verdict": (True, _tampered),
}
ERRORS = {"raises", "keyboard-interrupt", "system-exit", "cancelled", "hangs", "blocks-thread",
          "blocks-loop", "returns-junk", "tampered-verdict"}


@dataclass(frozen=True)
class Expected:
    disposition: str
    reply_class: int
    decided_by: str
    score: float | None  # None: the message never reached its end (no Decision to compare)


def expected(phase: str, behaviour: str) -> Expected:
    """The rules of docs/verdicts.md, written out independently of smtpproxy.outcome."""
    before_message = phase != "data"
    score = 3.5  # the scorer: 1.5 at connect (session) + 2.0 at mail_from (transaction)
    if behaviour in ERRORS or behaviour == "tempfail":
        return Expected("tempfailed", 4, "judge", None if before_message else score)
    if behaviour in ("reject", "plain-reject"):
        return Expected("rejected", 5, "judge", None if before_message else score)
    if behaviour == "discard":
        return Expected("discarded", 2, "judge", score)
    if behaviour == "quarantine":
        return Expected("quarantined", 2, "judge", score)
    if behaviour == "continue":
        return Expected("delivered", 2, "delivery", score + 0.5)
    return Expected("delivered", 2, "delivery", score)


SCENARIOS = [(phase, b) for phase in PHASES for b in ("reject", "tempfail", "discard", "quarantine",
                                                       "accept", "continue")]
SCENARIOS += [(phase, b) for phase in ("connect", "rcpt_to", "data") for b in sorted(ERRORS)]
SCENARIOS += [("rcpt_to", "plain-reject"), ("data", "plain-reject")]


class Scorer:
    name = "scorer"

    @hookimpl
    async def connect(self) -> Verdict:
        return Verdict.cont(score=1.5)

    @hookimpl
    async def mail_from(self) -> Verdict:
        return Verdict.cont(score=2.0)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.decided = asyncio.Event()

    @hookimpl
    async def after_message(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.decided.set()


def judge(phase: str, behaviour: str, enforce: bool = True) -> object:
    is_async, body = BEHAVIOURS[behaviour]
    if is_async:
        async def hook(self: object) -> Any:
            result = body()
            if asyncio.iscoroutine(result):
                return await result
            return result
    else:
        def hook(self: object) -> Any:  # type: ignore[misc]
            return body()
    cls = type("Judge", (), {"name": "judge", "timeout": TIMEOUT, "enforce": enforce, phase: hookimpl(hook)})
    return cls()


@dataclass
class Seen:
    disposition: str
    reply_class: int
    decided_by: str
    score: float | None

    def matches(self, want: Expected) -> bool:
        return (self.disposition, self.reply_class, self.decided_by, self.score) == (
            want.disposition, want.reply_class, want.decided_by, want.score)


def _refused(code: int) -> str:
    return "tempfailed" if code // 100 == 4 else "rejected"


def _by(caplog: pytest.LogCaptureFixture, events: tuple[str, ...]) -> str:
    for record in reversed(caplog.records):
        fields = getattr(record, "smtpproxy_fields", {})
        if record.getMessage() in events and fields.get("by"):
            return str(fields["by"])
    return "?"


async def through_proxy(
    phase: str, behaviour: str, *, proxy_factory: ProxyFactory, sink: Sink,
    caplog: pytest.LogCaptureFixture, enforce: bool = True,
) -> Seen:
    recorder = Recorder()
    server = await proxy_factory(Scorer(), judge(phase, behaviour, enforce), recorder, upstream=sink.port)
    talk = await Talk.open(port_of(server))
    try:
        code, _ = await talk.greeting()
        if code != 220:
            return Seen(_refused(code), code // 100, _by(caplog, ("connect_rejected",)), None)
        for line, events in (("EHLO client.test", ("helo",)),
                             ("MAIL FROM:<alice@sender.test>", ("mail_from",)),
                             ("RCPT TO:<bob@dest.test>", ("rcpt_to",))):
            code, _ = await talk.cmd(line)
            if code != 250:
                return Seen(_refused(code), code // 100, _by(caplog, events), None)
        code, _ = await talk.cmd("DATA")
        assert code == 354
        talk.send(MESSAGE + b".\r\n")
        code, _ = await talk.reply()
        await asyncio.wait_for(recorder.decided.wait(), 5)
        d = recorder.decisions[0]
        assert d.reply.code == code
        return Seen(d.disposition, code // 100, d.decided_by, d.score)
    finally:
        await talk.close()


async def through_milter(phase: str, behaviour: str, milter: MilterFactory,
                         caplog: pytest.LogCaptureFixture, enforce: bool = True) -> Seen:
    recorder = Recorder()
    mta = await FakeMTA.open(await milter(Scorer(), judge(phase, behaviour, enforce), recorder))
    try:
        steps: list[tuple[codec.Command, dict[str, str], tuple[str, ...]]] = [
            (codec.Helo("client.test"), {}, ("helo",)),
            (codec.Mail(("<alice@sender.test>",)), {"i": "4ABC"}, ("mail_from",)),
            (codec.Rcpt(("<bob@dest.test>",)), {}, ("rcpt_to",)),
        ]
        answer = await mta.start()
        # What the MTA reads when the event passes: SMFIR_CONTINUE, or nothing for an event
        # the milter agreed not to answer (no plugin in the chain implements its hook).
        passed = answer == mta.passed(codec.Connect("", "U"))
        events: tuple[str, ...] = ("connect_rejected",)
        for command, macros, names in steps:
            if not passed:
                break
            # A refusal at MAIL comes with RCPT's answer (MAIL has no reply, as Postfix's own
            # smtpd_delay_reject gives it): the line that decided is any step's so far.
            events += names
            answer = await mta.event(command, **macros)
            passed = answer == mta.passed(command)
        if passed:
            answer = await mta.content(HEADERS, BODY)
            await asyncio.wait_for(recorder.decided.wait(), 5)
            d = recorder.decisions[0]
            final = answer[-1]
            if isinstance(final, codec.ReplyCode):
                assert final.text.startswith(str(d.reply.code))
            else:
                assert isinstance(final, codec.Accept | codec.Discard)
                assert (codec.Quarantine in {type(a) for a in answer}) is (d.disposition == "quarantined")
            return Seen(d.disposition, d.reply.code // 100, d.decided_by, d.score)
        assert len(answer) == 1 and isinstance(answer[0], codec.ReplyCode), answer
        code = int(answer[0].text[:3])
        return Seen(_refused(code), code // 100, _by(caplog, events), None)
    finally:
        await mta.close()


async def through_tracer(phase: str, behaviour: str, enforce: bool = True) -> Seen:
    recorder = Recorder()
    async with Tracer(chain_of(Scorer(), judge(phase, behaviour, enforce), recorder)) as tracer:
        trace = await tracer.trace(MESSAGE, sender="alice@sender.test", recipients=["bob@dest.test"],
                                   helo="client.test")
    code = int(trace.reply[:3])
    score = recorder.decisions[0].score if recorder.decisions else None
    if recorder.decisions:
        assert recorder.decisions[0].score == trace.score
    return Seen(trace.decision, code // 100, trace.decided_by, score)


async def through_conversation(phase: str, behaviour: str, enforce: bool = True) -> Seen:
    """The bare Conversation, as a front end without a medium would drive it."""
    recorder = Recorder()
    conversation = Conversation(
        chain_of(Scorer(), judge(phase, behaviour, enforce), recorder, timeout=TIMEOUT), Rules())
    session = Session(Client("192.0.2.1", 4567), transport="offline")

    def refused(refusal: Refusal) -> Seen:
        return Seen(refusal.disposition, refusal.reply.code // 100, refusal.decided_by, None)

    try:
        refusal = await conversation.connect(session)
        if refusal is None:
            refusal = await conversation.greet(session, "client.test")
        if refusal is None:
            refusal = await conversation.mail(session, Address("alice@sender.test", "alice", "sender.test"), {})
        if refusal is not None:
            return refused(refusal)
        transaction = session.transaction
        assert transaction is not None
        recipient = Recipient(Address("bob@dest.test", "bob", "dest.test"), {})
        refusal = await conversation.rcpt(session, transaction, recipient)
        if refusal is not None:
            return refused(refusal)
        conversation.accept(transaction, recipient)
        transaction.message = Message(MESSAGE)
        outcome = await conversation.end_of_message(session, transaction)
        if isinstance(outcome, Refusal):
            decision = outcome.decision(transaction.score)
        else:
            decision = outcome.decision(Reply(250, "2.0.0", "Ok"), transaction.score)
        await conversation.settle(session, transaction, decision, time.perf_counter())
        assert recorder.decisions == [decision]
        return Seen(decision.disposition, decision.reply.code // 100, decision.decided_by, decision.score)
    finally:
        await conversation.disconnect(session)


NOT_APPLICABLE = {
    ("policy", "data"): "Postfix sends a policy service no message: the data hook cannot run "
                        "there (check-config and `smtpproxy policy` name the plugin)",
}


async def through_policy(phase: str, behaviour: str, caplog: pytest.LogCaptureFixture,
                         enforce: bool = True) -> Seen | None:
    """Requests as Postfix sends them at RCPT and END-OF-MESSAGE; None: not applicable."""
    recorder = Recorder()
    chain = chain_of(Scorer(), judge(phase, behaviour, enforce), recorder, timeout=TIMEOUT)
    if ("policy", phase) in NOT_APPLICABLE:
        assert message_plugins(chain).only_message == ("judge",)  # named, never skipped silently
        return None
    service = PolicyService(chain, PolicySettings(quarantine_action="hold"))
    request = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
               "client_address": "192.0.2.1", "client_name": "unknown", "helo_name": "client.test",
               "sender": "alice@sender.test", "recipient": "bob@dest.test", "instance": "c0ffee.1"}
    try:
        action = await service.answer(request)
        if action[:1] in ("4", "5"):
            code = int(action[:3])
            return Seen(_refused(code), code // 100,
                        _by(caplog, ("connect_rejected", "helo", "mail_from", "rcpt_to")), None)
        end = await service.answer(request | {"protocol_state": "END-OF-MESSAGE", "size": "120"})
        await asyncio.wait_for(recorder.decided.wait(), 5)
        d = recorder.decisions[0]
        assert end.split(" ")[0] == {"delivered": DUNNO, "discarded": "DISCARD",
                                     "quarantined": "HOLD"}[d.disposition], (end, d)
        return Seen(d.disposition, d.reply.code // 100, d.decided_by, d.score)
    finally:
        await service.close()


@pytest.mark.parametrize(("phase", "behaviour"), SCENARIOS, ids=[f"{p}-{b}" for p, b in SCENARIOS])
async def test_every_front_end_decides_alike_through_the_conversation(  # noqa: PLR0917 - pytest fixtures
    phase: str, behaviour: str, proxy_factory: ProxyFactory, sink: Sink, milter: MilterFactory,
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    want = expected(phase, behaviour)
    phases_run: list[str] = []
    run = Conversation._run

    async def counted(self: Conversation, phase: str, *args: Any, **kwargs: Any) -> Any:
        phases_run.append(phase)
        return await run(self, phase, *args, **kwargs)

    monkeypatch.setattr(Conversation, "_run", counted)
    seen: dict[str, Seen] = {}
    front_ends = {
        "conversation": lambda: through_conversation(phase, behaviour),
        "proxy": lambda: through_proxy(phase, behaviour, proxy_factory=proxy_factory, sink=sink,
                                       caplog=caplog),
        "milter": lambda: through_milter(phase, behaviour, milter, caplog),
        "tracer": lambda: through_tracer(phase, behaviour),
        "policy": lambda: through_policy(phase, behaviour, caplog),
    }
    for name, drive in front_ends.items():
        phases_run.clear()
        result = await drive()
        if result is None:
            assert (name, phase) in NOT_APPLICABLE
            continue
        seen[name] = result
        # Every front end ran its phases through its Conversation, the judged one included.
        assert "connect" in phases_run and phase in phases_run, (name, phases_run)
    assert {name: s for name, s in seen.items() if not s.matches(want)} == {}, want
    # What the proxy said is what it did: one message upstream exactly when delivered.
    assert len(sink.messages) == (1 if want.disposition == "delivered" else 0)
    held = list((tmp_path / "quarantine").rglob("*.eml")) if (tmp_path / "quarantine").exists() else []
    assert bool(held) is (want.disposition == "quarantined")


SHADOW_BEHAVIOURS = ("reject", "tempfail", "discard", "quarantine", "accept", "continue", "raises",
                     "hangs")
SHADOW_SCENARIOS = [(phase, b) for phase in PHASES for b in SHADOW_BEHAVIOURS]


@pytest.mark.parametrize(("phase", "behaviour"), SHADOW_SCENARIOS,
                         ids=[f"{p}-{b}" for p, b in SHADOW_SCENARIOS])
async def test_a_shadowed_judge_changes_nothing_in_any_front_end(  # noqa: PLR0917 - pytest fixtures
    phase: str, behaviour: str, proxy_factory: ProxyFactory, sink: Sink, milter: MilterFactory,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """``enforce: false``: every front end delivers, with the score of the enforced plugins only,
    and its ``message`` line says what the message would have come to had the judge enforced
    (``expected`` of the enforced judge) and the shadow total."""
    caplog.set_level(logging.INFO)
    enforced = expected(phase, behaviour)
    want = Expected("delivered", 2, "delivery", 3.5)
    shadow_score = 3.5 + (0.5 if behaviour == "continue" else 0.0)
    front_ends = {
        "conversation": lambda: through_conversation(phase, behaviour, enforce=False),
        "proxy": lambda: through_proxy(phase, behaviour, proxy_factory=proxy_factory, sink=sink,
                                       caplog=caplog, enforce=False),
        "milter": lambda: through_milter(phase, behaviour, milter, caplog, enforce=False),
        "tracer": lambda: through_tracer(phase, behaviour, enforce=False),
        "policy": lambda: through_policy(phase, behaviour, caplog, enforce=False),
    }
    wrong: dict[str, Any] = {}
    for name, drive in front_ends.items():
        caplog.clear()
        seen = await drive()
        if seen is None:
            assert (name, phase) in NOT_APPLICABLE
            continue
        lines = [dict(getattr(r, "smtpproxy_fields", {})) for r in caplog.records
                 if r.getMessage() == "message"]
        line = lines[-1] if lines else {}
        got = (seen.matches(want), line.get("would"), line.get("shadow_score"))
        if got != (True, enforced.disposition, shadow_score):
            wrong[name] = (seen, got)
        if behaviour in ("reject", "tempfail", "discard", "quarantine"):
            events = [r for r in caplog.records if r.getMessage() == f"would_{behaviour}"]
            if len(events) != 1:
                wrong[f"{name} would_{behaviour}"] = len(events)
    assert wrong == {}, (enforced, want)
    assert len(sink.messages) == 1  # the proxy delivered it
    assert not (tmp_path / "quarantine").exists() or not list((tmp_path / "quarantine").rglob("*.eml"))


def test_the_oracle_never_answers_2xx_for_a_lost_message() -> None:
    for phase, behaviour in SCENARIOS:
        want = expected(phase, behaviour)
        assert (want.reply_class == 2) is (want.disposition in ("delivered", "quarantined", "discarded"))
        if behaviour in ERRORS:
            assert want.disposition == "tempfailed"
    assert Action.DISCARD.is_final


# -- the milter behind a real Postfix ----------------------------------------------------

POSTFIX_SCENARIOS = [(phase, b) for phase in ("mail_from", "rcpt_to", "data")
                     for b in ("reject", "tempfail", "discard", "quarantine", "accept", "raises",
                               "hangs", "returns-junk")]


class SwitchingJudge:
    """One judge for many scenarios: the sender's local part says ``phase--behaviour``."""

    name = "judge"
    timeout = TIMEOUT

    async def _act(self, phase: str, sender: str) -> Any:
        wanted, _, behaviour = sender.partition("--")
        if wanted != phase:
            return None
        result = BEHAVIOURS[behaviour][1]()
        return await result if asyncio.iscoroutine(result) else result

    @hookimpl
    async def mail_from(self, transaction: Any) -> Any:
        return await self._act("mail_from", transaction.envelope.sender.local)

    @hookimpl
    async def rcpt_to(self, transaction: Any) -> Any:
        return await self._act("rcpt_to", transaction.envelope.sender.local)

    @hookimpl
    async def data(self, transaction: Any) -> Any:
        return await self._act("data", transaction.envelope.sender.local)


async def test_the_milter_behind_a_real_postfix_decides_alike(
    tmp_path: Path, postfix_factory: Any
) -> None:
    from smtpproxy.milter.server import MilterServer
    from tests.conftest import make_config

    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"})
    server = MilterServer(config, chain=chain_of(Scorer(), SwitchingJudge(), timeout=TIMEOUT))
    await server.start()
    try:
        address = server.address
        assert isinstance(address, tuple)
        postfix = await asyncio.to_thread(postfix_factory, main_cf={
            "smtpd_milters": f"inet:127.0.0.1:{address[1]}", "milter_protocol": "6",
            "milter_default_action": "tempfail", "milter_command_timeout": "10s",
        })
        wrong: dict[str, tuple[int, int]] = {}
        delivered: list[str] = []
        for phase, behaviour in POSTFIX_SCENARIOS:
            want = expected(phase, behaviour)
            sender = f"{phase}--{behaviour}@sender.test"
            talk = await Talk.open(postfix.port)
            await talk.hello()
            code, _ = await talk.cmd(f"MAIL FROM:<{sender}>")
            if code == 250:
                code, _ = await talk.cmd("RCPT TO:<bob@dest.test>")
            if code == 250:
                assert (await talk.cmd("DATA"))[0] == 354
                talk.send(b"Subject: " + sender.encode() + b"\r\n\r\n" + BODY + b".\r\n")
                code, _ = await talk.reply()
            await talk.cmd("QUIT")
            await talk.close()
            if code // 100 != want.reply_class:
                wrong[sender] = (code, want.reply_class)
            if want.disposition == "delivered":
                delivered.append(sender)
            elif want.disposition == "quarantined":
                await asyncio.to_thread(postfix.wait_for_log, rf"milter-hold: .*from=<{sender}>")
        assert wrong == {}
        stored = await asyncio.to_thread(postfix.wait_for_messages, "bob", len(delivered))
        subjects = sorted(line.split(b": ", 1)[1].decode().strip() for m in stored
                          for line in m.splitlines() if line.startswith(b"Subject: "))
        assert subjects == sorted(delivered)  # discarded, held and refused ones never arrive
    finally:
        await server.stop(grace=1)
