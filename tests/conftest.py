"""Shared test parts: real sockets on 127.0.0.1, a capturing upstream, a raw SMTP client.

Nothing here mocks the network: the proxy listens on a free loopback port, the upstream is a
real aiosmtpd server on another, and clients speak SMTP over TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope as AiosmtpdEnvelope
from aiosmtpd.smtp import Session as AiosmtpdSession

from smtpproxy import pytest_plugin
from smtpproxy.chain import Chain
from smtpproxy.config import Config
from smtpproxy.server import ProxyServer
from tests.dns_server import dns_server as dns_server  # noqa: PLC0414 - re-exported fixture
from tests.dns_server import module_dns_server as module_dns_server  # noqa: PLC0414 - re-exported fixture
from tests.journald import journal as journal  # noqa: PLC0414 - re-exported fixture
from tests.notify_socket import systemd as systemd  # noqa: PLC0414 - re-exported fixture
from tests.postfix_instance import postfix_factory as postfix_factory  # noqa: PLC0414 - re-exported fixture
from tests.postgres_server import postgres_server as postgres_server  # noqa: PLC0414 - re-exported fixture
from tests.postgres_server import postgres_url as postgres_url  # noqa: PLC0414 - re-exported fixture
from tests.redis_server import redis_server as redis_server  # noqa: PLC0414 - re-exported fixture
from tests.release_build import release_dist as release_dist  # noqa: PLC0414 - re-exported fixture
from tests.systemd_pid1 import pid1 as pid1  # noqa: PLC0414 - re-exported fixture

TIMEOUT = 10.0


# -- a raw SMTP client -------------------------------------------------------------


class Talk:
    """A line-level SMTP client: send exact bytes, read exact replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Talk:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; returns (code, text lines joined by \\n)."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not raw:
                raise ConnectionError(f"connection closed; got so far {lines!r}")
            assert raw.endswith(b"\r\n"), f"reply line without CRLF: {raw!r}"
            line = raw[:-2].decode()
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def greeting(self) -> tuple[int, str]:
        return await self.reply()

    async def hello(self, name: str = "client.test") -> tuple[int, str]:
        code, text = await self.greeting()
        assert code == 220, text
        return await self.cmd(f"EHLO {name}")

    async def send_message(self, sender: str, rcpts: list[str], body: bytes) -> tuple[int, str]:
        """The reply that decided the message: the end of DATA's, or, when every recipient
        was refused at RCPT (rcpt_mode relay: the upstream's answer comes there), the first
        refusal (the transaction is then reset)."""
        code, text = await self.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        refusals = []
        for rcpt in rcpts:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            if code != 250:
                refusals.append((code, text))
        if refusals and len(refusals) == len(rcpts):
            assert (await self.cmd("RSET"))[0] == 250
            return refusals[0]
        assert not refusals, refusals
        code, text = await self.cmd("DATA")
        assert code == 354, text
        self.send(body + b".\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF) within the timeout."""
        try:
            data = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        except (ConnectionError, TimeoutError):
            return True
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# -- a capturing upstream ------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class SinkHandler:
    """An aiosmtpd handler recording messages; replies are configurable per test."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued as SINK1"
    helo_names: list[str] = field(default_factory=list)
    tls_versions: list[str | None] = field(default_factory=list)

    async def handle_EHLO(self, server: Any, session: AiosmtpdSession, envelope: AiosmtpdEnvelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self.helo_names.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server: Any, session: AiosmtpdSession, envelope: AiosmtpdEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: AiosmtpdSession,
                          envelope: AiosmtpdEnvelope) -> str:
        if self.data_reply.startswith("250"):
            ssl_object = session.ssl and server.transport.get_extra_info("ssl_object")
            self.tls_versions.append(ssl_object.version() if ssl_object else None)
            self.messages.append(Received(
                envelope.mail_from, list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""), list(envelope.mail_options),
            ))
        return self.data_reply


@dataclass
class Sink:
    handler: SinkHandler
    server: asyncio.Server
    port: int

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


async def start_sink(handler: SinkHandler | None = None, **smtp_kwargs: Any) -> Sink:
    handler = handler or SinkHandler()
    smtp_kwargs.setdefault("enable_SMTPUTF8", True)
    server = await asyncio.get_running_loop().create_server(
        lambda: AiosmtpdSMTP(handler, hostname="sink.test", **smtp_kwargs), "127.0.0.1", 0
    )
    return Sink(handler, server, server.sockets[0].getsockname()[1])


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await start_sink()
    yield s
    s.server.close()


@dataclass
class RawUpstream:
    """A minimal upstream that records every command line exactly as received.

    aiosmtpd would re-parse addresses itself; this one shows what went over the wire.
    ``extensions`` are offered in EHLO (e.g. ``b"XCLIENT NAME ADDR"``); XCLIENT answers 220.
    """

    extensions: tuple[bytes, ...] = (b"8BITMIME", b"SMTPUTF8", b"SIZE 100000000")
    lines: list[bytes] = field(default_factory=list)
    xclient_reply: bytes = b"220 raw.test ESMTP"  # Postfix >= 2.3; older ones (and smtp-sink) say 250
    answers_quit: bool = True
    """False: QUIT is never answered (a hung or overloaded upstream); the client must hang up."""

    def commands(self, verb: bytes) -> list[bytes]:
        return [line for line in self.lines if line.split(b" ")[0].upper() == verb]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                continue
            self.lines.append(line.rstrip(b"\r\n"))
            verb = line.split(b" ")[0].strip().upper()
            if verb == b"EHLO":
                offered = [b"raw.test", *self.extensions]
                writer.write(b"".join(
                    b"250" + (b" " if i == len(offered) - 1 else b"-") + ext + b"\r\n"
                    for i, ext in enumerate(offered)
                ))
            elif verb == b"XCLIENT":
                writer.write(self.xclient_reply + b"\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go\r\n")
            elif verb == b"QUIT":
                if not self.answers_quit:
                    continue  # silence
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the proxy -------------------------------------------------------------------------


def chain_of(
    *plugins: object, timeout: float = 2.0, on_error: Literal["tempfail", "continue"] = "tempfail"
) -> Chain:
    """The shipped fixture helper (:func:`smtpproxy.pytest_plugin.chain_of`) with the suite's
    shorter default timeout: plugins in order, named by ``name`` or their class."""
    return pytest_plugin.chain_of(list(plugins), timeout=timeout, on_error=on_error)


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A Config for tests: listen on a free port, Maildir under tmp_path unless overridden."""
    data: dict[str, Any] = {
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "delivery": {"type": "maildir", "path": str(tmp_path / "mail")},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "hostname": "proxy.test",
        # Most tests compare the bytes the upstream or Maildir got with what was sent; the
        # proxy's own Received: field (received_header: auto) is tested on its own.
        "received_header": "never",
    }
    for key, value in sections.items():
        if key != "delivery" and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Config.model_validate(data)


ProxyFactory = Callable[..., Awaitable[ProxyServer]]


DAEMON_FIXTURES = {
    "postfix_factory": "postfix",
    "redis_server": "redis",
    "postgres_server": "postgres",
    "slapd_server": "slapd",
    "slapd": "slapd",  # tests/store/test_tables_backends.py's own, with its directory
    "clamd": "clamd",
    "spamd_server": "spamd",
    "rspamd_server": "rspamd",
    "cluster_factory": "haproxy",
    "journal": "journald",
    "pid1": "systemd",
    "sendmail_factory": "sendmail",
}
"""Fixtures that start a Debian daemon privately, and the marker each test using one gets
(registered in pyproject.toml): ``pytest -m postfix`` runs what starts Postfix,
``-m "not postfix and not redis"`` what does not."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            marker = DAEMON_FIXTURES.get(fixture)
            if marker is not None:
                item.add_marker(marker)


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxies for a test (plugins given as objects) and stop them afterwards."""
    started: list[ProxyServer] = []

    async def factory(*plugins: object, upstream: int | None = None, **sections: Any) -> ProxyServer:
        if upstream is not None:
            delivery = {"type": "smtp", "host": "127.0.0.1", "port": upstream, "tls": "none",
                        "connect_timeout": 2, "command_timeout": 2, "data_timeout": 5}
            delivery.update(sections.pop("delivery", {}))
            sections["delivery"] = delivery
        config = make_config(tmp_path, **sections)
        server = ProxyServer(config, chain=chain_of(*plugins))
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.stop(grace=1)


def port_of(server: ProxyServer) -> int:
    return server.addresses[0][1]


def maildir_messages(path: Path) -> list[bytes]:
    new = path / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []
