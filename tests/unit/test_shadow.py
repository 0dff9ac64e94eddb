"""Shadow mode (``enforce: false``) in the chain and the decision rules, without sockets.

A shadowed plugin runs, but nothing it says is applied: not its verdicts, not its error (it
can never tempfail mail), not its edits; what it would have done is logged (``would_*``),
its score counts apart, and the would-be outcome is decided by the same rules as the real one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from smtpproxy import Action, Message, Transaction, Verdict, hookimpl
from smtpproxy.addresses import Address
from smtpproxy.config import Config
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.outcome import Deliver, Refusal
from smtpproxy.pytest_plugin import chain_of
from smtpproxy.session import Client, Decision, Recipient, Results, Session
from smtpproxy.verdicts import Reply

MESSAGE = b"From: a@src.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"
VERDICTS = {
    "reject": lambda: Verdict.reject("No thanks", code=554, enhanced="5.7.1", reason="too strict"),
    "tempfail": lambda: Verdict.tempfail("Later", code=450, enhanced="4.7.1", reason="not sure"),
    "quarantine": lambda: Verdict.quarantine("looks odd"),
    "discard": lambda: Verdict.discard("trap address"),
}
DISPOSITION = {"reject": "rejected", "tempfail": "tempfailed", "quarantine": "quarantined",
               "discard": "discarded"}


def address(text: str) -> Address:
    local, _, domain = text.partition("@")
    return Address(text, local, domain)


class Judge:
    """Says *verdict* in *phase*; with ``enforce = False`` it is shadowed."""

    def __init__(self, name: str, phase: str, verdict: Any, *, enforce: bool = True,
                 on_error: str = "tempfail") -> None:
        self.name, self.enforce, self.on_error = name, enforce, on_error
        self.calls = 0

        async def hook() -> Any:
            self.calls += 1
            result = verdict() if callable(verdict) else verdict
            if isinstance(result, BaseException):
                raise result
            return result

        setattr(self, phase, hookimpl(specname=phase)(hook))


class Editor:
    """Edits the message and envelope at data, adds points and a tag."""

    name = "editor"
    enforce = False

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> Verdict:
        message.add_header("X-Shadow", "was here")
        message.remove_header("Subject")
        message.replace_body(b"rewritten\r\n")
        transaction.envelope.add_recipient(address("archive@dest.test"))
        transaction.envelope.set_sender(address("other@src.test"))
        return Verdict.cont(score=7.0, tags=("editor:hit",))


class Scorer:
    name = "scorer"

    @hookimpl
    async def connect(self) -> Verdict:
        return Verdict.cont(score=1.0, tags=("scorer:seen",))


async def converse(*plugins: object, recipients: tuple[str, ...] = ("b@dest.test",)) -> tuple[
        Decision | Refusal, Session, Conversation]:
    """One message through a bare Conversation: the decision (or the refusal before DATA)."""
    conversation = Conversation(chain_of(list(plugins), timeout=1.0), Rules())
    session = Session(Client("192.0.2.1", 4567), transport="offline")
    try:
        refusal = await conversation.connect(session)
        refusal = refusal or await conversation.greet(session, "client.test")
        refusal = refusal or await conversation.mail(session, address("a@src.test"), {})
        if refusal is not None:
            return refusal, session, conversation
        transaction = session.transaction
        assert transaction is not None
        for text in recipients:
            recipient = Recipient(address(text), {})
            if await conversation.rcpt(session, transaction, recipient) is None:
                conversation.accept(transaction, recipient)
        if not transaction.envelope.recipients:
            return Refusal(Reply(550, "5.1.1", "no recipients"), "test"), session, conversation
        transaction.message = Message(MESSAGE)
        outcome = await conversation.end_of_message(session, transaction)
        if isinstance(outcome, Refusal):
            decision = outcome.decision(transaction.score)
        else:
            decision = outcome.decision(Reply(250, "2.0.0", "Ok"), transaction.score)
        await conversation.settle(session, transaction, decision, time.perf_counter())
        return decision, session, conversation
    finally:
        await conversation.disconnect(session)


def logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(r.smtpproxy_fields) for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == name and hasattr(r, "smtpproxy_fields")]


@pytest.mark.parametrize("phase", ["connect", "helo", "mail_from", "rcpt_to", "data"])
@pytest.mark.parametrize("action", sorted(VERDICTS))
async def test_a_shadowed_verdict_is_not_applied_but_logged_and_would_be(
    action: str, phase: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    after = Judge("after", phase, Verdict.cont(score=0.5))
    decision, _, _ = await converse(Judge("trial", phase, VERDICTS[action], enforce=False), after)
    assert isinstance(decision, Decision)
    assert (decision.disposition, decision.decided_by) == ("delivered", "delivery")
    assert after.calls == 1  # the phase went on past the shadowed verdict
    [would] = logged(caplog, f"would_{action}")
    assert (would["plugin"], would["phase"]) == ("trial", phase)
    assert would["reason"]
    if action in ("reject", "tempfail"):
        assert would["reply"] == ("554 5.7.1 No thanks" if action == "reject" else "450 4.7.1 Later")
    [line] = logged(caplog, "message")
    assert line["decision"] == "delivered"
    assert (line["would"], line["would_by"]) == (DISPOSITION[action], "trial")
    assert line["score"] == line["shadow_score"] == 0.5


async def test_an_enforced_verdict_in_the_same_chain_still_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    decision, _, _ = await converse(
        Judge("trial", "data", VERDICTS["reject"], enforce=False),
        Judge("real", "data", VERDICTS["quarantine"]),
    )
    assert isinstance(decision, Decision)
    assert (decision.disposition, decision.decided_by) == ("quarantined", "real")
    [line] = logged(caplog, "message")
    assert (line["would"], line["would_by"]) == ("rejected", "trial")


async def test_an_enforced_refusal_first_leaves_the_shadowed_plugin_unasked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    trial = Judge("trial", "mail_from", VERDICTS["quarantine"], enforce=False)
    refusal, _, _ = await converse(Judge("real", "mail_from", VERDICTS["reject"]), trial)
    assert isinstance(refusal, Refusal) and refusal.decided_by == "real"
    assert trial.calls == 0 and logged(caplog, "would_quarantine") == []


async def test_a_shadowed_discard_outranks_a_shadowed_quarantine_by_the_same_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await converse(Judge("q", "rcpt_to", VERDICTS["quarantine"], enforce=False),
                   Judge("d", "data", VERDICTS["discard"], enforce=False))
    [line] = logged(caplog, "message")
    assert (line["decision"], line["would"], line["would_by"]) == ("delivered", "discarded", "d")


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
async def test_a_shadowed_plugin_that_fails_never_tempfails_mail(
    on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    decision, _, _ = await converse(
        Judge("trial", "rcpt_to", lambda: ValueError("boom"), enforce=False, on_error=on_error))
    assert isinstance(decision, Decision) and decision.disposition == "delivered"
    [error] = logged(caplog, "plugin_error")
    assert error["shadow"] is True and error["plugin"] == "trial"
    [line] = logged(caplog, "message")
    if on_error == "tempfail":  # what it would have done: a tempfail in its name
        [would] = logged(caplog, "would_tempfail")
        assert would["reply"] == "451 4.3.0 Temporary local problem, please try again later"
        assert (line["would"], line["would_by"]) == ("tempfailed", "trial")
    else:
        assert logged(caplog, "would_tempfail") == [] and line["would"] == "delivered"


async def test_a_recipient_only_a_shadowed_plugin_refuses_is_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    class PicksOne:
        name, enforce = "picky", False

        @hookimpl
        async def rcpt_to(self, recipient: Recipient) -> Verdict | None:
            return Verdict.reject("no") if recipient.address.local == "b" else None

    decision, _, _ = await converse(PicksOne(), recipients=("b@dest.test", "c@dest.test"))
    assert isinstance(decision, Decision) and decision.disposition == "delivered"
    [line] = logged(caplog, "message")
    assert line["recipients"] == ["b@dest.test", "c@dest.test"]
    assert line["would"] == "delivered"  # c would still have had it
    caplog.clear()
    decision, _, _ = await converse(PicksOne(), recipients=("b@dest.test",))
    [line] = logged(caplog, "message")
    assert (line["decision"], line["would"], line["would_by"]) == ("delivered", "rejected", "picky")


async def test_a_would_be_refused_recipient_the_front_end_then_refuses_does_not_count() -> None:
    """b@ is refused by the shadowed plugin and then by the front end (say, the upstream at
    RCPT): it is in neither envelope, so c@ alone decides what would have happened."""

    class PicksOne:
        name, enforce = "picky", False

        @hookimpl
        async def rcpt_to(self, recipient: Recipient) -> Verdict | None:
            return Verdict.reject("no") if recipient.address.local == "b" else None

    conversation = Conversation(chain_of([PicksOne()]), Rules())
    session = Session(Client("192.0.2.1", 4567), transport="offline")
    assert await conversation.connect(session) is None
    assert await conversation.mail(session, address("a@src.test"), {}) is None
    transaction = session.transaction
    assert transaction is not None
    assert await conversation.rcpt(session, transaction, Recipient(address("b@dest.test"), {})) is None
    # the front end refuses b@ itself: no accept()
    c = Recipient(address("c@dest.test"), {})
    assert await conversation.rcpt(session, transaction, c) is None
    conversation.accept(transaction, c)
    transaction.message = Message(MESSAGE)
    assert await conversation.end_of_message(session, transaction) == Deliver("deliver", "delivery")
    assert conversation.would(transaction) == Deliver("deliver", "delivery")


async def test_a_shadowed_plugins_edits_are_undone_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    seen: list[Message] = []

    class Looker:
        name = "looker"

        @hookimpl
        async def data(self, transaction: Transaction, message: Message) -> None:
            seen.append(message)
            assert [r.address.text for r in transaction.envelope.recipients] == ["b@dest.test"]
            assert transaction.envelope.sender.text == "a@src.test"

    decision, _, _ = await converse(Editor(), Looker())
    assert isinstance(decision, Decision) and decision.disposition == "delivered"
    [message] = seen
    assert message.raw == MESSAGE and not message.modified and message.get("X-Shadow") is None
    [undone] = logged(caplog, "shadow_edits_undone")
    assert undone["plugin"] == "editor" and undone["changes"] == [
        "+ X-Shadow: was here", "- Subject", "body replaced", "+rcpt <archive@dest.test>",
        "sender <other@src.test>"]


async def test_shadowed_scores_and_tags_count_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    decision, _, _ = await converse(Scorer(), Editor())
    assert isinstance(decision, Decision) and decision.score == 1.0
    [line] = logged(caplog, "message")
    assert (line["score"], line["shadow_score"], line["would"]) == (1.0, 8.0, "delivered")
    results = Results()
    chain = chain_of([Scorer(), Judge("trial", "connect", Verdict.cont(score=3, tags=("t:x",)),
                                      enforce=False)])
    session = Session(Client("192.0.2.1", 1))
    await chain.run("connect", results, session=session)
    assert (results.score, results.shadow_score) == (1.0, 3.0)
    assert (results.tags, results.shadow_tags) == ({"scorer:seen"}, {"t:x"})
    assert [o.shadow for o in results] == [False, True]


async def test_without_shadowed_plugins_the_message_line_is_as_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await converse(Scorer())
    [line] = logged(caplog, "message")
    assert "would" not in line and "shadow_score" not in line


async def test_a_shadowed_accept_does_not_skip_the_enforced_plugins_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    refusal, _, _ = await converse(Judge("allow", "mail_from", Verdict.accept("listed"), enforce=False),
                                   Judge("real", "mail_from", VERDICTS["reject"]))
    assert isinstance(refusal, Refusal) and refusal.decided_by == "real"
    chain = chain_of([Judge("allow", "helo", Verdict.accept("listed"), enforce=False),
                      Judge("real", "helo", VERDICTS["tempfail"])])
    result = await chain.run("helo", Results(), session=Session(Client("192.0.2.1", 1)), hostname="h")
    assert result.verdict is not None and result.verdict.action is Action.TEMPFAIL
    assert result.would is not None and result.would.decided_by == "allow"  # it would have let it by


def test_enforce_is_an_ordinary_plugin_option_default_true(tmp_path: Any) -> None:
    base = {"listeners": [{"address": "127.0.0.1", "port": 0}],
            "delivery": {"type": "maildir", "path": str(tmp_path)}}
    config = Config.model_validate({**base, "plugins": [{"name": "a"}, {"name": "b", "enforce": False}]})
    assert [p.enforce for p in config.plugins] == [True, False]
    with pytest.raises(ValueError, match="enforce"):
        Config.model_validate({**base, "plugins": [{"name": "b", "enforce": "no"}]})


def test_deliver_says_its_disposition() -> None:
    assert [Deliver(a, "x").disposition for a in ("deliver", "discard", "quarantine")] == [
        "delivered", "discarded", "quarantined"]
