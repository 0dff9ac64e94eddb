"""pytest fixtures for testing smtpproxy plugins in their own repository.

Installed with smtpproxy and loaded by pytest automatically (entry point ``pytest11``), so a
plugin author's tests can use, without any conftest:

``smtpproxy_message``
    ``smtpproxy_message(body="Hello", subject="Hi", headers={...})`` → a :class:`~smtpproxy.Message`.
``smtpproxy_session``
    ``smtpproxy_session(client_ip=..., helo=..., auth_user=..., sender=..., recipients=[...])``
    → a :class:`~smtpproxy.Session` (with a transaction when ``sender`` is given), for calling
    one hook directly.
``smtpproxy_run``
    ``await smtpproxy_run(plugins, message, sender=..., recipients=[...])`` → a
    :class:`~smtpproxy.tracer.Trace`: the plugins run through every phase by the offline
    tracer, with the proxy's semantics (startup and shutdown hooks included).
``smtpproxy_upstream``
    ``await smtpproxy_upstream()`` → a :class:`CapturingUpstream`: a real SMTP server on a
    free loopback port that records what it receives.
``smtpproxy_proxy``
    ``await smtpproxy_proxy(*plugins, **config_sections)`` → a :class:`RunningProxy`: a real
    proxy on a free loopback port delivering to a capturing upstream. ``await
    proxy.send(sender, recipients, message)`` speaks SMTP to it and returns the final
    reply; ``proxy.received`` is what the upstream got.
``smtpproxy_dns``
    a :class:`~smtpproxy.zoneserver.ZoneServer`: an authoritative DNS server on loopback
    serving the records the test adds (``smtpproxy_dns.add("bl.test. 300 IN A 127.0.0.2")``),
    with the shared resolver (``smtpproxy.get_resolver()``) pointed at it for the test. Needs
    dnslib (the ``plugin-test`` extra).

The async fixtures are declared with ``pytest_asyncio.fixture``, so they work with
pytest-asyncio in ``auto`` and in ``strict`` mode (in strict mode, mark your async tests
``@pytest.mark.asyncio``). Without pytest-asyncio the synchronous fixtures still work and
the async ones fail with a message saying to install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from smtpproxy import dns
from smtpproxy.addresses import Address, parse_mailbox
from smtpproxy.chain import Chain, ChainStep
from smtpproxy.config import Config, ConfigError, Problem
from smtpproxy.message import Message
from smtpproxy.registry import ENTRY_POINT_GROUP, build_chain, instantiate, new_plugin_manager
from smtpproxy.session import Client, Envelope, Recipient, Session, TLSInfo
from smtpproxy.tracer import Trace, TracePolicy, Tracer, data_section
from smtpproxy.versions import PluginAPIError, check_plugin_api

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is in smtpproxy's test extra
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from smtpproxy.zoneserver import ZoneServer

__all__ = [
    "CapturingUpstream",
    "ClientReply",
    "ReceivedMessage",
    "RunningProxy",
    "chain_of",
    "entry_point_name",
    "make_message",
    "make_plugin",
    "make_session",
    "recipient",
    "run_plugins",
]

TIMEOUT = 10.0
"""Seconds any single network step of these helpers may take before the test fails."""

Plugins = object | Sequence[object]


# -- building blocks --------------------------------------------------------------------------


_PRODUCTION_NAMES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
"""The name ``make_plugin`` gave each plugin object, for ``chain_of``."""


def make_plugin(cls: type, **settings: Any) -> object:
    """Build a plugin class the way the configuration does: ``settings`` validated by its
    nested pydantic ``Settings`` (a :class:`~smtpproxy.config.ConfigError` when invalid).

    The plugin is named as production names it when the configuration says ``- name: <entry
    point>``: by the entry point (group ``smtpproxy.plugins``) that announces ``cls``, so the
    trace's ``decided_by``, the results and the log lines carry that name. A class no
    installed entry point announces is named after the class (``NoRoles`` → ``no_roles``).
    """
    name = entry_point_name(cls)
    try:
        check_plugin_api(cls, name or _class_name(cls))
    except PluginAPIError as exc:
        raise ConfigError([Problem("<settings>", None, None, "plugins[0]", str(exc))]) from None
    plugin = instantiate(cls, settings, None, 0)
    if name is not None:
        with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced
            _PRODUCTION_NAMES[plugin] = name
    return plugin


def entry_point_name(cls: type) -> str | None:
    """The name of the installed entry point that announces ``cls``, if exactly one does."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.value.replace(" ", "") == target}
    return names.pop() if len(names) == 1 else None


def _name_of(plugin: object) -> str:
    with contextlib.suppress(TypeError):
        production = _PRODUCTION_NAMES.get(plugin)
        if production is not None:
            return production
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    return _class_name(plugin if isinstance(plugin, type) else type(plugin))


def _class_name(cls: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def chain_of(
    plugins: Plugins, *, timeout: float = 10.0, on_error: Literal["tempfail", "continue"] = "tempfail"
) -> Chain:
    """A chain of plugin objects in order, named as :func:`make_plugin` named them (the entry
    point's name), else by their ``name`` attribute, else after their class.

    A plugin object may carry its own ``timeout``, ``on_error`` and ``enforce`` attributes
    (``enforce = False``: shadow mode).
    """
    items = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    pm = new_plugin_manager()
    steps = []
    for index, plugin in enumerate(items):
        name = _name_of(plugin)
        if pm.has_plugin(name):
            name = f"{name}-{index}"
        pm.register(plugin, name=name)
        steps.append(ChainStep(
            name, plugin, float(getattr(plugin, "timeout", timeout)),
            getattr(plugin, "on_error", on_error), bool(getattr(plugin, "enforce", True)),
        ))
    return Chain(pm, steps)


def make_message(
    body: str | bytes = "Hello.\r\n",
    *,
    subject: str = "Test message",
    from_: str = "sender@example.org",
    to: str = "recipient@example.net",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    raw: bytes | str | None = None,
) -> Message:
    """A :class:`~smtpproxy.Message` with CRLF line endings, as the proxy hands it to plugins.

    ``raw`` gives the whole message (LF line endings are converted); otherwise it is built
    from From, To, Subject, the extra ``headers`` and ``body``.
    """
    if raw is None:
        extra = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        lines = [f"From: {from_}", f"To: {to}", f"Subject: {subject}", *(f"{k}: {v}" for k, v in extra)]
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        raw = "\r\n".join(lines) + "\r\n\r\n" + re.sub(r"\r?\n", "\r\n", text)
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return Message(data)


def recipient(address: str, **params: str | None) -> Recipient:
    """A :class:`~smtpproxy.Recipient` for calling a ``rcpt_to`` hook directly."""
    return Recipient(parse_mailbox(address, allow_utf8=True), dict(params))


def make_session(
    *,
    client_ip: str = "192.0.2.1",
    client_port: int = 40000,
    client_hostname: str | None = None,
    helo: str | None = "client.example",
    auth_user: str | None = None,
    tls: bool = False,
    sender: str | None = None,
    recipients: Sequence[str] = (),
    transport: str = "offline",
) -> Session:
    """A :class:`~smtpproxy.Session` in the state a hook sees it; with ``sender``, it also has
    a transaction whose envelope holds ``recipients``."""
    session = Session(Client(client_ip, client_port, client_hostname), local_ip="127.0.0.1",
                      local_port=25, transport=transport)
    session.helo = helo
    session.esmtp = helo is not None
    session.auth_user = auth_user
    if tls:
        session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    if sender is not None:
        sender_address = parse_mailbox(sender, allow_utf8=True) if sender else Address("", "", "")
        transaction = session.begin_transaction(Envelope(sender_address))
        for rcpt in recipients:
            transaction.envelope._accept_recipient(recipient(rcpt))
    return session


async def run_plugins(
    plugins: Plugins | Config,
    message: Message | bytes | str | None = None,
    *,
    sender: str = "sender@example.org",
    recipients: Sequence[str] = ("recipient@example.net",),
    client_ip: str = "192.0.2.1",
    client_port: int = 40000,
    helo: str = "client.example",
    auth_user: str | None = None,
    tls: bool = False,
    policy: TracePolicy | None = None,
) -> Trace:
    """Run plugin objects (or a whole :class:`~smtpproxy.config.Config`) over one message.

    With plugin objects no relay rule applies (any recipient passes) unless ``policy`` says
    otherwise; with a Config its relay, routes and limits apply, as in ``test-message``.
    """
    tracer = Tracer.from_config(plugins) if isinstance(plugins, Config) else Tracer(chain_of(plugins), policy)
    if message is None:
        message = make_message()
    raw = message.raw if isinstance(message, Message) else message
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    async with tracer:
        return await tracer.trace(data, sender=sender, recipients=list(recipients), client_ip=client_ip,
                                  client_port=client_port, helo=helo, auth_user=auth_user, tls=tls)


# -- a capturing upstream -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the capturing upstream accepted, with its envelope."""

    sender: str
    recipients: list[str]
    content: bytes
    helo: str | None

    @property
    def message(self) -> Message:
        """The content as a :class:`~smtpproxy.Message`, to read its headers."""
        return Message(self.content)


@dataclass
class CapturingUpstream:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that records every message it accepts.

    Set ``rcpt_replies[address]`` or ``data_reply`` (e.g. ``"451 4.3.0 Busy"``) to make it
    refuse.
    """

    received: list[ReceivedMessage] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued"
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> CapturingUpstream:
        from aiosmtpd.smtp import SMTP

        upstream = self

        class Handler:
            async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                                  rcpt_options: list[str]) -> str:
                reply = upstream.rcpt_replies.get(address)
                if reply is not None:
                    return reply
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if upstream.data_reply.startswith("2"):
                    upstream.received.append(ReceivedMessage(
                        envelope.mail_from, list(envelope.rcpt_tos),
                        bytes(envelope.original_content or b""), session.host_name,
                    ))
                return upstream.data_reply

        self._server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(Handler(), hostname="upstream.test", enable_SMTPUTF8=True), "127.0.0.1", 0
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), TIMEOUT)
            self._server = None


# -- a real proxy and an SMTP client ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientReply:
    """The last reply the client got (end of DATA, or the refusal that stopped it)."""

    code: int
    text: str
    stage: str
    """Where the conversation ended: ``connect``, ``helo``, ``mail``, ``rcpt``, ``data`` or ``end``."""
    rcpt_replies: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(reader.readline(), TIMEOUT)
        if not raw:
            return 421, "connection closed: " + " | ".join(lines)
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        lines.append(line[4:])
        if line[3:4] != "-":
            return int(line[:3]), "\n".join(lines)


class RunningProxy:
    """A proxy started by ``smtpproxy_proxy``: its port, its upstream, and a client."""

    def __init__(self, server: Any, upstream: CapturingUpstream | None, proxy_protocol: bool):
        self.server = server
        """The :class:`smtpproxy.server.ProxyServer`."""
        self.upstream = upstream
        self.proxy_protocol = proxy_protocol

    @property
    def port(self) -> int:
        return int(self.server.addresses[0][1])

    @property
    def received(self) -> list[ReceivedMessage]:
        """What the default capturing upstream received (empty without one)."""
        return self.upstream.received if self.upstream is not None else []

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: Message | bytes | str,
        *,
        helo: str = "client.example",
        client_ip: str = "192.0.2.1",
        client_port: int = 40000,
    ) -> ClientReply:
        """Send one message over SMTP; returns the final reply (never raises on a refusal).

        The proxy sees the client as ``client_ip`` (sent in a PROXY protocol header, which
        the fixture's listener expects from 127.0.0.1).
        """
        raw = message.raw if isinstance(message, Message) else message
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        section, _ = data_section(data)
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), TIMEOUT)
        try:
            if self.proxy_protocol:
                family = "TCP6" if ":" in client_ip else "TCP4"
                local = "::1" if family == "TCP6" else "127.0.0.1"
                writer.write(f"PROXY {family} {client_ip} {local} {client_port} 25\r\n".encode())

            async def command(line: str) -> tuple[int, str]:
                writer.write(line.encode("utf-8") + b"\r\n")
                return await _read_reply(reader)

            code, text = await _read_reply(reader)
            if code != 220:
                return ClientReply(code, text, "connect")
            code, text = await command(f"EHLO {helo}")
            if code != 250:
                return ClientReply(code, text, "helo")
            utf8 = not all(a.isascii() for a in (sender, *recipients))
            code, text = await command(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
            if code != 250:
                return ClientReply(code, text, "mail")
            replies = {}
            for rcpt in recipients:
                replies[rcpt] = await command(f"RCPT TO:<{rcpt}>")
            accepted = [r for r, (c, _) in replies.items() if c == 250]
            if not accepted:
                code, text = list(replies.values())[-1] if replies else (503, "no recipients given")
                return ClientReply(code, text, "rcpt", replies)
            code, text = await command("DATA")
            if code != 354:
                return ClientReply(code, text, "data", replies)
            writer.write(section + b".\r\n")
            code, text = await _read_reply(reader)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await command("QUIT")
            return ClientReply(code, text, "end", replies)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _merge(base: dict[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in sections.items():
        if key != "delivery" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


ProxyFactory = Callable[..., Awaitable[RunningProxy]]
UpstreamFactory = Callable[[], Awaitable[CapturingUpstream]]


async def _upstream_factory() -> AsyncIterator[UpstreamFactory]:
    started: list[CapturingUpstream] = []

    async def factory() -> CapturingUpstream:
        upstream = await CapturingUpstream().start()
        started.append(upstream)
        return upstream

    yield factory
    for upstream in started:
        await upstream.stop()


async def _proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    from smtpproxy.server import ProxyServer

    started: list[tuple[Any, CapturingUpstream | None]] = []

    async def factory(*plugins: object, proxy_protocol: bool = True, **sections: Any) -> RunningProxy:
        """Start a proxy with these plugin objects (a list is fine too); without any, the
        ``plugins=[...]`` config section is loaded the way ``smtpproxy run`` loads it."""
        if len(plugins) == 1 and isinstance(plugins[0], list | tuple):
            plugins = tuple(plugins[0])
        listener: dict[str, Any] = {"address": "127.0.0.1", "port": 0}
        if proxy_protocol:
            listener |= {"proxy_protocol": True, "proxy_protocol_from": ["127.0.0.1/32", "::1/128"]}
        upstream = None
        data: dict[str, Any] = {
            "listeners": [listener],
            "quarantine": {"path": str(tmp_path / "quarantine")},
            "hostname": "proxy.test",
        }
        if "delivery" not in sections:
            upstream = await CapturingUpstream().start()
            data["delivery"] = {"type": "smtp", "host": "127.0.0.1", "port": upstream.port,
                                "tls": "none", "connect_timeout": 5, "command_timeout": 5,
                                "data_timeout": 10, "pool": {"max_idle": 0}}
        config = Config.model_validate(_merge(data, sections))
        chain = (chain_of(list(plugins)) if plugins
                 else build_chain(config.plugins, None, plugin_paths=config.plugin_paths,
                                table_names=config.tables, policies=config.policies))
        server = ProxyServer(config, chain=chain)
        started.append((server, upstream))
        await server.start()
        return RunningProxy(server, upstream, proxy_protocol)

    yield factory
    for server, upstream in started:
        await server.stop(grace=1)
        if upstream is not None:
            await upstream.stop()


# -- the fixtures -------------------------------------------------------------------------------


@pytest.fixture
def smtpproxy_message() -> Callable[..., Message]:
    """Factory: ``smtpproxy_message(body=..., subject=..., headers=..., raw=...)`` → Message."""
    return make_message


@pytest.fixture
def smtpproxy_session() -> Callable[..., Session]:
    """Factory: ``smtpproxy_session(client_ip=..., helo=..., auth_user=..., sender=..., recipients=...)``."""
    return make_session


@pytest.fixture
def smtpproxy_dns() -> Iterator[ZoneServer]:
    """An authoritative DNS server on loopback with the shared resolver pointed at it (for
    this test; the resolver before it is put back after). ``add(zone_text)``, ``txt(name,
    value)``, ``timeout_names``, ``servfail_names``, ``queries``, ``dns_section()``."""
    try:
        from smtpproxy.zoneserver import running_zone_server
    except ImportError as exc:  # pragma: no cover - dnslib is in the plugin-test extra
        pytest.fail(f"smtpproxy_dns needs dnslib ({exc}): pip install 'smtpproxy[plugin-test]'")
    previous = dns.get_resolver()
    with running_zone_server() as zones:
        dns.configure(dns.Resolver(["127.0.0.1"], port=zones.port, timeout=1.0))
        try:
            yield zones
        finally:
            dns.configure(previous)


@pytest.fixture
def smtpproxy_run() -> Callable[..., Awaitable[Trace]]:
    """``await smtpproxy_run(plugins, message, sender=..., recipients=...)`` → Trace."""
    return run_plugins


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def smtpproxy_upstream() -> AsyncIterator[UpstreamFactory]:
        """Factory: ``await smtpproxy_upstream()`` → a started CapturingUpstream (stopped after)."""
        async for factory in _upstream_factory():
            yield factory

    @pytest_asyncio.fixture
    async def smtpproxy_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
        """Factory: ``await smtpproxy_proxy(*plugins, **config_sections)`` → RunningProxy."""
        async for factory in _proxy_factory(tmp_path):
            yield factory

else:  # pragma: no cover

    @pytest.fixture
    def smtpproxy_upstream() -> None:
        pytest.fail("smtpproxy_upstream needs pytest-asyncio: pip install pytest-asyncio")

    @pytest.fixture
    def smtpproxy_proxy() -> None:
        pytest.fail("smtpproxy_proxy needs pytest-asyncio: pip install pytest-asyncio")
