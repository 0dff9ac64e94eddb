"""``workers: N``: several proxy processes sharing each listening socket.

One Python process uses one core. With ``workers: N`` the ``smtpproxy run`` process becomes
a small supervisor: it opens every listening socket once and starts N copies of itself
(``--worker 0..N-1``), each a complete proxy that inherits those sockets and accepts from
them. One shared accept queue, not one SO_REUSEPORT socket per worker: the kernel resets the
connections waiting in a socket whose process dies, so with per-worker sockets a killed or
crashing worker took its queued clients with it; a shared queue is drained by the workers
that are still alive, and it stays open while a dead worker is restarted.
The supervisor forwards SIGHUP (reload) and SIGTERM/SIGINT (graceful stop) to every worker,
and during the stop a second SIGTERM/SIGINT too (each worker then cuts its grace short); a
SIGHUP during the stop is logged and ignored. It restarts a worker that dies, writes the pid
file and talks to systemd; the workers don't.

Each worker has its own upstream pool, rate-limit memory (use the Redis backend to share
limits) and metrics endpoint (``metrics.port`` + worker index).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from smtpproxy import eventloop
from smtpproxy.config import Config
from smtpproxy.eventlog import event, flush_logs
from smtpproxy.pidfile import remove_pid_file, write_pid_file
from smtpproxy.sdnotify import notify, ready
from smtpproxy.startup import cannot_start
from smtpproxy.watchdog import WorkerWatch, watchdog_period

__all__ = ["LISTEN_FDS_VARIABLE", "READY_FD_VARIABLE", "inherited_listener", "supervise",
           "tell_supervisor_ready"]

READY_FD_VARIABLE = "SMTPPROXY_READY_FD"
"""A worker writes one byte to this inherited pipe once it listens."""
LISTEN_FDS_VARIABLE = "SMTPPROXY_LISTEN_FDS"
"""The supervisor's listening sockets, one file descriptor per listener, comma-separated."""
RESTART_DELAY = 1.0
"""Seconds before a dead worker is started again (a crash loop must not spin)."""
STARTUP_TIMEOUT = 60.0



def tell_supervisor_ready() -> None:
    """In a worker: report that the listeners are open. Does nothing in a single process."""
    fd = os.environ.pop(READY_FD_VARIABLE, None)
    if fd is None:
        return
    flush_logs()  # this worker's lines so far (its listening line) come before the supervisor's
    try:
        os.write(int(fd), b"R")
        os.close(int(fd))
    except OSError:
        pass  # the supervisor is gone; nothing to tell


@functools.cache
def _inherited_fds() -> tuple[int, ...]:
    fds = os.environ.pop(LISTEN_FDS_VARIABLE, "")  # read once; not for the plugins' children
    return tuple(int(fd) for fd in fds.split(",") if fd)


def inherited_listener(index: int) -> socket.socket | None:
    """In a worker: the supervisor's listening socket for listener *index* (None: bind one)."""
    fds = _inherited_fds()
    return socket.socket(fileno=fds[index]) if index < len(fds) else None


def open_listeners(config: Config) -> list[socket.socket]:
    """The supervisor's listening sockets, bound once; every worker accepts from them."""
    opened: list[socket.socket] = []
    try:
        for index, listener in enumerate(config.listeners):
            family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
            try:
                sock.bind((listener.address, listener.port))
            except OSError as exc:
                raise OSError(f"listeners[{index}]: cannot listen on {listener.address}:"
                              f"{listener.port}: {exc.strerror or exc}") from exc
            sock.listen(1024)
            sock.set_inheritable(True)
    except OSError:
        for sock in opened:
            sock.close()
        raise
    return opened


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec function that makes the child get SIGTERM when we die (Linux), or None.

    A supervisor that is SIGKILLed (or crashes) cannot stop its workers, and they would go on
    holding the inherited listening socket, so a new supervisor could not bind the port.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not after fork
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_signal


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


_SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""systemd talks to the supervisor; a worker gets them from :class:`WorkerWatch`, if at all."""


class _Worker:
    def __init__(self, index: int, argv: list[str], listeners: list[socket.socket],
                 watch: WorkerWatch | None = None):
        self.index = index
        self.argv = argv
        self.listeners = listeners
        self.watch = watch
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        """It listens (and has its SIGHUP handler): before that, SIGHUP would end it."""
        self.reload_pending = False

    async def start(self) -> None:
        """Start the process and wait until it listens; RuntimeError when it cannot start."""
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}  # systemd is ours
        if self.watch is not None:
            env.update(self.watch.environment(self.index))
        env[READY_FD_VARIABLE] = str(write_fd)
        listen_fds = [sock.fileno() for sock in self.listeners]
        env[LISTEN_FDS_VARIABLE] = ",".join(map(str, listen_fds))
        self.ready = False
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, "--worker", str(self.index), env=env, pass_fds=(write_fd, *listen_fds),
                preexec_fn=_parent_death_signal(),
            )
        finally:
            os.close(write_fd)
        # The read ends with our byte, or with EOF when the worker exits (it held the only
        # other copy of the write end).
        reading = asyncio.get_running_loop().run_in_executor(None, os.read, read_fd, 1)
        try:
            ready = await asyncio.wait_for(asyncio.shield(reading), STARTUP_TIMEOUT)
        except TimeoutError:
            ready = b""
        if ready != b"R":
            code = await self.stop()
            await reading
            os.close(read_fd)
            raise RuntimeError(f"worker {self.index} did not start (exit code {code})")
        os.close(read_fd)
        self.ready = True
        if self.watch is not None:
            self.watch.watch(self.index, self.running_pid)
        event("worker_started", worker=self.index, pid=self.process.pid)
        if self.reload_pending:  # a SIGHUP came while it started: it may have read the old file
            self.reload_pending = False
            self.signal(signal.SIGHUP)

    def reload(self) -> None:
        """Forward a SIGHUP now, or once the worker is ready."""
        if self.ready:
            self.signal(signal.SIGHUP)
        else:
            self.reload_pending = True

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    def running_pid(self) -> int | None:
        """Its process id while it runs, else None."""
        if self.process is None or self.process.returncode is not None:
            return None
        return self.process.pid

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.process.wait()


async def _supervise(config: Config, argv: list[str], listeners: list[socket.socket]) -> int:
    """Run the workers; systemd watches the supervisor (eventloop.run feeds it), and the
    supervisor watches each worker with the same period."""
    period = watchdog_period()
    watch = _watch_workers(period, config.worker_count) if period is not None else None
    try:
        return await _run_workers(config, argv, listeners, watch)
    finally:
        if watch is not None:
            watch.close()


def _watch_workers(period: float, count: int) -> WorkerWatch | None:
    """The supervisor's watch over its workers, or None (logged) when its sockets cannot be
    made: the workers then run unwatched, as without WatchdogSec=, rather than not at all."""
    try:
        return WorkerWatch(period, count)
    except OSError as exc:
        event("worker_watchdog_unavailable", level=logging.WARNING, error=str(exc),
              note="the workers run without the supervisor's watchdog")
        return None


async def _run_workers(config: Config, argv: list[str], listeners: list[socket.socket],
                       watch: WorkerWatch | None) -> int:
    workers = [_Worker(i, argv, listeners, watch) for i in range(config.worker_count)]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    def reload_all() -> None:  # each worker validates and reloads the file itself
        for worker in workers:
            worker.reload()

    loop.add_signal_handler(signal.SIGHUP, reload_all)
    try:
        try:
            for worker in workers:
                await worker.start()
        except RuntimeError as exc:
            cannot_start(exc)
            await asyncio.gather(*(w.stop() for w in workers))
            return 1
        ready()
        event("workers_ready", workers=len(workers))
        watchers = {asyncio.ensure_future(_wait(w)): w for w in workers}
        stop_task = asyncio.ensure_future(stopping.wait())
        while not stopping.is_set():
            done, _ = await asyncio.wait({stop_task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop_task}:
                worker = watchers.pop(task)
                worker.ready = False
                if stopping.is_set():
                    break
                event("worker_died", level=logging.ERROR, worker=worker.index,
                      code=task.result(), note=f"restarting in {RESTART_DELAY:g}s")
                await asyncio.sleep(RESTART_DELAY)
                try:
                    await worker.start()
                except RuntimeError as exc:
                    event("worker_restart_failed", logging.ERROR, worker=worker.index, error=str(exc))
                watchers[asyncio.ensure_future(_wait(worker))] = worker
        notify("STOPPING=1")
        event("workers_stopping", workers=len(workers))

        def hurry_all(signum: int) -> None:  # a second SIGTERM/SIGINT: each worker hurries
            event("shutdown_hurried", level=logging.WARNING, signal=signal.Signals(signum).name)
            for worker in workers:
                worker.signal(signum)

        def ignore_reload() -> None:  # draining workers would only log that they ignore it
            event("signal_ignored", level=logging.WARNING, signal="SIGHUP",
                  note="shutting down; no reload")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, hurry_all, signum)
        loop.add_signal_handler(signal.SIGHUP, ignore_reload)
        for worker in workers:
            worker.signal(signal.SIGTERM)  # each finishes its sessions within shutdown_grace
        for sock in listeners:  # the port closes once every worker has closed its copy
            sock.close()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*(w.process.wait() for w in workers if w.process is not None))
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def _wait(worker: _Worker) -> int:
    assert worker.process is not None
    return await worker.process.wait()


def supervise(config: Config, config_path: str | None) -> int:
    """Run ``config.worker_count`` proxy processes until SIGTERM; the exit code of ``smtpproxy run``."""

    argv = [sys.executable, "-m", "smtpproxy", "run"]
    if config_path is not None:
        argv += ["-c", config_path]
    try:
        listeners = open_listeners(config)
    except OSError as exc:
        cannot_start(exc)
        return 1
    pid_file = Path(config.pid_file) if config.pid_file is not None else None
    if pid_file is not None:
        write_pid_file(pid_file)
    try:
        return eventloop.run(_supervise(config, argv, listeners), "asyncio")
    finally:
        for sock in listeners:
            sock.close()
        if pid_file is not None:
            remove_pid_file(pid_file)
