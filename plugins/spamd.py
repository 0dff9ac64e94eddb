"""spamd: ask SpamAssassin's spamd for a score, at DATA, and feed it to the ``score`` plugin.

    plugins:
      - name: spamd                     # first: it only scores and tags
        settings:
          host: 127.0.0.1
          port: 783
      - name: score                     # after it: owns the thresholds
        settings:
          reject: 15.0

The message is sent to spamd with the SPAMC/SPAMD protocol (version 1.5, spoken here over
asyncio TCP, no client library): a ``SYMBOLS`` request with ``Content-length`` (and ``User``
if set). spamd answers ``SPAMD/1.1 0 EX_OK``, a ``Spam: True ; 15.2 / 5.0`` header and the
comma-separated list of rules that hit. The verdict is a continue with
``score = spamd score * score_factor``, the tag ``spamd:spam`` or ``spamd:ham`` (spamd's own
opinion, against its ``required_score``) and one tag ``spamd:<RULE>`` per rule hit.

Messages larger than ``max_size`` are not sent (like spamc's default of 500 KiB) and get the
tag ``spamd:skipped``. When spamd cannot be reached, times out or answers an error, the
``on_error`` action applies (``continue`` by default: logged, tagged ``spamd:error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import Field, field_validator

from smtpproxy import EventLog, Message, Transaction, Verdict, hookimpl

from ._scanner import ScannerSettings, ask_scanner, no_control, symbol_list

__all__ = ["Spamd", "SpamdError", "SpamdResult", "check", "tell"]

log = EventLog(__name__)


PROTOCOL = "SPAMC/1.5"
HEADER_SCORE = "X-Spam-Spamd-Score"
HEADER_SYMBOLS = "X-Spam-Spamd-Symbols"
_T = TypeVar("_T")
_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) +(\d+) +(.*?)\r?\n$")
_SPAM = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I)
_SYMBOL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_HEADER_LINES = 32
_MAX_BODY = 64 * 1024  # the SYMBOLS body is a list of rule names: a few KiB at most
_REASON_SYMBOLS = 10  # rules named in the reason; the tags carry them all


class SpamdError(Exception):
    """spamd could not be asked or did not answer in the protocol."""


@dataclass(frozen=True, slots=True)
class SpamdResult:
    is_spam: bool
    score: float
    threshold: float
    symbols: tuple[str, ...]


async def check(host: str, port: int, message: bytes, *, user: str | None = None) -> SpamdResult:
    """One SYMBOLS request to spamd; raises SpamdError on any failure. The caller time-boxes it."""
    return await _exchange(host, port, "SYMBOLS", {}, message, user=user, read=_read_response)


async def tell(host: str, port: int, message: bytes, verdict: str, *, user: str | None = None) -> bool:
    """Teach spamd's Bayes database *message* as ``spam`` or ``ham``, as ``spamc -L`` does: a
    ``TELL`` request with ``Message-class`` and ``Set: local``. True when spamd learned it
    (``DidSet: local``), False when it did nothing (already learned, or Bayes is off); raises
    SpamdError when spamd refused (started without ``--allow-tell``) or could not be asked."""
    if verdict not in ("spam", "ham"):
        raise SpamdError(f"can only learn spam or ham, not {verdict!r}")
    headers = await _exchange(host, port, "TELL", {"Message-class": verdict, "Set": "local"}, message,
                              user=user, read=_read_head)
    return "local" in (v.strip() for v in headers.get("didset", "").split(","))


async def _exchange(host: str, port: int, method: str, fields: dict[str, str], message: bytes, *,
                    user: str | None, read: Callable[[asyncio.StreamReader], Awaitable[_T]]) -> _T:
    """One spamd request (*method* with *fields*, the message) and its answer as *read* reads
    it; SpamdError when spamd cannot be asked or answers badly."""
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=8192)
    except OSError as exc:
        raise SpamdError(f"cannot connect to spamd at {host}:{port}: {exc}") from exc
    try:
        head = f"{method} {PROTOCOL}\r\nContent-length: {len(message)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        if user:
            head += f"User: {user}\r\n"
        writer.write(head.encode("ascii") + b"\r\n" + message)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await read(reader)
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise SpamdError(f"spamd at {host}:{port}: {exc or type(exc).__name__}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> dict[str, str]:
    """The status line (an error raises) and the headers of a spamd answer, names in lower case."""
    status = await reader.readline()
    if not status:
        raise SpamdError("spamd closed the connection without an answer")
    m = _STATUS.match(status)
    if m is None:
        raise SpamdError(f"not a SPAMD status line: {status[:100]!r}")
    if m.group(2) != b"0":
        raise SpamdError(f"spamd answered {m.group(2).decode()} {m.group(3).decode('ascii', 'replace')}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = line.decode("ascii", "replace").partition(":")
        if not sep:
            raise SpamdError(f"bad header line from spamd: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    else:
        raise SpamdError("too many header lines from spamd")
    return headers


async def _read_response(reader: asyncio.StreamReader) -> SpamdResult:
    headers = await _read_head(reader)
    spam = _SPAM.match(headers.get("spam", ""))
    if spam is None:
        raise SpamdError(f"no valid Spam header from spamd: {headers.get('spam')!r}")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= _MAX_BODY:
        body = await reader.readexactly(int(length))
    else:
        body = await reader.read(_MAX_BODY)
    names = (s.strip() for s in body.decode("ascii", "replace").replace("\r\n", ",").split(","))
    return SpamdResult(
        is_spam=spam.group(1).lower() in ("true", "yes"),
        score=float(spam.group(2)),
        threshold=float(spam.group(3)),
        symbols=tuple(s for s in names if _SYMBOL.match(s)),
    )


class Spamd:
    """Score messages with SpamAssassin's spamd; the ``score`` plugin after it decides."""

    class Settings(ScannerSettings):
        host: str = Field(default="127.0.0.1", min_length=1, description="spamd's address or host name.")
        port: int = Field(default=783, ge=1, le=65535, description="spamd's TCP port.")
        max_size: int = Field(
            default=512000, gt=0,
            description=(
                "Messages larger than this many bytes are not sent to spamd (tagged spamd:skipped), "
                "like spamc's default of 500 KiB; raise spamd-side limits too if you raise it."
            ),
        )
        user: str | None = Field(
            default=None, min_length=1, max_length=255,
            description="Sent as the User header: whose preferences spamd uses (spamc -u).",
        )
        add_headers: bool = Field(
            default=False, strict=True,
            description=(
                f"Write {HEADER_SCORE} (e.g. '15.2/5.0') and {HEADER_SYMBOLS} (the rules hit). "
                "Incoming ones are removed either way."
            ),
        )

        @field_validator("user", "host")
        @classmethod
        def _no_control(cls, value: str | None) -> str | None:
            return no_control(value)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()

    @hookimpl
    async def learn(self, message: Message, verdict: str, reporter: str) -> str:
        """A report of spam or not spam, learned into spamd's Bayes database (TELL, as spamc -L)."""
        s = self.settings
        learned = await tell(s.host, s.port, message.raw, verdict, user=s.user)
        text = (f"spamd learned it as {verdict}" if learned else
                f"spamd did not learn it: already learned as {verdict}, or Bayes is off (use_bayes)")
        log.info("spamd_learn", verdict=verdict, reporter=reporter, learned=learned)
        return text

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> Verdict | None:
        s = self.settings
        result = await ask_scanner(
            "spamd", transaction, message, settings=s, max_size=s.max_size,
            headers=(HEADER_SCORE, HEADER_SYMBOLS), errors=(SpamdError,), where=f"{s.host}:{s.port}",
            ask=lambda raw: check(s.host, s.port, raw, user=s.user),
        )
        if isinstance(result, Verdict):
            return result
        points = result.score * s.score_factor
        shown = symbol_list(result.symbols, _REASON_SYMBOLS)
        reason = f"spamd score {result.score:g}" + (f" ({shown})" if shown else "")
        log.info("spamd", tx=transaction.id, result="spam" if result.is_spam else "ham",
              score=result.score, required=result.threshold, points=round(points, 2),
              symbols=list(result.symbols))
        if s.add_headers:
            message.add_header(HEADER_SCORE, f"{result.score:g}/{result.threshold:g}")
            message.add_header(HEADER_SYMBOLS, ", ".join(result.symbols) or "none")
        tags = ("spamd:spam" if result.is_spam else "spamd:ham", *(f"spamd:{n}" for n in result.symbols))
        return Verdict.cont(score=points, reason=reason, tags=tags)
