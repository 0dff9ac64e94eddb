"""Property tests against a live proxy: arbitrary input never crashes a session, and an
address the proxy accepted reaches the upstream exactly as validated, byte for byte.

The proxy and a raw upstream recorder run in a background event loop on loopback ports;
hypothesis drives them through blocking sockets, one connection per example.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from smtpproxy.addresses import AddressError, parse_mail_from
from smtpproxy.delivery.identity import xtext
from smtpproxy.dsn import check_mail_params, check_rcpt_params
from smtpproxy.server import ProxyServer
from tests.conftest import RawUpstream, chain_of, make_config

REPLY = re.compile(rb"^[2-5]\d\d[ -]")


@dataclass
class Live:
    port: int
    upstream: RawUpstream
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = RawUpstream()
    tmp: Path = tmp_path_factory.mktemp("live")

    async def start() -> tuple[asyncio.Server, ProxyServer]:
        raw = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        config = make_config(
            tmp, relay={"domains": ["dest.test"], "networks": []},
            delivery={"type": "smtp", "host": "127.0.0.1", "port": raw.sockets[0].getsockname()[1],
                      "tls": "none", "rcpt_mode": "at_data"},  # one MAIL per message upstream
            limits={"max_sessions_per_ip": 1000, "max_errors": 1000},
        )
        proxy = ProxyServer(config, chain=chain_of())
        await proxy.start()
        return raw, proxy

    async def stop() -> None:
        await proxy.stop(grace=1)
        # On the servers' own loop: asyncio.Server is not thread-safe. Closed from this thread,
        # it raced its last connection's end on the loop (the proxy no longer waits for the
        # upstream's 221 at shutdown, so that connection may still be ending): both ran
        # Server._wakeup, the second on None.
        raw.close()

    raw, proxy = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield Live(proxy.addresses[0][1], upstream, loop)
    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, list[bytes]]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(lines)
            assert line.endswith(b"\r\n") and REPLY.match(line), f"malformed reply line {line!r}"
            lines.append(line)
            if line[3:4] == b" ":
                return int(line[:3]), lines

    def cmd(self, data: bytes) -> tuple[int, list[bytes]]:
        self.sock.sendall(data + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=600))
def test_arbitrary_command_bytes_never_break_the_session(live: Live, garbage: bytes) -> None:
    assume(b"DATA" not in garbage.upper() and b"QUIT" not in garbage.upper())
    conn = Conn(live.port)
    try:
        assert conn.reply()[0] == 220
        assert conn.cmd(b"EHLO prop.test")[0] == 250
        conn.sock.sendall(garbage + b"\r\nVRFY sentinel\r\n")
        codes = []
        while True:  # every line gets a well-formed reply, then the sentinel's 252
            code, lines = conn.reply()
            assert b"Internal error" not in b"".join(lines)
            codes.append(code)
            if code == 252:
                break
        assert all(c in (250, 252) or 500 <= c < 600 or c in (452, 503) for c in codes), codes
    finally:
        conn.close()


local_atoms = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20),
    st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,20}", fullmatch=True),
    st.from_regex(r'"[ !#-\[\]-~]{0,15}"', fullmatch=True),
    st.from_regex(r"[a-z\u00e0-\u00ff\u4e00-\u4e10]{1,10}", fullmatch=True),
)
domains = st.one_of(
    st.just("dest.test"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=30),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=10),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=local_atoms, domain=domains, utf8=st.booleans())
def test_accepted_sender_reaches_upstream_exactly(live: Live, local: str, domain: str, utf8: bool) -> None:
    path = f"{local}@{domain}"
    line = f"MAIL FROM:<{path}>{' SMTPUTF8' if utf8 else ''}".encode("utf-8", "surrogateescape")
    assume(b"\r" not in line and b"\n" not in line)
    try:
        expected = parse_mail_from(line[5:].decode("utf-8"), smtputf8_enabled=True).address.text
    except AddressError:
        expected = None
    conn = Conn(live.port)
    try:
        conn.reply()
        conn.cmd(b"EHLO prop.test")
        code, _ = conn.cmd(line)
        event("refused" if expected is None else "accepted and forwarded")
        if expected is None:
            assert code >= 500  # what the parser refuses, the proxy refuses
            return
        assert code == 250, (line, expected)
        assert conn.cmd(b"RCPT TO:<rcpt@dest.test>")[0] == 250
        assert conn.cmd(b"DATA")[0] == 354
        before = len(live.upstream.commands(b"MAIL"))
        code, _ = conn.cmd(b"Subject: p\r\n\r\nbody\r\n.")
        assert code == 250
        sent = live.upstream.commands(b"MAIL")[before]
        assert sent.startswith(b"MAIL FROM:<" + expected.encode("utf-8") + b">"), sent
        assert expected == path  # no source route here: the text is exactly what the client sent
    finally:
        conn.close()


def _xtext_decode(text: str) -> bytes:
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "+":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    return bytes(out)


@given(st.binary(max_size=300))
def test_xtext_of_any_client_octets_is_safe_and_exact(octets: bytes) -> None:
    """Whatever a client sent as HELO (decoded with surrogateescape, as the inbound side
    does) encodes as xtext that the upstream decodes back to the same octets."""
    value = octets.decode("utf-8", "surrogateescape")
    encoded = xtext(value)
    assert encoded.isascii() and all(33 <= ord(c) <= 126 for c in encoded)
    assert "=" not in encoded
    assert _xtext_decode(encoded) == octets


@given(st.binary(min_size=1, max_size=100))
def test_dsn_xtext_values_are_checked_exactly(octets: bytes) -> None:
    """An xtext-encoded ENVID/ORCPT passes; the raw value passes only if it is xtext itself."""
    encoded = xtext(octets.decode("utf-8", "surrogateescape"))
    assume(len(encoded) <= 100)
    assert check_mail_params({"ENVID": encoded}) is None
    assert check_rcpt_params({"ORCPT": "rfc822;" + encoded}) is None
    raw = octets.decode("latin-1")
    is_xtext = re.fullmatch(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+", raw) is not None
    assert (check_mail_params({"ENVID": raw}) is None) == is_xtext


@given(st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "NEVER", "success", "x", ""]),
                min_size=1, max_size=4))
def test_dsn_notify_values(words: list[str]) -> None:
    upper = [w.upper() for w in words]
    valid = upper == ["NEVER"] or (
        set(upper) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(upper)) == len(upper))
    assert (check_rcpt_params({"NOTIFY": ",".join(words)}) is None) == valid
