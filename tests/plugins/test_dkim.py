"""DKIM verifying and signing against a real DNS server on loopback, keys made at test time.

Unit-level tests call the plugins' ``data`` hooks with the process-wide resolver pointed at
the test server; the end-to-end ones speak SMTP to a running proxy that forwards to a sink.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pydantic
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from smtpproxy_plugins.dkim import DKIMSign, DKIMVerify, header_from_dkimpy, load_private_key
from smtpproxy_plugins.dmarc import DMARC
from smtpproxy_plugins.headers import AddHeaders

import smtpproxy.dns
from smtpproxy import Address, Client, Envelope, Message, Session, Transaction
from smtpproxy.authresults import AuthCheck, checks
from smtpproxy.config import ConfigError, PluginSpec
from smtpproxy.dns import Resolver
from smtpproxy.registry import build_chain
from smtpproxy.verdicts import Action
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@dest.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Tue, 1 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Hello Bob,\r\nthe numbers are fine.\r\n"
)
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]
# A throwaway 512-bit key (too short to sign with; cryptography will not even generate one).
RSA_512 = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBAJmBCHfU32QWMGEeRbb4nhUKA+jGUul1nladx4ixGc7HnLigy8LC
m7rZ6GudNGBi3za1TiIG8m7Sgtr2M9kjZukCAwEAAQJBAIDSR6AA9oRRFsK6G/lk
hY3UfNlhbn1b5sh72tL9BVKA52wgLJa6RrcifT3pkBcAobuaMUaBUiDKzOHtA8Zx
hfECIQDG5CQG5UmuqPZoACILv7uib3mEoDObuyLfn9OEmmQ9bQIhAMWUoLMNZHUk
NCVgySDezGyrLP/8gAzpWYKGMR61GA3tAiB893fThVnIjo1UR1EdBLmGlHhL5sTG
gsykqa2jUcbN+QIhAML/+k5dFF2Mmq6dREPdwHIryyDmatbTY1Uv7cC5yIDNAiBD
OVazfX0SWInRrolPj7qoCk4jT16HZA9jkcyMz2XP1A==
-----END RSA PRIVATE KEY-----
"""


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    algorithm: str
    pem: bytes
    """The private key file's content (PKCS#1 PEM for RSA, PKCS#8 PEM for Ed25519)."""
    dkimpy_private: bytes
    """What dkimpy signs with (the PEM for RSA, the base64 seed for Ed25519)."""
    txt: str
    """The DNS TXT record publishing the public key."""

    def sign(self, message: bytes, domain: str, selector: str, **kwargs: Any) -> bytes:
        """``message`` with a DKIM-Signature made by dkimpy itself (not by the plugin) on top."""
        kwargs.setdefault("include_headers", SIGNED)
        kwargs.setdefault("canonicalize", (b"relaxed", b"relaxed"))
        signature = dkim.sign(message, selector.encode(), domain.encode(), self.dkimpy_private,
                              signature_algorithm=self.algorithm.encode(), **kwargs)
        return signature + message  # type: ignore[no-any-return]

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path


def rsa_key(bits: int = 2048, fmt: serialization.PrivateFormat = serialization.PrivateFormat.TraditionalOpenSSL) -> Key:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key("rsa-sha256", pem, pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


def ed25519_key() -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key("ed25519-sha256", pem, base64.b64encode(seed),
               "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode())


@pytest.fixture(scope="module")
def rsa2048() -> Key:
    return rsa_key()


@pytest.fixture(scope="module")
def rsa_pkcs8() -> Key:
    return rsa_key(fmt=serialization.PrivateFormat.PKCS8)


@pytest.fixture(scope="module")
def ed() -> Key:
    return ed25519_key()


# -- DNS and hook arguments ---------------------------------------------------------------


@pytest.fixture
def zone(module_dns_server: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[ZoneServer]:
    """The test DNS server, emptied, with the process-wide resolver pointed at it (restored afterwards)."""
    module_dns_server.clear()
    monkeypatch.setattr(smtpproxy.dns, "_resolver", smtpproxy.dns._resolver)
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=module_dns_server.port, timeout=0.5))
    yield module_dns_server


def dns_section(server: ZoneServer, timeout: float = 1) -> dict[str, Any]:
    return {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": timeout}


def hook_args(sender: str = "alice@example.test", ip: str = "192.0.2.7",
              auth_user: str | None = None) -> tuple[Session, Transaction]:
    local, _, domain = sender.rpartition("@")
    session = Session(Client(ip, 40001))
    session.auth_user = auth_user
    return session, session.begin_transaction(Envelope(Address(sender, local, domain)))


async def verify(raw: bytes, plugin: DKIMVerify | None = None) -> tuple[list[AuthCheck], Any]:
    session, transaction = hook_args()
    verdict = await (plugin or DKIMVerify()).data(session, transaction, Message(raw))
    return checks(transaction, "dkim"), verdict


def b_prefix(raw: bytes, index: int = 0) -> str:
    values = Message(raw).get_all("DKIM-Signature")
    tags = dkim.util.parse_tag_value(values[index].encode())
    return re.sub(rb"\s+", b"", tags[b"b"])[:8].decode()


# -- verifying ----------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["rsa2048", "rsa_pkcs8", "ed"])
async def test_valid_signature_passes(zone: ZoneServer, key_name: str, request: pytest.FixtureRequest) -> None:
    key: Key = request.getfixturevalue(key_name)
    zone.txt("sel1._domainkey.example.test", key.txt)
    signed = key.sign(MESSAGE, "example.test", "sel1")
    found, verdict = await verify(signed)
    assert found == [AuthCheck("dkim", "pass", "", {
        "header.d": "example.test", "header.s": "sel1", "header.i": "@example.test",
        "header.a": key.algorithm, "header.b": b_prefix(signed),
    })]
    assert verdict.action is Action.CONTINUE and verdict.score == 0 and verdict.tags == ("dkim:pass",)


async def test_body_modified_in_transit_fails_with_the_reason(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("sel1._domainkey.example.test", rsa2048.txt)
    signed = rsa2048.sign(MESSAGE, "example.test", "sel1").replace(b"are fine", b"are awful")
    found, verdict = await verify(signed)
    assert [(c.result, c.reason) for c in found] == [("fail", "body hash did not verify")]
    assert verdict.action is Action.CONTINUE and verdict.score == 1.0  # the default for fail
    assert verdict.tags == ("dkim:fail",)


async def test_signed_header_modified_fails(zone: ZoneServer, ed: Key) -> None:
    zone.txt("sel1._domainkey.example.test", ed.txt)
    signed = ed.sign(MESSAGE, "example.test", "sel1").replace(b"quarterly numbers", b"urgent: wire money")
    found, _ = await verify(signed)
    assert [(c.result, c.reason) for c in found] == [("fail", "signature did not verify")]


async def test_unsigned_header_and_refolding_do_not_matter_with_relaxed(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("sel1._domainkey.example.test", rsa2048.txt)
    signed = rsa2048.sign(MESSAGE, "example.test", "sel1")
    changed = Message(signed)
    changed.add_header("Received", "from somewhere by relay.test")
    changed.replace_header("Subject", "quarterly   numbers")  # relaxed: runs of WSP are one SP
    found, _ = await verify(changed.raw)
    assert [c.result for c in found] == ["pass"]


async def test_missing_key_is_permerror(zone: ZoneServer, rsa2048: Key) -> None:
    signed = rsa2048.sign(MESSAGE, "example.test", "nokey")  # nothing published: NXDOMAIN
    found, verdict = await verify(signed)
    assert [(c.result, c.reason) for c in found] == [
        ("permerror", "no key published at nokey._domainkey.example.test")
    ]
    assert verdict.score == 0


async def test_revoked_key_is_permerror(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("gone._domainkey.example.test", "v=DKIM1; k=rsa; p=")
    found, _ = await verify(rsa2048.sign(MESSAGE, "example.test", "gone"))
    assert [(c.result, c.reason) for c in found] == [
        ("permerror", "key revoked (empty p= at gone._domainkey.example.test)")
    ]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("v=DKIM1; k=ed25519; p=" + "A" * 43 + "=", "key type k=ed25519 does not fit a=rsa-sha256"),
        ("v=DKIM1; h=sha1; p=MIIB", "key at bad._domainkey.example.test does not allow rsa-sha256"),
        ("v=DKIM1; s=tlsrpt; p=MIIB", "key at bad._domainkey.example.test is not for email (s=tlsrpt)"),
        ("v=DKIM1; k=rsa; p=bm90IGEga2V5", "unusable key at bad._domainkey.example.test"),
        ("v=DKIM1; p", "key record at bad._domainkey.example.test has a syntax error"),
    ],
)
async def test_unusable_key_records_are_permerror(zone: ZoneServer, rsa2048: Key, record: str, reason: str) -> None:
    zone.txt("bad._domainkey.example.test", record)
    found, _ = await verify(rsa2048.sign(MESSAGE, "example.test", "bad"))
    assert [c.result for c in found] == ["permerror"]
    assert found[0].reason.startswith(reason)


async def test_dns_timeout_and_servfail_are_temperror(zone: ZoneServer, rsa2048: Key) -> None:
    zone.timeout_names.add("slow._domainkey.example.test")
    zone.servfail_names.add("broken._domainkey.example.test")
    signed = rsa2048.sign(rsa2048.sign(MESSAGE, "example.test", "slow"), "example.test", "broken")
    found, verdict = await verify(signed)
    assert [c.result for c in found] == ["temperror", "temperror"]
    assert [c.properties["header.s"] for c in found] == ["broken", "slow"]
    assert "key lookup failed" in found[0].reason
    assert verdict.action is Action.CONTINUE and verdict.score == 0  # temperror: DMARC decides


async def test_every_signature_is_verified_and_recorded_in_order(zone: ZoneServer, rsa2048: Key, ed: Key) -> None:
    zone.txt("good._domainkey.example.test", rsa2048.txt)
    zone.txt("wrong._domainkey.list.test", rsa2048.txt)  # list.test signed with the ed key
    signed = ed.sign(MESSAGE, "list.test", "wrong")
    signed = rsa2048.sign(signed, "example.test", "good")
    signed = ed.sign(signed, "third.test", "absent")
    found, verdict = await verify(signed)
    assert [(c.result, c.properties["header.d"]) for c in found] == [
        ("permerror", "third.test"), ("pass", "example.test"), ("permerror", "list.test"),
    ]
    assert found[2].reason == "key type k=rsa does not fit a=ed25519-sha256"
    assert verdict.tags == ("dkim:pass",)  # one passing signature is enough


async def test_two_signatures_pass_and_fail_each_recorded(zone: ZoneServer, rsa2048: Key, ed: Key) -> None:
    zone.txt("a._domainkey.example.test", rsa2048.txt)
    zone.txt("b._domainkey.example.test", ed.txt)
    body_only = [b"from"]
    # The ed25519 signature covers Subject, the RSA one does not; then Subject changes.
    signed = rsa2048.sign(ed.sign(MESSAGE, "example.test", "b"), "example.test", "a", include_headers=body_only)
    signed = signed.replace(b"quarterly numbers", b"other")
    found, _ = await verify(signed)
    assert [(c.result, c.properties["header.s"], c.reason) for c in found] == [
        ("pass", "a", ""), ("fail", "b", "signature did not verify"),
    ]


async def test_no_signature_is_recorded_as_none(zone: ZoneServer) -> None:
    found, verdict = await verify(MESSAGE)
    assert found == [AuthCheck("dkim", "none", "message not signed")]
    assert verdict.action is Action.CONTINUE and verdict.tags == ("dkim:none",)


async def test_signatures_past_max_signatures_are_ignored(zone: ZoneServer, ed: Key) -> None:
    zone.txt("s._domainkey.example.test", ed.txt)
    signed = MESSAGE
    for _ in range(4):
        signed = ed.sign(signed, "example.test", "s")
    plugin = DKIMVerify(DKIMVerify.Settings(max_signatures=2))
    found, _ = await verify(signed, plugin)
    assert [c.result for c in found] == ["pass", "pass"]
    assert zone.queries.count(("s._domainkey.example.test", "TXT")) == 1  # looked up once


async def test_short_rsa_key_is_policy(zone: ZoneServer) -> None:
    short = rsa_key(1024)
    zone.txt("short._domainkey.example.test", short.txt)
    signed = short.sign(MESSAGE, "example.test", "short")
    found, _ = await verify(signed)
    assert [c.result for c in found] == ["pass"]  # 1024 bits is the default minimum
    strict = DKIMVerify(DKIMVerify.Settings(min_key_bits=2048, actions={"policy": "reject"}))
    found, verdict = await verify(signed, strict)
    assert [(c.result, c.reason) for c in found] == [
        ("policy", "key too short (1024 bits, at least 2048 required)")
    ]
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.text) == (
        550, "5.7.21", "No acceptable DKIM signature found"
    )


async def test_syntax_errors_are_permerror(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("sel1._domainkey.example.test", rsa2048.txt)
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; this is not a tag list\r\n" + MESSAGE
    no_bh = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel1; h=from; b=AAAA\r\n" + MESSAGE
    found, _ = await verify(broken)
    assert [c.result for c in found] == ["permerror"]
    found, _ = await verify(no_bh)
    assert [c.result for c in found] == ["permerror"]
    assert "bh" in found[0].reason


async def test_actions_merge_with_defaults_and_reject_replies(zone: ZoneServer, rsa2048: Key) -> None:
    settings = DKIMVerify.Settings(actions={"permerror": "reject", "none": "tempfail"})
    assert settings.actions["fail"] == 1.0 and settings.actions["temperror"] == "continue"
    plugin = DKIMVerify(settings)
    _, verdict = await verify(rsa2048.sign(MESSAGE, "example.test", "nokey"), plugin)
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == "550 5.7.20 No passing DKIM signature found"
    _, verdict = await verify(MESSAGE, plugin)
    assert verdict.action is Action.TEMPFAIL
    assert str(verdict.reply) == "451 4.7.1 DKIM check failed, try again later"
    zone.timeout_names.add("slow._domainkey.example.test")
    _, verdict = await verify(rsa2048.sign(MESSAGE, "example.test", "slow"),
                              DKIMVerify(DKIMVerify.Settings(actions={"temperror": "tempfail"})))
    assert str(verdict.reply) == "451 4.7.5 DKIM key lookup failed temporarily, try again later"


def test_verify_settings_are_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="not a valid domain"):
        DKIMVerify.Settings(require_valid_for=["bad domain"])
    with pytest.raises(pydantic.ValidationError, match="finite"):
        DKIMVerify.Settings(actions={"fail": float("inf")})
    with pytest.raises(pydantic.ValidationError):
        DKIMVerify.Settings(actions={"softfail": 1.0})  # not a DKIM result
    with pytest.raises(pydantic.ValidationError):
        DKIMVerify.Settings(min_key_bits=512)
    assert DKIMVerify.Settings(require_valid_for=["Bank.TEST."]).require_valid_for == ["bank.test"]


# -- require_valid_for over SMTP ----------------------------------------------------------


def bank_message(subject: str) -> bytes:
    return MESSAGE.replace(b"alice@example.test", b"alice@bank.test").replace(b"quarterly numbers", subject.encode())


async def test_require_valid_for_rejects_with_the_exact_replies(
    proxy_factory: ProxyFactory, sink: Sink, zone: ZoneServer, rsa2048: Key, ed: Key,
) -> None:
    zone.txt("sel._domainkey.bank.test", rsa2048.txt)
    zone.txt("sel._domainkey.other.test", ed.txt)
    zone.timeout_names.add("slow._domainkey.bank.test")
    plugin = DKIMVerify(DKIMVerify.Settings(require_valid_for=["bank.test"]))
    proxy = await proxy_factory(plugin, upstream=sink.port, dns=dns_section(zone, timeout=0.5))
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    send = talk.send_message

    unsigned = bank_message("unsigned")
    assert await send("alice@bank.test", ["bob@dest.test"], unsigned) == (
        550, "5.7.20 No passing DKIM signature found")
    other_domain = ed.sign(bank_message("signed by another domain"), "other.test", "sel")
    assert await send("alice@bank.test", ["bob@dest.test"], other_domain) == (
        550, "5.7.22 No valid author-matched DKIM signature found")
    tampered = rsa2048.sign(bank_message("tampered"), "bank.test", "sel").replace(b"fine", b"FINE")
    assert await send("alice@bank.test", ["bob@dest.test"], tampered) == (
        550, "5.7.20 No passing DKIM signature found")
    slow = rsa2048.sign(bank_message("key lookup times out"), "bank.test", "slow")
    assert await send("alice@bank.test", ["bob@dest.test"], slow) == (
        451, "4.7.5 DKIM key lookup failed temporarily, try again later")
    good = rsa2048.sign(bank_message("good"), "bank.test", "sel")
    code, _ = await send("alice@bank.test", ["bob@dest.test"], good)
    assert code == 250
    not_required = MESSAGE  # example.test is not in the list: unsigned is fine
    code, _ = await send("alice@example.test", ["bob@dest.test"], not_required)
    assert code == 250
    await talk.close()
    assert [m.content for m in sink.messages] == [good, not_required]


# -- signing ------------------------------------------------------------------------------


def sign_settings(tmp_path: Path, *keys: tuple[str, str, Key], **kwargs: Any) -> DKIMSign.Settings:
    specs = [
        {"domain": domain, "selector": selector, "algorithm": key.algorithm,
         "key_file": str(key.write(tmp_path / f"{selector}.{domain}.pem"))}
        for domain, selector, key in keys
    ]
    return DKIMSign.Settings.model_validate({"keys": specs, **kwargs})


def signature_tags(raw: bytes) -> list[dict[bytes, bytes]]:
    return [dkim.util.parse_tag_value(v.encode()) for v in Message(raw).get_all("DKIM-Signature")]


async def test_relay_client_mail_arrives_signed_with_rsa_and_ed25519(  # noqa: PLR0917
    proxy_factory: ProxyFactory, sink: Sink, zone: ZoneServer, tmp_path: Path,
    rsa2048: Key, ed: Key,
) -> None:
    zone.txt("rsa1._domainkey.example.test", rsa2048.txt)
    zone.txt("ed1._domainkey.example.test", ed.txt)
    signer = DKIMSign(sign_settings(tmp_path, ("example.test", "ed1", ed), ("example.test", "rsa1", rsa2048),
                                    relay_networks=["127.0.0.0/8"]))
    proxy = await proxy_factory(signer, upstream=sink.port, dns=dns_section(zone))
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    code, _ = await talk.send_message("alice@example.test", ["bob@dest.test"], MESSAGE)
    assert code == 250
    await talk.close()
    delivered = sink.messages[0].content
    assert delivered.endswith(MESSAGE)  # the original, untouched, below the new fields
    tags = signature_tags(delivered)
    assert [(t[b"a"], t[b"s"], t[b"d"], t[b"c"]) for t in tags] == [
        (b"rsa-sha256", b"rsa1", b"example.test", b"relaxed/relaxed"),  # RSA on top
        (b"ed25519-sha256", b"ed1", b"example.test", b"relaxed/relaxed"),
    ]
    signed_fields = [h.strip() for h in tags[0][b"h"].split(b":")]
    assert signed_fields == [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                             b"content-type", b"from"]  # present fields, From oversigned
    for line in delivered.split(b"\r\n"):
        assert len(line) <= 998

    # Our verifier agrees, through the shared resolver ...
    found, _ = await verify(delivered)
    assert [(c.result, c.properties["header.a"]) for c in found] == [
        ("pass", "rsa-sha256"), ("pass", "ed25519-sha256")]
    # ... and so does dkimpy on its own, against the published records.
    published = {b"rsa1._domainkey.example.test.": rsa2048.txt.encode(),
                 b"ed1._domainkey.example.test.": ed.txt.encode()}
    checker = dkim.DKIM(delivered)
    assert checker.verify(idx=0, dnsfunc=lambda name, timeout=5: published.get(name))
    assert checker.verify(idx=1, dnsfunc=lambda name, timeout=5: published.get(name))


async def test_fields_added_after_signing_are_not_covered(
    proxy_factory: ProxyFactory, sink: Sink, zone: ZoneServer, tmp_path: Path, rsa2048: Key,
) -> None:
    zone.txt("rsa1._domainkey.example.test", rsa2048.txt)
    settings = sign_settings(tmp_path, ("example.test", "rsa1", rsa2048), relay_networks=["127.0.0.0/8"])
    later = AddHeaders(AddHeaders.Settings(add={"X-Added-Later": "yes"}))
    proxy = await proxy_factory(DKIMSign(settings), later, upstream=sink.port, dns=dns_section(zone))
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    assert (await talk.send_message("alice@example.test", ["bob@dest.test"], MESSAGE))[0] == 250
    await talk.close()
    delivered = sink.messages[0].content
    assert delivered.startswith(b"X-Added-Later: yes\r\nDKIM-Signature: ")
    assert b"x-added-later" not in signature_tags(delivered)[0][b"h"].lower()

    found, _ = await verify(delivered)
    assert [c.result for c in found] == ["pass"]  # still valid: the field is simply not covered
    # A later plugin that edits a signed field breaks the signature: dkim_sign goes last.
    edited = Message(delivered)
    edited.replace_header("Subject", "changed after signing")
    found, _ = await verify(edited.raw)
    assert [c.result for c in found] == ["fail"]


async def test_only_authenticated_or_relay_clients_are_signed(tmp_path: Path, rsa2048: Key) -> None:
    signer = DKIMSign(sign_settings(tmp_path, ("example.test", "rsa1", rsa2048), relay_networks=["10.0.0.0/8"]))
    cases = [
        (hook_args(ip="192.0.2.7"), False),  # outside, not authenticated
        (hook_args(ip="10.1.2.3"), True),  # relay network
        (hook_args(ip="::ffff:10.1.2.3"), True),  # the same, as a dual-stack listener reports it
        (hook_args(ip="192.0.2.7", auth_user="alice"), True),  # authenticated
    ]
    for (session, transaction), signed in cases:
        message = Message(MESSAGE)
        verdict = await signer.data(session, transaction, message)
        assert ("DKIM-Signature" in message) is signed, session.client.ip
        assert (verdict is not None and verdict.tags == ("dkim:signed",)) is signed


async def test_only_configured_domains_are_signed_by_from_or_sender(tmp_path: Path, rsa2048: Key) -> None:
    by_from = DKIMSign(sign_settings(tmp_path, ("example.test", "rsa1", rsa2048), relay_networks=["0.0.0.0/0"]))
    by_sender = DKIMSign(sign_settings(tmp_path, ("example.test", "rsa1", rsa2048),
                                       relay_networks=["0.0.0.0/0"], match="sender"))
    other_from = MESSAGE.replace(b"alice@example.test", b"alice@elsewhere.test")
    upper = MESSAGE.replace(b"alice@example.test", b"Alice@EXAMPLE.Test")
    for plugin, raw, sender, signed in [
        (by_from, MESSAGE, "x@elsewhere.test", True),
        (by_from, upper, "x@elsewhere.test", True),
        (by_from, other_from, "alice@example.test", False),
        (by_sender, other_from, "alice@example.test", True),
        (by_sender, MESSAGE, "x@elsewhere.test", False),
        (by_sender, MESSAGE, "", False),  # null sender
    ]:
        message = Message(raw)
        session, transaction = hook_args(sender) if sender else hook_args()
        if not sender:
            transaction.envelope.set_sender(Address("", "", ""))
        await plugin.data(session, transaction, message)
        assert ("DKIM-Signature" in message) is signed, (raw[:40], sender)
        if signed:
            assert signature_tags(message.raw)[0][b"d"] == b"example.test"


def test_header_from_dkimpy_unfolds_and_refuses_bare_line_breaks() -> None:
    assert header_from_dkimpy(b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\th=from : to;\r\n b=abc\r\n def\r\n") == (
        "DKIM-Signature", "v=1; a=rsa-sha256;\th=from : to; b=abc def")
    with pytest.raises(ValueError, match="bare CR or LF"):
        header_from_dkimpy(b"DKIM-Signature: v=1;\n b=abc\r\n")


def test_key_files_are_checked_at_construction(tmp_path: Path, rsa2048: Key, ed: Key) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=f"DKIM key file {missing}: cannot read it"):
        DKIMSign(DKIMSign.Settings.model_validate(
            {"keys": [{"domain": "example.test", "selector": "rsa1", "key_file": str(missing)}]}))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ValueError, match=f"DKIM key file {garbage}: not an unencrypted RSA private key"):
        load_private_key(garbage, "rsa-sha256")
    ed_file = ed.write(tmp_path / "ed.pem")
    with pytest.raises(ValueError, match="not an unencrypted RSA private key"):
        load_private_key(ed_file, "rsa-sha256")
    rsa_file = rsa2048.write(tmp_path / "rsa.pem")
    with pytest.raises(ValueError, match=f"DKIM key file {rsa_file}: not an Ed25519 private key"):
        load_private_key(rsa_file, "ed25519-sha256")
    short = tmp_path / "short.pem"
    short.write_bytes(RSA_512)
    with pytest.raises(ValueError, match="512 bits"):
        load_private_key(short, "rsa-sha256")
    crlf = tmp_path / "crlf.pem"
    crlf.write_bytes(rsa2048.pem.replace(b"\n", b"\r\n"))
    assert load_private_key(crlf, "rsa-sha256") == rsa2048.pem
    assert load_private_key(ed_file, "ed25519-sha256") == ed.dkimpy_private
    seed_file = tmp_path / "ed.key"  # dknewkey's format: the bare base64 seed
    seed_file.write_bytes(ed.dkimpy_private + b"\n")
    assert load_private_key(seed_file, "ed25519-sha256") == ed.dkimpy_private


def test_the_loader_reports_a_bad_key_file_at_its_key(tmp_path: Path) -> None:
    spec = PluginSpec.model_validate({"name": "dkim_sign", "settings": {
        "keys": [{"domain": "example.test", "selector": "s", "key_file": str(tmp_path / "nope.pem")}],
    }})
    with pytest.raises(ConfigError) as caught:
        build_chain([spec], None)
    assert "plugins[0].settings.keys[0].key_file: DKIM key file" in str(caught.value)
    assert str(tmp_path / "nope.pem") in str(caught.value)


def test_sign_settings_are_checked(tmp_path: Path) -> None:
    key = {"domain": "example.test", "selector": "s", "key_file": "k.pem"}
    with pytest.raises(pydantic.ValidationError, match="must include from"):
        DKIMSign.Settings.model_validate({"keys": [key], "headers": ["to", "subject"]})
    with pytest.raises(pydantic.ValidationError, match="received must not be signed"):
        DKIMSign.Settings.model_validate({"keys": [key], "headers": ["from", "Received"]})
    with pytest.raises(pydantic.ValidationError, match="not a valid domain"):
        DKIMSign.Settings.model_validate({"keys": [{**key, "domain": "exa mple.test"}]})
    with pytest.raises(pydantic.ValidationError):
        DKIMSign.Settings.model_validate({"keys": [{**key, "algorithm": "rsa-sha1"}]})
    with pytest.raises(pydantic.ValidationError):
        DKIMSign.Settings.model_validate({"keys": []})
    with pytest.raises(pydantic.ValidationError):
        DKIMSign.Settings.model_validate({"keys": [key], "relay_networks": ["10.0.0.1/8"]})
    # Relative key files are relative to the config file when the loader says where that is.
    settings = DKIMSign.Settings.model_validate({"keys": [key]}, context={"base_dir": tmp_path})
    assert settings.keys[0].key_file == tmp_path / "k.pem"


# -- signatures that must not count (issue 14) --------------------------------------------------


def craft_signature(key: Key, message: bytes, domain: str, selector: str, headers: list[bytes], *,
                    length: int | None = None, body_for_hash: bytes | None = None) -> bytes:
    """``message`` with an RSA DKIM-Signature built field by field through dkimpy's own
    ``gen_header``: dkimpy's ``sign`` refuses an ``h=`` without from, and an attacker's does not.

    ``length`` adds ``l=``; the body hash covers the first ``length`` octets of the canonical
    body of ``body_for_hash`` (default: of ``message``)."""
    signer = dkim.DKIM(message, signature_algorithm=b"rsa-sha256")
    canon = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    source = dkim.DKIM(body_for_hash).body if body_for_hash is not None else signer.body
    body = canon.canonicalize_body(source)
    if length is not None:
        body = body[:length]
    signer.hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"), (b"d", domain.encode()),
              (b"i", b"@" + domain.encode())]
    if length is not None:
        fields.append((b"l", str(length).encode()))
    fields += [(b"q", b"dns/txt"), (b"s", selector.encode()), (b"t", b"1700000000"),
               (b"h", b" : ".join(headers)),
               (b"bh", base64.b64encode(hashlib.sha256(body).digest())), (b"b", b"0" * 60)]
    private = dkim.crypto.parse_pem_private_key(key.pem)
    value = signer.gen_header(fields, tuple(headers), canon, b"DKIM-Signature", private)
    return b"DKIM-Signature: " + value + message


CEO_MESSAGE = MESSAGE.replace(b"Alice <alice@example.test>", b"Mallory <mallory@example.org>")


async def test_signature_without_from_in_h_is_ignored_and_never_aligns_dmarc(
    zone: ZoneServer, rsa2048: Key
) -> None:
    """RFC 6376 6.1.1: h= without From must be ignored. Before the fix: dkim=pass, dmarc=pass."""
    zone.txt("sel1._domainkey.example.org", rsa2048.txt)
    zone.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    signed = craft_signature(rsa2048, CEO_MESSAGE, "example.org", "sel1",
                             [b"subject", b"to", b"date", b"message-id"])
    forged = signed.replace(b"Mallory <mallory@example.org>", b"CEO <ceo@example.org>")
    session, transaction = hook_args("bounce@attacker.test")
    verdict = await DKIMVerify().data(session, transaction, Message(forged))
    (found,) = checks(transaction, "dkim")
    assert found.result == "policy"
    assert "does not cover the From field" in found.reason
    assert verdict is not None and verdict.tags == ("dkim:policy",)
    dmarc_verdict = await DMARC().data(session, transaction, Message(forged))
    assert [c.result for c in checks(transaction, "dmarc")] == ["fail"]
    assert dmarc_verdict is not None and dmarc_verdict.action is Action.REJECT


async def test_the_same_signature_with_from_in_h_still_passes(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("sel1._domainkey.example.org", rsa2048.txt)
    signed = craft_signature(rsa2048, CEO_MESSAGE, "example.org", "sel1",
                             [b"from", b"subject", b"to", b"date", b"message-id"])
    found, _ = await verify(signed)
    assert [(c.result, c.reason) for c in found] == [("pass", "")]
    forged = signed.replace(b"Mallory <mallory@example.org>", b"CEO <ceo@example.org>")
    found, _ = await verify(forged)
    assert [c.result for c in found] == ["fail"]


async def test_required_domain_with_a_signature_lacking_from_is_not_acceptable(
    proxy_factory: ProxyFactory, sink: Sink, zone: ZoneServer, rsa2048: Key,
) -> None:
    """End to end: the signature that skips From is 5.7.21 for a require_valid_for domain."""
    zone.txt("sel._domainkey.bank.test", rsa2048.txt)
    plugin = DKIMVerify(DKIMVerify.Settings(require_valid_for=["bank.test"]))
    proxy = await proxy_factory(plugin, upstream=sink.port, dns=dns_section(zone, timeout=0.5))
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    signed = craft_signature(rsa2048, bank_message("no from"), "bank.test", "sel", [b"subject", b"to"])
    assert await talk.send_message("alice@bank.test", ["bob@dest.test"], signed) == (
        550, "5.7.21 No acceptable DKIM signature found")
    await talk.close()
    assert sink.messages == []


async def dkim_then_dmarc(raw: bytes, dkim_settings: DKIMVerify.Settings | None = None,
                          dmarc_settings: DMARC.Settings | None = None) -> tuple[list[AuthCheck], str, Any]:
    session, transaction = hook_args("bounce@attacker.test")
    await DKIMVerify(dkim_settings).data(session, transaction, Message(raw))
    verdict = await DMARC(dmarc_settings).data(session, transaction, Message(raw))
    (dmarc_check,) = checks(transaction, "dmarc")
    return checks(transaction, "dkim"), dmarc_check.result, verdict


APPENDED = b"\r\nP.S. Wire the money to account 666 today.\r\n"


async def test_l_tag_with_appended_text_is_policy_and_never_aligns_dmarc(zone: ZoneServer, rsa2048: Key) -> None:
    """Before the fix: dkim=pass, dmarc=pass for text appended after the signed l= octets."""
    zone.txt("sel1._domainkey.example.org", rsa2048.txt)
    zone.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    signed = rsa2048.sign(CEO_MESSAGE, "example.org", "sel1", length=True)
    assert signature_tags(signed)[0][b"l"] == str(len(CEO_MESSAGE.split(b"\r\n\r\n", 1)[1])).encode()
    found, _ = await verify(signed)
    assert [(c.result, c.reason) for c in found] == [("pass", "")]  # l= covering the whole body is fine
    found, dmarc_result, verdict = await dkim_then_dmarc(signed + APPENDED)
    assert [c.result for c in found] == ["policy"]
    assert found[0].reason.startswith("body partly unsigned: l=")
    assert dmarc_result == "fail" and verdict.action is Action.REJECT


async def test_l_zero_with_an_attackers_body_is_policy(zone: ZoneServer, rsa2048: Key) -> None:
    zone.txt("sel1._domainkey.example.org", rsa2048.txt)
    zone.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    signed = craft_signature(rsa2048, CEO_MESSAGE, "example.org", "sel1", SIGNED, length=0)
    head, _, _ = signed.partition(b"\r\n\r\n")
    forged = head + b"\r\n\r\nAttacker's body entirely.\r\n"
    found, dmarc_result, _ = await dkim_then_dmarc(forged)
    assert [(c.result, c.reason) for c in found] == [
        ("policy", "body partly unsigned: l=0 signs 0 of 27 body octets "
                   "(RFC 6376 8.2: content may have been appended)")]
    assert dmarc_result == "fail"


async def test_partial_body_leniency_passes_but_dmarc_aligns_only_when_told(
    zone: ZoneServer, rsa2048: Key
) -> None:
    zone.txt("sel1._domainkey.example.org", rsa2048.txt)
    zone.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    appended = rsa2048.sign(CEO_MESSAGE, "example.org", "sel1", length=True) + APPENDED
    lenient = DKIMVerify.Settings(partial_body="pass")
    found, dmarc_result, _ = await dkim_then_dmarc(appended, lenient)
    assert [c.result for c in found] == ["pass"] and "partly unsigned" in found[0].reason
    assert dmarc_result == "fail"
    found, dmarc_result, _ = await dkim_then_dmarc(appended, lenient, DMARC.Settings(align_partial_body=True))
    assert dmarc_result == "pass"
