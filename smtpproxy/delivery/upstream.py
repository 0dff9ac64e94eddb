"""Connections to upstream servers: failover, TLS policy, AUTH, client identity and reuse.

A :class:`Connector` hands out a ready :class:`Connection` for one message: connected,
greeted, TLS applied as configured (never a silent fall back to plaintext when TLS is
required), authenticated if a smarthost wants it, and with the original client's identity
passed on (XCLIENT for Postfix, else XFORWARD). Servers are tried in priority order,
weighted at equal priority; one that fails to connect or greet is skipped for a back-off
period. Idle connections are kept per server (bounded), and a reused one is checked with
RSET first.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib

from smtpproxy.delivery import DeliveryError
from smtpproxy.eventlog import event
from smtpproxy.session import Session
from smtpproxy.verdicts import Reply

__all__ = ["Connection", "Connector", "ConnectorSettings", "UpstreamServer", "upstream_reply"]

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_UNSAFE_TEXT = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")

TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]
IdentityMode = Literal["auto", "xclient", "xforward", "none"]


def upstream_reply(code: int, message: str) -> Reply:
    """Turn an upstream response into a Reply, keeping its enhanced code and text."""
    lines = _UNSAFE_TEXT.sub(" ", message).split("\n")
    enhanced = None
    match = _ENHANCED_PREFIX.match(lines[0])
    if match and match.group(1)[0] == str(code)[0]:
        enhanced = match.group(1)
        lines = [_ENHANCED_PREFIX.sub("", line, count=1) for line in lines]
    if code == 421:
        # 421 means "I am closing"; passed through it would make the client drop *us*.
        code, enhanced = 451, "4" + enhanced[1:] if enhanced else None
    if not 200 <= code <= 599:
        return Reply(451, "4.4.0", f"Upstream sent an invalid reply code {code}")
    return Reply(code, enhanced, "\n".join(lines))


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    tls: TlsMode = "opportunistic"
    tls_verify: bool = True
    ca_file: Path | None = None
    tls_hostname: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    helo_name: str = "localhost"
    identity: IdentityMode = "auto"
    username: str | None = None
    password: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0
    max_idle: int = 32
    idle_timeout: float = 30.0
    max_messages: int = 100
    down_backoff: float = 30.0


@dataclass(eq=False)
class UpstreamServer:
    """One upstream host:port and what we know of its health."""

    host: str
    port: int
    priority: int = 10
    weight: int = 1
    down_until: float = 0.0
    idle: deque[Connection] = field(default_factory=deque)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def is_down(self, now: float) -> bool:
        return now < self.down_until


@dataclass(eq=False)
class Connection:
    """A greeted, policy-compliant connection to one server, used for one message at a time."""

    client: aiosmtplib.SMTP
    server: UpstreamServer
    tls: str | None
    messages: int = 0
    idle_since: float = 0.0
    xclient_offered: frozenset[str] | None = None
    """XCLIENT attributes the server offered to *us*, before any identity was applied (after
    XCLIENT the server speaks to the original client and stops offering it)."""
    identity: tuple[str, ...] | None = None
    """The XCLIENT attributes this connection carries. Postfix accepts XCLIENT only from an
    authorized client, and after one the client *is* the original one, so a connection can
    never be re-identified: it is reused only for the same identity."""

    @property
    def destination(self) -> str:
        return self.server.name


def order_servers(servers: Sequence[UpstreamServer], now: float) -> list[UpstreamServer]:
    """Priority order, weighted-random within a priority; servers in back-off go last."""
    if len(servers) == 1:
        return list(servers)
    ordered: list[UpstreamServer] = []
    for priority in sorted({s.priority for s in servers}):
        group = [s for s in servers if s.priority == priority]
        while group:
            pick = random.choices(group, weights=[s.weight for s in group])[0]
            group.remove(pick)
            ordered.append(pick)
    return [s for s in ordered if not s.is_down(now)] + [s for s in ordered if s.is_down(now)]


def xtext(value: str) -> str:
    """RFC 3461 xtext, the encoding XCLIENT and XFORWARD attribute values use."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


class Connector:
    """Opens, prepares, lends and takes back upstream connections."""

    def __init__(self, settings: ConnectorSettings):
        self.settings = settings
        self.on_down: Callable[[str], None] | None = None
        """Told the name of each server that failed to connect or greet (metrics)."""
        self._verify_context = self._context(verify=settings.tls_verify)
        self._opportunistic_context = self._context(verify=False)

    def _context(self, *, verify: bool) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if s.client_cert is not None:
            ctx.load_cert_chain(str(s.client_cert), str(s.client_key) if s.client_key else None)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def acquire(self, servers: Sequence[UpstreamServer], session: Session) -> Connection:
        """A connection ready for MAIL FROM, from the first server that works; else DeliveryError."""
        now = time.monotonic()
        last_error: DeliveryError | None = None
        for server in order_servers(servers, now):
            conn = await self._reuse(server, session)
            if conn is not None:
                return conn
            try:
                conn = await self._open(server)
            except DeliveryError as exc:
                server.down_until = time.monotonic() + self.settings.down_backoff
                event("upstream_down", upstream=server.name, detail=exc.detail,
                      backoff=self.settings.down_backoff)
                if self.on_down is not None:
                    self.on_down(server.name)
                last_error = exc
                continue
            server.down_until = 0.0
            try:
                await self._identify(conn, session)
            except DeliveryError:
                await self.discard(conn)
                raise
            return conn
        assert last_error is not None, "no upstream servers configured"
        raise last_error

    async def _reuse(self, server: UpstreamServer, session: Session) -> Connection | None:
        """An idle connection to this server that still answers, with the new identity."""
        while server.idle:
            conn = server.idle.popleft()
            if time.monotonic() - conn.idle_since > self.settings.idle_timeout:
                await self.discard(conn)
                continue
            if conn.identity is not None and conn.identity != self._xclient_identity(conn, session):
                await self.discard(conn)  # it speaks for another client now
                continue
            try:
                if not self._identifies_with_a_command(conn, session):
                    # Probe that the idle connection still answers (as Postfix's connection
                    # cache does). XCLIENT or XFORWARD, when sent, is that probe already.
                    response = await conn.client.rset()
                    if response.code != 250:
                        raise aiosmtplib.SMTPResponseException(response.code, response.message)
                await self._identify(conn, session)
            except (aiosmtplib.SMTPException, OSError, DeliveryError):
                await self.discard(conn)
                continue
            return conn
        return None

    def release(self, conn: Connection) -> None:
        """Give back a connection after a completed (or cleanly aborted) transaction."""
        conn.messages += 1
        s = self.settings
        if (not conn.client.is_connected or conn.messages >= s.max_messages
                or len(conn.server.idle) >= s.max_idle):
            task = asyncio.get_running_loop().create_task(self.discard(conn))
            task.add_done_callback(lambda t: t.exception())
            return
        conn.idle_since = time.monotonic()
        conn.server.idle.append(conn)

    async def discard(self, conn: Connection) -> None:
        if conn.client.is_connected:
            try:
                await conn.client.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.client.close()

    async def close_idle(self, servers: Sequence[UpstreamServer]) -> None:
        for server in servers:
            while server.idle:
                await self.discard(server.idle.popleft())

    async def sweep(self, servers: Sequence[UpstreamServer]) -> None:
        """Close idle connections past their idle time, forever (run as a task)."""
        while True:
            await asyncio.sleep(self.settings.idle_timeout / 2)
            limit = time.monotonic() - self.settings.idle_timeout
            for server in servers:
                stale = [c for c in server.idle if c.idle_since < limit]
                for conn in stale:
                    server.idle.remove(conn)
                    await self.discard(conn)

    async def _open(self, server: UpstreamServer) -> Connection:
        """Connect, greet, apply TLS and AUTH. Raises DeliveryError (temporary) on any failure."""
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, local_hostname=s.helo_name,
            timeout=s.command_timeout, use_tls=s.tls == "implicit", start_tls=False,
            tls_context=self._verify_context if s.tls == "implicit" else None,
        )
        try:
            tls = await self._handshake(client, server)
            if s.username is not None and s.password is not None:
                await client.login(s.username, s.password)
            offered = None
            if client.supports_extension("xclient"):
                offered = frozenset(client.esmtp_extensions.get("xclient", "").upper().split())
            return Connection(client, server, tls, xclient_offered=offered)
        except DeliveryError:
            client.close()
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise DeliveryError(
                Reply(451, "4.7.0", "Upstream authentication failed, try again later"),
                f"{server.name}: AUTH failed: {exc.code} {exc.message}",
            ) from exc
        except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            client.close()
            raise DeliveryError(
                Reply(451, "4.4.2", "Upstream mail server timed out, try again later"),
                f"{server.name}: timeout: {exc}",
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise DeliveryError(
                Reply(451, "4.4.1", "Upstream mail server not reachable, try again later"),
                f"{server.name}: {type(exc).__name__}: {exc}",
            ) from exc

    async def _handshake(self, client: aiosmtplib.SMTP, server: UpstreamServer) -> str | None:
        s = self.settings
        # Implicit TLS verifies the certificate against ``host`` (aiosmtplib has no separate
        # server name for it); tls_hostname applies to STARTTLS.
        greeting = await client.connect(timeout=s.connect_timeout)
        if greeting.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(greeting.code), greeting.message),
                                f"{server.name}: greeting {greeting.code}")
        await self._ehlo(client, server)
        if s.tls == "implicit":
            return _tls_version(client)
        if s.tls == "none":
            return None
        if not client.supports_extension("starttls"):
            if s.tls == "starttls":
                raise DeliveryError(
                    Reply(451, "4.7.5", "Upstream does not offer STARTTLS, which is required"),
                    f"{server.name}: no STARTTLS; refusing to send in plaintext",
                )
            return None
        context = self._verify_context if s.tls == "starttls" else self._opportunistic_context
        try:
            response = await client.starttls(
                tls_context=context, server_hostname=s.tls_hostname or server.host
            )
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryError(
                Reply(451, "4.7.5", "TLS with the upstream mail server failed, try again later"),
                f"{server.name}: STARTTLS failed: {exc}",
            ) from exc
        if response.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(response.code), response.message),
                                f"{server.name}: STARTTLS refused")
        # RFC 3207 4.2: the server forgot everything; greet again (and learn the extensions it
        # offers under TLS). execute_command, which we use for MAIL, will not do it for us.
        await self._ehlo(client, server)
        return _tls_version(client)

    async def _ehlo(self, client: aiosmtplib.SMTP, server: UpstreamServer, name: str | None = None) -> None:
        ehlo = await client.ehlo(hostname=name)
        if ehlo.code == 250:
            return
        helo = await client.helo(hostname=name)
        if helo.code != 250:
            raise DeliveryError(upstream_reply(_as_temp(helo.code), helo.message),
                                f"{server.name}: HELO refused")

    def _xclient_identity(self, conn: Connection, session: Session) -> tuple[str, ...] | None:
        """The XCLIENT attributes for this session, or None when XCLIENT is not used here."""
        if self.settings.identity not in ("auto", "xclient") or conn.xclient_offered is None:
            return None
        return tuple(_xclient_attributes(session, conn.xclient_offered))

    def _identifies_with_a_command(self, conn: Connection, session: Session) -> bool:
        """Whether :meth:`_identify` will send XCLIENT or XFORWARD on this connection now."""
        identity = self._xclient_identity(conn, session)
        if identity is not None:
            return conn.identity != identity
        return self.settings.identity in ("auto", "xforward") and conn.client.supports_extension("xforward")

    async def _identify(self, conn: Connection, session: Session) -> None:
        """Tell the upstream who the real client is (per message: pooled connections move on)."""
        mode = self.settings.identity
        client = conn.client
        identity = self._xclient_identity(conn, session)
        if identity is not None:
            if conn.identity == identity:
                return  # a reused connection already speaking for this client
            response = await client.execute_command(b"XCLIENT", *[a.encode() for a in identity])
            if response.code not in (220, 250):  # 220 greeting (Postfix >= 2.3); 250 before that
                raise DeliveryError(
                    upstream_reply(_as_temp(response.code), response.message),
                    f"{conn.destination}: XCLIENT refused: {response.code} {response.message}",
                )
            # XCLIENT resets the session like a new greeting; greet with the client's own name,
            # or that EHLO would replace the HELO= just sent (Postfix logs and Received show it).
            await self._ehlo(client, conn.server, session.helo)
            conn.identity = identity
        elif mode in ("auto", "xforward") and client.supports_extension("xforward"):
            offered = set(client.esmtp_extensions.get("xforward", "").upper().split())
            attrs = _xforward_attributes(session, offered)
            response = await client.execute_command(b"XFORWARD", *[a.encode() for a in attrs])
            if response.code != 250:
                raise DeliveryError(
                    upstream_reply(_as_temp(response.code), response.message),
                    f"{conn.destination}: XFORWARD refused: {response.code} {response.message}",
                )
        elif mode in ("xclient", "xforward"):
            raise DeliveryError(
                Reply(451, "4.7.0", "Upstream mail server does not accept the client identity"),
                f"{conn.destination}: {mode.upper()} required by configuration but not offered",
            )


def _addr(ip: str) -> str:
    return f"IPV6:{ip}" if ":" in ip else ip


def _client_values(session: Session) -> dict[str, str]:
    """What XCLIENT and XFORWARD both say about the original client."""
    return {
        "ADDR": _addr(session.client.ip),
        "PORT": str(session.client.port),
        "NAME": session.client.hostname or "[UNAVAILABLE]",
        "HELO": session.helo or "[UNAVAILABLE]",
        "PROTO": "ESMTP" if session.esmtp else "SMTP",
    }


def _encode(values: dict[str, str], offered: Collection[str]) -> list[str]:
    """``NAME=xtext`` for the attributes the server offers and we know."""
    return [f"{k}={xtext(v)}" for k, v in values.items() if k in offered and v]


def _xclient_attributes(session: Session, offered: frozenset[str]) -> list[str]:
    return _encode({
        **_client_values(session),
        "LOGIN": session.auth_user or "[UNAVAILABLE]",
        "DESTADDR": _addr(session.local_ip) if session.local_ip else "",
        "DESTPORT": str(session.local_port) if session.local_port else "",
    }, offered)


def _xforward_attributes(session: Session, offered: set[str]) -> list[str]:
    return _encode({**_client_values(session), "SOURCE": "REMOTE"}, offered)


def _as_temp(code: int) -> int:
    """An upstream that refuses us before MAIL is our problem, not the sender's: retry later."""
    return code if 400 <= code < 500 else 451


def _tls_version(client: aiosmtplib.SMTP) -> str | None:
    ssl_object = client.get_transport_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None

