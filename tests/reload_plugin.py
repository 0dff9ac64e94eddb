"""A plugin for the reload tests, loaded by name from a configuration file (``use:``).

It records its startup and shutdown in a file (the tests read it to see which chain was
started and shut down, and when) and refuses every message with its tag, so a client can
tell which chain handled its session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel

from smtpproxy import Message, Session, Transaction, Verdict, hookimpl


class Tagged:
    class Settings(BaseModel):
        tag: str
        record: Path
        fail_startup: bool = False
        startup_delay: float = 0.0

    def __init__(self, settings: Settings):
        self.settings = settings

    def _record(self, what: str) -> None:
        with self.settings.record.open("a") as f:
            f.write(f"{self.settings.tag} {what}\n")

    @hookimpl
    async def startup(self) -> None:
        self._record("startup-begin")
        await asyncio.sleep(self.settings.startup_delay)
        if self.settings.fail_startup:
            raise RuntimeError("cannot reach the policy database")
        self._record("startup-end")

    @hookimpl
    def shutdown(self) -> None:
        self._record("shutdown")

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict:
        return Verdict.reject(f"chain {self.settings.tag}")


def recorded(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
