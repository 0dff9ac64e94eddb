"""A private systemd-journald for tests: Debian's, in a journal namespace of its own.

``systemd-journald NAMESPACE`` listens under ``/run/systemd/journal.NAMESPACE/`` and stores
under ``/var/log/journal/MACHINE-ID.NAMESPACE``, apart from the system's journal
(systemd-journald.service(8), "Journal namespaces"); it needs no systemd as process 1, only
root. A test connects a process's stderr to it as systemd connects a service's (the stdout
stream's header, then lines; ``$JOURNAL_STREAM`` names the socket) and reads back with
journalctl what journald filed. Tests skip with the reason only where journald is not
installed or the tests do not run as root (CI has both).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import stop_process

__all__ = ["Journal", "journal"]

JOURNALD = Path("/lib/systemd/systemd-journald")


@dataclass
class Journal:
    namespace: str
    process: subprocess.Popen[bytes]

    @property
    def runtime(self) -> Path:
        return Path(f"/run/systemd/journal.{self.namespace}")

    def stream(self, identifier: str, unit: str = "") -> socket.socket:
        """A connection to the journal as systemd makes one for a service's stderr:
        ``SyslogIdentifier=`` *identifier*, priority info, ``SyslogLevelPrefix=yes`` (the
        default: a line's leading ``<N>`` is its priority, and is taken off). With *unit*
        journald files the lines under that unit and applies its rate limit (a stream from
        root may name its unit, as PID 1's do)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.runtime / "stdout"))
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit, priority, level prefix, forward to syslog, to kmsg, to the console
        sock.sendall(f"{identifier}\n{unit}\n6\n1\n0\n0\n0\n".encode())
        return sock

    @contextlib.contextmanager
    def rate_limit(self, unit: str, burst: int) -> Iterator[None]:
        """*unit* with ``LogRateLimitBurst=`` *burst*, passed to journald as PID 1 passes it (a
        symlink in /run/systemd/units; journald multiplies it by 1-6 by free journal space).
        Only a unit of this journal's own name, which no real unit has."""
        assert unit.startswith(self.namespace)
        link = Path(f"/run/systemd/units/log-rate-limit-burst:{unit}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(str(burst))
        try:
            yield
        finally:
            link.unlink()

    @staticmethod
    def environment(stream: socket.socket) -> dict[str, str]:
        """The environment of a process whose stderr is *stream*, as systemd sets it."""
        status = os.fstat(stream.fileno())
        return dict(os.environ, JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}")

    def entries(self, identifier: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            ["journalctl", f"--namespace={self.namespace}", "--output=json", "--no-pager",
             f"SYSLOG_IDENTIFIER={identifier}"],
            capture_output=True, timeout=30, check=False)
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_for(self, identifier: str, text: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The entries of *identifier* once one of them contains *text* (polled, not slept on)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries(identifier)
            if any(text in str(entry.get("MESSAGE", "")) for entry in entries):
                return entries
            if time.monotonic() > deadline:
                last = [str(e.get("MESSAGE"))[:120] for e in entries[-3:]]
                raise AssertionError(f"no journal entry with {text!r} among {len(entries)}, the last: {last}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.runtime, ignore_errors=True)
        for storage in (*Path("/var/log/journal").glob(f"*.{self.namespace}"),  # persistent
                        *Path("/run/log/journal").glob(f"*.{self.namespace}")):  # no /var/log/journal
            shutil.rmtree(storage, ignore_errors=True)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    if not JOURNALD.exists() or shutil.which("journalctl") is None:
        pytest.skip("systemd-journald is not installed: apt-get install systemd")
    if os.geteuid() != 0:
        pytest.skip("a private systemd-journald needs root")
    machine_id = Path("/etc/machine-id")
    if not machine_id.exists() or not machine_id.read_text().strip():
        pytest.skip("journald stores nothing without /etc/machine-id: run systemd-machine-id-setup "
                    "(.ci/run does)")
    namespace = f"smtpproxytest{secrets.token_hex(4)}"
    log = tmp_path / "journald.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(JOURNALD), namespace], stdout=out, stderr=subprocess.STDOUT)
    found = Journal(namespace, process)
    deadline = time.monotonic() + 15
    while not (found.runtime / "stdout").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            found.stop()
            raise RuntimeError(f"systemd-journald {namespace} did not start: {log.read_text()}")
        time.sleep(0.02)
    yield found
    found.stop()
