"""``logging.accepted_commands: debug`` in the processes users run: a delivered message keeps
one line at info, its ``message`` summary; what was refused keeps its line at info in the
proxy and in the milter (the front ends share eventlog.event)."""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
from pathlib import Path

import pytest

from smtpproxy.milter import codec
from tests.daemons import checked_process, free_port, smtpproxy_process
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


def _proxy_session(tmp_path: Path, level: str) -> str:
    port = free_port()
    proc, log = smtpproxy_process("run", tmp_path / "smtpproxy.yaml", PROXY.format(port=port, level=level))
    with checked_process(proc, log):
        log.wait_line(r"event=listening ")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            refused = client.sendmail("a@sender.test", ["bob@localhost", "carol@elsewhere.org"], MESSAGE)
            assert set(refused) == {"carol@elsewhere.org"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    return log.everything()


def test_a_delivered_message_keeps_its_summary_and_the_refusal_at_info(tmp_path: Path) -> None:
    text = _proxy_session(tmp_path, "info")
    lines = _session_lines(text)
    assert lines == [("info", "rcpt_to"), ("info", "message")], text
    assert re.search(r"event=rcpt_to .*recipient=carol@elsewhere.org verdict=relay_denied", text), text
    assert re.search(r"event=message .*recipients=bob@localhost .*decision=delivered", text), text


def test_at_debug_the_accepted_steps_are_there_at_debug(tmp_path: Path) -> None:
    lines = _session_lines(_proxy_session(tmp_path, "debug"))
    assert ("info", "rcpt_to") in lines and ("info", "message") in lines
    assert {event for level, event in lines if level == "debug"} == {
        "connect", "helo", "mail_from", "rcpt_to", "delivered", "disconnect"}
    assert {level for level, event in lines if event in ("connect", "disconnect")} == {"debug"}


async def test_the_milter_logs_the_same_way(tmp_path: Path) -> None:
    port = free_port()
    proc, log = smtpproxy_process(
        "milter", tmp_path / "smtpproxy.yaml",
        f"milter: {{listen: 'inet:127.0.0.1:{port}'}}\nlogging: {{accepted_commands: debug}}\n")
    with checked_process(proc, log):
        await asyncio.to_thread(log.wait_line, r"event=listening ")
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
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    text = log.everything()
    assert _session_lines(text) == [("info", "rcpt_to"), ("info", "message")], text
    assert re.search(r"event=rcpt_to .*verdict=syntax", text), text


async def test_the_policy_service_logs_the_same_way(tmp_path: Path) -> None:
    """Postfix asks at RCPT for a good and an unparsable recipient: only the second is at info."""
    from tests.wire.test_policy import Client, request

    port = free_port()
    proc, log = smtpproxy_process(
        "policy", tmp_path / "smtpproxy.yaml",
        f"policy: {{listen: 'inet:127.0.0.1:{port}'}}\nlogging: {{accepted_commands: debug}}\n")
    with checked_process(proc, log):
        await asyncio.to_thread(log.wait_line, r"event=listening ")
        client = Client(*await asyncio.open_connection("127.0.0.1", port))
        assert await client.ask(request("CONNECT")) == "DUNNO"
        assert await client.ask(request("RCPT")) == "DUNNO"
        # an address smtpproxy cannot parse: logged, and left to Postfix's own checks
        assert await client.ask(request("RCPT", recipient="not an address")) == "DUNNO"
        client.close()
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
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
