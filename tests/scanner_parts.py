"""What the spamd and rspamd bridge tests share: messages, the plugins under test, a probe.

Both bridges run the same flow (``plugins/_scanner.py``), so their tests build the same
messages and chains; their failure tests are one parametrized set (test_scanner_failures.py).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from smtpproxy_plugins.score import Score

from smtpproxy import Transaction, hookimpl
from tests.conftest import Talk

MARKER = "smtpproxy-spam-marker"
"""The body text each test daemon's local rule SMTPPROXY_TEST scores 20 points."""

P = TypeVar("P")


def mail(body: str, subject: str = "Lunch on Friday") -> bytes:
    return (
        "From: Alice <alice@sender.test>\r\nTo: Bob <bob@dest.test>\r\n"
        f"Subject: {subject}\r\nDate: Mon, 2 Jan 2023 10:00:00 +0000\r\n"
        "Message-ID: <20230102100000.1@sender.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{body}\r\n"
    ).encode()


CLEAN = mail("Hi Bob,\r\n\r\nshall we meet at noon at the usual place?\r\n\r\nAlice")
SPAM = mail(f"Hi Bob,\r\n\r\nthis one carries the {MARKER} text.\r\n\r\nAlice")


def scanner(cls: type[P], name: str, server_port: int, **settings: Any) -> P:
    """A bridge plugin (Spamd or Rspamd) talking to ``server_port``, named as in a config."""
    plugin = cls.Settings.model_validate({"port": server_port, **settings})  # type: ignore[attr-defined]
    made = cls(plugin)  # type: ignore[call-arg]
    made.name = name  # type: ignore[attr-defined]
    made.timeout = 10  # type: ignore[attr-defined]  # the chain's time limit for the hook
    return made


def score(**settings: Any) -> Score:
    plugin = Score(Score.Settings.model_validate(settings))
    plugin.name = "score"  # type: ignore[attr-defined]
    return plugin


class Probe:
    """Records what the chain knows when it runs (after the scanner named ``scanner``)."""

    name = "probe"

    def __init__(self, scanner: str) -> None:
        self.scanner = scanner
        self.tags: set[str] = set()
        self.score = 0.0
        self.reasons: list[str] = []

    @hookimpl
    def data(self, transaction: Transaction) -> None:
        self.tags = set(transaction.results.tags)
        self.score = transaction.results.score
        self.reasons = [o.reason for o in transaction.results.for_plugin(self.scanner)]


async def send(proxy_port: int, body: bytes, rcpts: tuple[str, ...] = ("bob@dest.test",)) -> tuple[int, str]:
    client = await Talk.open(proxy_port)
    await client.hello("mail.sender.test")
    reply = await client.send_message("alice@sender.test", list(rcpts), body)
    await client.cmd("QUIT")
    await client.close()
    return reply


def header(content: bytes, name: str) -> list[str]:
    return re.findall(rf"^{name}: (.*)\r$", content.decode(), re.M | re.I)
