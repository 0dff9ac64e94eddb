"""Connections to upstream servers: failover, TLS policy, AUTH, client identity and reuse.

A :class:`Connector` hands out a ready :class:`Connection` for one message: connected,
greeted, TLS applied as configured (never a silent fall back to plaintext when TLS is
required), authenticated if a smarthost wants it, and with the original client's identity
passed on (XCLIENT for Postfix, else XFORWARD). Servers are tried in priority order,
weighted at equal priority; one that fails to connect or greet is skipped for a back-off
period. A connection waits for its client session's next message, as if that client were
connected to the server itself; when the session ends it joins the idle connections kept per
server (bounded) for any client's message, unless its XCLIENT told the client's port, which
makes it that client's alone: then it is closed. A reused one is checked with RSET first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from smtpproxy.delivery import DeliveryError
from smtpproxy.delivery.identity import (
    MAX_HELO,
    identity_key,
    xclient_attributes,
    xforward_attributes,
)
from smtpproxy.delivery.pipelining import open_connection, send_command
from smtpproxy.eventlog import event
from smtpproxy.session import Session
from smtpproxy.verdicts import Reply

__all__ = ["Connection", "Connector", "ConnectorSettings", "UpstreamServer", "upstream_reply"]

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_UNSAFE_TEXT = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")

TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]
IdentityMode = Literal["auto", "xclient", "xforward", "none"]


@functools.lru_cache(maxsize=1024)
def upstream_reply(code: int, message: str) -> Reply:
    """Turn an upstream response into a Reply, keeping its enhanced code and text.

    Cached: a busy upstream repeats the same few replies (Reply is immutable)."""
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
    pipelining: bool = True


@dataclass(eq=False)
class UpstreamServer:
    """One upstream host:port and what we know of its health."""

    host: str
    port: int
    priority: int = 10
    weight: int = 1
    down_until: float = 0.0
    idle: deque[Connection] = field(default_factory=deque)
    """Idle connections any client's message may take (bounded by ``max_idle``), oldest first."""
    held: dict[str, list[Connection]] = field(default_factory=dict)
    """Idle connections waiting for their client session's next message, by its id (see
    Connection.holder); bounded by the open sessions, and each by ``idle_timeout``."""
    lendable: dict[Connection, None] = field(default_factory=dict)
    """The held connections that are not pinned, oldest first: one is lent to another
    session's message when nothing else is idle, rather than a connection opened."""
    identity: str | None = None
    """How the last connection told this server the original client: ``xclient``,
    ``xforward`` or ``none``; None until a connection was made."""
    identity_reason: str = ""
    """Why, when ``identity`` is ``none``."""
    down_reason: str | None = None
    """Why the last attempt to use it failed (``tls_verify`` for a certificate that did not
    verify, ``connect``, ``timeout``, ...); None once a connection succeeded."""
    down_detail: str = ""
    offers_dsn: bool | None = None
    """Whether its last EHLO offered DSN (RFC 3461); None until a connection was made."""
    offers_8bitmime: bool | None = None
    """Whether its last EHLO offered 8BITMIME (RFC 6152); None until a connection was made."""
    offers_smtputf8: bool | None = None
    """Whether its last EHLO offered SMTPUTF8 (RFC 6531); None until a connection was made."""
    size: int = 0
    """The SIZE its last EHLO announced (RFC 1870); 0: none announced, or not connected yet."""
    xclient_offered: frozenset[str] | None = None
    """The XCLIENT attributes its last EHLO before an identity offered; None until then, or
    since it refused XCLIENT. Known, a new connection sends XCLIENT without that EHLO."""

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def hold(self, conn: Connection) -> None:
        """Keep *conn* idle for its holder session's next message."""
        assert conn.holder is not None
        self.held.setdefault(conn.holder, []).append(conn)
        if not conn.pinned:
            self.lendable[conn] = None

    def unhold(self, conn: Connection) -> None:
        """Take *conn* out of ``held`` (for another session, or to be closed)."""
        assert conn.holder is not None
        held = self.held[conn.holder]
        held.remove(conn)
        if not held:
            del self.held[conn.holder]
        self.lendable.pop(conn, None)

    def take_held(self, holder: str) -> Connection | None:
        """The connection held last for *holder*, out of ``held``; None when there is none."""
        held = self.held.get(holder)
        if not held:
            return None
        conn = held[-1]
        self.unhold(conn)
        return conn

    def end_hold(self, holder: str) -> list[Connection]:
        """Every connection held for *holder*, out of ``held``."""
        held = self.held.pop(holder, [])
        for conn in held:
            self.lendable.pop(conn, None)
        return held

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
    authorized client, and after one the client *is* the original one (xclient_cmd() in
    smtpd.c matches smtpd_authorized_xclient_hosts again against the new NAME and ADDR), so
    a connection cannot be re-identified: it is reused only for the same identity, port
    included (Postfix hands the port to policy servers, milters and the queue file)."""
    holder: str | None = None
    """The id of the client session whose message it carried last. Until that session ends
    it waits for the session's next message in ``server.held``, not in the shared pool: a
    sender's connection cache keeps one upstream connection, whatever else is in flight."""
    reused: bool = False
    """Taken from the idle pool for this message (it may have died while idle)."""

    @property
    def destination(self) -> str:
        return self.server.name

    @property
    def pinned(self) -> bool:
        """Its XCLIENT told the client's port, which no other client has: it can serve no other
        session, so it is closed when its own ends instead of joining the shared pool."""
        return self.identity is not None and "PORT" in (self.xclient_offered or ())


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


_SURROGATES = re.compile("[\udc80-\udcff]")
"""Octets of a HELO that were not valid UTF-8, as the inbound side keeps them."""

_MAX_IDENTITIES = 1024
"""Encoded XCLIENT identities kept (about one per open client session); all are dropped
when full, so memory stays bounded under any load."""
_MAX_ENDED = 4096
"""Ended sessions remembered (see Connector._ended): more than a background abort can lag."""

class Connector:
    """Opens, prepares, lends and takes back upstream connections."""

    def __init__(self, settings: ConnectorSettings):
        self.settings = settings
        self.on_down: Callable[[str, str], None] | None = None
        """Told the name of each server that failed to connect or greet, and why (metrics)."""
        self.on_identity: Callable[[str, str], None] | None = None
        """Told a server's name and how it learns the client (xclient, xforward, none)."""
        self._identities: dict[tuple[object, ...], tuple[str, ...]] = {}
        """Encoded XCLIENT attributes by what they encode (see _xclient_identity)."""
        self._xforward: dict[tuple[object, ...], bytes] = {}
        """XFORWARD commands by what they encode (see _xforward_command)."""
        self._ended: OrderedDict[str, None] = OrderedDict()
        """Sessions ended lately, for a connection given back after its session ended (an
        upstream transaction aborted in the background): it is not held for that session."""
        self._helo_name = aiosmtplib.SMTP(local_hostname=settings.helo_name).local_hostname
        """helo_name as aiosmtplib checks and keeps it (stripped; ValueError if unusable)."""
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

    async def acquire(self, servers: Sequence[UpstreamServer], session: Session, *,
                      reuse: bool = True) -> tuple[Connection, bytes | None]:
        """A connection ready for MAIL FROM, from the first server that works; else DeliveryError.

        With it, on a server that pipelines, the command still to go in the message's first
        write, before MAIL: XFORWARD, or RSET to probe a reused connection (its reply goes
        to :meth:`accept_prelude`); None when there is none. *reuse* False: a new
        connection, not an idle one.
        """
        now = time.monotonic()
        last_error: DeliveryError | None = None
        for server in order_servers(servers, now):
            reused = await self._reuse(server, session) if reuse else None
            if reused is not None:
                reused[0].holder = session.id
                return reused
            try:
                conn = await self._open(server, session)
            except DeliveryError as exc:
                reason = exc.reason or "connect"
                server.down_until = time.monotonic() + self.settings.down_backoff
                server.down_reason, server.down_detail = reason, exc.detail
                # Warning, like greylist_redis_down: every client of this server hears 4xx
                # until it is back (a certificate that does not verify is a configuration
                # problem, which the reason says).
                event("upstream_down", level=logging.WARNING,
                      upstream=server.name, reason=reason, detail=exc.detail,
                      backoff=self.settings.down_backoff)
                if self.on_down is not None:
                    self.on_down(server.name, reason)
                last_error = exc
                continue
            server.down_until = 0.0
            server.down_reason, server.down_detail = None, ""
            try:
                prelude = await self._identify(conn, session)
            except DeliveryError:
                self.retire(conn)
                raise
            conn.holder = session.id
            return conn, prelude
        assert last_error is not None, "no upstream servers configured"
        raise last_error

    async def _reuse(
        self, server: UpstreamServer, session: Session
    ) -> tuple[Connection, bytes | None] | None:
        """An idle connection to this server that still answers, with the new identity (and
        the command :meth:`acquire` returns with it): the one held for *session*, else one
        from the shared pool that can speak for its client. Those speaking for another
        client are left for theirs."""
        while (conn := self._take_idle(server, session)) is not None:
            if time.monotonic() - conn.idle_since > self.settings.idle_timeout:
                self.retire(conn)
                continue
            identity = self._xclient_identity(conn, session)
            if conn.identity is not None and conn.identity != identity:
                # Held for this session, which has since said another HELO: no longer its own.
                self.retire(conn)
                continue
            conn.reused = True
            if self.pipelines(conn) and identity == conn.identity:  # no XCLIENT to send
                # Probe that the idle connection still answers (as Postfix's connection cache
                # does) in the message's first write: XFORWARD when it is sent, else RSET.
                return conn, self._xforward_command(conn, session) or b"RSET"
            try:
                if not self._identifies_with_a_command(conn, session):
                    # The probe on its own. XCLIENT or XFORWARD, when sent, is that probe already.
                    response = await conn.client.rset()
                    if response.code != 250:
                        raise aiosmtplib.SMTPResponseException(response.code, response.message)
                prelude = await self._identify(conn, session)
            except (aiosmtplib.SMTPException, OSError, DeliveryError) as exc:
                self.retire(conn)
                if isinstance(exc, aiosmtplib.SMTPTimeoutError):
                    return None  # wedged or slow: a new connection, not one timeout per idle one
                continue
            return conn, prelude
        return None

    def _take_idle(self, server: UpstreamServer, session: Session) -> Connection | None:
        """Out of the idle ones: the latest held for *session*; else the oldest in the shared
        pool that can speak for its client; else one lent by another session's hold; else
        None. Those speaking for another client are left for theirs."""
        own = server.take_held(session.id)
        if own is not None:
            return own
        for conn in server.idle:
            if self._can_speak_for(conn, session):
                server.idle.remove(conn)
                return conn
        for conn in server.lendable:
            if self._can_speak_for(conn, session):
                server.unhold(conn)
                return conn
        return None

    def _can_speak_for(self, conn: Connection, session: Session) -> bool:
        """No XCLIENT identity yet, or this session's (one without the client's port is the
        same for all of that client's connections)."""
        return conn.identity is None or conn.identity == self._xclient_identity(conn, session)

    def retire(self, conn: Connection) -> None:
        """Close *conn*, the one way connections are closed: after its last message, stale in
        the sweep, at shutdown, and on the error paths (a refused identity, a failed probe, a
        transfer that did not end cleanly). QUIT written and the connection closed at once,
        without waiting for the 221, as Postfix's own client does (``smtp_skip_quit_response
        = yes``, its default). No task, timer or reply to read per retired connection: where
        each client session has its own (XCLIENT with PORT, a connection per client) that was
        ~4 % of the proxy's CPU a message (bench/README.md, 2026-12-07 16:00); an upstream
        that stopped answering cannot hold a shutdown, nor a client's answer for a QUIT
        timeout. Postfix logs the session as ended by QUIT either way. A connection already
        closed (timed out, lost, or cut in the middle of message data) is left as it is."""
        client = conn.client
        protocol, transport = client.protocol, client.transport
        if protocol is not None and transport is not None and not transport.is_closing():
            protocol.write(b"QUIT\r\n")  # close() below sends it before the FIN (or TLS close)
        client.close()

    def pipelines(self, conn: Connection) -> bool:
        """Whether commands go to this connection in groups (RFC 2920): it offered PIPELINING
        in its last EHLO and the configuration allows it."""
        return self.settings.pipelining and conn.client.supports_extension("pipelining")

    def accept_prelude(self, conn: Connection, command: bytes, reply: SMTPResponse) -> bool:
        """Check the reply to the command :meth:`acquire` returned with the connection.

        False: a reused connection that no longer works (the caller drops it and acquires
        another, as a failed probe would have). A new connection's refused XFORWARD raises
        DeliveryError, as it would when sent on its own.
        """
        if reply.code == 250:
            if command != b"RSET":
                self._note_identity(conn.server, "xforward")
            return True
        if conn.reused:
            return False
        raise self._identity_refused(conn, upstream_reply(_as_temp(reply.code), reply.message),
                                     f"XFORWARD refused: {reply.code} {reply.message}")

    def release(self, conn: Connection) -> None:
        """Give back a connection after a completed (or cleanly aborted) transaction: held
        for its client session's next message, or shared once that session has ended."""
        conn.messages += 1
        s = self.settings
        if not conn.client.is_connected or conn.messages >= s.max_messages or s.max_idle <= 0:
            self.retire(conn)
            return
        conn.idle_since = time.monotonic()
        holder = conn.holder
        if holder is not None and holder not in self._ended:
            conn.server.hold(conn)
        else:
            self._share(conn)

    def _share(self, conn: Connection) -> None:
        """Into the shared pool, where the oldest idle connection makes room once ``max_idle``
        are there; closed instead when it can serve no other client."""
        if conn.pinned:
            self.retire(conn)
            return
        idle = conn.server.idle
        if len(idle) >= self.settings.max_idle:
            self.retire(idle.popleft())
        idle.append(conn)

    def end_session(self, session: Session, servers: Sequence[UpstreamServer]) -> None:
        """The client session is over: the connections held for it (and any it gives back
        later) join the shared pool, or are closed (QUIT, not waiting for its reply) when pinned to it."""
        self._ended[session.id] = None
        if len(self._ended) > _MAX_ENDED:
            self._ended.popitem(last=False)
        for server in servers:
            for conn in server.end_hold(session.id):
                self._share(conn)

    def close_idle(self, servers: Sequence[UpstreamServer]) -> None:
        """Close every idle connection at shutdown, as after its last message (QUIT, then
        hang up): an upstream that stopped answering cannot hold the stop for a QUIT timeout
        per connection."""
        for server in servers:
            while server.idle:
                self.retire(server.idle.popleft())
            for holder in list(server.held):
                for conn in server.end_hold(holder):
                    self.retire(conn)

    async def sweep(self, servers: Sequence[UpstreamServer]) -> None:
        """Close idle connections past their idle time, forever (run as a task)."""
        while True:
            await asyncio.sleep(self.settings.idle_timeout / 2)
            limit = time.monotonic() - self.settings.idle_timeout
            for server in servers:
                # All taken out of the pool before the first is closed: the lists are not
                # walked while they change.
                stale = [c for c in server.idle if c.idle_since < limit]
                for conn in stale:
                    server.idle.remove(conn)
                gone = [c for held in server.held.values() for c in held if c.idle_since < limit]
                for conn in gone:  # clients silent that long
                    server.unhold(conn)
                for conn in stale + gone:
                    self.retire(conn)

    async def _open(self, server: UpstreamServer, session: Session | None = None) -> Connection:
        """Connect, greet, apply TLS and AUTH. Raises DeliveryError (temporary) on any failure.

        With *session*, on a server known to take XCLIENT (and no AUTH to do), the client's
        identity goes right after the greeting (or STARTTLS) instead of after an EHLO that
        the XCLIENT would void: one round trip and one EHLO less per new connection."""
        s = self.settings
        early = self._early_xclient(server, session)
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, timeout=s.command_timeout,
            use_tls=s.tls == "implicit", start_tls=False,
            tls_context=self._verify_context if s.tls == "implicit" else None,
        )
        client.local_hostname = self._helo_name  # checked once (the constructor checks each time)
        try:
            tls = await self._handshake(client, server, last_ehlo=early is None)
            conn = Connection(client, server, tls, xclient_offered=early)
            if early is not None and session is not None and not await self._xclient_first(conn, session):
                await self._ehlo(client, server)  # it refused: learn what it offers now
                early = None
            if s.username is not None and s.password is not None:
                await client.login(s.username, s.password)
            server.offers_dsn = client.supports_extension("dsn")
            server.offers_8bitmime = client.supports_extension("8bitmime")
            server.offers_smtputf8 = client.supports_extension("smtputf8")
            server.size = _announced_size(client.esmtp_extensions.get("size", ""))
            if early is None:  # what it offers before any identity
                conn.xclient_offered = server.xclient_offered = (
                    frozenset(client.esmtp_extensions.get("xclient", "").upper().split())
                    if client.supports_extension("xclient") else None)
            return conn
        except DeliveryError:
            client.close()
            raise
        except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            client.close()
            raise DeliveryError(
                Reply(451, "4.4.2", "Upstream mail server timed out, try again later"),
                f"{server.name}: timeout: {exc}", "timeout",
            ) from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise DeliveryError(
                Reply(451, "4.7.0", "Upstream authentication failed, try again later"),
                f"{server.name}: AUTH failed: {exc.code} {exc.message}", "auth",
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            verify = _cert_error(exc)
            if verify is None:
                raise _unreachable(server, exc) from exc
            raise DeliveryError(
                Reply(451, "4.7.5", "TLS with the upstream mail server failed, try again later"),
                f"{server.name}: TLS certificate verification failed: {verify.verify_message}",
                "tls_verify",
            ) from exc

    async def _handshake(self, client: aiosmtplib.SMTP, server: UpstreamServer, *,
                         last_ehlo: bool = True) -> str | None:
        """Greeting, EHLO and TLS. *last_ehlo* False: no EHLO after the last step (greeting
        or STARTTLS), for an XCLIENT that goes there (an EHLO before STARTTLS still does)."""
        s = self.settings
        # Implicit TLS verifies the certificate against ``host`` (aiosmtplib has no separate
        # server name for it); tls_hostname applies to STARTTLS.
        if s.tls == "implicit":
            greeting = await client.connect(timeout=s.connect_timeout)
        else:
            greeting = await open_connection(client, s.connect_timeout)
        if greeting.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(greeting.code), greeting.message),
                                f"{server.name}: greeting {greeting.code}")
        if s.tls in ("implicit", "none"):
            if last_ehlo:
                await self._ehlo(client, server)
            return _tls_version(client) if s.tls == "implicit" else None
        await self._ehlo(client, server)
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
            verify = _cert_error(exc)
            detail = (f"TLS certificate verification failed: {verify.verify_message}"
                      if verify is not None else f"STARTTLS failed: {exc}")
            raise DeliveryError(
                Reply(451, "4.7.5", "TLS with the upstream mail server failed, try again later"),
                f"{server.name}: {detail}", "tls_verify" if verify is not None else "tls",
            ) from exc
        if response.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(response.code), response.message),
                                f"{server.name}: STARTTLS refused")
        # RFC 3207 4.2: the server forgot everything; greet again (and learn the extensions it
        # offers under TLS). execute_command, which we use for MAIL, will not do it for us.
        if last_ehlo:
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

    async def _greet_as_client(self, conn: Connection, helo: str | None) -> None:
        """EHLO with the client's own HELO argument: words and UTF-8 as they came (Postfix
        joins the words), octets that are not UTF-8 as '?' (Postfix refuses them with 500).
        If the upstream will not take it, or it is longer than an upstream accepts, greet as
        the proxy: the message still goes, only the upstream's idea of the HELO is ours."""
        client = conn.client
        if helo:
            octets = _SURROGATES.sub("?", helo).encode("utf-8")
            if len(octets) <= MAX_HELO:
                response = await send_command(client, b"EHLO", octets,
                                              reply_timeout=self.settings.command_timeout)
                if response.code == 250:
                    _learn_extensions(client, response)  # as ehlo() does
                    return
                event("upstream_helo_refused", upstream=conn.destination, reply=response.code)
        await self._ehlo(client, conn.server)

    def _early_xclient(self, server: UpstreamServer, session: Session | None) -> frozenset[str] | None:
        """The XCLIENT attributes a new connection to *server* can send before any EHLO
        (Postfix takes XCLIENT in any state outside a transaction), or None: not known to be
        offered, no session, another identity mode, or AUTH to do first (it needs EHLO)."""
        s = self.settings
        if session is None or s.identity not in ("auto", "xclient") or s.username is not None:
            return None
        return server.xclient_offered

    async def _xclient_first(self, conn: Connection, session: Session) -> bool:
        """XCLIENT on a new connection before any EHLO, then EHLO as the client; False when
        the server refused it (the connection is still at its greeting: the caller greets)."""
        identity = self._xclient_identity(conn, session)
        assert identity is not None
        response = await send_command(conn.client, b"XCLIENT", *[a.encode() for a in identity],
                                      reply_timeout=self.settings.command_timeout)
        if response.code not in (220, 250):
            conn.xclient_offered = conn.server.xclient_offered = None
            return False
        await self._greet_as_client(conn, session.helo)
        self._speaks_for(conn, identity)
        return True

    def _speaks_for(self, conn: Connection, identity: tuple[str, ...]) -> None:
        """*conn* took XCLIENT *identity* (with the client's port in it, it is pinned)."""
        conn.identity = identity
        self._note_identity(conn.server, "xclient")

    def _xclient_identity(self, conn: Connection, session: Session) -> tuple[str, ...] | None:
        """The XCLIENT attributes for this session, or None when XCLIENT is not used here.

        Asked up to three times per message (the idle connection's match, the new
        connection's XCLIENT, the check after it): the encoded attributes are kept for the
        values they were made from."""
        offered = conn.xclient_offered
        if self.settings.identity not in ("auto", "xclient") or offered is None:
            return None
        key = identity_key(b"XCLIENT", session, offered)
        identity = self._identities.get(key)
        if identity is None:
            if len(self._identities) >= _MAX_IDENTITIES:
                self._identities.clear()
            identity = self._identities[key] = tuple(xclient_attributes(session, offered))
        return identity

    def _identifies_with_a_command(self, conn: Connection, session: Session) -> bool:
        """Whether :meth:`_identify` will send XCLIENT or XFORWARD on this connection now."""
        identity = self._xclient_identity(conn, session)
        if identity is not None:
            return conn.identity != identity
        return self.settings.identity in ("auto", "xforward") and conn.client.supports_extension("xforward")

    def _note_identity(self, server: UpstreamServer, mechanism: str, reason: str = "") -> None:
        """Remember how *server* learns the client; a change to "not told" is a warning."""
        if server.identity == mechanism and server.identity_reason == reason:
            return
        server.identity, server.identity_reason = mechanism, reason
        if mechanism == "none" and self.settings.identity != "none":
            # The upstream now sees the proxy as the client: its own client restrictions,
            # permit_mynetworks included, apply to the proxy's address (docs/deploy-postfix.md).
            event("upstream_identity_missing", level=logging.WARNING, upstream=server.name,
                  mode=self.settings.identity, reason=reason)
        else:
            event("upstream_identity", upstream=server.name, mechanism=mechanism)
        if self.on_identity is not None:
            self.on_identity(server.name, mechanism)

    def _identity_refused(self, conn: Connection, reply: Reply, detail: str) -> DeliveryError:
        """A 4xx for the client, and a warning that says why (it is the proxy's problem)."""
        event("upstream_identity_refused", level=logging.WARNING, upstream=conn.destination,
              mode=self.settings.identity, reply=reply.code, reason=detail)
        return DeliveryError(reply, f"{conn.destination}: {detail}")

    async def _identify(self, conn: Connection, session: Session) -> bytes | None:
        """Tell the upstream who the real client is (per message: pooled connections move on).

        On a server that pipelines, XFORWARD is not sent here but returned, to go with MAIL."""
        mode = self.settings.identity
        client = conn.client
        identity = self._xclient_identity(conn, session)
        if identity is not None:
            if conn.identity == identity:
                return None  # a reused connection already speaking for this client
            response = await send_command(client, b"XCLIENT", *[a.encode() for a in identity],
                                          reply_timeout=self.settings.command_timeout)
            if response.code not in (220, 250):  # 220 greeting (Postfix >= 2.3); 250 before that
                raise self._identity_refused(
                    conn, upstream_reply(_as_temp(response.code), response.message),
                    f"XCLIENT refused: {response.code} {response.message}",
                )
            # XCLIENT resets the session like a new greeting; greet with the client's own name,
            # or that EHLO would replace the HELO= just sent (Postfix logs and Received show it).
            await self._greet_as_client(conn, session.helo)
            self._speaks_for(conn, identity)
        elif (command := self._xforward_command(conn, session)) is not None:
            if self.pipelines(conn):
                return command  # sent with MAIL, its reply to accept_prelude
            response = await client.execute_command(command)
            if not self.accept_prelude(conn, command, response):
                raise aiosmtplib.SMTPResponseException(response.code, response.message)
        elif mode in ("xclient", "xforward"):
            self._note_identity(conn.server, "none", f"{mode.upper()} not offered")
            raise self._identity_refused(
                conn, Reply(451, "4.7.0", "Upstream mail server does not accept the client identity"),
                f"{mode.upper()} required by configuration but not offered "
                f"(is the proxy's address in smtpd_authorized_{mode}_hosts?)",
            )
        elif mode == "auto":
            self._note_identity(conn.server, "none", "upstream offers neither XCLIENT nor XFORWARD")
        else:
            self._note_identity(conn.server, "none", "client_identity: none")
        return None

    def _xforward_command(self, conn: Connection, session: Session) -> bytes | None:
        """XFORWARD with the client's attributes, when the mode and the server allow it."""
        if self.settings.identity not in ("auto", "xforward"):
            return None
        if not conn.client.supports_extension("xforward"):
            return None
        keywords = conn.client.esmtp_extensions.get("xforward", "")
        offered = _XFORWARD_OFFERED.get(keywords)
        if offered is None:
            if len(_XFORWARD_OFFERED) >= _MAX_IDENTITIES:
                _XFORWARD_OFFERED.clear()
            offered = _XFORWARD_OFFERED[keywords] = frozenset(keywords.upper().split())
        key = identity_key(b"XFORWARD", session, offered)
        command = self._xforward.get(key)
        if command is None:
            if len(self._xforward) >= _MAX_IDENTITIES:
                self._xforward.clear()
            command = self._xforward[key] = b" ".join(
                [b"XFORWARD", *[a.encode() for a in xforward_attributes(session, offered)]])
        return command


_EXTENSIONS: dict[str, tuple[dict[str, str], list[str]]] = {}
"""aiosmtplib's reading of an EHLO reply, by its text: a server answers every EHLO alike."""


def _learn_extensions(client: aiosmtplib.SMTP, response: SMTPResponse) -> None:
    """``client.last_ehlo_response = response`` (which parses the extensions each time), with
    the parse of an EHLO text seen before reused (the client gets its own copies)."""
    known = _EXTENSIONS.get(response.message)
    if known is None:
        client.last_ehlo_response = response
        if len(_EXTENSIONS) >= _MAX_IDENTITIES:
            _EXTENSIONS.clear()
        _EXTENSIONS[response.message] = (dict(client.esmtp_extensions), list(client.server_auth_methods))
        return
    client._last_ehlo_response = response  # what the setter stores, and the parse it makes
    client.esmtp_extensions, client.server_auth_methods = dict(known[0]), list(known[1])
    client.supports_esmtp = True


_XFORWARD_OFFERED: dict[str, frozenset[str]] = {}
"""The attributes an XFORWARD EHLO keyword's parameters name, by its text."""


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind *exc* (aiosmtplib wraps it), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _unreachable(server: UpstreamServer, exc: BaseException) -> DeliveryError:
    return DeliveryError(
        Reply(451, "4.4.1", "Upstream mail server not reachable, try again later"),
        f"{server.name}: {type(exc).__name__}: {exc}", "connect",
    )


def _as_temp(code: int) -> int:
    """An upstream that refuses us before MAIL is our problem, not the sender's: retry later."""
    return code if 400 <= code < 500 else 451


def _tls_version(client: aiosmtplib.SMTP) -> str | None:
    ssl_object = client.get_transport_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None


def _announced_size(value: str) -> int:
    """The number of a ``SIZE`` EHLO keyword (``SIZE 10240000``); 0 for none or nonsense."""
    text = value.strip()
    return int(text) if text.isdigit() and len(text) <= 15 else 0
