"""Hypothesis: random group tables and recipient lists; the group chosen and the transaction
split always equal an independent, simple model of the rules written in docs/multi-domain.md."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.addresses import Address
from smtpproxy.config import Config
from smtpproxy.conversation import OTHER_GROUP, Conversation, Rules
from smtpproxy.registry import build_chain
from smtpproxy.session import Client, Recipient, Session

DOMAINS = ["a.test", "b.test", "x.a.test", "c.test"]
LOCALS = ["u", "v"]
USERS = ["alice", "bob"]
GLOBAL_SCORE = 1.0


@dataclass(frozen=True)
class ModelGroup:
    name: str
    recipients: tuple[str, ...]
    auth_users: tuple[str, ...]
    score: float | None  # the data plugin's score in this group; None: turned off


def selector_matches(selector: str, address: str) -> bool:
    domain = address.partition("@")[2]
    if "@" in selector:
        return selector == address
    if selector.startswith("*."):
        return domain.endswith(selector[1:])
    return domain == selector


def model_choice(groups: list[ModelGroup], address: str, user: str | None) -> str:
    """First group whose every given selector matches; else 'default'."""
    for group in groups:
        if group.auth_users and user not in group.auth_users:
            continue
        if group.recipients and not any(selector_matches(s, address) for s in group.recipients):
            continue
        return group.name
    return "default"


def model_split(groups: list[ModelGroup], recipients: list[str], user: str | None) -> list[list[str]]:
    """Transactions as a client that resends every 452 recipient gets them: the first recipient
    sets the transaction's data policy; those with the same one join it."""
    score = {g.name: g.score for g in groups} | {"default": GLOBAL_SCORE}
    left, transactions = list(recipients), []
    while left:
        key = score[model_choice(groups, left[0], user)]
        taken = [r for r in left if score[model_choice(groups, r, user)] == key]
        transactions.append(taken)
        left = [r for r in left if r not in taken]  # recipients are unique
    return transactions


selectors = st.one_of(
    st.sampled_from(DOMAINS),
    st.sampled_from(DOMAINS[:2]).map(lambda d: f"*.{d}"),
    st.builds(lambda local, d: f"{local}@{d}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS)),
)


@st.composite
def group_tables(draw: st.DrawFn) -> list[ModelGroup]:
    count = draw(st.integers(0, 4))
    groups = []
    for index in range(count):
        recipients = tuple(draw(st.lists(selectors, min_size=1, max_size=3)))
        users = tuple(draw(st.lists(st.sampled_from(USERS), max_size=1)))
        score = draw(st.sampled_from([None, GLOBAL_SCORE, 5.0, 9.0]))
        groups.append(ModelGroup(f"g{index}", recipients, users, score))
    return groups


def config_of(groups: list[ModelGroup]) -> Config:
    policies: list[dict[str, Any]] = []
    for group in groups:
        override: dict[str, Any] = ({"enabled": False} if group.score is None
                                    else {"settings": {"score": group.score}})
        policies.append({"name": group.name, "recipients": list(group.recipients),
                         "auth_users": list(group.auth_users), "plugins": {"judge": override}})
    return Config.model_validate({
        "plugins": [{"name": "judge", "use": "tests.unit.test_groups:Judge",
                     "settings": {"score": GLOBAL_SCORE}}],
        "policies": policies,
    })


async def run_split(
    config: Config, recipients: list[str], user: str | None
) -> tuple[dict[str, str], list[list[str]]]:
    chain = build_chain(config.plugins, None, policies=config.policies)
    chosen: dict[str, str] = {}
    for text in recipients:
        if chain.policies is None:  # no policies: configured: everyone is in the default group
            chosen[text] = "default"
            continue
        choice = await chain.policies.choose(text, auth_user=user)
        chosen[text] = choice.group.name
    conversation = Conversation(chain, Rules(max_recipients=1000))
    session = Session(Client("192.0.2.1", 1), transport="offline")
    session.auth_user = user
    left, transactions = list(recipients), []
    while left:
        assert await conversation.mail(session, Address("s@s.test", "s", "s.test"), {}) is None
        transaction = session.transaction
        assert transaction is not None
        deferred = []
        for text in left:
            local, _, domain = text.partition("@")
            recipient = Recipient(Address(text, local, domain))
            refusal = await conversation.rcpt(session, transaction, recipient)
            if refusal is None:
                conversation.accept(transaction, recipient)
            else:
                assert refusal.reply == OTHER_GROUP  # no route rule here: every split is a group split
                deferred.append(text)
        transactions.append([r.address.text for r in transaction.envelope.recipients])
        conversation.end_transaction(session)
        assert len(deferred) < len(left)  # every transaction takes at least its first
        left = deferred
    return chosen, transactions


addresses = st.builds(lambda local, d: f"{local}@{d}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS))


@settings(max_examples=150, deadline=None)
@given(groups=group_tables(), recipients=st.lists(addresses, min_size=1, max_size=6, unique=True),
       user=st.sampled_from([None, *USERS]))
def test_choice_and_split_equal_the_model(
    groups: list[ModelGroup], recipients: list[str], user: str | None
) -> None:
    chosen, transactions = asyncio.run(run_split(config_of(groups), recipients, user))
    assert chosen == {r: model_choice(groups, r, user) for r in recipients}
    assert transactions == model_split(groups, recipients, user)
