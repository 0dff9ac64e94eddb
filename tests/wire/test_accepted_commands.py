"""``logging.accepted_commands: debug`` in the processes users run: a delivered message keeps
one line at info, its ``message`` summary; what was refused keeps its line at info in the
proxy and in the milter (the front ends share eventlog.event)."""

from __future__ import annotations

import asyncio
import re
import smtplib
from pathlib import Path

import pytest

from smtpproxy.milter import codec
from tests.daemons import free_port, smtpproxy_serving
from tests.wire.test_milter import BODY, HEADERS, FakeMTA

MESSAGE = b"From: a@sender.test\r\nTo: bob@localhost\r\nSubject: quiet\r\n\r\nHello.\r\n"
PROXY = (
    "listeners:\n  - address: 127.0.0.1\n    port: {port}\n"
    "hostname: quiet.test\n"
    "delivery:\n  type: maildir\n  path: mail\n"
    "logging:\n  level: {level}\n  accepted_commands: debug\n"
)
SESSION_EVENTS = r"event=(connect|helo|starttls|mail_from|rcpt_to|upstream_rcpt|delivered|message|disconnect) "


def _session_lines(text: str) -> list[tuple[str, str]]:
    """(level, event) of every session line, in order."""
    return re.findall(r"level=(\w+) " + SESSION_EVENTS, text)


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        refused = client.sendmail("a@sender.test", ["bob@localhost", "carol@elsewhere.org"], MESSAGE)
        assert set(refused) == {"carol@elsewhere.org"}


async def _proxy_session(tmp_path: Path, level: str) -> str:
    port = free_port()
    async with smtpproxy_serving("run", tmp_path / "smtpproxy.yaml", PROXY.format(port=port, level=level)) as (_, log):
        await asyncio.to_thread(_send, port)
    return log.everything()


async def test_a_delivered_message_keeps_its_summary_and_the_refusal_at_info(tmp_path: Path) -> None:
    text = await _proxy_session(tmp_path, "info")
    lines = _session_lines(text)
    assert lines == [("info", "rcpt_to"), ("info", "message")], text
    assert re.search(r"event=rcpt_to .*recipient=carol@elsewhere.org verdict=relay_denied", text), text
    assert re.search(r"event=message .*recipients=bob@localhost .*decision=delivered", text), text


async def test_at_debug_the_accepted_steps_are_there_at_debug(tmp_path: Path) -> None:
    lines = _session_lines(await _proxy_session(tmp_path, "debug"))
    assert ("info", "rcpt_to") in lines and ("info", "message") in lines
    assert {event for level, event in lines if level == "debug"} == {
        "connect", "helo", "mail_from", "rcpt_to", "delivered", "disconnect"}
    assert {level for level, event in lines if event in ("connect", "disconnect")} == {"debug"}


async def test_the_milter_logs_the_same_way(tmp_path: Path) -> None:
    port = free_port()
    async with smtpproxy_serving(
        "milter", tmp_path / "smtpproxy.yaml",
        f"milter: {{listen: 'inet:127.0.0.1:{port}'}}\nlogging: {{accepted_commands: debug}}\n",
    ) as (_, log):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        mta = FakeMTA(reader, writer)
        await mta.start()
        await mta.envelope()
        refused = await mta.event(codec.Rcpt(("<no address>",)))
        assert refused and not isinstance(refused[0], codec.Continue)
        assert await mta.content(HEADERS, BODY) == [codec.Accept()]
        mta.send(codec.Quit())
        assert await mta.closed()
        await asyncio.to_thread(log.wait_line, r"event=message .*decision=delivered")
    text = log.everything()
    assert _session_lines(text) == [("info", "rcpt_to"), ("info", "message")], text
    assert re.search(r"event=rcpt_to .*verdict=syntax", text), text


async def test_the_policy_service_logs_the_same_way(tmp_path: Path) -> None:
    """Postfix asks at RCPT for a good and an unparsable recipient: only the second is at info."""
    from tests.wire.test_policy import Client, request

    port = free_port()
    async with smtpproxy_serving(
        "policy", tmp_path / "smtpproxy.yaml",
        f"policy: {{listen: 'inet:127.0.0.1:{port}'}}\nlogging: {{accepted_commands: debug}}\n",
    ) as (_, log):
        client = Client(*await asyncio.open_connection("127.0.0.1", port))
        assert await client.ask(request("CONNECT")) == "DUNNO"
        assert await client.ask(request("RCPT")) == "DUNNO"
        # an address smtpproxy cannot parse: logged, and left to Postfix's own checks
        assert await client.ask(request("RCPT", recipient="not an address")) == "DUNNO"
        client.close()
        await asyncio.sleep(0.2)
    text = log.everything()
    assert [line for line in _session_lines(text) if line[0] == "info"] == [("info", "rcpt_to")], text
    assert re.search(r"level=info event=rcpt_to .*verdict=syntax", text), text


@pytest.mark.parametrize("text", ["accepted_commands: warning", "accepted_commands: true"])
def test_only_info_or_debug_are_taken(tmp_path: Path, text: str) -> None:
    from tests.wire.test_cli import run_cli

    config = tmp_path / "smtpproxy.yaml"
    config.write_text(f"logging:\n  {text}\n")
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode != 0
    assert re.search(r"smtpproxy.yaml:2.*logging.accepted_commands", result.stdout + result.stderr), result
