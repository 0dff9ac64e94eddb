"""Sender/login binding (smtpproxy.senderlogin): Postfix's smtpd_sender_login_maps with
reject_sender_login_mismatch, through the submission listener into the tests' Postfix."""

from __future__ import annotations

import asyncio
import base64
import email
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy import Message
from smtpproxy.config import ConfigError, load_config
from smtpproxy.milter import codec
from smtpproxy.milter.server import MilterServer
from smtpproxy.senderlogin import SenderLoginMapError, SenderLoginPolicy, StaticTable
from smtpproxy.server import ProxyServer
from smtpproxy.tracer import Tracer
from tests.conftest import Talk, chain_of, make_config, port_of
from tests.postfix_instance import PostfixFactory, PostfixInstance
from tests.wire.test_milter import FakeMTA

PASSWORDS = {"alice": "alice's secret", "bob": "bob's secret"}
MAP = {
    "alice@example.com": "alice",
    "sales@example.com": ["alice", "bob"],  # a shared mailbox
    "Bob@Example.COM": "bob",
    "@example.org": "bob",
    "/^([a-z]+)@staff\\.example\\.com$/": "$1",
}
BODY = "From: {frm}\r\nTo: carol@dest.test\r\nSubject: s\r\n\r\nhello\r\n"


def table(entries: dict[str, Any] = MAP) -> StaticTable:
    return StaticTable.build((k, v, f"map[{k!r}]") for k, v in entries.items())


# -- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "login", "why"),
    [
        ("alice@example.com", "alice", None),
        ("ALICE@EXAMPLE.COM", "Alice", None),  # keys and logins without regard to case
        ("alice+lists@example.com", "alice", None),  # user+tag: looked up as user@ too
        ("alice+lists@example.com", "bob", "not owned by user bob"),
        ("sales@example.com", "alice", None),
        ("sales@example.com", "bob", None),
        ("bob@example.com", "alice", "not owned by user alice"),
        ("anyone@example.org", "bob", None),  # @domain
        ("anyone@EXAMPLE.org", "alice", "not owned by user alice"),
        ("carol@staff.example.com", "carol", None),  # a pattern and its group
        ("carol@staff.example.com", "alice", "not owned by user alice"),
        ("ceo@bigbank.test", "alice", "not owned by user alice"),  # not in the map
        ("ceo@bigbank.test", None, None),  # unauthenticated, unknown: not ours to judge
        ("alice@example.com", None, "not logged in"),
        ("+x@example.com", "alice", "not owned by user alice"),  # a leading '+' is no delimiter
    ],
)
async def test_who_may_use_which_sender(sender: str, login: str | None, why: str | None) -> None:
    policy = SenderLoginPolicy(table())
    assert await policy.mismatch(sender, login) == why
    reply = await policy.envelope_refusal(sender, login)
    if why is None:
        assert reply is None
    else:
        assert reply is not None and (reply.code, reply.enhanced) == (553, "5.7.1")
        assert reply.text == f"<{sender}>: Sender address rejected: {why}"


async def test_null_sender_unknown_senders_and_delimiters() -> None:
    strict = SenderLoginPolicy(table())
    assert await strict.envelope_refusal("", "alice") is None  # Postfix skips the null sender
    assert await strict.envelope_refusal("", None) is None
    known_only = SenderLoginPolicy(table(), unknown_senders="allow")
    assert await known_only.envelope_refusal("ceo@bigbank.test", "alice") is None
    assert await known_only.envelope_refusal("bob@example.com", "alice") is not None
    dash = SenderLoginPolicy(table(), recipient_delimiter="-+")
    assert await dash.mismatch("alice-news@example.com", "alice") is None
    assert await dash.mismatch("alice+news@example.com", "alice") is None
    none = SenderLoginPolicy(table(), recipient_delimiter="")
    assert await none.mismatch("alice+news@example.com", "alice") == "not owned by user alice"


@pytest.mark.parametrize(
    ("field", "refused"),
    [
        ("Alice <alice@example.com>", None),
        ("alice@example.com, Sales <sales@example.com>", None),  # several authors, all hers
        ("alice@example.com, bob@example.com", "From: <bob@example.com> rejected: not owned by user alice"),
        ('"ceo@bigbank.test" <alice@example.com>',
         "From: display name 'ceo@bigbank.test' rejected: not owned by user alice"),
        ('"alice@example.com" <alice@example.com>', None),
        ('"Alice (sales@example.com)" <alice@example.com>', None),
        ("=?utf-8?q?ceo=40bigbank=2Etest?= <alice@example.com>",
         "From: display name 'ceo@bigbank.test' rejected: not owned by user alice"),
        ("<<<>>>", "From: field rejected: cannot be parsed"),
    ],
)
async def test_header_from(field: str, refused: str | None) -> None:
    policy = SenderLoginPolicy(table(), headers=True)
    message = Message(f"From: {field}\r\nSubject: s\r\n\r\nbody\r\n".encode())
    found = await policy.header_refusal(message, "alice")
    if refused is None:
        assert found is None
    else:
        assert found is not None
        assert (found[0].code, found[0].enhanced, found[0].text) == (550, "5.7.1", refused)


async def test_header_sender_and_second_from_field_count_too() -> None:
    policy = SenderLoginPolicy(table(), headers=True)
    two = Message(b"From: alice@example.com\r\nFrom: bob@example.com\r\n\r\nx\r\n")
    assert (await policy.header_refusal(two, "alice")) is not None
    sender = Message(b"From: alice@example.com\r\nSender: ceo@bigbank.test\r\n\r\nx\r\n")
    found = await policy.header_refusal(sender, "alice")
    assert found is not None and found[0].text.startswith("Sender: <ceo@bigbank.test>")
    assert await SenderLoginPolicy(table()).header_refusal(sender, "alice") is None  # headers: off
    unauth = Message(b"From: alice@example.com\r\n\r\nx\r\n")
    found = await policy.header_refusal(unauth, None)
    assert found is not None and found[0].text.endswith("not logged in")
    assert await policy.header_refusal(Message(b"From: x@elsewhere.test\r\n\r\nx\r\n"), None) is None


def test_map_file_format_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "logins"
    path.write_text("# sender  logins\n\nsales@example.com  alice,\n   bob carol\n@example.org\tdave\n")
    loaded = StaticTable.load(path)
    assert asyncio.run(loaded.lookup("SALES@example.com")) == ("alice", "bob", "carol")
    assert asyncio.run(loaded.lookup("@EXAMPLE.ORG")) == ("dave",)
    for text, problem in [
        ("alice alice\n", ":1: 'alice' is not 'user@domain', '@domain' or '/pattern/'"),
        ("ok@example.com a\nlonely@example.com\n", ":2: 'lonely@example.com' has no logins"),
        ("/(/ a\n", ":1: bad pattern /(/"),
        ("/^(.*)@x\\.test$/ $2\n", ":1: /^(.*)@x\\.test$/: $2 but the pattern has 1 groups"),
        ("  x@y.test a\n", ":1: continuation line without an entry"),
    ]:
        path.write_text(text)
        with pytest.raises(SenderLoginMapError) as info:
            StaticTable.load(path)
        assert str(info.value).startswith(str(path) + problem), str(info.value)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "logins").write_text("x@y.test a\nbroken alice\n")
    for section, expected in [
        ("sender_login:\n  file: logins\n", f"sender_login.file: {tmp_path / 'logins'}:2: 'broken' is not"),
        ("sender_login:\n  map: {'nobody': alice}\n", "sender_login.map: map['nobody']: 'nobody' is not"),
        ("sender_login:\n  headers: true\n", "sender_login: needs 'map' or 'file' (or both)"),
    ]:
        (tmp_path / "c.yaml").write_text(section)
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "c.yaml")
        assert expected in str(info.value), str(info.value)


# -- through the listener, into Postfix ---------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


Start = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy(tmp_path: Path, tls_ca: trustme.CA) -> AsyncIterator[Start]:
    """A proxy from a real configuration file (so that reload re-reads it) in front of Postfix."""
    pem = tmp_path / "proxy.pem"
    tls_ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    users = "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                    for u, p in PASSWORDS.items())
    (tmp_path / "users").write_text(users)
    started: list[ProxyServer] = []

    async def start(postfix: PostfixInstance, sender_login: dict[str, Any], *, require: bool = True,
                    tables: dict[str, Any] | None = None, **delivery: Any) -> ProxyServer:
        import yaml

        config = {
            "hostname": "proxy.test", "received_header": "never",
            "listeners": [{"address": "127.0.0.1", "port": 0, "tls": {"cert": str(pem), "key": str(pem)},
                           "auth": {"users_file": "users", "require": require}}],
            "relay": {"domains": ["dest.test"]},
            "delivery": {"type": "smtp", "host": "127.0.0.1", "port": postfix.port, "tls": "none",
                         **delivery},
            "quarantine": {"path": str(tmp_path / "quarantine")},
            "login_throttle": {"initial_delay": 0},
            "sender_login": sender_login,
            "tables": tables or {},
        }
        path = tmp_path / "smtpproxy.yaml"
        path.write_text(yaml.safe_dump(config))
        loaded, source = load_config(path)
        server = ProxyServer(loaded, source, chain=chain_of())
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=1)


async def session(proxy: ProxyServer, ctx: ssl.SSLContext, login: str | None) -> Talk:
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("STARTTLS"))[0] == 220
    await client.writer.start_tls(ctx, server_hostname="proxy.test")
    assert (await client.cmd("EHLO client.test"))[0] == 250
    if login is not None:
        blob = base64.b64encode(f"\0{login}\0{PASSWORDS[login]}".encode()).decode()
        assert (await client.cmd(f"AUTH PLAIN {blob}"))[0] == 235
    return client


async def submit(client: Talk, sender: str, frm: str) -> tuple[int, str]:
    return await client.send_message(sender, ["carol@dest.test"], BODY.format(frm=frm).encode())


async def test_forged_envelope_and_from_are_refused_shared_mailbox_and_tags_work(
    start_proxy: Start, postfix_factory: PostfixFactory, client_tls: ssl.SSLContext,
) -> None:
    postfix = postfix_factory()
    proxy = await start_proxy(postfix, {"map": MAP, "headers": True})
    alice = await session(proxy, client_tls, "alice")
    # The forged envelope: what issue 23 found delivered.
    assert await alice.cmd("MAIL FROM:<ceo@bigbank.test>") == (
        553, "5.7.1 <ceo@bigbank.test>: Sender address rejected: not owned by user alice")
    assert await alice.cmd("MAIL FROM:<bob@example.com>") == (
        553, "5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice")
    # The forged From behind a good envelope.
    assert await submit(alice, "alice@example.com", "CEO <ceo@bigbank.test>") == (
        550, "5.7.1 From: <ceo@bigbank.test> rejected: not owned by user alice")
    assert await submit(alice, "alice@example.com", '"ceo@bigbank.test" <alice@example.com>') == (
        550, "5.7.1 From: display name 'ceo@bigbank.test' rejected: not owned by user alice")
    # Her own address with a tag, and the shared mailbox: delivered by Postfix.
    assert (await submit(alice, "alice+lists@example.com", "Alice <alice+lists@example.com>"))[0] == 250
    assert (await submit(alice, "sales@example.com", "Sales <sales@example.com>"))[0] == 250
    await alice.close()
    bob = await session(proxy, client_tls, "bob")
    assert (await submit(bob, "sales@example.com", "Sales <sales@example.com>"))[0] == 250
    assert (await submit(bob, "", "Mailer <bob@example.com>"))[0] == 250  # null sender: no check
    await bob.close()
    stored = await asyncio.to_thread(postfix.wait_for_messages, "carol", 4)
    authors = sorted(str(email.message_from_bytes(m)["From"]) for m in stored)
    assert authors == ["Alice <alice+lists@example.com>", "Mailer <bob@example.com>",
                       "Sales <sales@example.com>", "Sales <sales@example.com>"]
    assert not any(b"bigbank" in m for m in stored)


async def test_a_forged_from_never_reaches_postfix_in_relay_mode(
    start_proxy: Start, postfix_factory: PostfixFactory, client_tls: ssl.SSLContext,
) -> None:
    """rcpt_mode relay: Postfix has the transaction open from RCPT on; the refusal aborts it."""
    postfix = postfix_factory()
    proxy = await start_proxy(postfix, {"map": MAP, "headers": True}, rcpt_mode="relay")
    alice = await session(proxy, client_tls, "alice")
    assert (await submit(alice, "alice@example.com", "bob@example.com"))[0] == 550
    assert (await submit(alice, "alice@example.com", "alice@example.com"))[0] == 250
    await alice.close()
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "carol", 1)
    assert email.message_from_bytes(stored)["From"] == "alice@example.com"
    assert b"bob@example.com" not in stored


async def test_unauthenticated_client_may_not_use_an_owned_address(
    start_proxy: Start, postfix_factory: PostfixFactory, client_tls: ssl.SSLContext,
) -> None:
    postfix = postfix_factory()
    proxy = await start_proxy(postfix, {"map": MAP}, require=False)
    client = await session(proxy, client_tls, None)
    assert await client.cmd("MAIL FROM:<alice@example.com>") == (
        553, "5.7.1 <alice@example.com>: Sender address rejected: not logged in")
    # An address nobody owns, to a local recipient: an ordinary inbound message.
    assert (await submit(client, "friend@elsewhere.test", "friend@elsewhere.test"))[0] == 250
    await client.close()
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "carol", 1)) == 1


async def test_the_map_file_is_read_again_at_reload(
    start_proxy: Start, postfix_factory: PostfixFactory, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    postfix = postfix_factory()
    logins = tmp_path / "logins"
    logins.write_text("alice@example.com alice\n")
    proxy = await start_proxy(postfix, {"file": "logins"})
    client = await session(proxy, client_tls, "alice")
    assert (await client.cmd("MAIL FROM:<help@example.com>"))[0] == 553
    await client.close()
    logins.write_text("alice@example.com alice\nhelp@example.com alice, bob\n")
    assert await proxy.reload()
    client = await session(proxy, client_tls, "alice")
    assert (await client.cmd("MAIL FROM:<help@example.com>"))[0] == 250
    await client.close()
    logins.write_text("help@example.com\n")  # broken: the reload fails, the old map stays
    assert not await proxy.reload()
    client = await session(proxy, client_tls, "alice")
    assert (await client.cmd("MAIL FROM:<help@example.com>"))[0] == 250
    await client.close()


# -- hostile input -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab@.+/ \t\n#,$1()^*\\é\x00"), max_size=120))
def test_any_map_file_loads_or_names_its_line(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("map") / "logins"
    path.write_bytes(text.encode("utf-8"))
    try:
        loaded = StaticTable.load(path)
    except SenderLoginMapError as exc:
        assert str(exc).startswith(f"{path}:")
        return
    for key in ("a@b.a", "ab+a@b.a", "@b.a"):
        found = asyncio.run(loaded.lookup(key))
        assert found is None or (found and all(isinstance(v, str) for v in found))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab@.<>",:;()\\ =?q_é'), max_size=80))
def test_any_from_field_is_judged_never_crashes(value: str) -> None:
    policy = SenderLoginPolicy(table(), headers=True)
    try:
        message = Message(f"From: {value}\r\n\r\nx\r\n".encode())
    except ValueError:
        return  # not a header the DATA reader would pass on either
    found = asyncio.run(policy.header_refusal(message, "alice"))
    assert found is None or (found[0].code, found[0].enhanced) == (550, "5.7.1")


# -- the milter front end ------------------------------------------------------------------


async def test_milter_holds_authenticated_senders_to_the_map(tmp_path: Path) -> None:
    """The sibling in milter mode: Postfix's own smtpd_sender_login_maps checks the envelope,
    nothing in Postfix checks From:; milter.check_sender_login does both for {auth_authen}."""
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0", "check_sender_login": True},
                         sender_login={"map": MAP, "headers": True})
    server = MilterServer(config, chain=chain_of())
    await server.start()
    try:
        mta = await FakeMTA.open(server)
        assert await mta.start() == mta.passed(codec.Connect("", "U"))
        await mta.passes(codec.Helo("client.test"))
        alice = {"{auth_authen}": "alice", "i": "4ABC"}
        assert await mta.event(codec.Mail(("<ceo@bigbank.test>",)), **alice) == [codec.ReplyCode(
            "553 5.7.1 <ceo@bigbank.test>: Sender address rejected: not owned by user alice")]
        await mta.passes(codec.Mail(("<alice+x@example.com>",)), **alice)
        await mta.passes(codec.Rcpt(("<carol@dest.test>",)))
        assert await mta.content([("From", " CEO <ceo@bigbank.test>")], b"x\r\n") == [codec.ReplyCode(
            "550 5.7.1 From: <ceo@bigbank.test> rejected: not owned by user alice")]
        await mta.passes(codec.Mail(("<sales@example.com>",)), **alice)
        await mta.passes(codec.Rcpt(("<carol@dest.test>",)))
        assert await mta.content([("From", " Sales <sales@example.com>")], b"x\r\n") == [codec.Accept()]
        # Unauthenticated mail (port 25) is not the milter's to judge: inbound mail claiming
        # the domain is for SPF/DMARC, and Postfix has reject_unauthenticated_sender_login_mismatch.
        await mta.close()
        inbound = await FakeMTA.open(server)
        assert await inbound.start() == inbound.passed(codec.Connect("", "U"))
        await inbound.envelope("<alice@example.com>", "<carol@dest.test>")
        assert await inbound.content([("From", " alice@example.com")], b"x\r\n") == [codec.Accept()]
        await inbound.close()
    finally:
        await server.stop(grace=1)


def test_milter_check_sender_login_needs_a_map(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("milter:\n  check_sender_login: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert "milter.check_sender_login: needs a sender_login section (map or file)" in str(
        info.value)


# -- the tracer ----------------------------------------------------------------------------


async def test_the_tracer_shows_the_listeners_sender_login_refusals(tmp_path: Path) -> None:
    """`smtpproxy test-message --auth-user` answers as the first listener would."""
    pem = tmp_path / "proxy.pem"
    trustme.CA().issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    (tmp_path / "users").write_text(f"alice:{bcrypt.hashpw(b'x', bcrypt.gensalt(rounds=4)).decode()}\n")
    config = make_config(
        tmp_path, sender_login={"map": MAP, "headers": True},
        listeners=[{"address": "127.0.0.1", "port": 0, "tls": {"cert": str(pem), "key": str(pem)},
                    "auth": {"users_file": str(tmp_path / "users")}}],
    )
    body = BODY.format(frm="alice@example.com").encode()
    async with Tracer.from_config(config) as tracer:
        forged = await tracer.trace(body, sender="ceo@bigbank.test", recipients=["carol@dest.test"],
                                    auth_user="alice")
        assert (forged.decision, forged.decided_by) == ("rejected", "proxy")
        assert forged.reply == "553 5.7.1 <ceo@bigbank.test>: Sender address rejected: not owned by user alice"
        header = await tracer.trace(BODY.format(frm="bob@example.com").encode(), sender="alice@example.com",
                                    recipients=["carol@dest.test"], auth_user="alice")
        assert header.reply == "550 5.7.1 From: <bob@example.com> rejected: not owned by user alice"
        fine = await tracer.trace(body, sender="alice+x@example.com", recipients=["carol@dest.test"],
                                  auth_user="alice")
        assert fine.decision == "delivered"
    no_auth = make_config(tmp_path, sender_login={"map": MAP})  # port 25 only: not checked
    async with Tracer.from_config(no_auth) as tracer:
        assert (await tracer.trace(body, sender="ceo@bigbank.test", recipients=["carol@dest.test"],
                                   auth_user="alice")).decision == "delivered"
