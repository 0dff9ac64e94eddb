"""The Authentication-Results header: built from the recorded checks, forged copies removed."""

from __future__ import annotations

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtpproxy_plugins.auth_results import AuthResults, authserv_id_of, header_value
from smtpproxy_plugins.dmarc import DMARC

from smtpproxy import Client, Envelope, Message, Session, Transaction
from smtpproxy.authresults import AuthCheck, record
from smtpproxy.registry import resolve
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer
from tests.plugins.test_dmarc import RecordSPF, address
from tests.plugins.test_dmarc import zones as zones  # noqa: PLC0414 - fixture

ID = "mx.example.com"


def plugin(**settings: object) -> AuthResults:
    return AuthResults(AuthResults.Settings.model_validate({"authserv_id": ID, **settings}))


def transaction(*recorded: AuthCheck) -> Transaction:
    tx = Session(Client("192.0.2.1", 4321)).begin_transaction(Envelope(address("a@example.org")))
    for check in recorded:
        record(tx, check)
    return tx


def message(head: str = "") -> Message:
    return Message((head + "From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n").encode())


def written(msg: Message) -> list[str]:
    return msg.get_all("Authentication-Results")


SPF_PASS = AuthCheck("spf", "pass", properties={"smtp.mailfrom": "a@example.org"})
DKIM_PASS = AuthCheck("dkim", "pass", properties={
    "header.d": "example.org", "header.s": "sel", "header.b": "AbCdEf12"})
DKIM_FAIL = AuthCheck("dkim", "fail", "bad signature", {
    "header.d": "other.test", "header.s": "s2", "header.b": "ZZ/+yx0987654321=="})
DMARC_PASS = AuthCheck("dmarc", "pass", "p=reject dis=none", {"header.from": "example.org"})
ARC_NONE = AuthCheck("arc", "none")


async def test_one_header_with_every_check_in_rfc_order() -> None:
    tx = transaction(DMARC_PASS, ARC_NONE, DKIM_PASS, SPF_PASS, DKIM_FAIL)
    msg = message()
    await plugin().data(tx, msg)
    assert written(msg) == [
        "mx.example.com; spf=pass smtp.mailfrom=a@example.org;"
        " dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12;"
        ' dkim=fail reason="bad signature" header.d=other.test header.s=s2 header.b="ZZ/+yx09";'
        ' dmarc=pass reason="p=reject dis=none" header.from=example.org; arc=none'
    ]
    assert msg.headers[0][0] == "Authentication-Results"  # prepended, above everything else
    parsed = authres.AuthenticationResultsHeader.parse_value(written(msg)[0])
    assert parsed.authserv_id == ID
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass"), ("arc", "none")]
    assert [str(p.value) for p in parsed.results[1].properties] == ["example.org", "sel", "AbCdEf12"]


async def test_nothing_recorded_says_none_and_none_results_are_written() -> None:
    msg = message()
    await plugin().data(transaction(), msg)
    assert written(msg) == ["mx.example.com; none"]
    msg = message()
    await plugin().data(transaction(AuthCheck("spf", "none", properties={"smtp.mailfrom": "a@example.org"})), msg)
    assert written(msg) == ["mx.example.com; spf=none smtp.mailfrom=a@example.org"]


def test_values_are_quoted_and_made_safe() -> None:
    value = header_value(ID, [
        AuthCheck("spf", "pass", properties={"smtp.mailfrom": '"john doe"@example.org'}),
        AuthCheck("iprev", "fail", "no PTR for a@b; \"odd\"\r\n", {"policy.iprev": "192.0.2.1"}),
        AuthCheck("spf", "none", properties={"smtp.helo": "bad helo; x=y", "smtp.empty": ""}),
        AuthCheck("bad method", "pass"),  # cannot be written: skipped
    ])
    assert value == (
        'mx.example.com; spf=pass smtp.mailfrom="john doe"@example.org;'
        ' spf=none smtp.helo="bad helo; x=y";'
        ' iprev=fail reason="no PTR for a@b; \\"odd\\"??" policy.iprev=192.0.2.1'
    )
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert [r.method for r in parsed.results] == ["spf", "spf", "iprev"]
    msg = message()
    msg.add_header("Authentication-Results", value)  # no CR/LF: Message accepts it


async def test_long_values_are_folded_by_the_message() -> None:
    many = [AuthCheck("dkim", "pass", properties={"header.d": f"d{i}.example.org", "header.s": "s" * 40})
            for i in range(40)]
    msg = message()
    await plugin().data(transaction(*many), msg)
    assert all(len(line) <= 998 for line in msg.raw.split(b"\r\n"))
    assert len(authres.AuthenticationResultsHeader.parse_value(written(msg)[0]).results) == 40


async def test_our_forged_fields_go_and_foreign_ones_stay() -> None:
    head = (
        "Authentication-Results: MX.Example.COM; spf=pass smtp.mailfrom=ceo@example.org\r\n"
        "Received: from somewhere\r\n"
        "Authentication-Results: relay.example.net;\r\n dkim=pass header.d=example.net\r\n"
        "Authentication-Results: (sneaky) mx.example.com ; dmarc=pass header.from=example.org\r\n"
        'Authentication-Results: "mx.example.com"; dkim=pass header.d=example.org\r\n'
        "Authentication-Results: mx.example.com.evil.test; none\r\n"
        "Authentication-Results: other.example.net; arc=pass\r\n"
    )
    msg = message(head)
    p = plugin()
    await p.data(transaction(SPF_PASS), msg)
    assert written(msg) == [
        "mx.example.com; spf=pass smtp.mailfrom=a@example.org",
        "relay.example.net; dkim=pass header.d=example.net",
        "mx.example.com.evil.test; none",
        "other.example.net; arc=pass",
    ]
    # foreign fields stay where they were, byte for byte (folding included)
    assert [n for n, _ in msg.headers] == [
        "Authentication-Results", "Received", "Authentication-Results", "Authentication-Results",
        "Authentication-Results", "From", "Subject",
    ]
    assert b"Received: from somewhere\r\nAuthentication-Results: relay.example.net;\r\n dkim=pass" in msg.raw


async def test_keeping_forged_fields_when_told_and_untouched_messages_stay_byte_identical() -> None:
    head = "Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=x@example.org\r\n"
    msg = message(head)
    await plugin(remove_forged=False).data(transaction(), msg)
    assert len(written(msg)) == 2
    original = message("Authentication-Results: elsewhere.test;\r\n  dkim=pass header.d=x.test\r\n")
    before = original.raw
    await plugin().data(transaction(), original)
    assert original.raw == b"Authentication-Results: mx.example.com; none\r\n" + before


def test_authserv_id_of() -> None:
    assert authserv_id_of("mx.example.com; none") == "mx.example.com"
    assert authserv_id_of(" (a (nested) comment)\tmx.example.com 1; none") == "mx.example.com"
    assert authserv_id_of('"mx.example.com"; none') == "mx.example.com"
    assert authserv_id_of("mx.example.com;spf=pass") == "mx.example.com"
    assert authserv_id_of("; none") is None
    assert authserv_id_of("") is None


def test_settings() -> None:
    assert resolve("auth_results") is AuthResults
    with pytest.raises(ValueError, match="authserv_id"):
        AuthResults.Settings.model_validate({})
    for bad in ("mx example.com", "mx.example.com;", ""):
        with pytest.raises(ValueError):
            AuthResults.Settings(authserv_id=bad)
    for name, info in AuthResults.Settings.model_fields.items():
        assert info.description, name


async def test_end_to_end_pass_is_delivered_with_one_header_of_ours(
    zones: ZoneServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    dns = {"nameservers": ["127.0.0.1"], "port": zones.port, "timeout": 1}
    proxy = await proxy_factory(RecordSPF("pass"), DMARC(), plugin(), upstream=sink.port, dns=dns)
    body = (
        b"Authentication-Results: mx.example.com; dmarc=pass header.from=example.org\r\n"
        b"Authentication-Results: upstream.example.net; spf=pass smtp.mailfrom=example.org\r\n"
        b"From: Alice <alice@example.org>\r\nTo: bob@dest.test\r\nSubject: hello\r\n\r\nhi\r\n"
    )
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, _ = await client.send_message("alice@example.org", ["bob@dest.test"], body)
    assert code == 250
    await client.cmd("QUIT")
    await client.close()
    (received,) = sink.messages
    delivered = Message(received.content)
    assert delivered.get_all("Authentication-Results") == [
        "mx.example.com; spf=pass smtp.mailfrom=alice@example.org;"
        ' dmarc=pass reason="p=reject dis=none" header.from=example.org',
        "upstream.example.net; spf=pass smtp.mailfrom=example.org",
    ]
    assert received.content.endswith(b"From: Alice <alice@example.org>\r\nTo: bob@dest.test\r\nSubject: hello\r\n\r\nhi\r\n")


def _written_by_authres(authserv_id: str, recorded: list[AuthCheck]) -> str:
    """The field value as the plugin built it with authres' objects before it wrote it itself."""
    from authres.core import AuthenticationResult, AuthenticationResultProperty
    from smtpproxy_plugins import auth_results as module

    clauses = []
    for check in sorted(recorded, key=lambda c: module._ORDER.get(c.method, len(module._ORDER))):
        if not module._is_keyword(check.method) or not module._is_keyword(check.result):
            continue
        properties = []
        for key, text in check.properties.items():
            parts = module._property_key(key)
            if parts is None or not text:
                continue
            prop = AuthenticationResultProperty(*parts)
            prop.value = module._Value(text[:8] if key == "header.b" else text)
            properties.append(prop)
        clause = AuthenticationResult(check.method, result=check.result, properties=properties)
        if check.reason:
            clause.reason = module._Reason(check.reason)
        clauses.append(clause)
    return str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=clauses).header_value())


_WORDS = st.one_of(st.sampled_from(["spf", "dkim", "dmarc", "arc", "iprev", "Pass", "FAIL", "none", "x-y",
                                    "bad method", "", "-x"]), st.text(max_size=6))
_PROPERTY_KEYS = st.one_of(st.sampled_from(["smtp.mailfrom", "header.b", "header.D", "Policy.iprev", "x",
                                            "a.b.c", ".x", "smtp."]), st.text(max_size=8))
_CHECKS = st.builds(
    AuthCheck, _WORDS, _WORDS, st.one_of(st.just(""), st.text(max_size=20)),
    st.dictionaries(_PROPERTY_KEYS, st.one_of(st.sampled_from(["a@example.org", '"q"@x.test', "AbCdEf1234",
                                                               ""]), st.text(max_size=12)), max_size=4))


@given(st.sampled_from(["mx.example.com", "MX.Example.COM", ""]), st.lists(_CHECKS, max_size=5))
@settings(max_examples=300, deadline=None)
def test_header_value_is_what_authres_writes(authserv_id: str, recorded: list[AuthCheck]) -> None:
    assert header_value(authserv_id, recorded) == _written_by_authres(authserv_id, recorded)
