"""The web console (``smtpproxy web``) on a free loopback port, from a configuration file the
test writes: served in the test's loop (:func:`console_at`, tests/wire/test_console*.py), or as
the ``smtpproxy web`` process a person runs (:func:`web_process`, the Chromium tests)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import bcrypt
import httpx

from smtpproxy.config import load_config
from smtpproxy.web.serve import make_server

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
"""The tests' console password ("pw"), hashed once for every test file."""

ACCOUNTS = f"root:{HASH}:admin\nhost-a:{HASH}:domain:a.test\nbob@a.test:{HASH}:recipient\n"
"""One account of each role: an admin, a domain admin of a.test, a recipient."""


def console_files(directory: Path, port: int, more: str = "", *, accounts: str = ACCOUNTS) -> Path:
    """Write what ``smtpproxy web`` with the console needs into *directory*: the link key, the
    accounts file and ``cfg.yaml`` (Maildir, an SQLite store, the console on *port* over
    plain HTTP), with *more* YAML appended; returns the configuration's path."""
    (directory / "link.key").write_text("k" * 64)
    (directory / "accounts").write_text(accounts)
    config = directory / "cfg.yaml"
    config.write_text(
        "delivery:\n  type: maildir\n  path: mail\nstore:\n  sqlite: store.db\n"
        f"digest:\n  keys: [link.key]\n  port: {port}\nconsole:\n  users: accounts\n  secure_cookie: false\n"
        + more)
    return config


@contextlib.asynccontextmanager
async def console_at(config_path: Path, port: int) -> AsyncIterator[str]:
    """Serve the configuration at *config_path* (its web port is *port*); yields the base URL
    and stops the server on the way out."""
    config, _ = load_config(str(config_path))
    server = make_server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the web app did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def web_process(config_path: Path, port: int, log: Path) -> Iterator[str]:
    """Run ``smtpproxy web -c config_path`` (its stderr into *log*) until its /healthz answers;
    yields the base URL and stops the process with SIGTERM on the way out."""
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "smtpproxy", "web", "-c", str(config_path)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield base
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()  # a clean stop after the test
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
