"""The real authentication chain, spf -> dkim_verify -> dmarc -> auth_results, through a proxy.

Everything is real: the proxy on loopback, an upstream sink, an authoritative DNS server with
the SPF, DKIM and DMARC records, a DKIM key made for the test and messages signed by dkimpy.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from smtpproxy_plugins.auth_results import AuthResults
from smtpproxy_plugins.dkim import DKIMVerify
from smtpproxy_plugins.dmarc import DMARC
from smtpproxy_plugins.spf import SPF

from smtpproxy import Message
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer
from tests.plugins.test_dmarc import zones as zones  # noqa: PLC0414 - fixture


@pytest.fixture(scope="module")
def key() -> Iterator[tuple[bytes, str]]:
    """A fresh RSA key: (private key PEM for dkim.sign, the DNS TXT value publishing it)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    yield pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture
async def chain(zones: ZoneServer, key: tuple[bytes, str], proxy_factory: ProxyFactory, sink: Sink) -> int:
    """Publish the zones and start the proxy; returns its port."""
    zones.txt("example.org", "v=spf1 ip4:127.0.0.1 -all")  # the proxy sees the test client as 127.0.0.1
    zones.txt("sel._domainkey.example.org", key[1])
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject; rua=mailto:dmarc@example.org")
    zones.txt("bank.test", "v=spf1 ip4:192.0.2.0/24 -all")
    zones.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns = {"nameservers": ["127.0.0.1"], "port": zones.port, "timeout": 1}
    proxy = await proxy_factory(
        SPF(SPF.Settings.model_validate({"actions": {"fail": 1.0}})),  # let DMARC decide
        DKIMVerify(),
        DMARC(),
        AuthResults(AuthResults.Settings(authserv_id="mx.example.com")),
        upstream=sink.port, dns=dns,
    )
    return port_of(proxy)


def signed(head: bytes, body: bytes, pem: bytes, domain: bytes = b"example.org") -> bytes:
    message = head + b"\r\n" + body
    signature = dkim.sign(message, b"sel", domain, pem, include_headers=[b"from", b"to", b"subject"])
    return signature + message


async def send(port: int, sender: str, data: bytes) -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello("client.test")
    reply = await client.send_message(sender, ["bob@dest.test"], data)
    await client.cmd("QUIT")
    await client.close()
    return reply


async def test_a_valid_message_gets_spf_dkim_and_dmarc_pass(
    chain: int, key: tuple[bytes, str], sink: Sink
) -> None:
    head = (
        b"Authentication-Results: mx.example.com; dkim=pass header.d=bank.test\r\n"  # forged
        b"From: Alice <alice@example.org>\r\nTo: bob@dest.test\r\nSubject: report\r\n"
        b"Message-ID: <1@example.org>\r\n"
    )
    data = signed(head, b"The numbers are in.\r\n", key[0])
    code, text = await send(chain, "alice@example.org", data)
    assert code == 250, text
    (received,) = sink.messages
    delivered = Message(received.content)
    (field,) = delivered.get_all("Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse_value(field)
    assert parsed.authserv_id == "mx.example.com"
    results = {r.method: r for r in parsed.results}
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert results["spf"].smtp_mailfrom == "alice@example.org"
    assert (results["dkim"].header_d, results["dkim"].header_s) == ("example.org", "sel")
    assert [(p.type, p.name, p.value) for p in results["dmarc"].properties] == [("header", "from", "example.org")]
    assert re.fullmatch(
        r'mx\.example\.com; spf=pass reason="[^"]+" smtp\.mailfrom=alice@example\.org;'
        r" dkim=pass header\.d=example\.org header\.s=sel header\.i=@example\.org header\.a=rsa-sha256"
        r' header\.b=(?:[^\s";/]{8}|"[^"]{8}"); dmarc=pass reason="p=reject dis=none" header\.from=example\.org',
        field,
    ), field
    assert delivered.headers[0][0] == "Authentication-Results"
    # the signature still verifies downstream: only the new header was added on top
    assert dkim.verify(received.content, dnsfunc=lambda name, timeout=5: key[1].encode())


async def test_a_spoofed_message_is_rejected_by_dmarc(chain: int, key: tuple[bytes, str], sink: Sink) -> None:
    head = (
        b"From: Bank Security <security@bank.test>\r\nTo: bob@dest.test\r\n"
        b"Subject: verify your account\r\nMessage-ID: <2@evil.test>\r\n"
    )
    # signed as bank.test with a key bank.test does not publish: no valid signature
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    data = signed(head, b"Click here.\r\n", other, domain=b"bank.test")
    code, text = await send(chain, "security@bank.test", data)  # SPF: 127.0.0.1 is not allowed
    assert (code, text) == (550, "5.7.1 DMARC policy of bank.test rejects this message (p=reject)")
    assert sink.messages == []
