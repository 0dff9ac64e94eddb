"""The Conversation without any I/O: smtpproxy's own rules, the observer, the failure policy."""

from __future__ import annotations

from typing import Any

import pytest

from smtpproxy import Verdict, hookimpl
from smtpproxy.addresses import Address
from smtpproxy.chain import PhaseResult
from smtpproxy.conversation import OTHER_ROUTE, TOO_MANY_RECIPIENTS, Conversation, Rules
from smtpproxy.outcome import ERROR_REJECT, PROXY, Deliver, Refusal, on_plugin_failure
from smtpproxy.relay import RelayPolicy
from smtpproxy.session import Client, Outcome, Recipient, Session, Transaction
from smtpproxy.verdicts import Reply
from tests.conftest import chain_of


def address(text: str) -> Address:
    local, _, domain = text.partition("@")
    return Address(text, local, domain)


class Counter:
    name = "counter"

    def __init__(self) -> None:
        self.recipients: list[str] = []

    @hookimpl
    async def rcpt_to(self, recipient: Any) -> Verdict:
        self.recipients.append(recipient.address.text)
        return Verdict.cont(score=1.0, reason="seen")


class Log:
    """A ConversationObserver that writes down what it sees."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def phase_started(self, phase: str, subject: str) -> None:
        self.seen.append(f"begin {phase} {subject}")

    def outcome(self, outcome: Outcome) -> None:
        self.seen.append(f"outcome {outcome.plugin} {outcome.action.value}")

    def rule_refused(self, refusal: Refusal) -> None:
        self.seen.append(f"rule {refusal.reply.code}")

    def phase_finished(self, result: PhaseResult, refusal: Refusal | None) -> None:
        self.seen.append(f"end {refusal.reply.code if refusal else 'ok'}")


async def started(conversation: Conversation) -> tuple[Session, Transaction]:
    session = Session(Client("192.0.2.9", 1), transport="offline")
    assert await conversation.connect(session) is None
    assert await conversation.greet(session, "client.test") is None
    assert session.helo == "client.test"
    assert await conversation.mail(session, address("a@sender.test"), {}) is None
    assert session.transaction is not None
    return session, session.transaction


async def test_the_proxy_rules_come_before_the_chain_in_the_front_ends_order() -> None:
    counter, log = Counter(), Log()
    rules = Rules(max_recipients=2, relay=RelayPolicy.from_config(["dest.test", "other.test"], [], False),
                  route_key=lambda a: a.domain)
    conversation = Conversation(chain_of(counter), rules, observer=log)
    session, transaction = await started(conversation)

    async def rcpt(text: str) -> Refusal | None:
        recipient = Recipient(address(text), {})
        refusal = await conversation.rcpt(session, transaction, recipient)
        if refusal is None:
            conversation.accept(transaction, recipient)
        return refusal

    assert await rcpt("b@dest.test") is None
    relay = await rcpt("b@elsewhere.test")
    assert relay is not None and relay.reply.code == 554 and relay.decided_by == PROXY
    route = await rcpt("c@other.test")
    assert route is not None and route.reply == OTHER_ROUTE
    assert await rcpt("c@dest.test") is None
    limit = await rcpt("d@dest.test")
    assert limit is not None and limit.reply == TOO_MANY_RECIPIENTS
    # The chain saw only the recipients the rules let through.
    assert counter.recipients == ["b@dest.test", "c@dest.test"]
    assert [r.address.text for r in transaction.envelope.recipients] == ["b@dest.test", "c@dest.test"]
    assert log.seen[-5:] == ["begin rcpt_to c@dest.test", "outcome counter continue", "end ok",
                             "begin rcpt_to d@dest.test", "rule 452"]
    assert "rule 554" in log.seen and log.seen.count("rule 452") == 2
    # A new transaction forgets the route.
    conversation.end_transaction(session)
    assert conversation.route is None


async def test_a_rule_that_refuses_is_seen_as_its_own_step() -> None:
    log = Log()
    conversation = Conversation(chain_of(Counter()), Rules(max_recipients=0), observer=log)
    session, transaction = await started(conversation)
    refusal = await conversation.rcpt(session, transaction, Recipient(address("b@dest.test"), {}))
    assert refusal is not None and refusal.reply == TOO_MANY_RECIPIENTS
    assert log.seen[-2:] == ["begin rcpt_to b@dest.test", "rule 452"]


@pytest.mark.parametrize("phase", ["connect", "helo", "mail_from", "rcpt_to", "data"])
def test_a_plugin_failure_goes_by_the_default_action(phase: str) -> None:
    failed = Refusal(Reply(451, "4.3.0", "Local error"), "judge", "boom", failed=True)
    assert on_plugin_failure(phase, failed, "tempfail") is failed
    accepted = on_plugin_failure(phase, failed, "accept")
    assert isinstance(accepted, Deliver) and accepted.action == "deliver"
    assert accepted.reason == "plugin error; milter.default_action accept: boom"
    rejected = on_plugin_failure(phase, failed, "reject")
    assert isinstance(rejected, Refusal) and rejected.failed
    assert rejected.reply.code == (554 if phase == "connect" else ERROR_REJECT.code)
    # A plugin's own refusal is no failure: it stands whatever the default action says.
    own = Refusal(Reply(550, "5.7.1", "No"), "judge", "no")
    assert all(on_plugin_failure(phase, own, a) is own for a in ("tempfail", "accept", "reject"))
