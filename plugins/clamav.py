"""clamav: scan each message with ClamAV's clamd, at DATA, and refuse or hold what it finds.

    plugins:
      - name: clamav
        settings:
          servers: ["unix:/run/clamav/clamd.ctl", "10.0.0.5:3310"]
          infected: reject              # 554 5.7.1 Virus found: <signature>
          pua: 5.0                      # score it instead (the score plugin decides)

The message is streamed to clamd with ``zINSTREAM`` (clamd(8)): the command, then the
message in chunks of ``<4-byte big-endian length><data>``, then a zero-length chunk; clamd
answers one NUL-terminated line, ``stream: OK``, ``stream: <signature> FOUND`` or
``... ERROR``, and closes. One INSTREAM per connection. A ``Received:`` line goes first, so
that clamd always takes the stream for mail and decodes its parts. The chunks are taken from
:meth:`Message.parts`, so a spooled 50 MB message is read from its memory map a chunk at a
time and never copied whole.

The servers are tried in order (or shuffled with ``randomize``): a server that cannot be
reached, resets the connection, or answers something that is not a clamd result is logged
and the next one is asked. When none gives a result within ``timeout``, ``on_error``
applies: ``tempfail`` by default, never a silent pass.

Each result has its own action (``reject``, ``quarantine``, ``tempfail``, ``continue`` or a
score): ``infected`` (a signature), ``heuristic`` (``Heuristics.*`` and ``Broken.*``),
``phishing`` (``Heuristics.Phishing.*``), ``pua`` (``PUA.*``, with clamd's ``DetectPUA``),
``encrypted`` (``Heuristics.Encrypted.*``, with ``AlertEncrypted``) and ``unscanned``:
clamd could not scan it all
(``Heuristics.Limits.Exceeded.*``, which clamd only reports with ``AlertExceedsMax yes``;
without it an over-limit file is a plain ``OK``), or the stream was over clamd's
``StreamMaxLength``. At startup (``probe_limits``) each server gets a zip nested too deep to
scan: one that answers ``OK`` has ``AlertExceedsMax`` off, which is logged (or refused).
Messages over ``max_size`` are not sent at all: the ``oversize``
action. ``signatures`` overrides the action by signature name pattern. The sender is never
notified: a refusal is an SMTP reply, a quarantine is silent.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import functools
import io
import random
import re
import socket
import struct
import zipfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, field_validator

from smtpproxy import (
    Buffer,
    EventLog,
    Message,
    PluginSettings,
    Transaction,
    Verdict,
    hookimpl,
    validate_header,
)

from ._policy import ActionSpec, check_reply_template, verdict_for

__all__ = ["ClamAV", "ClamdError", "ClamdResult", "Server", "classify", "instream", "instream_writes",
           "parse_reply"]

log = EventLog(__name__)

DEFAULT_PORT = 3310
CHUNK = 64 * 1024
"""Bytes per INSTREAM chunk: each is copied once on its way to the socket, the message never."""
_MAX_REPLY = 4096  # "stream: <signature> FOUND": a signature name is far shorter
_SIGNATURE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,198}[\x21-\x7e])?")
_EXTENDED_INFO = re.compile(r"\([0-9a-f]{32,64}:\d+\)$")  # ExtendedDetectionInfo: (md5:size)
_SIZE_LIMIT = "INSTREAM size limit exceeded. ERROR"
MAIL_MARKER = b"Received: by smtpproxy (clamav plugin)\r\n"
"""Sent to clamd before the message (not delivered). clamd decides from the first bytes whether
a stream is mail; a header block it does not recognise (one that starts with Content-Type,
say) would be scanned as plain text, its attachments never decoded. A Received field first
always reads as mail (Haraka's clamd plugin does the same)."""
_PLACEHOLDERS = {"signature": "Win.Test.EICAR_HDB-1"}
PROBE_DEPTH = 256
"""Zip levels in the startup probe: well past what any clamd scans (MaxRecursion is at most
100, and clamd stops at about twice its MaxRecursion in nested stored zips)."""

Result = Literal[
    "clean", "infected", "heuristic", "phishing", "pua", "encrypted", "unscanned", "oversize", "error"
]


class ClamdError(Exception):
    """clamd could not be asked, or did not answer a clamd result."""


@dataclass(frozen=True, slots=True)
class ClamdResult:
    """One answer of clamd: OK, a signature, or "the stream was too long"."""

    signature: str | None  # None for OK
    over_stream_limit: bool = False

    @property
    def clean(self) -> bool:
        return self.signature is None and not self.over_stream_limit


@dataclass(frozen=True, slots=True)
class Server:
    """A clamd address: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> Server:
        """``unix:/path``, ``/path``, ``host``, ``host:port`` or ``[v6]:port``."""
        if any(ord(c) < 33 or ord(c) == 127 for c in text):
            raise ValueError(f"{text!r}: no spaces or control characters")
        if text.startswith("unix:") or text.startswith("/"):
            path = text.removeprefix("unix:")
            if not path.startswith("/"):
                raise ValueError(f"{text!r}: a unix socket needs an absolute path")
            return cls(path=path)
        host, port = text, DEFAULT_PORT
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
            rest = rest[1:]
        elif text.count(":") == 1:
            host, _, rest = text.partition(":")
        elif ":" in text:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
        else:
            rest = ""
        if rest:
            if not rest.isdigit() or not 1 <= int(rest) <= 65535:
                raise ValueError(f"{text!r}: the port must be 1..65535")
            port = int(rest)
        if not host:
            raise ValueError(f"{text!r}: no host")
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self) -> socket.socket:
        """A connected non-blocking socket (each address of a host name tried in turn)."""
        loop = asyncio.get_running_loop()
        if self.path is not None:
            targets: list[tuple[socket.AddressFamily, Any]] = [(socket.AF_UNIX, self.path)]
        else:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            targets = [(family, address) for family, _, _, _, address in infos]
        error: OSError = OSError(f"no address for {self.host}")
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError):
                    raise
                error = exc
                continue
            return sock
        raise error


def parse_reply(reply: bytes) -> ClamdResult:
    """The result in one NUL-terminated clamd reply to INSTREAM; ClamdError for anything else."""
    text = reply.removesuffix(b"\0").decode("ascii", "replace").strip()
    if text == _SIZE_LIMIT:
        return ClamdResult(None, over_stream_limit=True)
    if text == "stream: OK":
        return ClamdResult(None)
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        name = _EXTENDED_INFO.sub("", text[len("stream: ") : -len(" FOUND")])
        if _SIGNATURE.fullmatch(name):
            return ClamdResult(name)
    if text.endswith(" ERROR"):
        raise ClamdError(f"clamd answered {text[:200]!r}")
    raise ClamdError(f"not a clamd INSTREAM result: {reply[:100]!r}")


def classify(signature: str) -> Result:
    """Which configured result a clamd signature name falls under."""
    if signature.startswith("Heuristics.Limits.Exceeded."):
        return "unscanned"
    if signature.startswith("Heuristics.Encrypted."):
        return "encrypted"
    if signature.startswith("PUA."):
        return "pua"
    if signature.startswith("Heuristics.Phishing."):
        return "phishing"
    if signature.startswith(("Heuristics.", "Broken.")):
        return "heuristic"
    return "infected"


@functools.cache
def limits_probe() -> bytes:
    """A message carrying a harmless zip nested :data:`PROBE_DEPTH` deep (about 40 KB): clamd
    cannot scan it all, so it answers ``Heuristics.Limits.Exceeded.MaxRecursion`` with
    ``AlertExceedsMax yes`` and a plain ``OK`` without it. A mail, as every stream the plugin
    sends is (a bare zip after the Received line takes clamd seconds instead of milliseconds)."""
    data = b"smtpproxy clamav plugin: a probe of clamd's AlertExceedsMax\n"
    for level in range(PROBE_DEPTH):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("probe.zip" if level else "probe.txt", data)
        data = buffer.getvalue()
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        b"From: smtpproxy <postmaster@localhost>\r\nSubject: clamd limits probe\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: application/zip; name="probe.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + encoded
    )


async def instream(server: Server, parts: Sequence[Buffer], *, connect_timeout: float) -> ClamdResult:
    """One zINSTREAM exchange with one clamd; raises ClamdError on any failure.

    The caller time-boxes the whole exchange; ``connect_timeout`` only bounds the connect,
    so that a dead server leaves time for the next one.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            sock = await server.connect()
    except TimeoutError as exc:
        raise ClamdError(f"cannot connect to clamd at {server}: timed out after {connect_timeout} s") from exc
    except OSError as exc:
        raise ClamdError(f"cannot connect to clamd at {server}: {exc}") from exc
    with sock:
        try:
            await _send(loop, sock, parts)
        except OSError as exc:
            # clamd refuses a stream over StreamMaxLength by answering and closing at once;
            # its answer is still in our receive buffer (over TCP, the reset may have dropped it).
            try:
                async with asyncio.timeout(1):
                    return parse_reply(await _read_reply(loop, sock, server))
            except (OSError, ClamdError):
                pass
            raise ClamdError(f"clamd at {server} closed the connection while receiving: {exc}") from exc
        try:
            reply = await _read_reply(loop, sock, server)
        except OSError as exc:
            raise ClamdError(f"clamd at {server}: {exc}") from exc
        return parse_reply(reply)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: Sequence[Buffer]) -> None:
    writes = instream_writes(parts)
    try:
        for block in writes:
            await loop.sock_sendall(sock, block)
    finally:
        writes.close()  # its view of the message released now, also when the send failed


def instream_writes(parts: Sequence[Buffer]) -> Generator[bytes, None, None]:
    """The zINSTREAM command, the marker and the message as length-prefixed chunks of at most
    :data:`CHUNK` octets, and the zero-length end, gathered into writes of about CHUNK octets:
    a small message goes to clamd in one write (one system call, one wake-up of clamd), also
    when a header edit cut it into parts. Each chunk is copied once, the message never whole."""
    pending = [b"zINSTREAM\0", struct.pack("!I", len(MAIL_MARKER)), MAIL_MARKER]
    size = sum(map(len, pending))
    for part in parts:
        with memoryview(part) as view:  # released before the spool may close its map
            for start in range(0, len(view), CHUNK):
                if size >= CHUNK:
                    yield b"".join(pending)
                    pending, size = [], 0
                chunk = bytes(view[start : start + CHUNK])
                pending += (struct.pack("!I", len(chunk)), chunk)
                size += 4 + len(chunk)
    pending.append(b"\0\0\0\0")
    yield b"".join(pending)


async def _read_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket, server: Server) -> bytes:
    """clamd's answer up to and including its NUL."""
    reply = b""
    while b"\0" not in reply:
        data = await loop.sock_recv(sock, _MAX_REPLY)
        if not data:
            if not reply:
                raise ClamdError(f"clamd at {server} closed the connection without an answer")
            raise ClamdError(f"clamd at {server}: answer not NUL-terminated: {reply[:100]!r}")
        reply += data
        if len(reply) > _MAX_REPLY:
            raise ClamdError(f"clamd at {server}: answer longer than {_MAX_REPLY} bytes")
    return reply


class ClamAV:
    """Antivirus through clamd: each result is refused, held, scored or passed as configured."""

    class Settings(PluginSettings):
        servers: list[str] = Field(
            default=["unix:/run/clamav/clamd.ctl"], min_length=1,
            description=(
                "clamd addresses, tried in order until one answers: unix:/path (or /path) for "
                "LocalSocket, host:port or [IPv6]:port for TCPSocket (port 3310 if left out). "
                "The default is Debian's clamav-daemon socket."
            ),
        )
        randomize: bool = Field(
            default=False, strict=True,
            description="Try the servers in a random order for each message (spreads the load).",
        )
        connect_timeout: float = Field(
            default=2, strict=True, gt=0, allow_inf_nan=False,
            description="Seconds to connect to one server before the next is tried.",
        )
        timeout: float = Field(
            default=8, strict=True, gt=0, allow_inf_nan=False,
            description=(
                "Seconds for the whole scan, all servers included; past it on_error applies. Keep it "
                "below the plugin's own timeout (10 s by default); raise both for large messages."
            ),
        )
        max_size: int = Field(
            default=26214400, strict=True, gt=0,
            description=(
                "Messages larger than this many bytes are not sent to clamd (the oversize action). "
                "Keep it at or below clamd's StreamMaxLength (100M by default), which clamd does "
                "not tell its clients."
            ),
        )
        infected: ActionSpec = Field(
            default="reject", description="A signature (not one of the kinds below) matched.",
        )
        heuristic: ActionSpec = Field(
            default="reject",
            description="A Heuristics.* or Broken.* detection (phishing, broken executables, ...).",
        )
        phishing: ActionSpec = Field(
            default=5.0,
            description=(
                "A Heuristics.Phishing.* detection (PhishingSignatures/PhishingScanURLs in clamd.conf): "
                "ClamAV suggests these for scoring only, so the default is a score of 5."
            ),
        )
        pua: ActionSpec = Field(
            default="reject", description="A PUA.* detection (only with DetectPUA yes in clamd.conf).",
        )
        encrypted: ActionSpec = Field(
            default="reject",
            description=(
                "An encrypted archive or document (Heuristics.Encrypted.*; only with AlertEncrypted "
                "or AlertEncryptedArchive yes in clamd.conf)."
            ),
        )
        unscanned: ActionSpec = Field(
            default="quarantine",
            description=(
                "clamd could not scan it all: Heuristics.Limits.Exceeded.* (only with AlertExceedsMax "
                "yes in clamd.conf) or over clamd's StreamMaxLength."
            ),
        )
        oversize: ActionSpec = Field(
            default="quarantine", description="The message is over max_size and was not sent to clamd.",
        )
        signatures: dict[str, ActionSpec] = Field(
            default={},
            description=(
                "Actions by signature name, shell-style patterns matched without regard to case, e.g. "
                "{'*.UNOFFICIAL': 3.0, 'Heuristics.OLE2.ContainsMacros': quarantine}: the first pattern "
                "that matches decides instead of the result's own action."
            ),
        )
        on_error: ActionSpec = Field(
            default="tempfail",
            description=(
                "No server gave a result (unreachable, reset, timed out, answered an error or "
                "nonsense): tempfail (451 4.7.1), reject, quarantine, continue (logged), or a score."
            ),
        )
        reject_code: int = Field(
            default=554, strict=True, ge=550, le=554, description="SMTP code of a refusal (550..554).",
        )
        reject_text: str = Field(
            default="Virus found: {signature}",
            description="Reply text when a detection is rejected; {signature} is clamd's signature name.",
        )
        unscanned_text: str = Field(
            default="Message could not be scanned for viruses",
            description="Reply text when unscanned or oversize is rejected.",
        )
        tempfail_text: str = Field(
            default="Virus scan temporarily unavailable, try again later",
            description="Reply text (451 4.7.1) when on_error or a result is tempfail.",
        )
        probe_limits: Literal["warn", "refuse", "off"] = Field(
            default="warn",
            description=(
                "At startup, send each server a zip nested too deep to scan: a server that answers OK "
                "does not report what it could not scan (AlertExceedsMax no), so its OK can be a "
                "silent pass. warn logs it (clamav_limits_unreported), refuse stops the proxy from "
                "starting, off sends no probe. A server that cannot be reached is only logged."
            ),
        )
        header: str | None = Field(
            default="X-Virus-Scanned",
            description=(
                "The proxy's own scan header, e.g. 'X-Virus-Scanned: clean (ClamAV)'; null for none. "
                "Copies the message arrives with are removed either way."
            ),
        )
        remove_headers: list[str] = Field(
            default=["X-Virus-Scanned", "X-Virus-Status"],
            description="Scan headers removed from every incoming message (a client's forged verdicts).",
        )

        @field_validator("servers")
        @classmethod
        def _servers(cls, value: list[str]) -> list[str]:
            for text in value:
                Server.parse(text)
            return value

        @field_validator("signatures")
        @classmethod
        def _patterns(cls, value: dict[str, ActionSpec]) -> dict[str, ActionSpec]:
            for pattern in value:
                if not pattern or any(ord(c) < 32 or ord(c) == 127 for c in pattern):
                    raise ValueError(f"{pattern!r}: a pattern is a non-empty line without control characters")
            return value

        def action_for(self, result: Result, signature: str | None) -> ActionSpec:
            """The configured action: a matching signature pattern first, then the result's own."""
            if result == "clean":
                return "continue"
            if result == "error":
                return self.on_error
            if signature is not None:
                name = signature.lower()
                for pattern, configured in self.signatures.items():
                    if fnmatch.fnmatchcase(name, pattern.lower()):
                        return configured
            own: ActionSpec = getattr(self, result)
            return own

        @field_validator("reject_text", "unscanned_text", "tempfail_text")
        @classmethod
        def _template(cls, value: str) -> str:
            return check_reply_template(value, _PLACEHOLDERS)

        @field_validator("header")
        @classmethod
        def _header(cls, value: str | None) -> str | None:
            if value is not None:
                validate_header(value, "clean (ClamAV)")
            return value

        @field_validator("remove_headers")
        @classmethod
        def _names(cls, value: list[str]) -> list[str]:
            for name in value:
                validate_header(name)
            return value

        def parsed_servers(self) -> list[Server]:
            return [Server.parse(text) for text in self.servers]

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        self.servers = self.settings.parsed_servers()

    @hookimpl
    async def startup(self) -> None:
        """Probe each server's AlertExceedsMax (see ``probe_limits``)."""
        if self.settings.probe_limits == "off":
            return
        results = await asyncio.gather(*(self._probe(server) for server in self.servers))
        pairs = zip(self.servers, results, strict=True)
        silent = [str(server) for server, reported in pairs if reported is False]
        if silent and self.settings.probe_limits == "refuse":
            raise RuntimeError(
                f"clamd at {', '.join(silent)} answered OK for a zip it cannot scan to the end: set "
                "AlertExceedsMax yes in clamd.conf (or probe_limits: warn)"
            )

    async def _probe(self, server: Server) -> bool | None:
        """Whether the server reports over-limit scans; None when it could not be asked."""
        s = self.settings
        try:
            async with asyncio.timeout(s.timeout):
                answer = await instream(server, (limits_probe(),), connect_timeout=s.connect_timeout)
        except (ClamdError, TimeoutError) as exc:
            log.warning("clamav_probe", server=str(server), result="error",
                        error=str(exc) or f"no answer within {s.timeout} s")
            return None
        if answer.clean:
            log.warning("clamav_limits_unreported", server=str(server), action=s.probe_limits,
                        hint="set AlertExceedsMax yes in clamd.conf: OK can mean 'not scanned to the end'")
            return False
        log.info("clamav_probe", server=str(server), result="reported", signature=answer.signature)
        return True

    async def scan(self, transaction: Transaction, message: Message) -> ClamdResult:
        """Ask the servers in turn; the first result wins. ClamdError when none gave one."""
        servers = list(self.servers)
        if self.settings.randomize:
            random.shuffle(servers)
        parts = message.parts()
        failures: list[str] = []
        for server in servers:
            try:
                return await instream(server, parts, connect_timeout=self.settings.connect_timeout)
            except ClamdError as exc:
                failures.append(str(exc))
                log.warning("clamav_server_failed", tx=transaction.id, server=str(server), error=str(exc))
        raise ClamdError("; ".join(failures))

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> Verdict | None:
        s = self.settings
        for name in {*s.remove_headers, *([s.header] if s.header else [])}:
            message.remove_header(name)  # a client's own verdict must not reach the mailbox
        size = message.size
        if size > s.max_size:
            detail = f"message of {size} bytes over max_size {s.max_size}, not scanned"
            return self._decide(transaction, message, "oversize", None, detail, size=size)
        try:
            async with asyncio.timeout(s.timeout):
                answer = await self.scan(transaction, message)
        except (ClamdError, TimeoutError) as exc:
            detail = str(exc) or f"no result from clamd within {s.timeout} s"
            return self._decide(transaction, message, "error", None, detail, size=size)
        if answer.over_stream_limit:
            detail = "over clamd's StreamMaxLength, not scanned (max_size is above it)"
            return self._decide(transaction, message, "unscanned", None, detail, size=size)
        if answer.signature is None:
            return self._decide(transaction, message, "clean", None, "clean", size=size)
        result = classify(answer.signature)
        return self._decide(transaction, message, result, answer.signature, f"{answer.signature} FOUND",
                            size=size)

    def _decide(
        self, transaction: Transaction, message: Message, result: Result, signature: str | None,
        detail: str, *, size: int,
    ) -> Verdict | None:
        s = self.settings
        action = s.action_for(result, signature)
        reason = "clamav clean" if result == "clean" else f"clamav {result}: {detail}"
        tags = (f"clamav:{result}", *([f"clamav:{signature}"] if signature else []))
        level = log.info if result == "clean" else log.warning
        level("clamav", tx=transaction.id, result=result, signature=signature, size=size,
              action=action, **({"error": detail} if result == "error" else {}))
        if s.header:
            shown = "" if result == "clean" else f": {signature or _short(detail)}"
            message.add_header(s.header, f"{result} (ClamAV{shown})")
        if result == "clean":
            return Verdict.cont(reason=reason, tags=tags)
        if action == "reject":
            text = s.reject_text if signature and result != "unscanned" else s.unscanned_text
            verdict = Verdict.reject(
                text.format(signature=signature or "-"), code=s.reject_code, enhanced="5.7.1", reason=reason
            )
            return replace(verdict, tags=tags)
        return verdict_for(action, reject_text=s.unscanned_text, tempfail_text=s.tempfail_text,
                           reason=reason, tags=tags)


def _short(detail: str) -> str:
    """The kind of a failure or skip for the scan header, without addresses or numbers."""
    if "max_size" in detail:
        return "over max_size"
    if "StreamMaxLength" in detail:
        return "over StreamMaxLength"
    return "scan failed"
