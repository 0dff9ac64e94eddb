"""systemd's watchdog (``WatchdogSec=``, docs/operations.md): a proxy whose event loop is held
stops saying ``WATCHDOG=1``, so systemd restarts it; with ``workers:`` the supervisor does the
same for each worker.

A socket of the test stands in for systemd's notify socket (tests/notify_socket.py), and
``WATCHDOG_USEC`` is one second. The hostile plugin (tests/blocking_plugin.py) holds the loop in
an async RCPT hook, which no timeout of the chain can interrupt.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.daemons import LogLines, free_port
from tests.notify_socket import Systemd

ROOT = Path(__file__).resolve().parents[2]
PERIOD = 1.0
MESSAGE = b"From: a@sender.test\r\nSubject: watchdog\r\n\r\nHello.\r\n"


def start(tmp_path: Path, systemd: Systemd, *, workers: int, seconds: float, period: float = PERIOD,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], LogLines, int]:
    port = free_port()
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(f"listeners:\n  - address: 127.0.0.1\n    port: {port}\nworkers: {workers}\n"
                      "relay:\n  domains: [example.com]\ndelivery:\n  type: maildir\n  path: mail\n"
                      "plugins:\n  - name: blocking\n    use: tests.blocking_plugin:Blocking\n"
                      f"    settings: {{seconds: {seconds}}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET")} | (env or {})
    env.update(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC=str(int(period * 1_000_000)),
               PYTHONPATH=str(ROOT))  # tests.blocking_plugin
    proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stderr is not None
    log = LogLines(proc.stderr)
    log.wait_line(r"event=workers_ready" if workers > 1 else r"event=listening ")
    return proc, log, port


def blocked_recipient(port: int) -> threading.Thread:
    """A client whose RCPT TO holds the loop; it ends when the session does (or the block)."""
    def run() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                client.ehlo("client.test")
                client.mail("a@sender.test")
                client.rcpt("block@example.com")
        except (smtplib.SMTPException, OSError):
            pass  # a worker killed under it closes the session
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_held_event_loop_stops_feeding_systemds_watchdog(tmp_path: Path, systemd: Systemd) -> None:
    proc, _, port = start(tmp_path, systemd, workers=1, seconds=3)
    try:
        started = time.monotonic()
        time.sleep(2.2)
        assert len(systemd.pings(started)) >= 3  # twice a period while the loop turns
        blocked = time.monotonic()
        blocked_recipient(port).join(30)  # held for 3 s, then the session goes on
        time.sleep(1.2)
        assert systemd.longest_silence(started) > 2.5 * PERIOD  # systemd would have killed it after one period
        assert len(systemd.pings(blocked + 3.0)) >= 1  # and it says it again once the loop turns
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_the_supervisor_restarts_a_worker_whose_loop_is_held(tmp_path: Path, systemd: Systemd) -> None:
    period = 2 * PERIOD  # the supervisor starts a Python process meanwhile: room on a busy machine
    proc, log, port = start(tmp_path, systemd, workers=2, seconds=600, period=period)
    try:
        started = time.monotonic()
        client = blocked_recipient(port)
        line = log.wait_line(r"event=worker_watchdog ", timeout=15)
        assert "level=error" in line and "action=SIGABRT" in line
        worker = line.split(" worker=")[1].split(" ")[0]
        log.wait_line(rf"event=worker_died worker={worker} ", timeout=15)
        log.wait_line(rf"event=worker_started worker={worker} ", timeout=30)
        client.join(30)
        assert not client.is_alive()  # its session ended with the worker instead of hanging
        assert any("blocking_plugin.py" in text for text in log.lines)  # faulthandler: where it was held
        assert systemd.longest_silence(started) < period  # the supervisor's own loop turned all along
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as again:  # and mail flows again
            again.sendmail("a@sender.test", ["b@example.com"], MESSAGE)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_workers_run_unwatched_when_the_supervisor_cannot_make_their_sockets(
    tmp_path: Path, systemd: Systemd
) -> None:
    """A temporary directory whose path is too long for a Unix socket (108 octets): a warning,
    and the workers serve as without WatchdogSec=, rather than a supervisor that does not start."""
    deep = tmp_path / ("t" * 100)
    deep.mkdir()
    proc, log, port = start(tmp_path, systemd, workers=2, seconds=0, env={"TMPDIR": str(deep)})
    try:
        assert any("level=warning event=worker_watchdog_unavailable" in line for line in log.lines)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@sender.test", ["b@example.com"], MESSAGE)
        assert systemd.wait_for(b"WATCHDOG=1")  # systemd still watches the supervisor
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
