"""Under systemd, each line reaches the journal with its own priority (docs/operations.md, Logs).

A private systemd-journald (tests/journald.py) receives ``smtpproxy run``'s stderr as it
receives a service's. Without the ``<N>`` prefix journald files every line at priority info:
``journalctl -p warning`` finds no warning, and the warnings count against the same rate limit
as the info lines a busy gateway writes by the thousand.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import closed_port
from tests.daemons import free_port
from tests.journald import Journal


@contextmanager
def proxy_in_journal(journal: Journal, tmp_path: Path, *, workers: int = 1, unit: str = "") -> Iterator[int]:
    """``smtpproxy run`` with its stderr in *journal*, as systemd starts it; its upstream is
    down. Yields the port, once the proxy is listening."""
    port = free_port()
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(f"listeners:\n  - address: 127.0.0.1\n    port: {port}\nworkers: {workers}\n"
                      "relay:\n  domains: [example.com]\n"
                      f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {closed_port()}\n")
    stream = journal.stream("smtpproxy", unit)
    proxy = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                             stdout=subprocess.DEVNULL, stderr=stream.fileno(),
                             env=journal.environment(stream))
    stream.close()  # the proxy holds it now, as a service holds the one systemd gave it
    try:
        journal.wait_for("smtpproxy", "event=workers_ready" if workers > 1 else "event=listening")
        yield port
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(30)


def refused_at_rcpt(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        code, _ = client.rcpt("b@example.com")
    return code


def _event(entry: dict[str, Any]) -> str:
    message = str(entry.get("MESSAGE", ""))
    return message.split(" event=", 1)[1].split(" ", 1)[0] if " event=" in message else ""


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
def test_each_line_reaches_the_journal_with_its_priority(journal: Journal, tmp_path: Path, workers: int) -> None:
    with proxy_in_journal(journal, tmp_path, workers=workers) as port:
        assert 400 <= refused_at_rcpt(port) < 500  # the upstream is down: upstream_down, a warning
        entries = journal.wait_for("smtpproxy", "event=disconnect")
    priorities = {_event(entry): entry["PRIORITY"] for entry in entries}
    assert priorities["upstream_down"] == "4"
    assert priorities["listening"] == priorities["connect"] == priorities["disconnect"] == "6"
    assert all(str(entry["MESSAGE"]).startswith("ts=") for entry in entries)  # the prefix taken off


def test_a_flood_of_info_lines_does_not_take_the_warnings_with_it(journal: Journal, tmp_path: Path) -> None:
    """journald drops a unit's lines past its rate limit, counting each priority apart: a
    warning with its own priority still gets through when the info lines no longer do."""
    unit = f"{journal.namespace}.service"
    with journal.rate_limit(unit, 20), proxy_in_journal(journal, tmp_path, unit=unit) as port:
        for _ in range(60):  # connect, helo, disconnect: 180 info lines, past 20 times 1 to 6
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
        assert 400 <= refused_at_rcpt(port) < 500
        entries = journal.wait_for("smtpproxy", "event=upstream_down", timeout=15)
    assert len([e for e in entries if _event(e) == "connect"]) < 61  # info lines were dropped
    assert [e["PRIORITY"] for e in entries if _event(e) == "upstream_down"] == ["4"]
