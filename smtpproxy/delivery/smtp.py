"""Forwarding to upstream MTAs (Postfix, Exchange, a smarthost) with aiosmtplib.

Transparency rules: the upstream's reply to the end of DATA (code, enhanced code, text)
is what the client gets; a refusal at MAIL, RCPT or DATA is relayed with the upstream's
code; an unreachable or silent upstream becomes ``451 4.4.x`` so the client retries.

Two ways to meet the upstream (``rcpt_mode``):

- ``relay`` (default): the upstream transaction runs alongside the client's. Each RCPT that
  the plugins accept is asked of the upstream at once and its exact answer relayed, so
  unknown users are refused at RCPT by the real server. Costs an upstream connection per
  open client transaction.
- ``at_data``: the upstream is contacted once the plugins accepted the whole message. If it
  then refuses some recipients, the client gets ``451`` for the message (delivering to the
  others after the client heard 250 for all would lose mail silently); if it refuses all of
  them permanently, its refusal is relayed. Either way each refusal is remembered (per
  route, sender and recipient, for ``refusal_memory`` seconds) and given at RCPT when the
  client sends again, so the other recipients go through on that retry instead of being
  deferred with the refused one until the message bounces.

Addresses are sent with ``execute_command`` exactly as the inbound parser validated them:
aiosmtplib's ``mail()``/``rcpt()`` would run them through ``email.utils.parseaddr``, which
silently rewrites some addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import aiosmtplib

from smtpproxy import config as cfg
from smtpproxy.addresses import Address
from smtpproxy.delivery import Delivered, DeliveryError, DeliveryState
from smtpproxy.delivery.pipelining import OutOfStep, pipeline
from smtpproxy.delivery.probe import probe_upstreams
from smtpproxy.delivery.stream import send_data
from smtpproxy.delivery.upstream import (
    Connection,
    Connector,
    ConnectorSettings,
    UpstreamServer,
    upstream_reply,
)
from smtpproxy.dsn import MAIL_PARAMS, RCPT_PARAMS
from smtpproxy.eventlog import event
from smtpproxy.message import Message
from smtpproxy.received import received_field, wants_received
from smtpproxy.routing import DEFAULT_ROUTE, RouteTable, route_of
from smtpproxy.session import Envelope, Recipient, Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["RelayTransaction", "SmtpDelivery", "upstream_reply"]

class SmtpDelivery:
    """Upstream pools per route, with failover and connection reuse."""

    name = "smtp"

    def __init__(
        self,
        connector: Connector,
        default: Sequence[UpstreamServer],
        routes: Sequence[tuple[Sequence[str], Sequence[UpstreamServer]]] = (),
        *,
        rcpt_mode: str = "relay",
        refusal_memory: float = 3600.0,
        received: str = "auto",
        hostname: str = "localhost",
        route_names: Sequence[str | None] = (),
    ):
        self.connector = connector
        self.received = received
        self.hostname = hostname
        self.rcpt_mode = rcpt_mode
        self.refusal_memory = refusal_memory
        self._refusals: OrderedDict[tuple[str, str, str], tuple[Reply, float]] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self._table = RouteTable([domains for domains, _ in routes], route_names)
        self._routes: dict[str, list[UpstreamServer]] = {DEFAULT_ROUTE: list(default)}
        for key, (_, servers) in zip(self._table.keys, routes, strict=True):
            self._routes[key] = list(servers)
        self._servers = tuple(s for servers in self._routes.values() for s in servers)
        """Every route's servers, for what EHLO offers (asked per client session)."""

    @classmethod
    def from_config(
        cls, c: cfg.SmtpDeliveryConfig, helo_name: str, *, received: str = "auto"
    ) -> SmtpDelivery:
        settings = ConnectorSettings(
            tls=c.tls, tls_verify=c.tls_verify, ca_file=_path(c.ca_file),
            tls_hostname=c.tls_hostname, client_cert=_path(c.client_cert),
            client_key=_path(c.client_key), helo_name=c.helo_name or helo_name,
            identity=c.client_identity,
            username=c.auth.username if c.auth else None,
            password=c.auth.password if c.auth else None,
            connect_timeout=c.connect_timeout, command_timeout=c.command_timeout,
            data_timeout=c.data_timeout, max_idle=c.pool.max_idle,
            idle_timeout=c.pool.idle_timeout, max_messages=c.pool.max_messages,
            down_backoff=c.down_backoff, pipelining=c.pipelining,
        )
        routes = [(route.domains, _servers(route.upstreams)) for route in c.routes]
        return cls(Connector(settings), _servers(c.default_upstreams()), routes,
                   rcpt_mode=c.rcpt_mode, refusal_memory=c.refusal_memory,
                   received=received, hostname=helo_name, route_names=[r.name for r in c.routes])

    @property
    def servers(self) -> list[UpstreamServer]:
        return list(self._servers)

    @property
    def route_servers(self) -> dict[str, list[UpstreamServer]]:
        """The servers of each route (``default`` first); readiness wants one alive per route."""
        return {key: list(servers) for key, servers in self._routes.items()}

    def route_key(self, address: Address) -> str:
        """Which upstream pool a recipient goes to (one transaction goes to one pool)."""
        return self._table.key_of(address)

    async def start(self) -> None:
        if self.connector.settings.max_idle > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self.connector.sweep(self.servers))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.connector.close_idle(self.servers)

    def end_session(self, session: Session) -> None:
        self.connector.end_session(session, self._servers)

    async def deliver(self, session: Session, transaction: Transaction, content: Message) -> Delivered:
        """Send the message to every route its recipients belong to; 250 only if all took it."""
        groups: dict[str, list[Recipient]] = {}
        for rcpt in transaction.envelope.recipients:
            groups.setdefault(route_of(transaction.notes, rcpt.address, self.route_key), []).append(rcpt)
        delivered: Delivered | None = None
        for key, recipients in groups.items():
            transfer, replies = await _Transfer.start(
                self.connector, self._routes[key], session, transaction.envelope, size=content.size,
                recipients=[(rcpt.address, rcpt.params) for rcpt in recipients], data=True,
            )
            async with transfer:
                conn = transfer.conn
                refused = [(rcpt.address.text, reply) for rcpt, reply in zip(recipients, replies, strict=True)
                           if not reply.is_positive]
                if refused:
                    await transfer.reset()
                    for address_text, reply in refused:
                        self._remember(key, transaction.envelope.sender.text, address_text, reply)
                    raise DeliveryError(_refusal_reply(refused, len(recipients)),
                                        f"{conn.destination}: recipients refused: "
                                        + ", ".join(f"{a} {r.code}" for a, r in refused))
                reply = await transfer.data(content, self._trace(conn, session, transaction))
                delivered = Delivered(reply, conn.destination, conn.tls)
        assert delivered is not None, "a transaction always has recipients"
        return delivered

    def _remember(self, route: str, sender: str, recipient: str, reply: Reply) -> None:
        if self.refusal_memory <= 0:
            return
        key = (route, sender.lower(), recipient.lower())
        self._refusals.pop(key, None)
        self._refusals[key] = (reply, time.monotonic() + self.refusal_memory)
        while len(self._refusals) > _MAX_REMEMBERED:
            self._refusals.popitem(last=False)

    def remembered_refusal(self, sender: Address, recipient: Address) -> Reply | None:
        """The upstream's refusal of *recipient* at an earlier delivery from *sender*."""
        if not self._refusals:
            return None
        key = (self.route_key(recipient), sender.text.lower(), recipient.text.lower())
        entry = self._refusals.get(key)
        if entry is None:
            return None
        reply, expires = entry
        if time.monotonic() >= expires:
            del self._refusals[key]
            return None
        return reply

    def _trace(self, conn: Connection, session: Session, transaction: Transaction) -> bytes:
        """Our Received: field for this hop, or nothing (``received_header``)."""
        told = conn.server.identity in ("xclient", "xforward")
        if wants_received(self.received, client_told=told):
            return received_field(session, transaction, self.hostname)
        return b""

    # What the client is offered is what every upstream of every route offers: the route is
    # not known at EHLO. A server not connected to yet is assumed to offer what Postfix does
    # (DSN, 8BITMIME, SMTPUTF8, no SIZE below ours); the checks at MAIL and at the end of
    # data (_Transfer) cover a message sent before a server was seen without one.

    def offers_dsn(self) -> bool:
        return all(s.offers_dsn is not False for s in self._servers)

    def offers_8bitmime(self) -> bool:
        return all(s.offers_8bitmime is not False for s in self._servers)

    def offers_smtputf8(self) -> bool:
        return all(s.offers_smtputf8 is not False for s in self._servers)

    def size_limit(self) -> int | None:
        """The smallest SIZE any upstream announced, less SIZE_MARGIN (what the proxy adds)."""
        sizes = [s.size for s in self._servers if s.size]
        return max(min(sizes) - SIZE_MARGIN, 1) if sizes else None

    def reply_bound(self) -> float:
        """The end of DATA's timeout, and one command's (the pipelined group before it)."""
        s = self.connector.settings
        return s.data_timeout + s.command_timeout

    async def probe(self, greeting_seconds: float) -> DeliveryState:
        implicit = self.connector.settings.tls == "implicit"
        return await probe_upstreams(self.route_servers, implicit_tls=implicit,
                                     greeting_seconds=greeting_seconds)

    def upstream_names(self) -> list[str]:
        return list({u.name: None for servers in self.route_servers.values() for u in servers})

    def report_to(self, on_down: Callable[[str, str], None],
                  on_identity: Callable[[str, str], None]) -> None:
        self.connector.on_down = on_down
        self.connector.on_identity = on_identity

    def open_transaction(self, session: Session, transaction: Transaction) -> RelayTransaction:
        """For rcpt_mode relay: an upstream transaction that follows the client's."""
        return RelayTransaction(self, session, transaction)

    def _servers_for(self, key: str) -> list[UpstreamServer]:
        return self._routes[key]


class RelayTransaction:
    """The upstream half of a client transaction in ``rcpt_mode: relay``."""

    def __init__(self, delivery: SmtpDelivery, session: Session, transaction: Transaction):
        self._delivery = delivery
        self._session = session
        self._transaction = transaction
        self._transfer: _Transfer | None = None
        self._failed: Reply | None = None

    @property
    def started(self) -> bool:
        return self._transfer is not None

    async def rcpt(self, address: Address, params: Mapping[str, str | None] | None = None) -> Reply:
        """Ask the upstream about one recipient; its answer is the client's answer."""
        if self._failed is not None:
            return self._failed
        if self._transfer is None:
            try:  # the first recipient opens the upstream transaction, in one write if it pipelines
                self._transfer, (reply,) = await _Transfer.start(
                    self._delivery.connector,
                    self._delivery._servers_for(route_of(self._transaction.notes, address,
                                                         self._delivery.route_key)),
                    self._session, self._transaction.envelope, size=_declared_size(self._transaction),
                    recipients=[(address, params)], data=False,
                )
            except DeliveryError as exc:
                self._failed = exc.reply
                return exc.reply
            return reply
        try:
            return await self._transfer.rcpt(address, self._transaction.envelope.smtputf8, params)
        except DeliveryError as exc:
            self._failed = exc.reply
            await self.abort()
            return exc.reply

    async def data(self, content: Message) -> Delivered:
        if self._transfer is None:
            raise DeliveryError(self._failed or Reply(451, "4.4.0", "No upstream transaction"))
        transfer, self._transfer = self._transfer, None
        async with transfer:
            trace = self._delivery._trace(transfer.conn, self._session, self._transaction)
            reply = await transfer.data(content, trace)
            return Delivered(reply, transfer.conn.destination, transfer.conn.tls)

    async def abort(self) -> None:
        """The client gave up (RSET, QUIT, refusal): end the upstream transaction too."""
        transfer, self._transfer = self._transfer, None
        if transfer is not None:
            async with transfer:
                await transfer.reset()


class _Transfer:
    """One message on one connection; turns every failure into a DeliveryError.

    As a context manager it returns the connection to the pool when the transaction ended
    cleanly, and closes it otherwise (a connection in an unknown state is never reused).
    """

    def __init__(self, connector: Connector, conn: Connection):
        self.connector = connector
        self.conn = conn
        self.clean = False
        self.out_of_step = False
        self.seven_bit_only = False
        """The client said BODY=8BITMIME and the upstream does not offer 8BITMIME."""
        self.in_data = False
        """The upstream answered a pipelined DATA with 354: it takes the message now, and
        the only way to end the transaction without sending one is to close the connection."""

    @classmethod
    async def start(
        cls, connector: Connector, servers: Sequence[UpstreamServer], session: Session,
        envelope: Envelope, *, size: int | None,
        recipients: Sequence[tuple[Address, Mapping[str, str | None] | None]], data: bool,
    ) -> tuple[_Transfer, list[Reply]]:
        """A connection with MAIL and *recipients* sent, and the replies to the RCPTs.

        On a server that pipelines, the command acquire returned (XFORWARD, or RSET probing a
        reused connection), MAIL, the RCPTs and, with *data*, DATA go in one write (RFC 2920);
        a reused connection that turns out dead is dropped and the next one tried, as a
        failed probe would be: no message data has been sent on it. Raises DeliveryError
        (a MAIL refusal, an unreachable upstream); the connection is then closed.
        """
        reuse = True
        while True:
            conn, prelude = await connector.acquire(servers, session, reuse=reuse)
            transfer = cls(connector, conn)
            try:
                return transfer, await transfer._begin(envelope, size, recipients, prelude, data=data)
            except _DeadConnection as dead:
                transfer.close()
                # A timeout: the upstream may be slow rather than the connection dead, so one
                # more try, on a new connection, instead of one timeout per idle connection.
                reuse = reuse and not dead.timed_out
            except BaseException:
                await transfer.__aexit__()  # a refused DATA leaves it clean, for the pool
                raise

    async def __aenter__(self) -> _Transfer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.clean:
            self.connector.release(self.conn)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection: QUIT without waiting for its reply, or no QUIT while the
        upstream expects message data (a QUIT there would be a line of the message)."""
        if self.in_data or self.out_of_step:
            self.conn.client.close()
        self.connector.retire(self.conn)

    def _lost_upstream_is_temporary(self, exc: aiosmtplib.SMTPException | OSError) -> NoReturn:
        """A timeout or lost connection mid-transaction: 451, the client retries. Called in
        the ``except (aiosmtplib.SMTPException, OSError)`` of every exchange (a with-block
        of a generator context manager cost more than the rest of a command's bookkeeping)."""
        if isinstance(exc, OutOfStep):
            self._out_of_step(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPTimeoutError):
            raise DeliveryError(Reply(451, "4.4.2", "Upstream mail server timed out, try again later"),
                                f"{self.conn.destination}: {exc}") from exc
        raise DeliveryError(Reply(451, "4.4.2", "Upstream connection lost, try again later"),
                            f"{self.conn.destination}: {type(exc).__name__}: {exc}") from exc

    async def _command(self, command: bytes) -> Reply:
        try:
            [response] = await pipeline(self.conn.client, [command], self.connector.settings.command_timeout)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._lost_upstream_is_temporary(exc)
        return upstream_reply(response.code, response.message)

    async def _begin(self, envelope: Envelope, size: int | None,
                     recipients: Sequence[tuple[Address, Mapping[str, str | None] | None]],
                     prelude: bytes | None, *, data: bool) -> list[Reply]:
        mail = self._mail_command(envelope, size)
        rcpts = [self._rcpt_command(address, envelope.smtputf8, params) for address, params in recipients]
        if not self.connector.pipelines(self.conn):
            self._check_mail(await self._command(mail))
            return [self._in_step(await self._command(rcpt), _RCPT_OK) for rcpt in rcpts]
        group = [*([prelude] if prelude else []), mail, *rcpts, *([b"DATA"] if data else [])]
        try:
            try:
                responses = await pipeline(self.conn.client, group, self.connector.settings.command_timeout)
            except (aiosmtplib.SMTPException, OSError) as exc:
                self._lost_upstream_is_temporary(exc)
        except DeliveryError as exc:
            if self.conn.reused:  # it may have died while idle: start() tries another
                timed_out = isinstance(exc.__cause__, aiosmtplib.SMTPTimeoutError)
                raise _DeadConnection(timed_out=timed_out) from None
            raise
        probe = (prelude, responses.pop(0)) if prelude is not None else None
        replies = [upstream_reply(r.code, r.message) for r in responses]
        if data:
            data_reply = replies.pop()
            self.in_data = data_reply.is_positive  # first: closing must not say QUIT (354, or out of step)
            self._in_step(data_reply, _DATA_OK)
        if probe is not None and not self.connector.accept_prelude(self.conn, *probe):
            raise _DeadConnection
        self._check_mail(replies[0])
        rcpt_replies = [self._in_step(reply, _RCPT_OK) for reply in replies[1:]]
        if data and not self.in_data and any(r.is_positive for r in rcpt_replies):
            # DATA refused although recipients were taken: the upstream's answer to the message
            self.clean = True
            raise DeliveryError(data_reply, f"{self.conn.destination}: DATA refused: {data_reply.code}")
        return rcpt_replies

    def _mail_command(self, envelope: Envelope, size: int | None) -> bytes:
        client = self.conn.client
        options = []
        if size is not None and client.supports_extension("size"):
            options.append(b"SIZE=%d" % size)
        body = (envelope.sender_params.get("BODY") or "").upper()
        if body and client.supports_extension("8bitmime"):
            options.append(b"BODY=" + body.encode("ascii"))
        elif body == "8BITMIME":
            # Not passed on (the upstream would refuse it): the message goes only if it has
            # no 8-bit octet after all (data()), never converted (that would break DKIM).
            self.seven_bit_only = True
        if envelope.smtputf8:
            if not client.supports_extension("smtputf8"):
                raise DeliveryError(
                    Reply(550, "5.6.7", "Upstream mail server does not support SMTPUTF8"),
                    f"{self.conn.destination}: no SMTPUTF8",
                )
            options.append(b"SMTPUTF8")
        options += self._dsn_options(envelope.sender_params, MAIL_PARAMS)
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        return b" ".join([b"MAIL FROM:<" + envelope.sender.text.encode(encoding) + b">", *options])

    def _check_mail(self, reply: Reply) -> None:
        if self._in_step(reply, _MAIL_OK).code != 250:
            raise DeliveryError(reply, f"{self.conn.destination}: MAIL refused: {reply.code}")

    def _rcpt_command(self, address: Address, smtputf8: bool,
                      params: Mapping[str, str | None] | None) -> bytes:
        encoding = "utf-8" if smtputf8 else "ascii"
        options = self._dsn_options(params or {}, RCPT_PARAMS)
        return b" ".join([b"RCPT TO:<" + address.text.encode(encoding) + b">", *options])

    async def rcpt(self, address: Address, smtputf8: bool,
                   params: Mapping[str, str | None] | None = None) -> Reply:
        """One more recipient in an open transaction (rcpt_mode relay)."""
        return self._in_step(await self._command(self._rcpt_command(address, smtputf8, params)), _RCPT_OK)

    def _dsn_options(self, params: Mapping[str, str | None], names: frozenset[str]) -> list[bytes]:
        """The client's DSN parameters (validated inbound) for an upstream that offers DSN."""
        wanted = [(k, v) for k, v in params.items() if k in names and v is not None]
        if not wanted:
            return []
        if not self.conn.client.supports_extension("dsn"):
            # Not dropped: the client asked for DSNs (or for none: NOTIFY=NEVER) and would
            # not get what it asked. Its retry sees no DSN in our EHLO any more, and it
            # handles the DSN itself (RFC 3461 "relayed").
            event("dsn_not_offered", level=logging.WARNING, upstream=self.conn.destination,
                  refused=[k for k, _ in wanted])
            self.clean = True  # nothing was sent: the connection is as it was
            raise DeliveryError(DSN_NOT_OFFERED, f"{self.conn.destination}: no DSN")
        return [f"{k}={v}".encode("ascii") for k, v in wanted]

    async def data(self, content: Message, trace: bytes = b"") -> Reply:
        """Send the message, with *trace* (our Received: field) on top when given."""
        parts = (trace, *content.parts()) if trace else content.parts()
        if self.seven_bit_only and any(_EIGHT_BIT.search(part) for part in content.parts()):
            await self.reset()
            raise DeliveryError(NOT_8BIT_CLEAN, f"{self.conn.destination}: 8-bit data, no 8BITMIME")
        try:
            response = await send_data(
                self.conn.client, parts, self.connector.settings.data_timeout, started=self.in_data,
                chunking=self.conn.client.supports_extension("chunking"),
            )
        except aiosmtplib.SMTPDataError as exc:
            refusal = self._in_step(upstream_reply(exc.code, exc.message), frozenset())
            self.clean = True  # a refusal of the message leaves the session usable
            raise DeliveryError(refusal, f"{self.conn.destination}: DATA refused: {exc.code}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._lost_upstream_is_temporary(exc)
        finally:
            self.in_data = False
        reply = self._in_step(upstream_reply(response.code, response.message), _END_OK)
        self.clean = True
        if reply.code != 250:
            raise DeliveryError(reply, f"{self.conn.destination}: DATA {reply.code}")
        return reply

    def _in_step(self, reply: Reply, success: frozenset[int]) -> Reply:
        """The upstream's reply, if it is a success this command may get or a refusal (4xx,
        5xx). Anything else (a 354 to RCPT, a 220 to MAIL, a 251 at the end of data) means the
        upstream is out of step with us: DeliveryError 451, never a positive answer the client
        would take for one, and the connection is not used again."""
        if reply.code >= 400 or reply.code in success:
            return reply
        self._out_of_step(reply.code, reply.text)

    def _out_of_step(self, code: int, text: str) -> NoReturn:
        """451, and the connection is never used again."""
        self.out_of_step = True
        self.clean = False
        reply = Reply(451, "4.4.0", f"Upstream sent an unexpected reply ({code}), try again later")
        raise DeliveryError(reply, f"{self.conn.destination}: unexpected reply {code} {text[:80]!r}")

    async def reset(self) -> None:
        """End the transaction without a message: RSET, or close the connection when the
        upstream already waits for message data (or is out of step with us)."""
        if self.in_data or self.out_of_step:
            self.clean = False
            return
        try:
            self.clean = (await self._command(b"RSET")).code == 250
        except DeliveryError:
            self.clean = False


SIZE_MARGIN = 32 * 1024
"""Octets kept free under an upstream's SIZE for what the proxy adds to a message: its
Received: field and the header fields plugins add (Authentication-Results:, ARC and DKIM
signatures, X-Spam-*)."""

NOT_8BIT_CLEAN = Reply(554, "5.6.3", "Conversion required but not supported: the upstream mail server "
                       "does not accept 8-bit data (no 8BITMIME)")
DSN_NOT_OFFERED = Reply(451, "4.5.4", "The upstream mail server does not offer DSN: "
                        "send again without DSN parameters")

_MAIL_OK = _END_OK = frozenset({250})
_RCPT_OK = frozenset({250, 251})
_DATA_OK = frozenset({354})


class _DeadConnection(Exception):
    """A reused connection that no longer works: try another (no message data was sent)."""

    def __init__(self, *, timed_out: bool = False):
        super().__init__()
        self.timed_out = timed_out


_EIGHT_BIT = re.compile(rb"[\x80-\xff]")

_MAX_REMEMBERED = 10_000
"""Remembered recipient refusals (the oldest go first): bounded memory under any load."""


def _refusal_reply(refused: list[tuple[str, Reply]], total: int) -> Reply:
    """One reply for a message whose recipients the upstream refused at delivery time."""
    first = refused[0][1]
    if len(refused) == total and all(r.is_permanent for _, r in refused):
        return first
    addr, reply = refused[0]
    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
    return Reply(451, "4.5.0", (
        f"Upstream refused recipient {addr}{more}: {reply.code} {reply.text}; "
        "send again and it is refused at RCPT, the others accepted")[:400])


def _declared_size(transaction: Transaction) -> int | None:
    size = transaction.envelope.sender_params.get("SIZE")
    return int(size) if size else None


def _servers(upstreams: Sequence[cfg.Upstream]) -> list[UpstreamServer]:
    return [UpstreamServer(u.host, u.port, u.priority, u.weight) for u in upstreams]


def _path(value: Path | None) -> Path | None:
    return Path(value) if value is not None else None
