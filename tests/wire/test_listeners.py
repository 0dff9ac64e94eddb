"""Listener kinds an MTA admin expects: implicit TLS (465), PROXY protocol, submission with AUTH."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import ssl
import struct
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
import trustme

from smtpproxy import Session, hookimpl
from smtpproxy.auth import PasswordFile, PasswordFileError
from smtpproxy.config import ConfigError, load_config
from smtpproxy.server import ProxyServer, StartupError
from tests.conftest import TIMEOUT, ProxyFactory, Talk, chain_of, maildir_messages, port_of

RELAY = {"domains": ["dest.test"], "networks": []}
HEAD = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: s\r\n\r\n"
OUTSIDE = "someone@elsewhere.org"  # not a relay domain: only trusted clients may send there

ALICE_PASSWORD = "correct horse battery staple"
BOB_PASSWORD = "pässwörd 2"


class Recorder:
    """Records what plugins see of the session."""

    name = "recorder"

    def __init__(self) -> None:
        self.clients: list[tuple[str, int]] = []
        self.tls_versions: list[str | None] = []
        self.auth_users: list[str | None] = []

    @hookimpl
    def connect(self, session: Session) -> None:
        self.clients.append((session.client.ip, session.client.port))
        self.tls_versions.append(session.tls.version if session.tls else None)

    @hookimpl
    def mail_from(self, session: Session) -> None:
        self.auth_users.append(session.auth_user)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tls_ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    pem = tmp_path / "proxy.pem"
    tls_ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return {"cert": str(pem), "key": str(pem)}


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="module")
def users_text() -> str:
    alice = bcrypt.hashpw(ALICE_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    bob = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(BOB_PASSWORD)
    return f"# submission users\n\nalice:{alice}\n  bob:{bob}\n"


@pytest.fixture
def users_file(tmp_path: Path, users_text: str) -> Path:
    path = tmp_path / "users"
    path.write_text(users_text)
    return path


async def open_tls(port: int, ctx: ssl.SSLContext) -> Talk:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="proxy.test")
    return Talk(reader, writer)


async def closed_without_banner(client: Talk) -> bool:
    """True when the server hung up without sending a single byte."""
    try:
        data = await asyncio.wait_for(client.reader.read(), TIMEOUT)
    except ConnectionResetError:
        data = b""
    await client.close()
    return data == b""


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "smtpproxy.session" and r.msg == name]


# -- implicit TLS ----------------------------------------------------------------------------


async def test_implicit_tls_listener(
    proxy_factory: ProxyFactory, tls_files: dict[str, str], client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, relay=RELAY, listeners=[
        {"address": "127.0.0.1", "port": 0, "implicit_tls": True, "tls": tls_files}])
    client = await open_tls(port_of(proxy), client_tls)
    code, banner = await client.greeting()
    assert code == 220 and banner.startswith("proxy.test")
    code, ehlo = await client.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in ehlo.split("\n")
    assert await client.cmd("STARTTLS") == (503, "5.5.1 TLS already active")
    assert (await client.send_message("a@sender.test", ["b@dest.test"], HEAD + b"over TLS\r\n"))[0] == 250
    await client.close()
    assert recorder.tls_versions and recorder.tls_versions[0] in ("TLSv1.2", "TLSv1.3")
    assert len(maildir_messages(tmp_path / "mail")) == 1


@pytest.mark.parametrize("limits", [{"max_sessions_per_ip": 2, "max_sessions": 50},
                                    {"max_sessions_per_ip": 2, "max_sessions": 2}], ids=["per-ip", "total"])
async def test_implicit_tls_counts_sessions_before_the_handshake(
    proxy_factory: ProxyFactory, tls_files: dict[str, str], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, limits: dict[str, int],
) -> None:
    """Silent connections to the 465 port: past the cap each is closed at once, not held
    for the handshake timeout (a plaintext 421 would mean nothing to a TLS client). Once
    the silent ones go, a TLS client gets its session."""
    proxy = await proxy_factory(limits=limits, listeners=[
        {"address": "127.0.0.1", "port": 0, "implicit_tls": True, "tls": tls_files}])
    silent = [await Talk.open(port_of(proxy)) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        for _ in range(5):
            extra = await Talk.open(port_of(proxy))
            assert await asyncio.wait_for(extra.reader.read(), 5) == b""  # closed before any TLS
            await extra.close()
    refused = events(caplog, "connect_refused")
    assert len(refused) == 5 and all(r["before_tls"] is True for r in refused)
    for client in silent:
        await client.close()
    for _ in range(50):  # the handshakes the silent clients never made end with their connections
        try:
            client = await open_tls(port_of(proxy), client_tls)
        except (ConnectionError, ssl.SSLError):
            await asyncio.sleep(0.05)
            continue
        break
    assert (await client.greeting())[0] == 220
    await client.close()


async def test_implicit_tls_listener_drops_plaintext_clients(
    proxy_factory: ProxyFactory, tls_files: dict[str, str]
) -> None:
    proxy = await proxy_factory(listeners=[
        {"address": "127.0.0.1", "port": 0, "implicit_tls": True, "tls": tls_files}])
    client = await Talk.open(port_of(proxy))
    client.send(b"EHLO client.test\r\n")
    assert await closed_without_banner(client)


# -- PROXY protocol --------------------------------------------------------------------------


def proxy_v1(ip: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in ip else "TCP4"
    dst = "::1" if ":" in ip else "127.0.0.1"
    return f"PROXY {family} {ip} {dst} {port} 25\r\n".encode()


def proxy_v2(ip: str | None, port: int = 40000, tlvs: bytes = b"") -> bytes:
    """A binary v2 header; ip=None makes a LOCAL one (a load balancer's health check)."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if ip is None:
        return signature + struct.pack("!BBH", 0x20, 0x00, 0)
    addresses = ipaddress.ip_address(ip).packed + ipaddress.ip_address("127.0.0.1").packed
    body = addresses + struct.pack("!HH", port, 25) + tlvs
    return signature + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


def proxied_listener(**overrides: Any) -> dict[str, Any]:
    listener = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True,
                "proxy_protocol_from": ["127.0.0.0/8"]}
    listener.update(overrides)
    return listener


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
async def test_proxy_header_names_the_real_client(
    proxy_factory: ProxyFactory, header: Any
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(
        recorder, relay={"domains": ["dest.test"], "networks": ["203.0.113.7"]},
        listeners=[proxied_listener()],
    )
    trusted = await Talk.open(port_of(proxy))
    trusted.send(header("203.0.113.7", 41234))
    await trusted.hello()
    # relaying to an outside domain works only because the header names a relay client
    assert (await trusted.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await trusted.cmd(f"RCPT TO:<{OUTSIDE}>"))[0] == 250
    await trusted.close()

    other = await Talk.open(port_of(proxy))
    other.send(header("198.51.100.9"))
    await other.hello()
    assert (await other.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert await other.cmd(f"RCPT TO:<{OUTSIDE}>") == (554, f"5.7.1 <{OUTSIDE}>: Relay access denied")
    await other.close()
    assert recorder.clients == [("203.0.113.7", 41234), ("198.51.100.9", 40000)]


async def test_proxy_v2_tlvs_that_fit_the_header_are_accepted(proxy_factory: ProxyFactory) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, listeners=[proxied_listener()])
    client = await Talk.open(port_of(proxy))
    ssl_tlv = b"\x20\x00\x0d\x01\x00\x00\x00\x00" + b"\x21\x00\x05TLSv1"  # PP2_TYPE_SSL, a version inside
    client.send(proxy_v2("203.0.113.7", 41000, tlvs=b"\x04\x00\x03abc" + ssl_tlv))
    assert (await client.greeting())[0] == 220
    await client.close()
    assert recorder.clients == [("203.0.113.7", 41000)]


async def test_proxy_v2_local_header_keeps_the_connection_address(proxy_factory: ProxyFactory) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, listeners=[proxied_listener()])
    client = await Talk.open(port_of(proxy))
    client.send(proxy_v2(None))
    await client.hello()
    await client.close()
    assert recorder.clients[0][0] == "127.0.0.1"


async def test_proxy_header_from_an_untrusted_source_is_refused(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, listeners=[proxied_listener(proxy_protocol_from=["10.0.0.0/8"])])
    client = await Talk.open(port_of(proxy))
    client.send(proxy_v1("203.0.113.7"))
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        assert await closed_without_banner(client)
    refused = events(caplog, "proxy_refused")
    assert len(refused) == 1 and refused[0]["client"] == "127.0.0.1"
    assert "proxy_protocol_from" in refused[0]["reason"]
    assert recorder.clients == []  # no session, no plugin ever saw it


@pytest.mark.parametrize(
    "garbage",
    [b"EHLO client.test\r\n", b"PROXY TCP4 999.1.1.1 127.0.0.1 1 25\r\n", b"PROXY TCP4 1.2.3.4\r\n",
     b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x02ab",
     proxy_v2("203.0.113.7", tlvs=b"\x04\x00\x10abc"),            # NOOP TLV: 16 octets said, 3 there
     proxy_v2("203.0.113.7", tlvs=b"\x04\x00\x00\x05"),           # a TLV cut inside its length
     proxy_v2("203.0.113.7", tlvs=b"\x20\x00\x08\x01\x00\x00\x00\x00\x21\x00\x09")],  # SSL sub-TLV
    ids=["smtp", "bad-address", "short-v1", "short-v2", "tlv-overrun", "tlv-cut", "ssl-sub-tlv-overrun"],
)
async def test_invalid_proxy_header_closes_without_banner(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    proxy = await proxy_factory(listeners=[proxied_listener()])
    client = await Talk.open(port_of(proxy))
    client.send(garbage)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        assert await closed_without_banner(client)
    assert len(events(caplog, "proxy_refused")) == 1
    assert events(caplog, "connect") == []
    # one line per refused connection: aiosmtpd's parser does not add its own warning
    assert [r.msg for r in caplog.records if r.levelno >= logging.WARNING] == ["proxy_refused"]


async def test_missing_proxy_header_times_out_without_banner(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(listeners=[proxied_listener(proxy_protocol_timeout=0.3)])
    client = await Talk.open(port_of(proxy))
    assert await closed_without_banner(client)


async def test_per_ip_limit_counts_the_real_client(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(listeners=[proxied_listener()], limits={"max_sessions_per_ip": 1})
    first, second, third = [await Talk.open(port_of(proxy)) for _ in range(3)]
    first.send(proxy_v1("192.0.2.1"))
    second.send(proxy_v2("192.0.2.2"))
    assert (await first.greeting())[0] == 220
    assert (await second.greeting())[0] == 220  # same TCP peer, different real client
    third.send(proxy_v1("192.0.2.1"))
    assert await third.greeting() == (421, "4.7.0 Too many connections from your address, try again later")
    for client in (first, second, third):
        await client.close()


# -- submission with AUTH --------------------------------------------------------------------


@pytest.fixture
def submission(tls_files: dict[str, str], users_file: Path) -> dict[str, Any]:
    """A submission listener: STARTTLS, and AUTH against the users file."""
    return {"address": "127.0.0.1", "port": 0, "tls": tls_files, "auth": {"users_file": str(users_file)}}


async def starttls(client: Talk, ctx: ssl.SSLContext) -> str:
    assert await client.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    code, ehlo = await client.cmd("EHLO client.test")
    assert code == 250
    return ehlo


async def test_submission_auth_after_starttls_then_relay(
    proxy_factory: ProxyFactory, submission: dict[str, Any],
    client_tls: ssl.SSLContext, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    proxy = await proxy_factory(recorder, relay=RELAY, listeners=[submission])
    client = await Talk.open(port_of(proxy))
    _, ehlo = await client.hello()
    assert "STARTTLS" in ehlo.split("\n")
    assert not any(line.startswith("AUTH") for line in ehlo.split("\n"))
    assert await client.cmd(f"AUTH PLAIN {plain('alice', ALICE_PASSWORD)}") == (
        538, "5.7.11 Encryption required for requested authentication mechanism")
    ehlo = await starttls(client, client_tls)
    assert "AUTH PLAIN LOGIN" in ehlo.split("\n")
    assert await client.cmd("MAIL FROM:<alice@sender.test>") == (530, "5.7.0 Authentication required")
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        assert await client.cmd(f"AUTH PLAIN {plain('alice', ALICE_PASSWORD)}") == (
            235, "2.7.0 Authentication successful")
    assert events(caplog, "auth") == [{"mechanism": "PLAIN", "user": "alice"}]
    assert await client.cmd(f"AUTH PLAIN {plain('alice', ALICE_PASSWORD)}") == (503, "5.5.1 Already authenticated")
    reply = await client.send_message("alice@sender.test", [OUTSIDE], HEAD + b"submitted\r\n")
    assert reply[0] == 250
    await client.close()
    assert recorder.auth_users == ["alice"]
    assert len(maildir_messages(tmp_path / "mail")) == 1


@pytest.mark.parametrize(
    ("mechanism", "user"),
    [("PLAIN-initial", "alice"), ("PLAIN-initial", "bob"), ("PLAIN-challenge", "bob"),
     ("LOGIN", "alice"), ("LOGIN", "bob"), ("LOGIN-initial", "bob")],
)
async def test_auth_mechanisms_and_hash_kinds(
    proxy_factory: ProxyFactory, submission: dict[str, Any],
    client_tls: ssl.SSLContext, mechanism: str, user: str,
) -> None:
    password = {"alice": ALICE_PASSWORD, "bob": BOB_PASSWORD}[user]
    proxy = await proxy_factory(listeners=[submission])
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await starttls(client, client_tls)
    if mechanism == "PLAIN-initial":
        reply = await client.cmd(f"AUTH PLAIN {plain(user, password)}")
    elif mechanism == "PLAIN-challenge":
        assert await client.cmd("AUTH PLAIN") == (334, "")
        reply = await client.cmd(plain(user, password))
    elif mechanism == "LOGIN":
        assert await client.cmd("AUTH LOGIN") == (334, b64("Username:"))
        assert await client.cmd(b64(user)) == (334, b64("Password:"))
        reply = await client.cmd(b64(password))
    else:
        assert await client.cmd(f"AUTH LOGIN {b64(user)}") == (334, b64("Password:"))
        reply = await client.cmd(b64(password))
    assert reply == (235, "2.7.0 Authentication successful")
    assert (await client.cmd("MAIL FROM:<x@sender.test>"))[0] == 250
    await client.close()


async def test_failed_auth_is_refused_logged_and_counted(
    proxy_factory: ProxyFactory, submission: dict[str, Any],
    client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await proxy_factory(listeners=[submission], limits={"max_errors": 3},
                                login_throttle={"initial_delay": 0.01})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await starttls(client, client_tls)
    invalid = (535, "5.7.8 Authentication credentials invalid")
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        assert await client.cmd(f"AUTH PLAIN {plain('alice', 'guess-1')}") == invalid
        assert await client.cmd(f"AUTH PLAIN {plain('mallory', 'guess-2')}") == invalid
        assert await client.cmd(f"AUTH PLAIN {plain('alice', ALICE_PASSWORD, authzid='bob')}") == invalid
        assert await client.reply() == (421, "4.7.0 Too many errors, closing connection")
        assert await client.closed()
    failed = events(caplog, "auth_failed")
    assert [f["user"] for f in failed] == ["alice", "mallory", "alice"]
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert "guess-1" not in logged and ALICE_PASSWORD not in logged


async def test_auth_protocol_errors(
    proxy_factory: ProxyFactory, submission: dict[str, Any], client_tls: ssl.SSLContext,
) -> None:
    proxy = await proxy_factory(listeners=[submission])
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await starttls(client, client_tls)
    assert await client.cmd("AUTH CRAM-MD5") == (504, "5.5.4 Unrecognized authentication type")
    assert await client.cmd("AUTH") == (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
    assert await client.cmd("AUTH PLAIN not!base64") == (501, "5.5.2 Cannot decode base64 response")
    assert await client.cmd(f"AUTH PLAIN {b64('no-separators')}") == (501, "5.5.2 Malformed PLAIN response")
    assert await client.cmd("AUTH LOGIN") == (334, b64("Username:"))
    assert await client.cmd("*") == (501, "5.7.0 Authentication cancelled")
    assert await client.cmd("NOOP") == (250, "2.0.0 OK")  # still in step
    await client.close()


async def test_auth_not_required_still_guards_relaying(
    proxy_factory: ProxyFactory, submission: dict[str, Any], client_tls: ssl.SSLContext,
) -> None:
    submission["auth"]["require"] = False
    proxy = await proxy_factory(relay=RELAY, listeners=[submission])
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await starttls(client, client_tls)
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{OUTSIDE}>"))[0] == 554
    assert (await client.cmd("RCPT TO:<b@dest.test>"))[0] == 250
    await client.close()


async def test_auth_on_an_implicit_tls_listener_and_none_elsewhere(
    proxy_factory: ProxyFactory, submission: dict[str, Any], client_tls: ssl.SSLContext,
) -> None:
    proxy = await proxy_factory(listeners=[{**submission, "implicit_tls": True}])
    client = await open_tls(port_of(proxy), client_tls)
    _, ehlo = await client.hello()
    assert "AUTH PLAIN LOGIN" in ehlo.split("\n")
    assert (await client.cmd(f"AUTH PLAIN {plain('bob', BOB_PASSWORD)}"))[0] == 235
    await client.close()
    plain_client = await Talk.open(port_of(await proxy_factory()))
    await plain_client.hello()
    assert await plain_client.cmd("AUTH PLAIN") == (502, "5.5.1 AUTH not available on this listener")
    await plain_client.close()


# -- the users file --------------------------------------------------------------------------


async def test_password_file_checks_unknown_users_too(
    users_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smtpproxy import auth

    checked: list[str] = []
    real_check = auth._check

    def counting(hashed: str, password: bytes) -> bool:
        checked.append(hashed)
        return real_check(hashed, password)

    monkeypatch.setattr(auth, "_check", counting)
    users = PasswordFile.load(users_file)
    assert len(users) == 2 and "alice" in users
    assert await users.verify("alice", ALICE_PASSWORD)
    assert not await users.verify("alice", "wrong")
    assert not await users.verify("nobody", ALICE_PASSWORD)  # even a real password of someone else
    assert len(checked) == 3  # the unknown user cost a hash check as well
    assert await users.verify("bob", BOB_PASSWORD.encode())


async def test_bcrypt_passwords_longer_than_72_bytes(tmp_path: Path) -> None:
    long_password = "x" * 100
    hashed = bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "users"
    path.write_text(f"carol:{hashed}\n")
    assert await PasswordFile.load(path).verify("carol", long_password)


@pytest.mark.parametrize(
    ("line", "problem"),
    [("carol", "expected 'user:hash'"), ("carol:plaintext", "unsupported hash"),
     ("carol:$2b$04$tooshort", "malformed bcrypt hash"),
     ("carol:$argon2id$v=19$garbage", "malformed Argon2 hash"),
     ("car ol:$2b$04$" + "a" * 53, "spaces"), ("alice:$2b$04$" + "a" * 53, "already defined on line 3")],
)
def test_users_file_problems_name_file_and_line(
    users_file: Path, users_text: str, line: str, problem: str
) -> None:
    users_file.write_text(users_text + line + "\n")
    with pytest.raises(PasswordFileError) as info:
        PasswordFile.load(users_file)
    assert str(info.value).startswith(f"{users_file}:5: ")
    assert problem in str(info.value)


# -- configuration ---------------------------------------------------------------------------


def write_config(tmp_path: Path, listener: str) -> Path:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(f"listeners:\n  - address: 127.0.0.1\n    port: 0\n{listener}")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return str(info.value)


@pytest.mark.parametrize(
    ("listener", "key", "message"),
    [
        ("    implicit_tls: true\n", "listeners[0].implicit_tls", "needs a 'tls' section"),
        ("    proxy_protocol: true\n", "listeners[0].proxy_protocol_from", "proxy_protocol needs"),
        ("    proxy_protocol: true\n    proxy_protocol_from: [10.0.0.1/8]\n",
         "listeners[0].proxy_protocol_from[0]", "host bits"),
        ("    proxy_protocol_timeout: 0\n", "listeners[0].proxy_protocol_timeout", "greater than 0"),
        ("    auth:\n      users_file: missing-users\n", "listeners[0].auth.users_file", "file not found"),
        ("    auth:\n      require: true\n", "listeners[0].auth.users_file", "Field required"),
    ],
)
def test_listener_config_errors(tmp_path: Path, listener: str, key: str, message: str) -> None:
    text = config_error(write_config(tmp_path, listener))
    assert f": {key}: " in text and message in text, text


def test_listener_config_errors_needing_tls_material(
    tmp_path: Path, tls_files: dict[str, str], users_file: Path
) -> None:
    tls = f"    tls: {{cert: {tls_files['cert']}, key: {tls_files['key']}}}\n"
    text = config_error(write_config(tmp_path, f"    auth:\n      users_file: {users_file}\n"))
    assert ": listeners[0].auth: auth needs a 'tls' section" in text
    text = config_error(write_config(tmp_path, tls + "    implicit_tls: true\n    require_starttls: true\n"))
    assert ": listeners[0].implicit_tls: implicit_tls and require_starttls exclude each other" in text
    text = config_error(write_config(
        tmp_path, tls + "    implicit_tls: true\n    proxy_protocol: true\n    proxy_protocol_from: [10.0.0.0/8]\n"))
    assert ": listeners[0].proxy_protocol: proxy_protocol cannot be combined with implicit_tls" in text
    users_file.write_text("alice:not-a-hash\n")
    text = config_error(write_config(tmp_path, tls + "    auth:\n      users_file: users\n"))
    assert f": listeners[0].auth.users_file: {users_file}:1: user 'alice': unsupported hash" in text


async def test_listener_config_loads_and_users_file_is_checked_again_at_startup(
    tmp_path: Path, tls_files: dict[str, str], users_file: Path
) -> None:
    tls = f"    tls: {{cert: {tls_files['cert']}, key: {tls_files['key']}}}\n"
    path = write_config(tmp_path, tls + "    auth:\n      users_file: users\n")
    path.write_text(path.read_text() + f"delivery: {{type: maildir, path: {tmp_path / 'mail'}}}\n")
    config, _ = load_config(path, environ={})
    auth = config.listeners[0].auth
    assert auth is not None and auth.require and auth.users_file == users_file  # resolved
    await asyncio.to_thread(users_file.write_text, "alice:changed-since\n")
    server = ProxyServer(config, chain=chain_of())
    with pytest.raises(StartupError, match=r"listeners\[0\]\.auth\.users_file: .*users:1: user 'alice'"):
        await server.start()
    await server.stop(grace=0.1)
