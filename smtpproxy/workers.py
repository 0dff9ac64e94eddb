"""``workers: N``: several proxy processes sharing each listening port (SO_REUSEPORT).

One Python process uses one core. With ``workers: N`` the ``smtpproxy run`` process becomes
a small supervisor: it starts N copies of itself (``--worker 0..N-1``), each a complete proxy
binding the same ports with SO_REUSEPORT, so the kernel spreads new connections across them.
The supervisor forwards SIGHUP (reload) and SIGTERM/SIGINT (graceful stop) to every worker,
restarts a worker that dies, writes the pid file and talks to systemd; the workers don't.

Each worker has its own upstream pool, rate-limit memory (use the Redis backend to share
limits) and metrics endpoint (``metrics.port`` + worker index).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from smtpproxy.config import Config
from smtpproxy.eventlog import event
from smtpproxy.sdnotify import notify

__all__ = ["READY_FD_VARIABLE", "supervise", "tell_supervisor_ready"]

READY_FD_VARIABLE = "SMTPPROXY_READY_FD"
"""A worker writes one byte to this inherited pipe once it listens."""
RESTART_DELAY = 1.0
"""Seconds before a dead worker is started again (a crash loop must not spin)."""
STARTUP_TIMEOUT = 60.0

log = logging.getLogger("smtpproxy.workers")


def tell_supervisor_ready() -> None:
    """In a worker: report that the listeners are open. Does nothing in a single process."""
    fd = os.environ.pop(READY_FD_VARIABLE, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"R")
        os.close(int(fd))
    except OSError:
        pass  # the supervisor is gone; nothing to tell


class _Worker:
    def __init__(self, index: int, argv: list[str]):
        self.index = index
        self.argv = argv
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until it listens; RuntimeError when it cannot start."""
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # systemd is ours
        env[READY_FD_VARIABLE] = str(write_fd)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, "--worker", str(self.index), env=env, pass_fds=(write_fd,)
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
        event("worker_started", worker=self.index, pid=self.process.pid)

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.process.wait()


async def _supervise(config: Config, argv: list[str]) -> int:
    workers = [_Worker(i, argv) for i in range(config.worker_count)]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    def reload_all() -> None:  # each worker validates and reloads the file itself
        for worker in workers:
            worker.signal(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, reload_all)
    try:
        try:
            for worker in workers:
                await worker.start()
        except RuntimeError as exc:
            print(f"smtpproxy: cannot start: {exc}", file=sys.stderr)
            await asyncio.gather(*(w.stop() for w in workers))
            return 1
        notify("READY=1", f"MAINPID={os.getpid()}")
        event("workers_ready", workers=len(workers))
        watchers = {asyncio.ensure_future(_wait(w)): w for w in workers}
        stop_task = asyncio.ensure_future(stopping.wait())
        while not stopping.is_set():
            done, _ = await asyncio.wait({stop_task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stop_task}:
                worker = watchers.pop(task)
                if stopping.is_set():
                    break
                event("worker_died", level=logging.ERROR, worker=worker.index,
                      code=task.result(), note=f"restarting in {RESTART_DELAY:g}s")
                await asyncio.sleep(RESTART_DELAY)
                try:
                    await worker.start()
                except RuntimeError as exc:
                    log.error("event=worker_restart_failed worker=%s error=%s", worker.index, exc)
                watchers[asyncio.ensure_future(_wait(worker))] = worker
        notify("STOPPING=1")
        event("workers_stopping", workers=len(workers))
        for worker in workers:
            worker.signal(signal.SIGTERM)  # each finishes its sessions within shutdown_grace
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
    from smtpproxy.server import remove_pid_file, write_pid_file

    argv = [sys.executable, "-m", "smtpproxy", "run"]
    if config_path is not None:
        argv += ["-c", config_path]
    pid_file = Path(config.pid_file) if config.pid_file is not None else None
    if pid_file is not None:
        write_pid_file(pid_file)
    try:
        return asyncio.run(_supervise(config, argv))
    finally:
        if pid_file is not None:
            remove_pid_file(pid_file)
