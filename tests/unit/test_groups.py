"""Policy groups (smtpproxy.groups): the configuration, the choice of a group per recipient, the
chains built once, and the transaction split in the Conversation (docs/multi-domain.md)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field

from smtpproxy import Verdict, hookimpl
from smtpproxy.addresses import Address
from smtpproxy.config import ConfigError, load_config
from smtpproxy.conversation import (
    GROUP_LOOKUP_FAILED,
    GROUPS_NOTE,
    OTHER_GROUP,
    OTHER_ROUTE,
    Conversation,
    Rules,
)
from smtpproxy.groups import Policies
from smtpproxy.outcome import PROXY, Refusal
from smtpproxy.registry import build_chain, resolve
from smtpproxy.session import Client, Recipient, Session, Transaction
from smtpproxy.tables import Backend, Table, Tables, install

PLUGIN = "tests.unit.test_groups:Judge"


class JudgeSettings(BaseModel):
    model_config = {"extra": "forbid"}
    score: float = Field(default=0.0, ge=0)
    refuse: list[str] = []


class Judge:
    """Refuses configured recipients at rcpt_to, gives a configured score at data; counts
    its instances."""

    Settings = JudgeSettings
    built = 0

    def __init__(self, settings: JudgeSettings) -> None:
        type(self).built += 1
        self.settings = settings

    @hookimpl
    async def rcpt_to(self, recipient: Any) -> Verdict | None:
        if recipient.address.text in self.settings.refuse:
            return Verdict.reject("not here", code=550, enhanced="5.1.1")
        return None

    @hookimpl
    async def data(self) -> Verdict:
        return Verdict.cont(score=self.settings.score)


class Gate:
    """A plugin with only an rcpt_to hook: groups that differ in it share transactions."""

    Settings = JudgeSettings

    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings

    @hookimpl
    async def rcpt_to(self, recipient: Any) -> Verdict | None:
        if recipient.address.text in self.settings.refuse:
            return Verdict.reject("gated", code=550, enhanced="5.7.1")
        return None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


BASE = f"""
plugins:
  - name: judge
    use: "{PLUGIN}"
    settings: {{score: 1.0}}
  - name: gate
    use: "tests.unit.test_groups:Gate"
"""


def built(tmp_path: Path, policies: str, extra: str = "") -> Policies:
    config, source = load_config(write(tmp_path, BASE + extra + policies), environ={})
    chain = build_chain(config.plugins, source, table_names=config.tables, policies=config.policies)
    assert chain.policies is not None
    policies_: Policies = chain.policies
    return policies_


def address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(text, local, domain)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("policies", "where", "message"), [
    ("policies:\n  - name: a\n    recipients: [a.test]\n  - name: a\n    recipients: [b.test]\n",
     (10, "policies[1].name"), "group name 'a' is already used by policies[0]"),
    ("policies:\n  - name: a\n    recipients: [a.test]\n    plugins: {nosuch: {enabled: false}}\n",
     (10, "policies[0].plugins.nosuch"), "no plugin named 'nosuch' in plugins: (gate, judge)"),
    ("policies:\n  - name: default\n    recipients: [a.test]\n",
     (8, "policies[0].name"), "the group named 'default' takes every recipient"),
    ("policies:\n  - name: default\n  - name: b\n    recipients: [b.test]\n",
     (8, "policies[0].name"), "the 'default' group takes every recipient, so the groups after it"),
    ("policies:\n  - name: a\n    recipients: ['@a.test']\n",
     (9, "policies[0].recipients[0]"), "must be a domain, '*.domain', an address or 'table:NAME'"),
    ("policies:\n  - name: a\n    recipients: ['table:nosuch']\n",
     (9, "policies[0].recipients[0]"), "no table named 'nosuch' in tables"),
    ("policies:\n  - name: A\n    recipients: [a.test]\n",
     (8, "policies[0].name"), "must consist of lower-case letters"),
])
def test_configuration_errors_name_file_line_and_key(
    tmp_path: Path, policies: str, where: tuple[int, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE + policies), environ={})
    (problem,) = info.value.problems
    assert (problem.line, problem.key) == where, str(info.value)
    assert message in problem.message
    assert problem.file.endswith("smtpproxy.yaml")


def test_override_settings_are_validated_by_the_plugin_with_the_overrides_location(tmp_path: Path) -> None:
    policies = """policies:
  - name: strict
    recipients: [a.test]
    plugins:
      judge:
        settings: {score: -1}
"""
    config, source = load_config(write(tmp_path, BASE + policies), environ={})
    with pytest.raises(ConfigError) as info:
        build_chain(config.plugins, source, policies=config.policies)
    (problem,) = info.value.problems
    assert problem.key == "policies[0].plugins.judge.settings.score"
    assert problem.line == 12 and "greater than or equal to 0" in problem.message
    unknown = policies.replace("score: -1", "scor: 2")
    config, source = load_config(write(tmp_path, BASE + unknown), environ={})
    with pytest.raises(ConfigError) as info:
        build_chain(config.plugins, source, policies=config.policies)
    assert info.value.problems[0].key == "policies[0].plugins.judge.settings.scor"


def test_chains_are_built_once_and_identical_settings_share_one_instance(tmp_path: Path) -> None:
    judge = resolve(PLUGIN)  # the class the configuration loads (this module, as imported by name)
    judge.built = 0  # type: ignore[attr-defined]
    policies = built(tmp_path, """policies:
  - name: same
    recipients: [same.test]
    plugins: {judge: {settings: {score: 1.0}}}
  - name: strict
    recipients: [strict.test]
    plugins: {judge: {settings: {score: 9.0}}}
  - name: quiet
    recipients: [quiet.test]
    plugins: {judge: {enabled: false}}
""")
    assert judge.built == 2  # type: ignore[attr-defined] # the global one (shared with "same") and strict's
    plugins = {g.name: dict(g.chain.phase_plugins("data")) for g in policies.by_name.values()}
    assert plugins["same"]["judge"] is plugins["default"]["judge"]
    assert plugins["strict"]["judge"] is not plugins["default"]["judge"]
    assert plugins["quiet"] == {}
    assert policies.by_name["same"].key == policies.default.key
    assert policies.by_name["strict"].key != policies.default.key


# ----------------------------------------------------------------------------- selection


class Directory(Backend):
    """An LDAP-like table in memory that can be taken down."""

    remote = True

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries
        self.down = False

    async def lookup(self, key: str) -> tuple[str, ...] | None:
        if self.down:
            raise ConnectionRefusedError("directory down")
        value = self.entries.get(key)
        return (value,) if value is not None else None


SELECTION = """tables:
  people: {type: inline, entries: {}}
policies:
  - name: vip
    recipients: [boss@corp.test]
  - name: submission
    recipients: [corp.test]
    auth_users: [alice]
  - name: internal
    recipients: [corp.test]
    client_networks: [10.0.0.0/8]
  - name: port
    listeners: [587]
  - name: corp
    recipients: [corp.test, '*.corp.test']
  - name: ldap
    recipients: ['table:people']
"""


@pytest.mark.parametrize(("rcpt", "session", "group", "why"), [
    ("boss@corp.test", {}, "vip", "recipient boss@corp.test"),
    ("Boss+tag@Corp.Test", {}, "vip", "recipient boss@corp.test"),
    ("x@corp.test", {"auth_user": "Alice"}, "submission", "domain corp.test, auth user Alice"),
    ("x@corp.test", {"auth_user": "bob"}, "corp", "domain corp.test"),
    ("x@corp.test", {"client_ip": "10.1.2.3"}, "internal", "domain corp.test, client 10.1.2.3"),
    ("x@other.test", {"local_port": 587}, "port", "listener port 587"),
    ("x@eu.corp.test", {}, "corp", "domain *.corp.test"),
    ("carol@uni.test", {}, "ldap", "table people has carol@uni.test"),
    ("dave@uni.test", {}, "ldap", "table people has @uni.test"),
    ("x@corp.test.evil", {}, "default", "no group selects it"),
])
async def test_the_first_group_whose_selectors_all_match_is_chosen(
    tmp_path: Path, rcpt: str, session: dict[str, Any], group: str, why: str
) -> None:
    policies = built(tmp_path, SELECTION)
    directory = Directory({"carol@uni.test": "yes", "@uni.test": "staff"})
    previous = install(Tables([Table("people", directory)]))
    try:
        choice = await policies.choose(rcpt, **session)
    finally:
        install(previous)
    assert (choice.group.name, choice.why) == (group, why)


async def test_a_selector_table_that_is_down_tempfails_and_never_gives_the_default(tmp_path: Path) -> None:
    policies = built(tmp_path, SELECTION)
    directory = Directory({})
    directory.down = True
    previous = install(Tables([Table("people", directory)]))
    try:
        conversation = Conversation(policies.default.chain, Rules())
        session, transaction = await started(conversation)
        # A static selector before the table still answers without it.
        assert await conversation.rcpt(session, transaction, Recipient(address("x@corp.test"))) is None
        refusal = await conversation.rcpt(session, transaction, Recipient(address("carol@uni.test")))
    finally:
        install(previous)
    assert refusal is not None and refusal.reply == GROUP_LOOKUP_FAILED
    assert refusal.reply.code == 451 and refusal.reply.enhanced == "4.3.0"


# ----------------------------------------------------------------------------- the conversation


async def started(conversation: Conversation, **session_fields: Any) -> tuple[Session, Transaction]:
    session = Session(Client("192.0.2.9", 1), transport="offline")
    for name, value in session_fields.items():
        setattr(session, name, value)
    assert await conversation.connect(session) is None
    assert await conversation.greet(session, "client.test") is None
    assert await conversation.mail(session, address("a@sender.test"), {}) is None
    assert session.transaction is not None
    return session, session.transaction


TENANTS = """policies:
  - name: gated
    recipients: [gated.test]
    plugins: {gate: {settings: {refuse: [no@gated.test]}}}
  - name: strict
    recipients: [strict.test]
    plugins: {judge: {settings: {score: 9.0}}}
"""


async def test_groups_that_differ_before_data_share_a_transaction_others_get_452(tmp_path: Path) -> None:
    policies = built(tmp_path, TENANTS)
    conversation = Conversation(policies.default.chain, Rules())
    session, transaction = await started(conversation)

    async def rcpt(text: str) -> Refusal | None:
        recipient = Recipient(address(text))
        refusal = await conversation.rcpt(session, transaction, recipient)
        if refusal is None:
            conversation.accept(transaction, recipient)
        return refusal

    assert await rcpt("a@plain.test") is None
    assert await rcpt("b@gated.test") is None  # only its rcpt_to plugin differs: same key
    gated = await rcpt("no@gated.test")  # the group's own rcpt_to settings decide
    assert gated is not None and gated.reply.code == 550 and gated.decided_by == "gate"
    other = await rcpt("c@strict.test")
    assert other is not None and other.reply == OTHER_GROUP
    assert transaction.notes[GROUPS_NOTE] == {"a@plain.test": "default", "b@gated.test": "gated"}
    # The next transaction starts with the deferred recipient, on its group's data chain.
    conversation.end_transaction(session)
    assert await conversation.mail(session, address("a@sender.test"), {}) is None
    assert session.transaction is not None
    transaction = session.transaction
    assert await rcpt("c@strict.test") is None
    assert (await rcpt("a@plain.test")) == Refusal(OTHER_GROUP, PROXY, other.reason)
    from smtpproxy.message import Message
    transaction.message = Message(b"Subject: x\r\n\r\nbody\r\n")
    await conversation.end_of_message(session, transaction)
    assert transaction.results.score == 9.0


async def test_routes_and_groups_are_one_rule(tmp_path: Path) -> None:
    policies = built(tmp_path, TENANTS)
    conversation = Conversation(policies.default.chain, Rules(route_key=lambda a: "r1" if a.domain == "r1.test"
                                                              else "default"))
    session, transaction = await started(conversation)
    first = Recipient(address("a@plain.test"))
    assert await conversation.rcpt(session, transaction, first) is None
    conversation.accept(transaction, first)
    route = await conversation.rcpt(session, transaction, Recipient(address("a@r1.test")))
    assert route is not None and route.reply == OTHER_ROUTE


class Early:
    """Refuses the sender bad@sender.test at MAIL; records the recipients it sees at RCPT."""

    seen: ClassVar[list[str]] = []

    @hookimpl
    async def mail_from(self, sender: Address) -> Verdict | None:
        if sender.text == "bad@sender.test":
            return Verdict.reject("bad sender", code=550, enhanced="5.7.1")
        return None

    @hookimpl
    async def rcpt_to(self, recipient: Any) -> None:
        type(self).seen.append(recipient.address.text)


async def test_connect_helo_and_mail_run_on_the_default_chain(tmp_path: Path) -> None:
    """The group is unknown before the first RCPT: a group that turns a plugin off does not
    turn it off for those phases (docs/multi-domain.md, "Before RCPT"), only from RCPT on."""
    extra = '  - name: early\n    use: "tests.unit.test_groups:Early"\n'
    policies = built(tmp_path, """policies:
  - name: quiet
    recipients: [quiet.test]
    plugins: {early: {enabled: false}}
""", extra)
    early = resolve("tests.unit.test_groups:Early")
    early.seen.clear()  # type: ignore[attr-defined]
    conversation = Conversation(policies.default.chain, Rules())
    session = Session(Client("192.0.2.9", 1), transport="offline")
    assert await conversation.connect(session) is None
    assert await conversation.greet(session, "client.test") is None
    refusal = await conversation.mail(session, address("bad@sender.test"), {})
    assert refusal is not None and refusal.decided_by == "early"  # applies at once, whatever the group
    conversation.end_transaction(session)
    assert await conversation.mail(session, address("good@sender.test"), {}) is None
    assert session.transaction is not None
    for text in ("a@quiet.test", "b@plain.test"):
        assert await conversation.rcpt(session, session.transaction, Recipient(address(text))) is None
    assert early.seen == ["b@plain.test"]  # type: ignore[attr-defined]  # off for the quiet group at RCPT


async def test_the_tracer_names_each_recipients_group_and_why(tmp_path: Path) -> None:
    from smtpproxy.trace_report import render_text
    from smtpproxy.tracer import Tracer

    path = write(tmp_path, BASE + "relay: {domains: [plain.test, gated.test, strict.test]}\n" + TENANTS)
    config, source = load_config(path, environ={})
    async with Tracer.from_config(config, source) as tracer:
        trace = await tracer.trace(b"Subject: hi\r\n\r\nbody\r\n", sender="s@sender.test",
                                   recipients=["a@gated.test", "b@plain.test", "c@strict.test"])
    assert trace.groups == [("a@gated.test", "gated", "domain gated.test"),
                            ("b@plain.test", "default", "no group selects it"),
                            ("c@strict.test", "strict", "domain strict.test")]
    assert trace.accepted_recipients == ["a@gated.test", "b@plain.test"]
    assert [(r, reply[:9]) for r, reply, _ in trace.refused_recipients] == [("c@strict.test", "452 4.5.3")]
    report = render_text(trace)
    assert "policy groups\n    <a@gated.test>  gated  (domain gated.test)" in report
    assert trace.to_dict()["envelope"]["groups"][2] == {"recipient": "c@strict.test", "group": "strict",
                                                        "why": "domain strict.test"}


async def test_the_message_line_and_the_metrics_carry_the_groups(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from smtpproxy.message import Message
    from smtpproxy.metrics import NullRecorder
    from smtpproxy.session import Decision
    from smtpproxy.verdicts import Reply

    class Counted(NullRecorder):
        def __init__(self) -> None:
            self.groups: list[tuple[str, str]] = []

        def group_message(self, group: str, decision: str) -> None:
            self.groups.append((group, decision))

    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    metrics = Counted()
    policies = built(tmp_path, TENANTS)
    conversation = Conversation(policies.default.chain, Rules(), metrics=metrics)
    session, transaction = await started(conversation)
    for text in ("b@gated.test", "a@plain.test"):
        recipient = Recipient(address(text))
        assert await conversation.rcpt(session, transaction, recipient) is None
        conversation.accept(transaction, recipient)
    transaction.message = Message(b"Subject: x\r\n\r\nbody\r\n")
    decision = Decision("delivered", Reply(250, "2.0.0", "OK"), "delivery")
    await conversation.settle(session, transaction, decision, time.perf_counter())
    (line,) = [r.smtpproxy_fields for r in caplog.records if r.msg == "message"]  # type: ignore[attr-defined]
    assert line["group"] == "default,gated"
    assert metrics.groups == [("default", "delivered"), ("gated", "delivered")]
    rcpt_lines = [r.smtpproxy_fields for r in caplog.records if r.msg == "rcpt_to"]  # type: ignore[attr-defined]
    assert [f["group"] for f in rcpt_lines] == ["gated", "default"]


async def test_a_group_can_shadow_a_plugin_and_that_is_its_own_transaction(tmp_path: Path) -> None:
    """enforce: false in a group's override: the group's verdicts are only would-be ones; a
    shadowed data plugin makes another transaction key than the enforced one."""
    from smtpproxy.tracer import Tracer

    text = """plugins:
  - name: score
    settings:
      tag: 5
      reject: 100
      rules: [{name: OFFER, score: 6, match: {header: {name: Subject, regex: offer}}}]
relay: {domains: [trial.test, plain.test]}
policies:
  - name: trial
    recipients: [trial.test]
    plugins:
      score: {enforce: false, settings: {reject: 5}}
"""
    config, source = load_config(write(tmp_path, text), environ={})
    async with Tracer.from_config(config, source) as tracer:
        trial = await tracer.trace(b"Subject: special offer\r\n\r\nbody\r\n", sender="s@sender.test",
                                   recipients=["a@trial.test", "b@plain.test"])
        plain = await tracer.trace(b"Subject: special offer\r\n\r\nbody\r\n", sender="s@sender.test",
                                   recipients=["b@plain.test"])
    assert trial.accepted_recipients == ["a@trial.test"]  # b@plain.test: 452, another key
    assert trial.decision == "delivered" and trial.would == "rejected" and trial.shadowed == ["score"]
    assert plain.decision == "delivered" and plain.score == 6  # the global threshold: 100
