"""Signals during the drain, against a real ``smtpproxy run`` process (issue 13 item 5).

SIGTERM starts the drain; a SIGHUP (logrotate, ``systemctl reload``) or a second SIGTERM
arriving while a message is with the upstream must neither kill the process nor make the
client retry a message the upstream took: the client hears the upstream's 250, then 421.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import milter_mta
from tests.conftest import SinkHandler, Talk, start_sink
from tests.daemons import LogLines, checked_process, free_port, smtpproxy_process

HEAD = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: drain\r\n\r\n"


class SlowData(SinkHandler):
    """Answers the end of DATA only when released; says when DATA arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_DATA(self, *args: Any) -> str:
        self.arrived.set()
        await self.release.wait()
        return await super().handle_DATA(*args)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_and_second_sigterm_during_the_drain(tmp_path: Path, workers: int) -> None:
    handler = SlowData()
    sink = await start_sink(handler)
    port = free_port()
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        f"listeners:\n  - address: 127.0.0.1\n    port: {port}\n"
        f"hostname: drain.test\nworkers: {workers}\n"
        "relay: {domains: [dest.test]}\n"
        "limits: {shutdown_grace: 0.5}\n"
        f"delivery: {{type: smtp, host: 127.0.0.1, port: {sink.port}, tls: none, "
        "data_timeout: 10, command_timeout: 5}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],  # noqa: ASYNC220 - returns at once
                            stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stderr is not None
    log = LogLines(proc.stderr)
    try:
        with checked_process(proc, log):
            for _ in range(workers):
                await asyncio.to_thread(log.wait_line, r"event=listening ")
            client = await Talk.open(port)
            await client.hello()
            assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
            assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            client.send(HEAD + b"in flight\r\n.\r\n")
            await asyncio.wait_for(handler.arrived.wait(), 10)  # the message is with the upstream

            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(log.wait_line, r"event=shutdown ")
            proc.send_signal(signal.SIGHUP)  # logrotate during the drain
            await asyncio.to_thread(log.wait_line, r"event=signal_ignored .*signal=SIGHUP")
            proc.send_signal(signal.SIGTERM)  # impatient admin
            await asyncio.to_thread(log.wait_line, r"event=shutdown_hurried ")
            # the grace is over, but the message is with the upstream: its reply is awaited
            await asyncio.to_thread(log.wait_line, r"event=shutdown_awaiting_upstream .*sessions=1")
            handler.release.set()  # the upstream answers now, well past the 0.5 s grace

            code, text = await client.reply()
            assert code == 250 and "SINK1" in text
            assert await client.reply() == (421, "4.3.2 Service shutting down, try again later")
            assert await client.closed()
            assert await asyncio.to_thread(proc.wait, 30) == 0
            assert len(sink.messages) == 1
    finally:
        handler.release.set()
        sink.server.close()


async def test_milter_survives_sighup_and_a_second_sigterm_ends_its_drain(tmp_path: Path) -> None:
    """The milter's sibling of the drain fix: handlers before the listener opens and during
    the drain. SIGHUP (it does not reload) is logged, never fatal; with an MTA connection
    still open, a second SIGTERM ends the grace period and the process exits 0."""
    from smtpproxy.milter import codec
    from tests.wire.test_milter import POSTFIX_ACTIONS, POSTFIX_PROTOCOL

    port = free_port()
    proc, log = smtpproxy_process("milter", tmp_path / "smtpproxy.yaml",
                                  f"milter: {{listen: 'inet:127.0.0.1:{port}'}}\nlimits: {{shutdown_grace: 60}}\n")
    with checked_process(proc, log):
        await asyncio.to_thread(log.wait_line, r"event=listening ")
        proc.send_signal(signal.SIGHUP)  # systemctl reload, logrotate: not a reason to die
        await asyncio.to_thread(log.wait_line, r"event=signal_ignored .*signal=SIGHUP")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # an MTA, mid-session
        writer.write(milter_mta.encode_command(codec.OptNeg(6, POSTFIX_ACTIONS, POSTFIX_PROTOCOL)))
        await asyncio.wait_for(reader.read(4), 10)
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(log.wait_line, r"event=shutdown ")
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)  # the grace is 60 s: this one ends it
        await asyncio.to_thread(log.wait_line, r"event=shutdown_hurried ")
        assert await asyncio.to_thread(proc.wait, 20) == 0
        writer.close()
