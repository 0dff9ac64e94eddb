"""rspamd: ask rspamd for a score, at DATA, and feed it to the ``score`` plugin.

    plugins:
      - name: rspamd                    # first: it only scores and tags
        settings:
          host: 127.0.0.1
          port: 11333
      - name: score                     # after it: owns the thresholds
        settings:
          reject: 15.0

The message is sent to rspamd's normal worker with its HTTP API (``POST /checkv2``, HTTP/1.1
spoken here over asyncio TCP, no client library), with the informational headers rspamd uses:
``IP``, ``Helo``, ``Hostname``, ``From`` (envelope sender), one ``Rcpt`` per recipient,
``Queue-Id`` and ``User`` (the authenticated user). rspamd answers JSON with ``score``,
``required_score``, ``action`` and ``symbols``. The verdict is a continue with
``score = rspamd score * score_factor``, the tag ``rspamd:<action>`` (``rspamd:no_action``,
``rspamd:add_header``, ``rspamd:reject``, ...) and one tag ``rspamd:<SYMBOL>`` per symbol.
With ``honour_action``, rspamd's own ``reject`` refuses (550 5.7.1) and ``soft reject``
tempfails (451 4.7.1).

Messages larger than ``max_size`` are not sent and get the tag ``rspamd:skipped``. When
rspamd cannot be reached, times out or answers an error, the ``on_error`` action applies
(``continue`` by default: logged, tagged ``rspamd:error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from smtpproxy import EventLog, Message, Session, Transaction, Verdict, hookimpl

from ._scanner import ScannerSettings, ask_scanner, no_control, symbol_list

__all__ = ["Rspamd", "RspamdError", "RspamdResult", "check", "learn"]

log = EventLog(__name__)


HEADER_SCORE = "X-Rspamd-Score"
HEADER_SYMBOLS = "X-Rspamd-Symbols"
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")
_STATUS = re.compile(rb"^HTTP/1\.[01] +(\d{3})(?: +(.*?))?\r?\n$")
_SYMBOL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_HEADER_LINES = 64
_MAX_BODY = 4 * 1024 * 1024  # the JSON answer: symbols with options, far below this
_REASON_SYMBOLS = 10  # symbols named in the reason (highest scores first); the tags carry them all


class RspamdError(Exception):
    """rspamd could not be asked or did not answer a valid result."""


@dataclass(frozen=True, slots=True)
class RspamdResult:
    score: float
    required_score: float
    action: str
    symbols: Mapping[str, float]

    @property
    def action_slug(self) -> str:
        return self.action.replace(" ", "_")

    def ranked(self) -> list[str]:
        """Symbol names, highest absolute score first (then by name)."""
        return sorted(self.symbols, key=lambda n: (-abs(self.symbols[n]), n))


async def check(
    host: str, port: int, message: bytes, *, path: str = "/checkv2",
    headers: Mapping[str, str | list[str]] | None = None,
) -> RspamdResult:
    """One ``POST /checkv2`` to rspamd; raises RspamdError on any failure. The caller time-boxes it."""
    code, detail, body = await _post(host, port, path, message, headers)
    if code != 200:
        raise RspamdError(f"rspamd answered HTTP {code} {_error_text(body, detail)}")
    return parse_result(body)


async def learn(host: str, port: int, message: bytes, verdict: str, *, password: str | None = None,
                path: str = "") -> str:
    """``POST /learnspam`` or ``/learnham`` to rspamd's controller: what it said, as a short text.

    A message rspamd already learned in that class is answered HTTP 208, reported as such;
    any other refusal (a wrong password, no Bayes classifier or its Redis unreachable) raises
    RspamdError with rspamd's own error text."""
    if verdict not in ("spam", "ham"):
        raise RspamdError(f"can only learn spam or ham, not {verdict!r}")
    headers = {"Password": password} if password else {}
    code, detail, body = await _post(host, port, f"{path}/learn{verdict}", message, headers)
    if code == 200:
        try:
            success = json.loads(body).get("success") is True
        except (ValueError, AttributeError):
            success = False
        if success:
            return f"rspamd learned it as {verdict}"
        raise RspamdError(f"rspamd did not confirm learning: {body[:200]!r}")
    if code == 208:
        return f"rspamd had already learned it as {verdict}"
    raise RspamdError(f"rspamd's controller answered HTTP {code} {_error_text(body, detail)}")


def _error_text(body: bytes, detail: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        detail = str(json.loads(body).get("error", detail))
    return detail[:200]


async def _post(host: str, port: int, path: str, message: bytes,
                headers: Mapping[str, str | list[str]] | None) -> tuple[int, str, bytes]:
    """One HTTP/1.1 POST: (status code, reason phrase, body); RspamdError on any failure."""
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=65536)
    except OSError as exc:
        raise RspamdError(f"cannot connect to rspamd at {host}:{port}: {exc}") from exc
    try:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
                 f"Content-Length: {len(message)}"]
        for name, value in (headers or {}).items():
            for one in [value] if isinstance(value, str) else value:
                lines.append(f"{name}: {one}")
        writer.write("\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + message)
        await writer.drain()
        return await _read_response(reader)
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise RspamdError(f"rspamd at {host}:{port}: {exc or type(exc).__name__}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
    status = await reader.readline()
    if not status:
        raise RspamdError("rspamd closed the connection without an answer")
    m = _STATUS.match(status)
    if m is None:
        raise RspamdError(f"not an HTTP status line: {status[:100]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise RspamdError(f"bad header line from rspamd: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    else:
        raise RspamdError("too many header lines from rspamd")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif (length := headers.get("content-length")) is not None:
        if not length.isdigit() or int(length) > _MAX_BODY:
            raise RspamdError(f"bad Content-Length from rspamd: {length[:30]!r}")
        body = await reader.readexactly(int(length))
    else:
        body = await reader.read(_MAX_BODY)
    return int(m.group(1)), (m.group(2) or b"").decode("ascii", "replace"), body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readline()).split(b";")[0].strip()
        size = int(size_line, 16)
        if size == 0 or len(body) + size > _MAX_BODY:
            if size:
                raise RspamdError("answer from rspamd too large")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readline()


def parse_result(body: bytes) -> RspamdResult:
    """The result of a checkv2 JSON answer (tolerating a missing required_score or symbols)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RspamdError(f"rspamd answer is not JSON: {body[:100]!r}") from exc
    if not isinstance(data, dict):
        raise RspamdError("rspamd answer is not a JSON object")
    if "error" in data:
        raise RspamdError(f"rspamd error: {str(data['error'])[:200]}")
    score, required, action = data.get("score"), data.get("required_score", 0.0), data.get("action")
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise RspamdError(f"no valid score in rspamd's answer: {score!r}")
    if not isinstance(required, int | float) or isinstance(required, bool):
        required = 0.0
    if action not in ACTIONS:
        raise RspamdError(f"unknown action in rspamd's answer: {str(action)[:50]!r}")
    symbols: dict[str, float] = {}
    raw_symbols = data.get("symbols")
    for name, entry in (raw_symbols.items() if isinstance(raw_symbols, dict) else ()):
        value = entry.get("score", 0.0) if isinstance(entry, dict) else 0.0
        if isinstance(name, str) and _SYMBOL.match(name):
            symbols[name] = float(value) if isinstance(value, int | float) else 0.0
    return RspamdResult(float(score), float(required), action, symbols)


def _header_value(value: str) -> str:
    """An informational header value: one line, whatever the client sent."""
    return "".join(c for c in value if c >= " " and c != "\x7f")[:255]


class Rspamd:
    """Score messages with rspamd; the ``score`` plugin after it decides (unless honour_action)."""

    class Settings(ScannerSettings):
        url: str | None = Field(
            default=None,
            description=(
                "rspamd's normal worker as a URL, e.g. http://127.0.0.1:11333 (overrides host and "
                "port; a path is a prefix for /checkv2). Plain HTTP only."
            ),
        )
        host: str = Field(default="127.0.0.1", min_length=1, description="rspamd's address or host name.")
        port: int = Field(default=11333, ge=1, le=65535, description="The normal worker's TCP port.")
        max_size: int = Field(
            default=20 * 1024 * 1024, gt=0,
            description=(
                "Messages larger than this many bytes are not sent to rspamd (tagged rspamd:skipped); "
                "keep it at or below rspamd's own max_message (50 MB by default)."
            ),
        )
        password: str | None = Field(
            default=None, min_length=1, max_length=255,
            description="Sent as the Password header (only needed if you point url at the controller).",
        )
        add_headers: bool = Field(
            default=False, strict=True,
            description=(
                f"Write {HEADER_SCORE} (e.g. '23.4/15') and {HEADER_SYMBOLS} (the symbols with their "
                "scores). Incoming ones are removed either way."
            ),
        )
        honour_action: bool = Field(
            default=False, strict=True,
            description=(
                "Follow rspamd's own action: reject refuses (550 5.7.1), soft reject tempfails "
                "(451 4.7.1). Off by default: the score plugin decides by its thresholds."
            ),
        )
        controller_port: int = Field(
            default=11334, ge=1, le=65535,
            description=(
                "The controller worker's TCP port (on host, or url's host): where reports of spam and "
                "not spam are learned (POST /learnspam, /learnham)."
            ),
        )
        controller_password: str | None = Field(
            default=None, min_length=1, max_length=255,
            description=(
                "The controller's password (its 'enable_password'; learning needs the privileged one), "
                "sent as the Password header."
            ),
        )
        spam_text: str = Field(
            default="Message rejected as spam", description="Reply text when honour_action refuses."
        )
        soft_reject_text: str = Field(
            default="Try again later", description="Reply text when honour_action tempfails."
        )

        @field_validator("host", "password", "controller_password", "spam_text", "soft_reject_text")
        @classmethod
        def _no_control(cls, value: str | None) -> str | None:
            return no_control(value)

        @field_validator("url")
        @classmethod
        def _http_url(cls, value: str | None) -> str | None:
            if value is None:
                return None
            no_control(value)
            parts = urlsplit(value)
            if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
                raise ValueError("must be http://HOST[:PORT][/PATH] (plain HTTP, no query)")
            _ = parts.port  # raises ValueError for a bad port
            return value

        def endpoint(self) -> tuple[str, int, str]:
            """Host, port and request path of /checkv2."""
            if self.url is None:
                return self.host, self.port, "/checkv2"
            parts = urlsplit(self.url)
            assert parts.hostname is not None
            return parts.hostname, parts.port or 80, parts.path.rstrip("/") + "/checkv2"

        def controller(self) -> tuple[str, int]:
            """Host and port of the controller (learning)."""
            host = self.host if self.url is None else urlsplit(self.url).hostname
            assert host is not None
            return host, self.controller_port

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()

    def request_headers(self, session: Session, transaction: Transaction) -> dict[str, str | list[str]]:
        env = transaction.envelope
        headers: dict[str, str | list[str]] = {
            "IP": session.client.ip,
            "From": _header_value(env.sender.text) if not env.sender.is_null else "<>",
            "Rcpt": [_header_value(r.address.text) for r in env.recipients],
            "Queue-Id": _header_value(transaction.id),
        }
        if session.helo:
            headers["Helo"] = _header_value(session.helo)
        if session.client.hostname:
            headers["Hostname"] = _header_value(session.client.hostname)
        if session.auth_user:
            headers["User"] = _header_value(session.auth_user)
        if self.settings.password:
            headers["Password"] = self.settings.password
        return headers

    @hookimpl
    async def learn(self, message: Message, verdict: str, reporter: str) -> str:
        """A report of spam or not spam, learned by rspamd's Bayes classifier (its controller)."""
        host, port = self.settings.controller()
        text = await learn(host, port, message.raw, verdict, password=self.settings.controller_password)
        log.info("rspamd_learn", verdict=verdict, reporter=reporter, result=text)
        return text

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        s = self.settings
        host, port, path = s.endpoint()
        headers = self.request_headers(session, transaction)
        result = await ask_scanner(
            "rspamd", transaction, message, settings=s, max_size=s.max_size,
            headers=(HEADER_SCORE, HEADER_SYMBOLS), errors=(RspamdError,), where=f"{host}:{port}",
            ask=lambda raw: check(host, port, raw, path=path, headers=headers),
        )
        if isinstance(result, Verdict):
            return result
        points = result.score * s.score_factor
        ranked = result.ranked()
        shown = symbol_list(ranked, _REASON_SYMBOLS)
        reason = f"rspamd score {result.score:g} action={result.action_slug}"
        reason += f" ({shown})" if shown else ""
        log.info("rspamd", tx=transaction.id, result=result.action_slug, score=result.score,
              required=result.required_score, points=round(points, 2), symbols=ranked)
        if s.add_headers:
            message.add_header(HEADER_SCORE, f"{result.score:g}/{result.required_score:g}")
            message.add_header(
                HEADER_SYMBOLS, ", ".join(f"{n}({result.symbols[n]:g})" for n in ranked) or "none"
            )
        tags = (f"rspamd:{result.action_slug}", *(f"rspamd:{n}" for n in ranked))
        if s.honour_action and result.action == "reject":
            verdict = Verdict.reject(s.spam_text, code=550, enhanced="5.7.1", reason=reason)
        elif s.honour_action and result.action == "soft reject":
            verdict = Verdict.tempfail(s.soft_reject_text, code=451, enhanced="4.7.1", reason=reason)
        else:
            return Verdict.cont(score=points, reason=reason, tags=tags)
        return replace(verdict, score=points, tags=tags)
