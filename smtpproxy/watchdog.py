"""systemd's watchdog (``WatchdogSec=``): a process whose event loop stops turning is restarted.

Nothing inside the process can interrupt code that holds the event loop: an endless loop, a
catastrophic regular expression or a blocking call in a plugin's async hook (a plain hook runs
in a thread, under the chain's timeout). Every session then hangs, and no timeout of the chain
ever fires. With ``WatchdogSec=`` systemd expects ``WATCHDOG=1`` at least once a period
(sd_watchdog_enabled(3)); :func:`fed` sends it from the event loop itself, twice a period, so
a loop held for a whole period misses it. systemd then sends SIGABRT (on which
:mod:`faulthandler` prints every thread's stack, the culprit's included, to the journal) and
``Restart=on-failure`` starts the proxy again.

With ``workers:`` systemd watches the supervisor, and the supervisor watches each worker the
same way (:class:`WorkerWatch`): a worker's ``$NOTIFY_SOCKET`` is a socket of the supervisor's,
a worker that misses its period gets SIGABRT, and the supervisor restarts it as after any death.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from smtpproxy.eventlog import event
from smtpproxy.sdnotify import notify

__all__ = ["WorkerWatch", "fed", "watchdog_period"]


def watchdog_period() -> float | None:
    """The period systemd watches this process with, in seconds (``$WATCHDOG_USEC``, when
    ``$WATCHDOG_PID`` is unset or this process), or None: not watched."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # set for a parent: a child of the proxy (a plugin's helper) is not watched
    try:
        period = int(usec) / 1_000_000
    except ValueError:
        return None
    return period if period > 0 else None


@contextlib.asynccontextmanager
async def fed() -> AsyncIterator[None]:
    """While the block runs, tell systemd twice a period that this event loop turns (nothing
    is sent when nothing watches the process)."""
    period = watchdog_period()
    if period is None:
        yield
        return
    if not faulthandler.is_enabled():
        with contextlib.suppress(Exception):  # no stderr to write to: the watchdog works without
            faulthandler.enable(sys.stderr, all_threads=True)  # where the loop was held, on SIGABRT
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None

    def feed() -> None:
        nonlocal handle
        notify("WATCHDOG=1")
        handle = loop.call_later(period / 2, feed)

    feed()
    try:
        yield
    finally:
        if handle is not None:
            handle.cancel()


class WorkerWatch:
    """The supervisor's watchdog over its workers, as systemd's over the supervisor: one
    datagram socket per worker (its ``$NOTIFY_SOCKET``, in a directory only this user can
    enter), the same period, and SIGABRT for a worker that has not said ``WATCHDOG=1`` for a
    whole period since it started or last said it."""

    def __init__(self, period: float, count: int) -> None:
        self.period = period
        self._directory = Path(tempfile.mkdtemp(prefix="smtpproxy-workers-"))  # mode 0700
        self._sockets: list[socket.socket] = []
        self._fed_at = [0.0] * count
        self._watched: list[Callable[[], int | None] | None] = [None] * count
        self._timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        try:
            for index in range(count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sockets.append(sock)
                sock.bind(str(self._directory / f"worker-{index}"))  # OSError: a path too long
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self._receive, index, sock)
        except BaseException:
            self.close()
            raise
        self._timer = loop.call_later(period / 2, self._check)

    def environment(self, index: int) -> dict[str, str]:
        """What worker *index* is started with: systemd's variables, naming the supervisor."""
        return {"NOTIFY_SOCKET": str(self._directory / f"worker-{index}"),
                "WATCHDOG_USEC": str(round(self.period * 1_000_000))}

    def watch(self, index: int, pid: Callable[[], int | None]) -> None:
        """Worker *index* is up; *pid* gives its process while it runs (None once it ended)."""
        self._fed_at[index] = asyncio.get_running_loop().time()
        self._watched[index] = pid

    def _receive(self, index: int, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                if b"WATCHDOG=1" in sock.recv(4096).split(b"\n"):
                    self._fed_at[index] = asyncio.get_running_loop().time()

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for index, pid_of in enumerate(self._watched):
            pid = pid_of() if pid_of is not None else None
            if pid is not None and now - self._fed_at[index] > self.period:
                event("worker_watchdog", level=logging.ERROR, worker=index, pid=pid,
                      seconds=round(now - self._fed_at[index], 1), action="SIGABRT")
                self._watched[index] = None  # once: it is restarted as after any death
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
        self._timer = loop.call_later(self.period / 2, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        shutil.rmtree(self._directory, ignore_errors=True)
