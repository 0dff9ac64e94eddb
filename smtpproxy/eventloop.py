"""Running the proxy on asyncio's own event loop or on uvloop.

uvloop (libuv under asyncio's API) makes the socket and timer work that dominates a
proxy's CPU profile cheaper. It is a dependency of smtpproxy wherever it installs (CPython
on Linux and macOS), and ``event_loop: auto`` (the default) takes it when it can be
imported; ``event_loop: uvloop`` insists on it, ``asyncio`` never uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from smtpproxy import watchdog

__all__ = ["EventLoopError", "loop_factory", "run"]

T = TypeVar("T")
Choice = Literal["auto", "asyncio", "uvloop"]


class EventLoopError(Exception):
    """The configured event loop cannot be used (uvloop asked for but not installed)."""


def loop_factory(choice: Choice) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(name, factory) for the configured loop; factory None means asyncio's default."""
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise EventLoopError(
                f"event_loop: uvloop, but uvloop cannot be imported ({exc}): "
                "pip install uvloop (the [uvloop] extra) or set event_loop: auto"
            ) from exc
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: Choice = "auto") -> T:
    """``asyncio.run`` on the chosen loop, feeding systemd's watchdog from it while *main* runs
    (:func:`smtpproxy.watchdog.fed`)."""
    try:
        _, factory = loop_factory(choice)
    except EventLoopError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_fed(main))


async def _fed(main: Coroutine[Any, Any, T]) -> T:
    async with watchdog.fed():
        return await main
