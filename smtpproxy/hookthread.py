"""The thread a plugin's plain (non-async) hooks run on, off the event loop.

A plain hook may block (a synchronous library, a file, ``time.sleep``): on the event loop
that would freeze every other session and no timeout could interrupt it. So each plugin
with plain hooks gets one daemon thread, and its calls run there one at a time, in order,
as they did on the loop, so a plain plugin needs no locks of its own. The chain waits for a
call with the plugin's ``timeout``; a call that overruns is abandoned (its result, and any
later one of the same call, is ignored) and the plugin's ``on_error`` policy applies. A
plugin stuck for good only ever delays its own later calls, which time out in turn: the
proxy fails closed, never open, and never waits on it to exit (the thread is a daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HookThread"]


@dataclass(slots=True)
class _Job:
    function: Callable[..., Any]
    args: Sequence[Any]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[Any, BaseException | None]]
    abandoned: bool = field(default=False)


class HookThread:
    """Runs one plugin's plain hooks in its own daemon thread, one call at a time."""

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Stop the thread when the chain that owns this object is gone (after a reload).
        weakref.finalize(self, self._queue.put, None)

    async def call(
        self, function: Callable[..., Any], args: Sequence[Any]
    ) -> tuple[Any, BaseException | None]:
        """``function(*args)`` on the thread: (result, None) or (None, what it raised).

        Whatever the function raises, ``BaseException`` included, comes back as a value;
        cancelling the await (the chain's timeout) abandons a call that has not finished.
        """
        loop = asyncio.get_running_loop()
        job = _Job(function, args, contextvars.copy_context(), loop, loop.create_future())
        self._start()
        self._queue.put(job)
        try:
            return await job.future
        finally:
            job.abandoned = True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_work, args=(self._queue,), name=f"smtpproxy-hook-{self.name}", daemon=True
                )
                self._thread.start()


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The thread's loop; it holds the queue, not the HookThread, so that can be collected."""
    while (job := jobs.get()) is not None:
        if job.abandoned:
            continue
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.context.run(job.function, *job.args)
        except BaseException as exc:  # handed back to the chain as the plugin's error
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        del job, result, error


def _settle(
    future: asyncio.Future[tuple[Any, BaseException | None]], result: Any, error: BaseException | None
) -> None:
    if not future.done():
        future.set_result((result, error))
