"""Shadow mode (``enforce: false``) on the wire: a shadowed refusal lets the message through.

Through the SMTP proxy on loopback, delivering to a real capturing upstream, with metrics on
(the ``would_reject`` line and the ``smtpproxy_shadow_verdicts`` counter), and through the
milter, driven by the protocol-level fake MTA (no edit of a shadowed plugin reaches the MTA).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Message, Recipient, Verdict, hookimpl
from smtpproxy.milter import codec
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.wire.test_metrics import METRICS, eventually, value
from tests.wire.test_milter import BODY, HEADERS, FakeMTA
from tests.wire.test_milter import Factory as MilterFactory
from tests.wire.test_milter import milter as milter  # noqa: PLC0414 - the fixture

MESSAGE = b"From: a@src.test\r\nTo: bob@dest.test\r\nSubject: cheap pills\r\n\r\nBuy now.\r\n"


class Strict:
    """The rule on trial: refuses bob@ at RCPT and everything at DATA, and tags the message."""

    name = "strict"

    def __init__(self, *, enforce: bool = False) -> None:
        self.enforce = enforce

    @hookimpl
    async def rcpt_to(self, recipient: Recipient) -> Verdict | None:
        if recipient.address.local == "bob":
            return Verdict.reject("No bob here", code=550, enhanced="5.1.1", reason="trial rule")
        return None

    @hookimpl
    async def data(self, message: Message) -> Verdict:
        message.add_header("X-Strict", "seen")
        return Verdict.reject("Looks like spam", reason="pills")


def logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(r.smtpproxy_fields) for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == name and hasattr(r, "smtpproxy_fields")]


async def test_a_shadowed_reject_lets_the_message_through_the_proxy(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await proxy_factory(Strict(), upstream=sink.port, **METRICS)
    talk = await Talk.open(port_of(server))
    await talk.hello()
    assert await talk.send_message("a@src.test", ["bob@dest.test"], MESSAGE) == (
        250, "2.0.0 Ok: queued as SINK1")
    assert (await talk.cmd("QUIT"))[0] == 221
    await talk.close()
    [delivered] = sink.messages
    assert delivered.content.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")  # no X-Strict
    would = logged(caplog, "would_reject")
    assert [(w["plugin"], w["phase"], w["reply"]) for w in would] == [
        ("strict", "rcpt_to", "550 5.1.1 No bob here"), ("strict", "data", "550 5.7.1 Looks like spam")]
    assert [w["reason"] for w in would] == ["trial rule", "pills"]
    [undone] = logged(caplog, "shadow_edits_undone")
    assert undone["changes"] == ["+ X-Strict: seen"]
    [line] = logged(caplog, "message")
    assert (line["decision"], line["would"], line["would_by"]) == ("delivered", "rejected", "strict")
    samples = await eventually(server, lambda s: value(
        s, "smtpproxy_shadow_verdicts_total", plugin="strict", action="reject") == 2)
    assert value(samples, "smtpproxy_shadow_verdicts_total", plugin="strict", action="reject") == 2
    assert ("smtpproxy_shadow_verdicts_total",
            frozenset({"plugin": "strict", "action": "quarantine"}.items())) in samples  # born at 0
    # What was applied: the plugin continued.
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="strict", phase="data",
                 action="reject") == 0
    assert value(samples, "smtpproxy_plugin_verdicts_total", plugin="strict", phase="data",
                 action="continue") == 1


async def test_the_same_plugin_enforced_refuses(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(Strict(enforce=True), upstream=sink.port)
    talk = await Talk.open(port_of(server))
    await talk.hello()
    assert (await talk.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert await talk.cmd("RCPT TO:<bob@dest.test>") == (550, "5.1.1 No bob here")
    await talk.close()
    assert sink.messages == []


async def test_a_shadowed_reject_lets_the_message_through_the_milter(
    milter: MilterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    mta = await FakeMTA.open(await milter(Strict()))
    try:
        assert await mta.start() == mta.passed(codec.Connect("", "4"))  # no reply: no connect hook
        await mta.envelope("<alice@sender.test>", "<bob@dest.test>")
        answer = await mta.content(HEADERS, BODY)
    finally:
        await mta.close()
    assert not any(isinstance(a, codec.ReplyCode | codec.Reject | codec.Tempfail) for a in answer), answer
    assert not any(isinstance(a, codec.AddHeader | codec.InsertHeader) for a in answer), answer
    assert [(w["plugin"], w["phase"]) for w in logged(caplog, "would_reject")] == [
        ("strict", "rcpt_to"), ("strict", "data")]
    [line] = logged(caplog, "message")
    assert (line["decision"], line["would"], line["would_by"]) == ("delivered", "rejected", "strict")


class Hold:
    name = "hold"

    @hookimpl
    async def data(self) -> Verdict:
        return Verdict.quarantine("held for review")


async def test_an_enforced_quarantine_still_applies_and_its_record_marks_shadow_outcomes(
    proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await proxy_factory(Strict(), Hold(), upstream=sink.port)
    talk = await Talk.open(port_of(server))
    await talk.hello()
    assert (await talk.send_message("a@src.test", ["carol@dest.test"], MESSAGE))[0] == 250
    await talk.close()
    assert sink.messages == []
    [meta] = (tmp_path / "quarantine").rglob("*.json")
    record = json.loads(meta.read_text())
    shown = [(o["plugin"], o["action"], o.get("shadow", False)) for o in record["outcomes"]
             if o["phase"] == "data"]
    assert shown == [("strict", "reject", True), ("hold", "quarantine", False)]
    assert b"X-Strict" not in next(iter((tmp_path / "quarantine").rglob("*.eml"))).read_bytes()
    [line] = logged(caplog, "message")
    assert (line["decision"], line["by"], line["would"], line["would_by"]) == (
        "quarantined", "hold", "rejected", "strict")
