"""A stand-in for systemd's notify socket (sd_notify(3)): what a process under test says to
systemd (READY=1, WATCHDOG=1, STOPPING=1), each datagram with the moment it came. Point the
process's ``$NOTIFY_SOCKET`` at ``path``."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["Systemd", "systemd"]


class Systemd:
    """The notify socket: every datagram, with the moment it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, bytes]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), data))

    def wait_for(self, datagram: bytes, timeout: float = 10) -> list[bytes]:
        """What was said, once *datagram* was (the reader is a thread: it may be a moment behind)."""
        deadline = time.monotonic() + timeout
        while datagram not in (said := [data for _, data in list(self.received)]):
            assert time.monotonic() < deadline, f"never said {datagram!r}: {said}"
            time.sleep(0.05)
        return said

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, data in list(self.received) if b"WATCHDOG=1" in data.split(b"\n") and t >= since]

    def longest_silence(self, since: float) -> float:
        """The longest time between two WATCHDOG=1 since *since*."""
        return max(b - a for a, b in itertools.pairwise(self.pings(since)))

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    stand_in = Systemd(tmp_path / "notify")
    yield stand_in
    stand_in.close()
