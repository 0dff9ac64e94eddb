"""score: rules over headers, decoded bodies, the envelope, other plugins' tags and auth results;
thresholds for marking, quarantining and rejecting, through a real proxy to a real sink."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from smtpproxy_plugins.score import Score

from smtpproxy import Address, Client, Envelope, Message, Session, Transaction, Verdict, hookimpl
from smtpproxy.authresults import AuthCheck, record
from tests.conftest import ProxyFactory, Sink, Talk, port_of

ROOT = Path(__file__).parents[2]


def score(**settings: Any) -> Score:
    plugin = Score(Score.Settings.model_validate(settings))
    plugin.name = "score"  # type: ignore[attr-defined]
    return plugin


class FakeSPF:
    """Stands in for a checking plugin: a tag, a score and an auth result at MAIL FROM."""

    name = "fakespf"

    def __init__(self, result: str = "fail", points: float = 1.0):
        self.result, self.points = result, points

    @hookimpl
    def mail_from(self, transaction: Transaction, sender: Address) -> Verdict:
        record(transaction, AuthCheck("spf", self.result, properties={"smtp.mailfrom": sender.text}))
        return Verdict.cont(tags=(f"spf:{self.result}",), score=self.points, reason="fake")


class FakeDNSBL:
    """A connect-phase plugin: its tag and score are in the session's results."""

    name = "fakednsbl"

    @hookimpl
    def connect(self) -> Verdict:
        return Verdict.cont(tags=("dnsbl:zen.test",), score=2.0, reason="listed")


def rule(name: str, points: float, **match: Any) -> dict[str, Any]:
    return {"name": name, "score": points, "match": match}


PLAIN = (
    b"From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: Cheap PILLS today\r\n"
    b"Message-ID: <1@sender.test>\r\n\r\nHello there.\r\n"
)

SECRET = "Buy cheap pills now, friend"
SECRET_B64 = base64.b64encode(SECRET.encode()).decode()
MULTIPART = (
    "From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="XX"\r\n\r\n'
    "--XX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    f"{SECRET_B64}\r\n"
    "--XX\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    "<html><head><style>.x{color:red}</style></head><body><p>Claim your <b>fr=\r\nee</b> prize=\r\n</p>"
    "<a href=3D\"http://evil.test/\">here</a></body></html>\r\n"
    "--XX--\r\n"
).encode()


async def send(proxy_port: int, body: bytes, sender: str = "a@sender.test",
               rcpts: tuple[str, ...] = ("bob@dest.test",)) -> tuple[int, str]:
    client = await Talk.open(proxy_port)
    await client.hello("mail.sender.test")
    reply = await client.send_message(sender, list(rcpts), body)
    await client.cmd("QUIT")
    await client.close()
    return reply


def header(content: bytes, name: str) -> list[str]:
    return re.findall(rf"^{name}: (.*)\r$", content.decode(), re.M | re.I)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name in ("smtpproxy.session", "smtpproxy_plugins.score") and r.msg == name]


# -- matching -------------------------------------------------------------------------------


async def test_header_rule_hits_and_headers_say_no_below_the_tag_threshold(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    plugin = score(rules=[
        rule("SUBJ_PILLS", 2.5, header={"name": "subject", "regex": r"cheap\s+pills"}),
        rule("SUBJ_CASE", 1.0, header={"name": "Subject", "regex": "cheap pills"}),
        rule("NO_SUCH", 9.0, header={"name": "X-Nope", "regex": "."}),
        {**rule("STRICT", 4.0, header={"name": "Subject", "regex": "cheap pills"}), "ignore_case": False},
    ])
    proxy = await proxy_factory(plugin, upstream=sink.port)
    assert await send(port_of(proxy), PLAIN) == (250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    assert header(content, "X-Spam-Score") == ["3.5"]
    assert header(content, "X-Spam-Status") == ["No, score=3.5 tests=SUBJ_PILLS,SUBJ_CASE"]
    assert header(content, "Subject") == ["Cheap PILLS today"]


async def test_header_rule_sees_rfc2047_decoded_subjects(proxy_factory: ProxyFactory, sink: Sink) -> None:
    encoded = "=?utf-8?b?" + base64.b64encode("Günstige Pillen".encode()).decode() + "?="
    body = f"From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: {encoded}\r\n\r\nx\r\n".encode()
    proxy = await proxy_factory(score(rules=[rule("DE", 1.0, header={"name": "Subject", "regex": "günstige"})]),
                                upstream=sink.port)
    await send(port_of(proxy), body)
    assert header(sink.messages[0].content, "X-Spam-Status") == ["No, score=1.0 tests=DE"]


async def test_body_rules_match_decoded_text_never_raw_base64_or_markup(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    plugin = score(rules=[
        rule("B64_DECODED", 1.0, body={"regex": r"cheap pills now"}),
        rule("B64_RAW", 10.0, body={"regex": re.escape(SECRET_B64[:16])}),
        rule("HTML_TEXT", 2.0, body={"regex": r"claim your free prize"}),
        rule("HTML_TAG", 10.0, body={"regex": r"<b>|href|color:red"}),
        rule("QP_SOFT_BREAK", 10.0, body={"regex": r"fr=\s*ee"}),
    ])
    proxy = await proxy_factory(plugin, upstream=sink.port)
    await send(port_of(proxy), MULTIPART)
    content = sink.messages[0].content
    assert SECRET_B64.encode() in content  # the body went upstream untouched
    assert header(content, "X-Spam-Status") == ["No, score=3.0 tests=B64_DECODED,HTML_TEXT"]


async def test_body_is_bounded_per_part(proxy_factory: ProxyFactory, sink: Sink) -> None:
    filler = "a" * 2000 + " "
    text = "near start " + filler * 40 + "far away"
    body = ("From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: long\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")).encode()
    plugin = score(body_max_kb=64, rules=[rule("NEAR", 1.0, body={"regex": "near start"}),
                                          rule("FAR", 1.0, body={"regex": "far away"})])
    proxy = await proxy_factory(plugin, upstream=sink.port)
    await send(port_of(proxy), body)
    assert header(sink.messages[0].content, "X-Spam-Status") == ["No, score=1.0 tests=NEAR"]


async def test_envelope_rules(proxy_factory: ProxyFactory, sink: Sink) -> None:
    plugin = score(rules=[
        rule("FROM_SENDER", 1.0, envelope={"sender": r"@sender\.test$"}),
        rule("TO_CAROL", 1.0, envelope={"recipient": r"^carol@"}),
        rule("TO_NOBODY", 9.0, envelope={"recipient": r"^nobody@"}),
        rule("LOOPBACK", 1.0, envelope={"client_ip": "127.0.0.0/8"}),
        rule("TEN_NET", 9.0, envelope={"client_ip": "10.0.0.0/8"}),
        rule("V6_NET", 9.0, envelope={"client_ip": "::/0"}),
        rule("IP_REGEX", 0.5, envelope={"client_ip": r"^127\.0\."}),
        rule("HELO_AND_SENDER", 1.0, envelope={"helo": r"^mail\.", "sender": "sender"}),
        rule("HELO_BUT_NOT_SENDER", 9.0, envelope={"helo": r"^mail\.", "sender": "other"}),
    ])
    proxy = await proxy_factory(plugin, upstream=sink.port)
    await send(port_of(proxy), PLAIN, rcpts=("bob@dest.test", "carol@dest.test"))
    assert header(sink.messages[0].content, "X-Spam-Status") == [
        "No, score=4.5 tests=FROM_SENDER,TO_CAROL,LOOPBACK,IP_REGEX,HELO_AND_SENDER"
    ]


async def test_tags_auth_results_and_earlier_scores_count(proxy_factory: ProxyFactory, sink: Sink) -> None:
    plugin = score(tag=5.0, rules=[
        rule("SPF_FAIL_TAG", 3.0, tag="spf:fail"),
        rule("SPF_PASS_TAG", -5.0, tag="spf:pass"),
        rule("SPF_FAIL_AUTH", 1.5, auth={"method": "spf", "result": "fail"}),
        rule("DKIM_FAIL", 9.0, auth={"method": "dkim", "result": "fail"}),
        rule("LISTED", 0.5, tag="dnsbl:zen.test"),
    ])
    proxy = await proxy_factory(FakeDNSBL(), FakeSPF("fail", 1.0), plugin, upstream=sink.port)
    await send(port_of(proxy), PLAIN)
    # 2.0 (connect) + 1.0 (MAIL FROM) from the fake plugins + 3.0 + 1.5 + 0.5
    assert header(sink.messages[0].content, "X-Spam-Status") == [
        "Yes, score=8.0 tests=SPF_FAIL_TAG,SPF_FAIL_AUTH,LISTED"
    ]


# -- thresholds ------------------------------------------------------------------------------

THRESHOLDS: dict[str, Any] = {"tag": 5.0, "quarantine": 10.0, "reject": 15.0, "subject_tag": "[SPAM]"}


def weighted(points: float) -> Score:
    return score(**THRESHOLDS, rules=[rule("SUBJ_PILLS", points, header={"name": "Subject", "regex": "pills"}),
                                      rule("LOOPBACK", 0.2, envelope={"client_ip": "127.0.0.1"})])


async def test_tag_threshold_marks_the_message_and_drops_forged_spam_headers(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    forged = b"X-Spam-Status: No, score=-100\r\nX-Spam-Score: -100\r\n" + PLAIN
    proxy = await proxy_factory(FakeSPF(points=1.0), weighted(5.0), upstream=sink.port)
    assert await send(port_of(proxy), forged) == (250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    assert header(content, "X-Spam-Score") == ["6.2"]
    assert header(content, "X-Spam-Status") == ["Yes, score=6.2 tests=SUBJ_PILLS,LOOPBACK"]
    assert header(content, "Subject") == ["[SPAM] Cheap PILLS today"]


async def test_quarantine_threshold_stores_the_message_with_the_rule_trace(
    proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path
) -> None:
    proxy = await proxy_factory(FakeSPF(points=1.0), weighted(9.0), upstream=sink.port)
    code, _ = await send(port_of(proxy), PLAIN)
    assert code == 250
    assert sink.messages == []
    [meta] = (tmp_path / "quarantine").glob("*.json")
    record_ = json.loads(meta.read_text())
    assert "SUBJ_PILLS=9 LOOPBACK=0.2" in record_["reason"]
    assert record_["reason"].startswith("score 10.2 (quarantine; plugins 1.0, rules 9.2)")
    [outcome] = [o for o in record_["outcomes"] if o["plugin"] == "score"]
    assert outcome["action"] == "quarantine" and "SUBJ_PILLS=9" in outcome["reason"]
    assert record_["score"] == pytest.approx(10.2)
    stored = meta.with_suffix(".eml").read_bytes()
    assert header(stored, "X-Spam-Status") == ["Yes, score=10.2 tests=SUBJ_PILLS,LOOPBACK"]


async def test_reject_threshold_refuses_with_550_and_logs_the_trace(
    proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_factory(FakeSPF(points=1.0), weighted(14.8), upstream=sink.port)
    with caplog.at_level(logging.INFO):
        reply = await send(port_of(proxy), PLAIN)
    assert reply == (550, "5.7.1 Message rejected as spam (score 16.0)")
    assert sink.messages == []
    assert not (tmp_path / "quarantine").exists() or not list((tmp_path / "quarantine").iterdir())
    [scored] = events(caplog, "score")
    assert scored["rules"] == ["SUBJ_PILLS=14.8", "LOOPBACK=0.2"]
    assert scored["score"] == pytest.approx(16.0) and scored["earlier"] == pytest.approx(1.0)
    assert scored["action"] == "reject" and scored["spam"] is True
    [message] = events(caplog, "message")
    assert message["decision"] == "rejected" and message["by"] == "score"
    assert "SUBJ_PILLS=14.8 LOOPBACK=0.2" in message["reason"]


async def test_no_hits_still_logs_and_marks(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_factory(score(rules=[rule("NEVER", 5.0, body={"regex": "zzz-never"})]), upstream=sink.port)
    with caplog.at_level(logging.INFO):
        await send(port_of(proxy), PLAIN)
    assert header(sink.messages[0].content, "X-Spam-Status") == ["No, score=0.0 tests=none"]
    [scored] = events(caplog, "score")
    assert scored["rules"] == [] and scored["action"] == "continue"


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rules": [rule("X", 1.0, body={"regex": "(unclosed"})]}, "not a valid regular expression"),
        ({"rules": [rule("X", 1.0, header={"name": "Subject", "regex": "[a-"})]}, "not a valid regular expression"),
        ({"rules": [rule("X", 1.0, envelope={"client_ip": "10.0.0.0/33("})]}, "not a valid regular expression"),
        ({"rules": [rule("X", 1.0, tag="a", body={"regex": "b"})]}, "exactly one of"),
        ({"rules": [rule("X", 1.0)]}, "exactly one of"),
        ({"rules": [rule("X", 1.0, envelope={})]}, "at least one of"),
        ({"rules": [rule("X", 1.0, tag="a"), rule("X", 2.0, tag="b")]}, "used twice"),
        ({"rules": [rule("bad name", 1.0, tag="a")]}, "rule names"),
        ({"rules": [rule("X", float("nan"), tag="a")]}, "finite"),
        ({"rules": [rule("X", 1.0, auth={"method": "spf", "result": "fail", "extra": 1})]}, "Extra inputs"),
        ({"tag": 12.0, "quarantine": 10.0}, "threshold tag"),
        ({"reject_text": "spam {nope}"}, "placeholder"),
        ({"subject_tag": "[SPAM]\r\nBcc: x"}, "control characters"),
    ],
)
def test_bad_settings_are_refused_at_load(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Score.Settings.model_validate(settings)


def test_the_documented_configuration_is_valid() -> None:
    doc = (ROOT / "docs" / "plugins" / "score.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    checked = 0
    for block in blocks:
        for spec in block.get("plugins", []) if isinstance(block, dict) else []:
            if spec.get("name") == "score":
                Score(Score.Settings.model_validate(spec.get("settings", {})))
                checked += 1
    assert checked >= 2


async def test_header_only_rules_need_no_thread_body_rules_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: a thread hand-off only when a body rule makes MIME parsing necessary."""
    from smtpproxy_plugins import score as score_module

    calls: list[object] = []
    real = score_module.run_blocking

    async def spy(function: Any, *args: Any) -> Any:
        calls.append(function)
        return await real(function, *args)

    monkeypatch.setattr(score_module, "run_blocking", spy)
    raw = b"From: a@example.org\r\nSubject: cheap pills\r\n\r\nbuy now\r\n"
    headers_only = Score(Score.Settings.model_validate({"rules": [
        {"name": "PILLS", "score": 3.0, "match": {"header": {"name": "Subject", "regex": "pills"}}}]}))
    session = Session(Client("192.0.2.1", 4000))
    tx = session.begin_transaction(Envelope(Address("a@example.org", "a", "example.org")))
    verdict = await headers_only.data(session, tx, Message(raw))
    assert verdict.score == 3.0 and calls == []
    with_body = Score(Score.Settings.model_validate({"rules": [
        {"name": "BUY", "score": 2.0, "match": {"body": {"regex": "buy now"}}}]}))
    tx = session.begin_transaction(Envelope(Address("a@example.org", "a", "example.org")))
    verdict = await with_body.data(session, tx, Message(raw))
    assert verdict.score == 2.0 and len(calls) == 1


# -- shadow mode -----------------------------------------------------------------------------


class ShadowSPF(FakeSPF):
    """The fake SPF plugin on trial: ``enforce: false``."""

    name = "shadowspf"
    enforce = False


async def test_a_shadowed_plugins_score_counts_in_the_shadow_total_only(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = score(**THRESHOLDS, rules=[rule("SPF_FAIL_TAG", 3.0, tag="spf:fail"),
                                        rule("LOOPBACK", 0.2, envelope={"client_ip": "127.0.0.1"})])
    proxy = await proxy_factory(ShadowSPF("fail", 20.0), plugin, upstream=sink.port)
    with caplog.at_level(logging.INFO):
        # 20 + 3 + 0.2 would be over reject (15): the thresholds see the enforced 0.2 only
        assert await send(port_of(proxy), PLAIN) == (250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    assert header(content, "X-Spam-Status") == ["No, score=0.2 tests=LOOPBACK"]
    assert header(content, "X-Spam-Score") == ["0.2"]
    assert header(content, "X-Spam-Shadow-Score") == ["23.2"]
    assert header(content, "Subject") == ["Cheap PILLS today"]
    [scored] = events(caplog, "score")
    assert scored["score"] == pytest.approx(0.2) and scored["action"] == "continue"
    assert scored["shadow_score"] == pytest.approx(23.2) and scored["shadow_action"] == "reject"
    [message] = events(caplog, "message")
    assert message["decision"] == "delivered" and message["score"] == pytest.approx(0.2)
    assert message["shadow_score"] == pytest.approx(20.2)  # the plugins' points, enforced and not


async def test_a_shadowed_score_plugin_reports_but_never_rejects(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    strict = score(tag=1.0, reject=1.0, rules=[rule("SUBJ_PILLS", 5.0, header={"name": "Subject", "regex": "pills"})])
    strict.enforce = False  # type: ignore[attr-defined]
    proxy = await proxy_factory(strict, upstream=sink.port)
    with caplog.at_level(logging.INFO):
        assert (await send(port_of(proxy), PLAIN))[0] == 250
    assert len(sink.messages) == 1
    [message] = events(caplog, "message")
    assert (message["decision"], message["would"], message["would_by"]) == ("delivered", "rejected", "score")
    assert (message["score"], message["shadow_score"]) == (0.0, 5.0)
    assert [r.msg for r in caplog.records if r.msg == "would_reject"] == ["would_reject"]


async def test_without_shadowed_plugins_no_shadow_header_and_forged_ones_go(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(FakeSPF(points=1.0), weighted(1.0), upstream=sink.port)
    await send(port_of(proxy), b"X-Spam-Shadow-Score: -50\r\n" + PLAIN)
    assert header(sink.messages[0].content, "X-Spam-Shadow-Score") == []
