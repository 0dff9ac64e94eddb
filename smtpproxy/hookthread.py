"""The threads plain (non-async) hooks run on, off the event loop.

A plain hook may block (a synchronous library, a file, ``time.sleep``): on the event loop
that would freeze every other session and no timeout could interrupt it. So plain hooks run
in one bounded pool of daemon threads (:data:`POOL_SIZE`), calls of different sessions side
by side, as ``loop.run_in_executor`` would run them. The chain waits for a call with the
plugin's ``timeout``; a call that overruns is abandoned (what it returns later is ignored)
and the plugin's ``on_error`` policy applies. A call stuck for good holds one thread; if
stuck calls ever hold them all, later plain hooks wait, time out and tempfail: the proxy
fails closed, never open, and never waits on them to exit (the threads are daemons, unlike
``concurrent.futures``' workers, which the interpreter joins at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["POOL_SIZE", "HookPool", "hook_pool"]

POOL_SIZE = 32
"""Threads for plain hooks, all plugins together."""


@dataclass(slots=True)
class _Job:
    function: Callable[..., Any]
    args: Sequence[Any]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[Any, BaseException | None]]
    abandoned: bool = field(default=False)


class HookPool:
    """Daemon threads, started as calls need them, up to ``size``; one queue of calls."""

    def __init__(self, size: int = POOL_SIZE):
        self.size = size
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a call
        self._queued = 0  # calls no thread has taken yet

    async def call(
        self, function: Callable[..., Any], args: Sequence[Any]
    ) -> tuple[Any, BaseException | None]:
        """``function(*args)`` on a pool thread: (result, None) or (None, what it raised).

        Whatever the function raises, ``BaseException`` included, comes back as a value;
        cancelling the await (the chain's timeout) abandons a call that has not finished.
        """
        loop = asyncio.get_running_loop()
        job = _Job(function, args, contextvars.copy_context(), loop, loop.create_future())
        with self._lock:
            self._queued += 1
            if self._queued > self._idle and self._threads < self.size:  # a burst gets a thread each
                self._threads += 1
                self._idle += 1
                threading.Thread(target=self._work, name=f"smtpproxy-hook-{self._threads}",
                                 daemon=True).start()
        self._queue.put(job)
        try:
            return await job.future
        finally:
            job.abandoned = True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                self._queued -= 1
                self._idle -= 1
            try:
                if not job.abandoned:
                    _run(job)
            finally:
                with self._lock:
                    self._idle += 1


def _run(job: _Job) -> None:
    result: Any = None
    error: BaseException | None = None
    try:
        result = job.context.run(job.function, *job.args)
    except BaseException as exc:  # handed back to the chain as the plugin's error
        error = exc
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)


_pool: HookPool | None = None


def hook_pool() -> HookPool:
    """The process-wide pool (created on first use)."""
    global _pool  # noqa: PLW0603 - one pool per process, like smtpproxy.blocking's
    if _pool is None:
        _pool = HookPool()
    return _pool


def _settle(
    future: asyncio.Future[tuple[Any, BaseException | None]], result: Any, error: BaseException | None
) -> None:
    if not future.done():
        future.set_result((result, error))
