"""The offline tracer and ``smtpproxy test-message``: the proxy's semantics, without a network.

The driver is checked against the rules of the SMTP front end (relay, routes, DATA limits,
dispositions carried across phases), and the command as a user runs it: a real process
with a real configuration file, asserting on the content of its report, not on snapshots.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smtpproxy import Message, Recipient, Session, Transaction, Verdict, hookimpl
from smtpproxy.startup import StartupError
from smtpproxy.trace_report import render_text
from smtpproxy.tracer import TraceInputError, TracePolicy, Tracer
from tests.conftest import chain_of, make_config

MESSAGE = b"From: a@sender.test\nTo: bob@localhost\nX-Internal: secret\nSubject: hi\n\nHello.\n.line with a dot\n"
EXE = [sys.executable, "-m", "smtpproxy"]


class Tagger:
    name = "tagger"

    @hookimpl
    def data(self, message: Message) -> Verdict:
        message.add_header("X-Tagged", "yes")
        message.remove_header("X-Internal")
        return Verdict.cont(score=2.5, tags=("tagged",), reason="looks fine")


class Roles:
    name = "roles"

    @hookimpl
    def rcpt_to(self, session: Session, recipient: Recipient) -> Verdict | None:
        if recipient.address.local.lower() == "abuse" and session.auth_user is None:
            return Verdict.reject("Role address takes no outside mail")
        return None


class Archive:
    name = "archive"

    @hookimpl
    def data(self, transaction: Transaction) -> None:
        from smtpproxy.addresses import parse_mailbox

        transaction.envelope.add_recipient(parse_mailbox("archive@localhost", allow_utf8=False))


class At:
    """Returns a verdict at one phase."""

    def __init__(self, phase: str, verdict: Verdict, name: str = "at"):
        self.name = name
        setattr(self, phase, hookimpl(specname=phase)(lambda: verdict))


class Lifecycle:
    name = "lifecycle"

    def __init__(self, fail: bool = False):
        self.events: list[str] = []
        self.fail = fail

    @hookimpl
    def startup(self) -> None:
        self.events.append("startup")
        if self.fail:
            raise RuntimeError("cannot open the database")

    @hookimpl
    def after_message(self, session: Session, decision: object) -> None:
        self.events.append(f"after_message:{session.transport}:{decision.disposition}")  # type: ignore[attr-defined]

    @hookimpl
    def disconnect(self) -> None:
        self.events.append("disconnect")

    @hookimpl
    def shutdown(self) -> None:
        self.events.append("shutdown")


def policy(tmp_path: Path, **sections: object) -> TracePolicy:
    return TracePolicy.from_config(make_config(tmp_path, **sections))


async def trace(tmp_path: Path, *plugins: object, message: bytes = MESSAGE, **kwargs: object):  # type: ignore[no-untyped-def]
    kwargs.setdefault("sender", "a@sender.test")
    kwargs.setdefault("recipients", ["bob@localhost"])
    async with Tracer(chain_of(*plugins), policy(tmp_path)) as tracer:
        return await tracer.trace(message, **kwargs)  # type: ignore[arg-type]


async def test_edits_are_attributed_to_the_plugin_that_made_them(tmp_path: Path) -> None:
    t = await trace(tmp_path, Tagger(), Archive())
    assert t.decision == "delivered"
    assert t.reply.startswith("250 2.0.0")
    tagger, archive = t.phase("data")[0].steps
    assert tagger.plugin == "tagger" and tagger.score == 2.5 and tagger.tags == ("tagged",)
    assert tagger.changes == ("+ X-Tagged: yes", "- X-Internal")
    assert archive.changes == ("+rcpt <archive@localhost>",)
    assert t.headers_added == [("X-Tagged", "yes")]
    assert t.headers_removed == [("X-Internal", "secret")]
    assert t.envelope_changes == [("add_recipient", "archive@localhost", "archive")]
    assert t.accepted_recipients == ["bob@localhost", "archive@localhost"]
    assert t.score == 2.5 and t.tags == ["tagged"]
    # LF file → CRLF, dot-stuffing undone: the plugins saw what a client's DATA carries.
    assert t.message is not None
    assert t.message.raw.endswith(b"Hello.\r\n.line with a dot\r\n")
    assert any("LF line endings" in note for note in t.notes)


async def test_relay_rule_is_a_proxy_step_and_refused_recipients_stay_out(tmp_path: Path) -> None:
    t = await trace(tmp_path, Roles(), recipients=["bob@localhost", "eve@elsewhere.org", "abuse@localhost"])
    relay = t.phase("rcpt_to")[1]
    assert relay.subject == "eve@elsewhere.org"
    assert [s.plugin for s in relay.steps] == ["proxy"]  # no plugin ran for it
    assert relay.steps[0].reply == "554 5.7.1 <eve@elsewhere.org>: Relay access denied"
    assert "relay.domains" in relay.steps[0].reason
    assert t.refused_recipients == [
        ("eve@elsewhere.org", "554 5.7.1 <eve@elsewhere.org>: Relay access denied", "proxy"),
        ("abuse@localhost", "550 5.7.1 Role address takes no outside mail", "roles"),
    ]
    assert t.accepted_recipients == ["bob@localhost"]
    assert t.decision == "delivered"


async def test_trusted_client_may_relay(tmp_path: Path) -> None:
    async with Tracer(chain_of(Roles()), policy(tmp_path, relay={"networks": ["10.0.0.0/8"]})) as tracer:
        t = await tracer.trace(MESSAGE, sender="a@sender.test", recipients=["x@elsewhere.org"],
                               client_ip="10.1.2.3")
    assert t.decision == "delivered" and t.accepted_recipients == ["x@elsewhere.org"]


async def test_every_recipient_refused_ends_at_rcpt(tmp_path: Path) -> None:
    t = await trace(tmp_path, Roles(), Tagger(), recipients=["abuse@localhost"])
    assert t.decision == "rejected"
    assert t.decided_by == "roles"
    assert t.reply == "550 5.7.1 Role address takes no outside mail"
    assert not t.phase("data")  # DATA is never reached
    assert t.message is None


async def test_authenticated_user_passes_the_role_rule(tmp_path: Path) -> None:
    t = await trace(tmp_path, Roles(), recipients=["abuse@localhost"], auth_user="alice")
    assert t.decision == "delivered"


async def test_connect_reject_is_answered_554_and_nothing_else_runs(tmp_path: Path) -> None:
    t = await trace(tmp_path, At("connect", Verdict.reject("Go away", code=550)), Tagger())
    assert t.decision == "rejected"
    assert t.reply == "554 5.7.1 Go away"  # RFC 5321 3.1: 554 at connect
    assert t.decided_by == "at"
    assert [p.phase for p in t.phases] == ["connect"]


async def test_discard_at_mail_from_skips_the_data_chain(tmp_path: Path) -> None:
    t = await trace(tmp_path, At("mail_from", Verdict.discard("known bad sender")), Tagger())
    assert t.decision == "discarded"
    assert t.decided_by == "at" and t.reason == "known bad sender"
    data = t.phase("data")[0]
    assert data.steps == [] and data.outcome == "discard"
    assert t.headers_added == []  # the tagger never ran
    assert "not run: discarded" in render_text(t)


async def test_quarantine_at_rcpt_applies_at_end_of_data(tmp_path: Path) -> None:
    t = await trace(tmp_path, At("rcpt_to", Verdict.quarantine("suspicious recipient")), Tagger())
    assert t.decision == "quarantined"
    assert t.decided_by == "at" and t.reason == "suspicious recipient"
    assert t.phase("data")[0].steps[0].plugin == "tagger"  # the data chain still ran


async def test_data_tempfail_and_plugin_errors(tmp_path: Path) -> None:
    class Broken:
        name = "broken"

        @hookimpl
        async def data(self) -> None:
            raise ValueError("bad state")

    t = await trace(tmp_path, Tagger(), Broken())
    assert t.decision == "tempfailed"
    assert t.decided_by == "broken"
    step = t.steps_for("broken")[0]
    assert step.error == "ValueError: bad state" and step.action == "tempfail"
    assert t.reply.startswith("451 4.3.0")
    assert "ERROR ValueError: bad state" in render_text(t)


async def test_data_rules_of_the_proxy(tmp_path: Path) -> None:
    smuggled = b"Subject: x\r\n\r\nline\n.\r\nMAIL FROM:<x@y>\r\n"
    t = await trace(tmp_path, Tagger(), message=smuggled)
    assert t.decision == "rejected" and t.decided_by == "proxy"
    assert t.reply.startswith("550 5.5.2 Bare CR or LF")
    assert t.steps_for("tagger") == []
    async with Tracer(chain_of(Tagger()), policy(tmp_path, limits={"max_message_size": 1000})) as tracer:
        big = await tracer.trace(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n",
                                 sender="a@sender.test", recipients=["bob@localhost"])
    assert big.decision == "rejected" and big.reply.startswith("552 5.3.4")


async def test_routes_one_transaction_per_route(tmp_path: Path) -> None:
    delivery = {"type": "smtp", "host": "10.0.0.9", "port": 25, "tls": "none",
                "routes": [{"domains": ["*.tenants.internal", "b.test"],
                            "upstreams": [{"host": "10.0.0.2", "port": 2525}]}]}
    async with Tracer(chain_of(), policy(tmp_path, delivery=delivery,
                                         relay={"domains": ["a.test", "b.test"]})) as tracer:
        t = await tracer.trace(MESSAGE, sender="", recipients=["x@b.test", "y@a.test", "z@b.test"])
    assert t.sender == ""
    assert t.accepted_recipients == ["x@b.test", "z@b.test"]
    assert t.refused_recipients[0][0] == "y@a.test" and t.refused_recipients[0][1].startswith("452 4.5.3")
    assert [(r.destination, r.recipients) for r in t.routes] == [("10.0.0.2:2525", ("x@b.test", "z@b.test"))]


async def test_notifications_and_startup_failure(tmp_path: Path) -> None:
    life = Lifecycle()
    async with Tracer(chain_of(life), policy(tmp_path)) as tracer:
        await tracer.trace(MESSAGE, sender="a@sender.test", recipients=["bob@localhost"])
        assert life.events == ["startup", "after_message:offline:delivered", "disconnect"]
    assert life.events[-1] == "shutdown"
    failing = Lifecycle(fail=True)
    with pytest.raises(StartupError, match="lifecycle: startup failed: RuntimeError: cannot open"):
        async with Tracer(chain_of(failing), policy(tmp_path)):
            pass


async def test_bad_input_says_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(TraceInputError, match="recipient 'not an address'"):
        await trace(tmp_path, recipients=["not an address"])
    with pytest.raises(TraceInputError, match="at least one recipient"):
        await trace(tmp_path, recipients=[])


async def test_text_report_columns_line_up(tmp_path: Path) -> None:
    t = await trace(tmp_path, Roles(), Tagger(), recipients=["bob@localhost", "eve@elsewhere.org"])
    text = render_text(t, "msg.eml")
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("    ") and line.split()[0] in ("plugin", "roles", "tagger", "proxy")]
    assert len(rows) >= 5
    # The action column starts at the same offset in every phase's table.
    assert len({row.index(row.split()[1]) for row in rows}) == 1
    assert "+ X-Tagged: yes" in text and "- X-Internal: secret" in text
    assert any(line.startswith("decision  DELIVERED  250 2.0.0") for line in lines)
    assert "score 2.5" in text


# -- the command, as a user runs it ------------------------------------------------------

PLUGINS_MODULE = '''
from pydantic import BaseModel
from smtpproxy import Verdict, hookimpl

class Fixed:
    """Returns one configured verdict at data."""
    class Settings(BaseModel):
        action: str

    def __init__(self, settings):
        self.action = settings.action

    @hookimpl
    def data(self, message):
        if self.action == "reject":
            return Verdict.reject("Content refused", code=554, enhanced="5.7.1")
        if self.action == "tempfail":
            return Verdict.tempfail("Scanner busy")
        if self.action == "discard":
            return Verdict.discard("dropped")
        if self.action == "quarantine":
            return Verdict.quarantine("held")
        return Verdict.cont(score=1.5)
'''


def write_setup(tmp_path: Path, action: str, enforce: bool = True) -> tuple[Path, dict[str, str]]:
    (tmp_path / "tracer_cli_plugins.py").write_text(PLUGINS_MODULE)
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(textwrap.dedent(f"""\
        hostname: mx.test
        relay:
          domains: [localhost, "*.test"]
        delivery: {{type: smtp, host: 127.0.0.1, port: 2525, tls: none}}
        plugins:
          - name: headers
            settings:
              add: {{X-Filtered-By: "smtpproxy {{client_ip}}"}}
              remove: [X-Internal]
          - name: fixed
            use: tracer_cli_plugins:Fixed
            settings: {{action: {action}}}
            enforce: {"true" if enforce else "false"}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return config, env


def test_message(tmp_path: Path, *args: str, action: str = "continue",
                 enforce: bool = True) -> subprocess.CompletedProcess[str]:
    config, env = write_setup(tmp_path, action, enforce)
    return subprocess.run([*EXE, "test-message", *args, "-c", str(config)], capture_output=True,
                          text=True, timeout=60, env=env)


test_message.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def test_command_text_report(tmp_path: Path) -> None:
    eml = tmp_path / "one.eml"
    eml.write_bytes(MESSAGE)
    result = test_message(tmp_path, str(eml), "--from", "a@sender.test", "--rcpt", "bob@localhost",
                          "--rcpt", "x@elsewhere.org", "--client-ip", "198.51.100.7", "--helo", "mx.sender.test")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "client    198.51.100.7, HELO mx.sender.test, no TLS, not authenticated" in out
    assert "+ X-Filtered-By: smtpproxy 198.51.100.7" in out
    assert "- X-Internal: secret" in out
    assert "554 5.7.1 <x@elsewhere.org>: Relay access denied" in out
    assert "default -> 127.0.0.1:2525: <bob@localhost>" in out
    fixed = next(line for line in out.splitlines() if line.split()[:2] == ["fixed", "continue"])
    assert "+1.5" in fixed
    assert "decision  DELIVERED" in out


@pytest.mark.parametrize(("action", "code", "decision"), [
    ("reject", 3, "rejected"), ("tempfail", 4, "tempfailed"),
    ("discard", 5, "discarded"), ("quarantine", 6, "quarantined"),
])
def test_command_exit_code_tells_the_decision(tmp_path: Path, action: str, code: int, decision: str) -> None:
    eml = tmp_path / "one.eml"
    eml.write_bytes(MESSAGE)
    result = test_message(tmp_path, str(eml), "--from", "a@sender.test", "--rcpt", "bob@localhost",
                          "--json", action=action)
    assert result.returncode == code, result.stderr
    data = json.loads(result.stdout)
    assert data["decision"] == decision
    assert data["decided_by"] == "fixed"
    assert [s["plugin"] for s in data["phases"][-1]["steps"]] == ["headers", "fixed"]


def test_command_directory_summary(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    (mail / "a.eml").write_bytes(MESSAGE)
    (mail / "b.eml").write_bytes(b"Subject: b\r\n\r\nbody\r\n")
    (mail / "c.eml").write_bytes(b"Subject: c\r\n\r\nbare\nLF\r\n")  # mixed: refused as smuggling
    (mail / "notes.txt").write_text("not a message")
    result = test_message(tmp_path, str(mail), "--from", "a@sender.test", "--rcpt", "bob@localhost")
    assert result.returncode == 0, result.stderr
    assert "[1/3] a.eml: delivered" in result.stderr and "[3/3] c.eml: rejected" in result.stderr
    rows = {Path(line.split()[0]).name: line.split() for line in result.stdout.splitlines()
            if line.endswith(".eml") or ".eml " in line}
    assert rows["a.eml"][1:4] == ["delivered", "1.5", "delivery"]
    assert rows["c.eml"][1:5] == ["rejected", "0", "proxy", "550"]
    assert "notes.txt" not in result.stdout
    assert "3 message(s): 2 delivered, 1 rejected" in result.stdout
    as_json = test_message(tmp_path, str(mail), "--from", "a@sender.test", "--rcpt", "bob@localhost", "--json")
    assert [(Path(d["file"]).name, d["decision"]) for d in json.loads(as_json.stdout)] == [
        ("a.eml", "delivered"), ("b.eml", "delivered"), ("c.eml", "rejected")]


def test_command_usage_errors(tmp_path: Path) -> None:
    missing = test_message(tmp_path, str(tmp_path / "nope.eml"), "--from", "a@b.test", "--rcpt", "c@localhost")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    eml = tmp_path / "one.eml"
    eml.write_bytes(MESSAGE)
    bad = test_message(tmp_path, str(eml), "--from", "a@b.test", "--rcpt", "no spaces@localhost")
    assert bad.returncode == 2 and "recipient 'no spaces@localhost'" in bad.stderr


# -- shadow mode: both outcomes -----------------------------------------------------------


class Shadowed(At):
    enforce = False


class ShadowTagger(Tagger):
    name = "shadow_tagger"
    enforce = False


async def test_the_trace_shows_what_shadowed_plugins_would_have_done(tmp_path: Path) -> None:
    t = await trace(tmp_path, ShadowTagger(), Shadowed("data", Verdict.reject("Too spammy"), "strict"),
                    At("data", Verdict.cont(score=1.0), "real"))
    assert (t.decision, t.decided_by, t.score) == ("delivered", "delivery", 1.0)
    assert (t.would, t.would_by, t.shadow_score) == ("rejected", "strict", 3.5)
    assert t.would_reply == "550 5.7.1 Too spammy"
    assert t.shadowed == ["shadow_tagger", "strict"]
    tagger, strict, real = t.phase("data")[0].steps
    assert (tagger.shadow, strict.shadow, real.shadow) == (True, True, False)
    assert strict.action == "reject" and tagger.changes == ("+ X-Tagged: yes", "- X-Internal")
    assert t.headers_added == [] and t.headers_removed == []  # undone: the message is as it came
    text = render_text(t)
    assert "shadow:reject" in text and "undone: + X-Tagged: yes" in text
    assert "decision  DELIVERED" in text
    assert "shadow    would be REJECTED  550 5.7.1 Too spammy" in text
    assert "shadow score 3.5" in text and "shadowed (enforce: false): shadow_tagger, strict" in text
    data = t.to_dict()
    assert data["shadow"]["decision"] == "rejected" and data["shadow"]["score"] == 3.5
    assert data["phases"][-1]["steps"][1]["shadow"] is True


async def test_a_trace_without_shadowed_plugins_has_no_second_outcome(tmp_path: Path) -> None:
    t = await trace(tmp_path, Tagger())
    assert t.shadowed == [] and "shadow" not in t.to_dict() and "shadow " not in render_text(t)


async def test_a_shadowed_refusal_before_data_is_the_would_be_outcome(tmp_path: Path) -> None:
    t = await trace(tmp_path, Shadowed("mail_from", Verdict.tempfail("Greylisted"), "grey"))
    assert (t.decision, t.would, t.would_by) == ("delivered", "tempfailed", "grey")
    t = await trace(tmp_path, Shadowed("connect", Verdict.reject("Listed"), "rbl"),
                    At("helo", Verdict.reject("Bad HELO"), "helo_check"))
    assert (t.decision, t.decided_by) == ("rejected", "helo_check")
    assert (t.would, t.would_by, t.would_reply) == ("rejected", "rbl", "554 5.7.1 Listed")


def test_command_with_a_shadowed_plugin_reports_both_outcomes(tmp_path: Path) -> None:
    eml = tmp_path / "one.eml"
    eml.write_bytes(MESSAGE)
    result = test_message(tmp_path, str(eml), "--from", "a@sender.test", "--rcpt", "bob@localhost",
                          action="quarantine", enforce=False)
    assert result.returncode == 0, result.stderr  # delivered: the shadowed quarantine is not applied
    assert "decision  DELIVERED" in result.stdout
    assert "shadow    would be QUARANTINED" in result.stdout
    assert "by fixed; reason: held" in result.stdout
