"""The soak run's plugins: they misbehave on the messages the load generator marks.

The generator puts ``X-Soak-Plugin: ACTION`` in each message and records what it asked for,
so the accounting knows what the client must have been told:

- ``SoakAsync`` (an ``async def`` data hook): ``raise`` raises, ``sleep`` sleeps past the
  plugin's timeout, ``quarantine``/``discard``/``reject``/``tempfail`` return that verdict.
- ``SoakBlocking`` (a plain data hook, run on the plugin thread pool): ``block`` blocks the
  thread past the timeout, ``raise-sync`` raises from the thread.

``SoakAsync`` also writes the proxy's own numbers every ``every`` seconds to ``stats`` (one
JSON line: pid, asyncio tasks, threads, open sessions), which /proc cannot show.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from smtpproxy import Message, Session, Transaction, Verdict, hookimpl

HEADER = "X-Soak-Plugin"
_stats_tasks: list[asyncio.Task[None]] = []  # one writer per process, whatever reloads do


class SoakAsync:
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        stats: str | None = None
        every: float = 2.0
        sleep: float = 5.0
        variant: str = "a"  # changed by the valid reloads, so a reload really changes something

    def __init__(self, settings: Settings):
        self.settings = settings

    @hookimpl
    async def startup(self) -> None:
        if self.settings.stats and not any(not t.done() for t in _stats_tasks):
            _stats_tasks[:] = [asyncio.get_running_loop().create_task(
                _write_stats(Path(self.settings.stats), self.settings.every))]

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        action = (message.get(HEADER) or "").strip()
        if action == "raise":
            raise RuntimeError("soak plugin raises on purpose")
        if action == "sleep":
            await asyncio.sleep(self.settings.sleep)
        if action == "quarantine":
            return Verdict.quarantine("soak: quarantine on purpose")
        if action == "discard":
            return Verdict.discard("soak: discard on purpose")
        if action == "reject":
            return Verdict.reject("soak: rejected on purpose")
        if action == "tempfail":
            return Verdict.tempfail("soak: tempfail on purpose")
        return None


class SoakBlocking:
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        block: float = 5.0

    def __init__(self, settings: Settings):
        self.settings = settings

    @hookimpl
    def data(self, message: Message) -> None:
        action = (message.get(HEADER) or "").strip()
        if action == "block":
            time.sleep(self.settings.block)
        if action == "raise-sync":
            raise ValueError("soak plugin raises in its thread on purpose")


def _sessions() -> int | None:
    import gc

    from smtpproxy.inbound import InboundSMTP

    # Cheap enough every few seconds: count live protocol objects (open or leaked sessions).
    return sum(1 for o in gc.get_objects() if type(o) is InboundSMTP)


async def _write_stats(path: Path, every: float) -> None:
    pid = os.getpid()
    while True:
        line = {"t": time.time(), "pid": pid, "tasks": len(asyncio.all_tasks()),
                "threads": threading.active_count(), "sessions": _sessions()}
        with path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        await asyncio.sleep(every)
