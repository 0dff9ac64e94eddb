"""Small pieces every private-daemon fixture needs (Redis, spamd, rspamd, Postfix)."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any

__all__ = ["LogLines", "checked_process", "free_port", "smtpproxy_process", "smtpproxy_serving", "stop_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a daemon, killing it if it does not exit within 10 s; idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LogLines:
    """Read a child's log pipe line by line as it comes, with a deadline.

    Reads the file descriptor directly: a buffered ``readline()`` after ``select()`` can
    leave a complete line in Python's buffer while select() waits on an empty pipe.
    """

    def __init__(self, pipe: IO[Any]):
        self._fd = pipe.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._pending = b""
        self.lines: list[str] = []

    def wait_line(self, pattern: str, timeout: float = 30) -> str:
        """The next line matching ``pattern`` (every line read is kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace") + "\n"
                self.lines.append(line)
                if re.search(pattern, line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sel.select(timeout=remaining):
                break
            chunk = os.read(self._fd, 65536)
            if not chunk:
                break
            self._pending += chunk
        raise AssertionError(f"no log line matching {pattern!r}:\n" + "".join(self.lines))

    def everything(self) -> str:
        """All the child wrote: the lines read so far, then the rest up to the end of the pipe
        (call it once the child exited; a partial line already read is not lost). What it
        reads is kept, so a second call returns the same."""
        rest = [self._pending]
        while chunk := os.read(self._fd, 65536):
            rest.append(chunk)
        self._pending = b""
        if len(rest) > 1 or rest[0]:
            self.lines.append(b"".join(rest).decode("utf-8", "replace"))
        return "".join(self.lines)


def smtpproxy_process(command: str, config: Any, yaml_text: str) -> tuple[subprocess.Popen[bytes], LogLines]:
    """``smtpproxy COMMAND -c CONFIG`` as users start it, with *yaml_text* written to *config*
    (a Path; its folder is the working directory): the process and its log, read as it comes."""
    import sys

    config.write_text(yaml_text)
    proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", command, "-c", str(config)],
                            stderr=subprocess.PIPE, cwd=config.parent)
    assert proc.stderr is not None
    return proc, LogLines(proc.stderr)


@contextlib.contextmanager
def checked_process(proc: subprocess.Popen[bytes], log: LogLines) -> Iterator[None]:
    """The block drives a child process: it is killed if still running when the block ends,
    and when the block succeeded, nothing the child wrote may hold a traceback (an exit
    code 0 after an exception logged and survived would pass otherwise)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.everything()


@contextlib.asynccontextmanager
async def smtpproxy_serving(command: str, config: Any, yaml_text: str, listening: str = r"event=listening ",
                            ) -> AsyncIterator[tuple[subprocess.Popen[bytes], LogLines]]:
    """``smtpproxy COMMAND`` (run, milter, policy) from start to a clean stop: the block runs
    once it logged a line matching *listening*, then SIGTERM must end it with status 0, with
    no traceback (:func:`checked_process`). It waits in threads: a connection the test closed
    on its own loop must really close while the child drains, or the child waits for it."""
    import asyncio
    import signal

    proc, log = smtpproxy_process(command, config, yaml_text)
    with checked_process(proc, log):
        await asyncio.to_thread(log.wait_line, listening)
        yield proc, log
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0, log.everything()
