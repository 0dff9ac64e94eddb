"""Every front end talks to systemd the same way (``Type=notify``, ``WatchdogSec=``): ``READY=1``
with its pid once its socket is open, ``WATCHDOG=1`` twice a period while its loop turns,
``STOPPING=1`` when told to stop. The units in config/ rely on it: without READY=1 systemd
would fail the start after ``TimeoutStartSec=`` and start the MTA ordered after the milter
before the milter listens. A socket of the test stands in for systemd's (tests/notify_socket.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.console_server import console_files
from tests.daemons import LogLines, free_port
from tests.notify_socket import Systemd

FRONT_ENDS = {
    "run": "listeners:\n  - address: 127.0.0.1\n    port: {port}\ndelivery:\n  type: maildir\n  path: mail\n",
    "milter": "milter:\n  listen: inet:127.0.0.1:{port}\n",
    "policy": "policy:\n  listen: inet:127.0.0.1:{port}\n",
    "web": "",  # console_files writes it
}


@pytest.mark.parametrize("command", list(FRONT_ENDS))
def test_each_front_end_says_ready_feeds_the_watchdog_and_says_stopping(
    tmp_path: Path, systemd: Systemd, command: str
) -> None:
    port = free_port()
    if command == "web":  # the release-link pages and the console
        config = console_files(tmp_path, port)
    else:
        config = tmp_path / "smtpproxy.yaml"
        config.write_text(FRONT_ENDS[command].format(port=port))
    env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
    env.update(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", command, "-c", str(config)],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stderr is not None
    try:
        LogLines(proc.stderr).wait_line(r"event=web_listening " if command == "web" else r"event=listening ")
        time.sleep(1.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    said = systemd.wait_for(b"STOPPING=1")
    ready = said.index(f"READY=1\nMAINPID={proc.pid}".encode())  # ValueError: never ready
    assert said.count(b"WATCHDOG=1") >= 2
    assert b"STOPPING=1" in said[ready:]
