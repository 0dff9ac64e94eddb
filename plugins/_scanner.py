"""What the spam-scanner bridges (spamd, rspamd) share: settings and the way they ask.

Each bridge only knows its own protocol and result. Around it, the same rules apply:
incoming copies of our result headers are removed (a client's own verdict must not reach
the mailbox), oversize messages are not sent, and a scanner that does not answer in time
or answers an error gets the configured ``on_error`` action, never a silent accept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import Field, field_validator

from smtpproxy import EventLog, Message, PluginSettings, Transaction, Verdict

from ._policy import ActionSpec, verdict_for

__all__ = ["ScannerSettings", "ask_scanner", "no_control"]

R = TypeVar("R")


def no_control(value: str | None) -> str | None:
    """Settings that end up in headers or replies are one line."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


class ScannerSettings(PluginSettings):
    """The settings every scanner bridge has (each adds host, port, max_size and its own)."""

    timeout: float = Field(
        default=8, strict=True, gt=0, allow_inf_nan=False,
        description=(
            "Seconds for the whole exchange (connect, send, answer); past it on_error applies. "
            "Stays below the chain's default plugin timeout (10 s) so this plugin answers for itself."
        ),
    )
    score_factor: float = Field(
        default=1.0, allow_inf_nan=False,
        description="The scanner's score is multiplied by this to give this plugin's score.",
    )
    add_headers: bool = Field(
        default=False, strict=True,
        description="Write the score and symbol headers. Incoming ones are removed either way.",
    )
    on_error: ActionSpec = Field(
        default="continue",
        description=(
            "When the scanner is unreachable, times out or answers an error: continue (logged), "
            "tempfail (451 4.7.1), reject, quarantine, or a number (continue with that score)."
        ),
    )
    tempfail_text: str = Field(
        default="Spam check temporarily unavailable, try again later",
        description="Reply text when on_error is tempfail.",
    )
    reject_text: str = Field(default="Spam check failed", description="Reply text when on_error is reject.")

    @field_validator("tempfail_text", "reject_text")
    @classmethod
    def _one_line(cls, value: str) -> str:
        no_control(value)
        return value


async def ask_scanner(
    name: str,
    transaction: Transaction,
    message: Message,
    *,
    settings: ScannerSettings,
    max_size: int,
    headers: tuple[str, ...],
    errors: tuple[type[Exception], ...],
    where: str,
    ask: Callable[[bytes], Awaitable[R]],
) -> R | Verdict:
    """The scanner's result, or the verdict that replaces it (skipped, or on_error)."""
    for header in headers:
        message.remove_header(header)  # a client's own verdict must not reach the mailbox
    raw = message.raw
    if len(raw) > max_size:
        EventLog(f"smtpproxy_plugins.{name}").info(name, tx=transaction.id, result="skipped", size=len(raw))
        return Verdict.cont(
            reason=f"{name} skipped: message of {len(raw)} bytes is over max_size {max_size}",
            tags=(f"{name}:skipped",),
        )
    failures: tuple[type[Exception], ...] = (*errors, TimeoutError)
    try:
        async with asyncio.timeout(settings.timeout):
            return await ask(raw)
    except failures as exc:
        detail = str(exc) or f"no answer from {name} at {where} within {settings.timeout} s"
        EventLog(f"smtpproxy_plugins.{name}").warning(
            name, result="error", tx=transaction.id, error=detail, action=settings.on_error
        )
        verdict = verdict_for(
            settings.on_error, reject_text=settings.reject_text, tempfail_text=settings.tempfail_text,
            reason=f"{name} error: {detail}", tags=(f"{name}:error",),
        )
        assert verdict is not None, "verdict_for always answers when tags are given"
        return verdict


def symbol_list(names: tuple[str, ...] | list[str], limit: int = 10) -> str:
    """The first symbols for a reason text; the tags carry them all."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
