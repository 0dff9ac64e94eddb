"""A hostile plugin for the watchdog tests, loaded by name from a configuration file (``use:``).

Its async RCPT hook holds the event loop (``time.sleep`` where ``await asyncio.sleep`` belongs)
for a recipient whose local part is ``block``: what a plugin's endless loop, a catastrophic
regular expression or a blocking library call does, and what no timeout can interrupt.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from smtpproxy import Recipient, Session, Transaction, Verdict, hookimpl


class Blocking:
    class Settings(BaseModel):
        seconds: float

    def __init__(self, settings: Settings):
        self.settings = settings

    @hookimpl
    async def rcpt_to(self, session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
        if recipient.address.local == "block":
            time.sleep(self.settings.seconds)  # noqa: ASYNC251 - the point: the loop is held
        return None
