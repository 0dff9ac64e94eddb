"""`smtpproxy policy`: Postfix's policy protocol over a real socket, and the parser.

The requests are the attribute sets Postfix 3.x sends (SMTPD_POLICY_README, "Protocol
description"); the answers are what check_policy_service would act on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy import Session, Verdict, hookimpl
from smtpproxy.addresses import Address
from smtpproxy.policy.protocol import Limits, PolicyProtocolError, format_action, parse_request
from smtpproxy.policy.server import PolicyServer
from smtpproxy.session import Recipient, Transaction
from tests.conftest import chain_of, make_config

Start = Callable[..., Any]


def request(state: str = "RCPT", instance: str = "a1.6f2c.1", **attributes: str) -> dict[str, str]:
    """A request as Postfix 3.x sends it at *state*."""
    base = {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": "192.0.2.7", "client_name": "mail.client.test",
        "reverse_client_name": "mail.client.test", "client_port": "40001",
        "helo_name": "mail.client.test", "sender": "alice@sender.test",
        "recipient": "bob@dest.test", "recipient_count": "0", "queue_id": "", "instance": instance,
        "size": "0", "etrn_domain": "", "stress": "", "sasl_method": "", "sasl_username": "",
        "sasl_sender": "", "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "", "encryption_protocol": "", "encryption_cipher": "",
        "encryption_keysize": "0", "policy_context": "", "server_address": "127.0.0.1",
        "server_port": "25", "compatibility_level": "3.6", "mail_version": "3.7.11",
        "future_attribute": "ignored",
    }
    return base | attributes


def encode(attributes: dict[str, str]) -> bytes:
    return b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n"


class Client:
    """A policy client like Postfix's: one connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, attributes: dict[str, str]) -> str:
        self.writer.write(encode(attributes))
        await self.writer.drain()
        return await self.answer()

    async def answer(self) -> str:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        empty = await asyncio.wait_for(self.reader.readline(), 10)
        assert empty == b"\n", (line, empty)
        assert line.startswith(b"action=") and line.endswith(b"\n"), line
        return line[len(b"action="):-1].decode()

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF, or a reset)."""
        try:
            return await asyncio.wait_for(self.reader.read(), 10) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def policy(tmp_path: Path) -> AsyncIterator[Start]:
    servers: list[PolicyServer] = []

    async def start(*plugins: object, **settings: Any) -> tuple[PolicyServer, Callable[[], Any]]:
        config = make_config(tmp_path, policy={"listen": "inet:127.0.0.1:0",
                                               "message_plugins": "warn"} | settings)
        server = PolicyServer(config, chain=chain_of(*plugins, timeout=2.0))
        await server.start()
        servers.append(server)
        address = server.address
        assert isinstance(address, tuple)

        async def connect() -> Client:
            return Client(*await asyncio.open_connection(*address))

        return server, connect

    yield start
    for server in servers:
        await server.stop(grace=1)


class Rules:
    """Verdicts by address, at each envelope phase; records what each phase saw."""

    name = "rules"

    def __init__(self, **verdicts: Verdict) -> None:
        self.verdicts = verdicts
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def connect(self, session: Session) -> Verdict | None:
        self.seen.append(("connect", session.client.ip))
        return self.verdicts.get("connect")

    @hookimpl
    def helo(self, hostname: str) -> Verdict | None:
        self.seen.append(("helo", hostname))
        return self.verdicts.get("helo")

    @hookimpl
    def mail_from(self, session: Session, sender: Address) -> Verdict | None:
        self.seen.append(("mail_from", sender.text))
        self.seen.append(("auth", session.auth_user or ""))
        return self.verdicts.get("mail_from")

    @hookimpl
    def rcpt_to(self, transaction: Transaction, recipient: Recipient) -> Verdict | None:
        self.seen.append(("rcpt_to", recipient.address.text))
        return self.verdicts.get(recipient.address.local)


async def test_a_passing_recipient_is_dunno_and_the_envelope_phases_run_once(policy: Start) -> None:
    rules = Rules()
    _, connect = await policy(rules)
    client = await connect()
    assert await client.ask(request()) == "DUNNO"
    assert await client.ask(request(recipient="carol@dest.test")) == "DUNNO"
    assert await client.ask(request("END-OF-MESSAGE", recipient="", recipient_count="2",
                                    size="1234")) == "DUNNO"
    client.close()
    assert rules.seen == [("connect", "192.0.2.7"), ("helo", "mail.client.test"),
                          ("mail_from", "alice@sender.test"), ("auth", ""),
                          ("rcpt_to", "bob@dest.test"), ("rcpt_to", "carol@dest.test")]


async def test_verdicts_map_to_postfix_actions(policy: Start) -> None:
    rules = Rules(
        bob=Verdict.reject("No bob here", code=550),
        carol=Verdict.tempfail("Greylisted, please try again later", code=451),
        dave=Verdict.discard("spam trap"),
    )
    _, connect = await policy(rules)
    client = await connect()
    assert await client.ask(request()) == "550 5.7.1 No bob here"
    greylisted = "451 4.7.1 Greylisted, please try again later"
    assert await client.ask(request(recipient="carol@dest.test")) == greylisted
    assert await client.ask(request(recipient="erin@dest.test")) == "DUNNO"
    assert (await client.ask(request(recipient="dave@dest.test"))).startswith("DISCARD ")
    # The discard is the whole message's: later recipients and the end say so as well.
    end = request("END-OF-MESSAGE", recipient="", recipient_count="2")
    assert (await client.ask(end)).startswith("DISCARD")


async def test_a_refusal_before_rcpt_answers_every_request_of_the_instance(policy: Start) -> None:
    rules = Rules(connect=Verdict.reject("Listed at dnsbl.test", code=550))
    _, connect = await policy(rules)
    client = await connect()
    # At connect RFC 5321 3.1 asks for 554; the same rule as the proxy's (outcome.connect_reply).
    assert await client.ask(request()) == "554 5.7.1 Listed at dnsbl.test"
    assert await client.ask(request(recipient="carol@dest.test")) == "554 5.7.1 Listed at dnsbl.test"
    assert rules.seen == [("connect", "192.0.2.7")]  # not asked again


async def test_quarantine_is_hold_only_where_the_admin_asks(policy: Start) -> None:
    rules = Rules(bob=Verdict.quarantine("looks odd"))
    _, connect = await policy(rules)
    client = await connect()
    assert await client.ask(request()) == "451 4.7.1 Message held for review, try again later"
    _, connect = await policy(Rules(bob=Verdict.quarantine("looks odd")), quarantine_action="hold")
    client = await connect()
    assert await client.ask(request()) == "HOLD looks odd"


async def test_sasl_tls_and_client_attributes_reach_the_plugins(policy: Start) -> None:
    seen: list[Session] = []

    class Look:
        name = "look"

        @hookimpl
        def mail_from(self, session: Session) -> None:
            seen.append(session)

    _, connect = await policy(Look())
    client = await connect()
    assert await client.ask(request(
        sasl_username="alice", sasl_method="PLAIN", encryption_protocol="TLSv1.3",
        encryption_cipher="TLS_AES_256_GCM_SHA384", encryption_keysize="256",
        policy_context="submission", client_name="unknown")) == "DUNNO"
    (session,) = seen
    assert session.auth_user == "alice"
    assert session.tls is not None and session.tls.version == "TLSv1.3" and session.tls.bits == 256
    assert session.client.hostname is None  # Postfix's "unknown" is no name
    assert session.notes["policy"]["policy_context"] == "submission"
    assert session.transport == "policy"


async def test_a_plugin_failure_goes_by_default_action(policy: Start) -> None:
    class Broken:
        name = "broken"

        @hookimpl
        def rcpt_to(self) -> None:
            raise RuntimeError("boom")

    _, connect = await policy(Broken())
    client = await connect()
    assert (await client.ask(request())).startswith("451 ")
    _, connect = await policy(Broken(), default_action="accept")
    client = await connect()
    assert await client.ask(request()) == "DUNNO"


async def test_instances_are_bounded_and_expire(policy: Start) -> None:
    server, connect = await policy(Rules(), max_instances=10)
    client = await connect()
    for n in range(25):
        assert await client.ask(request(instance=f"i{n}")) == "DUNNO"
    assert server.service.instances == 10
    server.service.settings = type(server.service.settings)(instance_timeout=1e-9, max_instances=10)
    await asyncio.sleep(0.01)
    assert await client.ask(request(instance="last")) == "DUNNO"
    assert server.service.instances == 1


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "smtpproxy_fields", {}))


# -- hostile input -------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "error"), [
    (b"a=b\n" * 200, "more than 100 attributes"),
    (b"name=" + b"x" * 10000 + b"\n\n", "longer than 4096"),
    (b"no equals sign\n\n", "not a name=value line"),
    (b"=value\n\n", "not a name=value line"),
])
async def test_hostile_requests_close_the_connection_and_the_service_keeps_serving(
    policy: Start, payload: bytes, error: str, caplog: pytest.LogCaptureFixture,
) -> None:
    _, connect = await policy(Rules())
    bad = await connect()
    with caplog.at_level(logging.WARNING):
        bad.writer.write(payload)
        await bad.writer.drain()
        assert await bad.closed()
    assert any(r.getMessage() == "policy_protocol_error" and error in fields(r)["error"]
               for r in caplog.records), [fields(r) for r in caplog.records]
    good = await connect()
    assert await good.ask(request()) == "DUNNO"


async def test_endless_request_without_empty_line_is_cut_at_max_request(policy: Start) -> None:
    _, connect = await policy(Rules(), max_request=4096, max_attributes=10000)
    bad = await connect()
    for n in range(1000):
        bad.writer.write(f"attr{n}=value\n".encode())
        if bad.writer.is_closing():
            break
        try:
            await bad.writer.drain()
        except ConnectionError:
            break
    assert await bad.closed()
    good = await connect()
    assert await good.ask(request()) == "DUNNO"


async def test_a_client_that_goes_away_mid_request_is_forgotten(
    policy: Start, caplog: pytest.LogCaptureFixture,
) -> None:
    server, connect = await policy(Rules())
    bad = await connect()
    with caplog.at_level(logging.WARNING):
        bad.writer.write(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        await bad.writer.drain()
        bad.close()
        for _ in range(100):
            if any("inside a request" in fields(r).get("error", "") for r in caplog.records):
                break
            await asyncio.sleep(0.02)
    assert any("inside a request" in fields(r).get("error", "") for r in caplog.records)
    assert server.service.instances == 0
    good = await connect()
    assert await good.ask(request()) == "DUNNO"


async def test_many_requests_on_one_connection_and_many_connections(policy: Start) -> None:
    _, connect = await policy(Rules())
    clients = [await connect() for _ in range(5)]
    for round_ in range(4):
        answers = await asyncio.gather(*(c.ask(request(instance=f"c{i}.{round_}"))
                                         for i, c in enumerate(clients)))
        assert answers == ["DUNNO"] * 5


# -- the parser ------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z_]{0,30}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=200)


@given(st.dictionaries(names, values, max_size=60))
def test_parse_request_round_trips_what_postfix_sends(attributes: dict[str, str]) -> None:
    lines = [f"{k}={v}".encode() for k, v in attributes.items()]
    assert parse_request(lines) == {k: v.removesuffix("\r") for k, v in attributes.items()}


@given(st.lists(st.binary(max_size=300), max_size=150))
def test_parse_request_never_crashes(lines: list[bytes]) -> None:
    lines = [line.replace(b"\n", b"") for line in lines]
    try:
        parsed = parse_request(lines, Limits(max_line=256, max_attributes=120))
    except PolicyProtocolError:
        return
    assert len(parsed) <= len(lines)


@given(st.text(max_size=300))
def test_an_action_is_always_one_line(text: str) -> None:
    out = format_action(text)
    assert out.endswith(b"\n\n") and out.count(b"\n") == 2 and out.startswith(b"action=")


# -- plugins that need the message -------------------------------------------------------------


def write_config(tmp_path: Path, policy: str, plugins: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("listeners: [{port: 2525}]\ndelivery: {type: maildir, path: mail}\n"
                    f"{policy}plugins:\n{plugins}")
    return path


DKIM_AND_RATELIMIT = (
    "  - name: dkim_verify\n"
    "  - name: ratelimit\n"
    "    settings: {rules: [{name: r, key: sender, what: recipients, limit: 5, window: 60}]}\n"
)


def test_check_config_refuses_plugins_that_need_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from smtpproxy.cli import main

    path = write_config(tmp_path, "policy: {listen: 'inet:127.0.0.1:10040'}\n", DKIM_AND_RATELIMIT)
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "policy: error: cannot run (they need the header or body): dkim_verify" in err
    assert "run without their message checks (data hook): ratelimit" in err
    path = write_config(tmp_path, "policy: {message_plugins: warn}\n", DKIM_AND_RATELIMIT)
    assert main(["check-config", "-c", str(path)]) == 0
    assert "policy: warning: cannot run (they need the header or body): dkim_verify" in capsys.readouterr().err
    # Without a policy: section the file is a proxy's or a milter's: nothing to say.
    path = write_config(tmp_path, "", DKIM_AND_RATELIMIT)
    assert main(["check-config", "-c", str(path)]) == 0
    assert "policy" not in capsys.readouterr().err


async def test_the_service_refuses_to_start_with_a_message_only_plugin(tmp_path: Path) -> None:
    from smtpproxy.config import load_config
    from smtpproxy.startup import StartupError

    path = write_config(tmp_path, "policy: {listen: 'inet:127.0.0.1:0'}\n", DKIM_AND_RATELIMIT)
    config, source = load_config(path)
    server = PolicyServer(config, source)
    with pytest.raises(StartupError, match=r"need the message: cannot run .*: dkim_verify"):
        await server.start()


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
async def test_read_request_ends_in_a_request_a_clean_end_or_a_clear_error(data: bytes, chunk: int) -> None:
    from smtpproxy.policy.protocol import read_request

    limits = Limits(max_line=512, max_attributes=40, max_request=4096)
    reader = asyncio.StreamReader(limit=limits.max_line + 2)
    for i in range(0, len(data), chunk):
        reader.feed_data(data[i:i + chunk])
    reader.feed_eof()
    for _ in range(len(data) + 1):  # every request consumes at least one byte
        try:
            request = await read_request(reader, limits)
        except PolicyProtocolError:
            return
        if request is None:
            assert reader.at_eof()
            return
        assert len(request) <= limits.max_attributes
    pytest.fail("read_request did not come to an end")


async def test_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    config = make_config(tmp_path, policy={"listen": f"unix:{path}", "socket_mode": "0600"})
    server = PolicyServer(config, chain=chain_of(Rules()))
    await server.start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        client = Client(*await asyncio.open_unix_connection(str(path)))
        assert await client.ask(request()) == "DUNNO"
        client.close()
    finally:
        await server.stop(grace=1)
    assert not path.exists()


async def test_one_instance_with_endless_recipients_stays_bounded(policy: Start) -> None:
    server, connect = await policy(Rules())
    client = await connect()
    answers = {await client.ask(request(recipient=f"r{n}@dest.test")) for n in range(250)}
    # limits.max_recipients (100) refuses the rest; what is remembered stays bounded.
    assert answers == {"DUNNO", "452 4.5.3 Too many recipients"}
    (instance,) = server.service._instances.values()
    assert len(instance.recipients) <= 2 * server.service.settings.max_recipients
    assert len(instance.session.transaction.envelope.recipients) == 100


async def test_a_failure_at_connect_under_reject_is_554_as_the_proxy_answers(policy: Start) -> None:
    class BrokenAtConnect:
        name = "broken"

        @hookimpl
        def connect(self) -> None:
            raise RuntimeError("boom")

    _, connect = await policy(BrokenAtConnect(), default_action="reject")
    client = await connect()
    assert (await client.ask(request())).startswith("554 5.3.0 ")


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_the_policy_process_answers_on_either_event_loop(tmp_path: Path, choice: str) -> None:
    """``smtpproxy policy`` as users start it (uvloop by default) answers Postfix's requests
    and stops cleanly: the in-process tests here run on asyncio's loop only."""
    from tests.daemons import free_port, smtpproxy_serving

    pytest.importorskip(choice)
    port = free_port()
    async with smtpproxy_serving("policy", tmp_path / "smtpproxy.yaml",
                           f"policy: {{listen: 'inet:127.0.0.1:{port}'}}\nevent_loop: {choice}\n",
                           listening=rf"event=listening .*loop={choice} "):
        client = Client(*await asyncio.open_connection("127.0.0.1", port))
        assert await client.ask(request("CONNECT")) == "DUNNO"
        assert await client.ask(request("RCPT")) == "DUNNO"
        client.close()
