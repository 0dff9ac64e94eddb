"""The web console (``smtpproxy web``) served in the test's loop on a free loopback port:
the tests of tests/wire/test_console*.py start it from a configuration file they write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from smtpproxy.config import load_config
from smtpproxy.web.serve import make_server


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
