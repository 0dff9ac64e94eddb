"""Hot reload: new sessions get the new chain, running ones finish on theirs, bad files change nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.cli import main as cli_main
from smtpproxy.config import load_config
from smtpproxy.server import ProxyServer
from tests.conftest import Talk, port_of
from tests.daemons import LogLines
from tests.reload_plugin import recorded

Starter = Callable[..., Awaitable[ProxyServer]]


def write_config(path: Path, tag: str, *, extra: str = "", plugin_settings: str = "") -> None:
    path.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "hostname: reload.test\n"
        f"delivery:\n  type: maildir\n  path: {path.parent / 'mail'}\n"
        f"quarantine:\n  path: {path.parent / 'quarantine'}\n"
        "plugins:\n"
        "  - name: tagged\n"
        "    use: tests.reload_plugin:Tagged\n"
        f"    settings: {{tag: {tag}, record: {path.parent / 'record.txt'}{plugin_settings}}}\n"
        + extra
    )


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Starter]:
    started: list[ProxyServer] = []

    async def starter(tag: str = "old", **kwargs: Any) -> ProxyServer:
        path = tmp_path / "smtpproxy.yaml"
        write_config(path, tag, **kwargs)
        config, source = load_config(path)
        server = ProxyServer(config, source)
        await server.start()
        started.append(server)
        return server

    yield starter
    for server in started:
        await server.stop(grace=1)


async def paused_before_data(port: int) -> Talk:
    """A client that has sent MAIL and RCPT and now waits (its transaction is in flight)."""
    client = await Talk.open(port)
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@localhost>"))[0] == 250
    return client


async def finish(client: Talk) -> tuple[int, str]:
    assert (await client.cmd("DATA"))[0] == 354
    client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    reply = await client.reply()
    await client.cmd("QUIT")
    await client.close()
    return reply


async def one_message(port: int) -> tuple[int, str]:
    return await finish(await paused_before_data(port))


def reload_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records
            if getattr(r, "smtpproxy_fields", None) is not None and r.msg == "reload"]


async def wait_for(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def test_valid_reload_in_flight_session_keeps_old_chain(
    start: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    record = tmp_path / "record.txt"
    server = await start("old")
    in_flight = await paused_before_data(port_of(server))

    write_config(tmp_path / "smtpproxy.yaml", "new")
    assert await server.reload() is True
    assert recorded(record) == ["old startup-begin", "old startup-end", "new startup-begin", "new startup-end"]

    assert await one_message(port_of(server)) == (550, "5.7.1 chain new")  # a new session: new chain
    assert "old shutdown" not in recorded(record)  # the in-flight session still uses it
    assert await finish(in_flight) == (550, "5.7.1 chain old")
    await wait_for(lambda: "old shutdown" in recorded(record))  # after its last session
    assert "new shutdown" not in recorded(record)
    (event,) = reload_events(caplog)
    assert event["result"] == "ok"
    assert event["file"] == str(tmp_path / "smtpproxy.yaml")
    assert event["plugins"] == ["tagged"]
    assert event["previous_chain_sessions"] == 1
    assert event["restart_needed"] is None

    await server.stop(grace=1)
    assert recorded(record).count("new shutdown") == 1


async def test_invalid_reload_keeps_old_chain_and_names_file_line_key(
    start: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    record = tmp_path / "record.txt"
    server = await start("old")
    in_flight = await paused_before_data(port_of(server))
    path = tmp_path / "smtpproxy.yaml"
    write_config(path, "new", extra="limits:\n  max_sessions: lots\n")

    assert await server.reload() is False
    (event,) = reload_events(caplog)
    assert event["result"] == "failed"
    line = path.read_text().splitlines().index("  max_sessions: lots") + 1
    assert re.match(rf"{re.escape(str(path))}:{line}:\d+: limits\.max_sessions: ", event["error"]), event
    assert [r.levelno for r in caplog.records if getattr(r, "msg", "") == "reload"] == [logging.ERROR]

    assert await one_message(port_of(server)) == (550, "5.7.1 chain old")
    assert await finish(in_flight) == (550, "5.7.1 chain old")
    assert recorded(record) == ["old startup-begin", "old startup-end"]  # the new chain was never built


async def test_plugin_startup_failure_keeps_old_chain(
    start: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    record = tmp_path / "record.txt"
    server = await start("old")
    write_config(tmp_path / "smtpproxy.yaml", "new", plugin_settings=", fail_startup: true")

    assert await server.reload() is False
    (event,) = reload_events(caplog)
    assert event["result"] == "failed"
    assert "plugin tagged: startup failed: RuntimeError: cannot reach the policy database" in event["error"]
    assert recorded(record)[-1] == "new shutdown"  # what the new chain had started is undone
    assert "old shutdown" not in recorded(record)
    assert await one_message(port_of(server)) == (550, "5.7.1 chain old")


async def test_restart_only_sections_are_kept_and_named(
    start: Starter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    server = await start("old")
    before = server.addresses
    path = tmp_path / "smtpproxy.yaml"
    write_config(path, "new", extra="limits:\n  max_recipients: 1\n")
    path.write_text(path.read_text().replace("port: 0", "port: 2526"))  # a listener change

    assert await server.reload() is True
    (event,) = reload_events(caplog)
    assert event["restart_needed"] == ["listeners"]
    assert [r.levelno for r in caplog.records if getattr(r, "msg", "") == "reload"] == [logging.WARNING]
    assert server.addresses == before  # still listening where it was
    client = await Talk.open(port_of(server))  # the new limits apply to new sessions
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bob@localhost>"))[0] == 250
    assert (await client.cmd("RCPT TO:<carol@localhost>"))[0] == 452
    await client.close()


async def test_concurrent_reloads_run_one_at_a_time(start: Starter, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    server = await start("old")
    write_config(tmp_path / "smtpproxy.yaml", "new", plugin_settings=", startup_delay: 0.05")
    assert await asyncio.gather(server.reload(), server.reload()) == [True, True]
    assert [line for line in recorded(record) if "startup" in line][2:] == [
        "new startup-begin", "new startup-end", "new startup-begin", "new startup-end"]
    # Both replaced chains (the first, and the first reload's) shut down: no session was on them.
    await wait_for(lambda: recorded(record).count("new shutdown") == 1 and "old shutdown" in recorded(record))
    assert await one_message(port_of(server)) == (550, "5.7.1 chain new")


# -- the command line, against a real proxy process --------------------------------------


class Proxy:
    """A ``smtpproxy run`` process whose log lines we read as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                                     stderr=subprocess.PIPE, text=True, cwd=config.parent,
                                     env={**os.environ, **(env or {})})
        assert self.proc.stderr is not None
        self._lines = LogLines(self.proc.stderr)
        self.log = self._lines.lines

    def wait_line(self, pattern: str, timeout: float = 30) -> str:
        return self._lines.wait_line(pattern, timeout)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return "".join(self.log) + err


def test_reload_command_signals_the_running_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, pid_file = tmp_path / "smtpproxy.yaml", tmp_path / "run" / "smtpproxy.pid"
    pid_file.parent.mkdir()
    base = ("listeners:\n  - address: 127.0.0.1\n    port: 0\nhostname: cli.test\n"
            "delivery:\n  type: maildir\n  path: mail\npid_file: run/smtpproxy.pid\n")
    config.write_text(base)
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd's notify socket
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(30)
    proxy = Proxy(config, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        proxy.wait_line(r"event=listening ")
        assert systemd.recv(4096) == f"READY=1\nMAINPID={proxy.proc.pid}".encode()
        assert int(pid_file.read_text()) == proxy.proc.pid  # written before the listeners opened

        config.write_text(base + "plugins:\n  - name: headers\n    settings: {add: {X-Reloaded: \"1\"}}\n")
        assert cli_main(["reload", "-c", str(config)]) == 0
        assert capsys.readouterr().out == (
            f"{config}: OK; sent SIGHUP to process {proxy.proc.pid}. "
            "The proxy logs event=reload with the result.\n")
        line = proxy.wait_line(r"event=reload ")
        assert "result=ok" in line and "plugins=headers" in line
        assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", systemd.recv(4096))
        assert systemd.recv(4096) == b"READY=1"

        config.write_text(base + "limits:\n  max_sessions: lots\n")
        assert cli_main(["reload", "-c", str(config)]) == 2  # invalid: nothing is signalled
        err = capsys.readouterr().err
        assert f"{config}:10:" in err and "limits.max_sessions" in err

        config.write_text(base)
        assert cli_main(["reload", "-c", str(config), "--pid", str(proxy.proc.pid)]) == 0
        line = proxy.wait_line(r"event=reload ")
        assert "result=ok" in line and 'plugins=""' in line
    finally:
        log = proxy.stop()
    assert [systemd.recv(4096) for _ in range(3)][1:] == [b"READY=1", b"STOPPING=1"]  # 2nd reload, stop
    systemd.close()
    assert proxy.proc.returncode == 0, log
    assert log.count("event=reload ") == 2
    assert not pid_file.exists()  # removed on exit


def test_reload_command_without_a_running_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("pid_file: smtpproxy.pid\n")
    assert cli_main(["reload", "-c", str(config)]) == 1
    assert "cannot read pid file" in capsys.readouterr().err
    (tmp_path / "smtpproxy.pid").write_text("999999999\n")
    assert cli_main(["reload", "-c", str(config)]) == 1
    assert "no process 999999999" in capsys.readouterr().err
    config.write_text("hostname: x.test\n")
    assert cli_main(["reload", "-c", str(config)]) == 2
    assert "sets no pid_file; give the process id with --pid" in capsys.readouterr().err


def test_unwritable_pid_file_is_a_startup_error(tmp_path: Path) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("listeners:\n  - address: 127.0.0.1\n    port: 0\n"
                      "delivery:\n  type: maildir\n  path: mail\npid_file: missing/dir/smtpproxy.pid\n")
    done = subprocess.run([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert (f"smtpproxy: cannot start: pid_file: cannot write {tmp_path / 'missing/dir/smtpproxy.pid'}: "
            "No such file or directory") in done.stderr
