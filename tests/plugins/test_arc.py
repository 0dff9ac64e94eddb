"""ARC verifying and sealing against a real DNS server on loopback, keys made at test time.

Chains are built with dkimpy's own ``arc_sign`` (an independent implementation of the
sealing side); the plugin's seals are checked by the plugin's verifier and by dkimpy's.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pydantic
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from smtpproxy_plugins.arc import ARC, ARCOutcome
from smtpproxy_plugins.auth_results import AuthResults
from smtpproxy_plugins.headers import AddHeaders

import smtpproxy.dns
from smtpproxy import Address, Client, Envelope, Message, Session, Transaction
from smtpproxy.authresults import AuthCheck, checks
from smtpproxy.dns import Resolver
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer

CLIENT = "192.0.2.7"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: list@lists.test\r\n"
    b"Subject: meeting notes\r\n"
    b"Date: Tue, 1 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <2@example.test>\r\n"
    b"\r\n"
    b"See you on Monday.\r\n"
)


class SealKey:
    def __init__(self) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        self.txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()

    def seal(self, message: bytes, domain: str, selector: str = "arc", results: str = "spf=pass") -> bytes:
        """One hop: its Authentication-Results, then dkimpy's ARC set for it, on top."""
        message = f"Authentication-Results: {domain}; {results}\r\n".encode() + message
        lines = dkim.arc_sign(message, selector.encode(), domain.encode(), self.pem, domain.encode())
        assert lines, "dkimpy did not seal"
        return b"".join(lines) + message

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path


@pytest.fixture(scope="module")
def key() -> SealKey:
    return SealKey()


@pytest.fixture
def zone(module_dns_server: ZoneServer, key: SealKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[ZoneServer]:
    """The test DNS server with the sealing keys of hop1.test, hop2.test and us (mx.test)."""
    module_dns_server.clear()
    for domain in ("hop1.test", "hop2.test", "mx.test"):
        module_dns_server.txt(f"arc._domainkey.{domain}", key.txt)
    monkeypatch.setattr(smtpproxy.dns, "_resolver", smtpproxy.dns._resolver)
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=module_dns_server.port, timeout=0.5))
    yield module_dns_server


def hook_args() -> tuple[Session, Transaction]:
    session = Session(Client(CLIENT, 40001))
    return session, session.begin_transaction(Envelope(Address("alice@example.test", "alice", "example.test")))


async def verify(raw: bytes, plugin: ARC | None = None) -> tuple[list[AuthCheck], Transaction, Any]:
    session, transaction = hook_args()
    verdict = await (plugin or ARC()).data(session, transaction, Message(raw))
    return checks(transaction, "arc"), transaction, verdict


def seal_settings(key: SealKey, tmp_path: Path, **kwargs: Any) -> ARC.Settings:
    seal = {"domain": "mx.test", "selector": "arc", "key_file": str(key.write(tmp_path / "arc.pem")),
            "authserv_id": "mx.test"}
    return ARC.Settings.model_validate({"seal": seal, **kwargs})


def dkimpy_verdict(raw: bytes, zone: ZoneServer, key: SealKey) -> tuple[bytes, str]:
    published = {f"arc._domainkey.{d}.".encode(): key.txt.encode() for d in ("hop1.test", "hop2.test", "mx.test")}
    cv, _, reason = dkim.arc_verify(raw, dnsfunc=lambda name, timeout=5: published.get(name))
    return cv, reason


# -- verifying ----------------------------------------------------------------------------


async def test_a_chain_sealed_by_dkimpy_passes(zone: ZoneServer, key: SealKey) -> None:
    found, transaction, verdict = await verify(key.seal(MESSAGE, "hop1.test"))
    assert found == [AuthCheck("arc", "pass", "1 ARC set(s) sealed by hop1.test",
                               {"header.oldest-pass": "0", "smtp.remote-ip": CLIENT})]
    outcome = transaction.notes["arc"]
    assert isinstance(outcome, ARCOutcome) and outcome.sealers == ("hop1.test",) and outcome.instances == 1
    assert verdict.tags == ("arc:pass",)


async def test_a_two_hop_chain_passes(zone: ZoneServer, key: SealKey) -> None:
    hop1 = key.seal(MESSAGE, "hop1.test")
    hop2 = key.seal(hop1, "hop2.test", results="arc=pass; spf=fail")
    found, transaction, _ = await verify(hop2)
    assert [(c.result, c.properties["header.oldest-pass"]) for c in found] == [("pass", "0")]
    assert transaction.notes["arc"].sealers == ("hop1.test", "hop2.test")


async def test_a_body_tampered_with_after_sealing_fails(zone: ZoneServer, key: SealKey) -> None:
    sealed = key.seal(MESSAGE, "hop1.test").replace(b"Monday", b"Friday")
    found, _, verdict = await verify(sealed)
    assert [(c.result, c.reason) for c in found] == [
        ("fail", "Most recent ARC-Message-Signature did not validate")
    ]
    assert found[0].properties == {"smtp.remote-ip": CLIENT}
    assert verdict.tags == ("arc:fail",)


async def test_a_tampered_seal_fails(zone: ZoneServer, key: SealKey) -> None:
    hop1 = key.seal(MESSAGE, "hop1.test")
    # hop2 claims the chain failed: the chain is over, whatever the signatures say.
    hop2 = key.seal(hop1, "hop2.test", results="arc=fail")
    found, _, _ = await verify(hop2)
    assert [c.result for c in found] == ["fail"]
    assert found[0].reason == "ARC-Seal[2] reported failure, the chain is terminated"


async def test_no_arc_headers_is_none(zone: ZoneServer) -> None:
    found, _, verdict = await verify(MESSAGE)
    assert found == [AuthCheck("arc", "none", "message has no ARC header fields", {"smtp.remote-ip": CLIENT})]
    assert verdict.tags == ("arc:none",)


async def test_broken_and_oversized_chains_fail_without_crashing(zone: ZoneServer) -> None:
    junk = b"ARC-Seal: this is not a tag list\r\nARC-Message-Signature: nor this\r\n" + MESSAGE
    found, _, _ = await verify(junk)
    assert [c.result for c in found] == ["fail"]
    too_many = b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AA==\r\n" + MESSAGE
    found, _, _ = await verify(too_many)
    assert [(c.result, c.reason) for c in found] == [("fail", "more than 50 ARC sets")]


async def test_a_key_lookup_timeout_fails_and_says_so(zone: ZoneServer, key: SealKey) -> None:
    zone.timeout_names.add("slow._domainkey.hop1.test")
    found, transaction, _ = await verify(key.seal(MESSAGE, "hop1.test", selector="slow"))
    assert [c.result for c in found] == ["fail"]
    assert "key lookup failed temporarily" in found[0].reason
    assert transaction.notes["arc"].temporary


# -- sealing ------------------------------------------------------------------------------


async def test_sealing_a_message_without_a_chain(zone: ZoneServer, key: SealKey, tmp_path: Path) -> None:
    plugin = ARC(seal_settings(key, tmp_path))
    message = Message(b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=alice@example.test\r\n" + MESSAGE)
    session, transaction = hook_args()
    verdict = await plugin.data(session, transaction, message)
    assert verdict is not None and verdict.tags == ("arc:none", "arc:sealed")
    names = [name for name, _ in message.headers]
    assert names[:4] == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results",
                         "Authentication-Results"]
    aar = message.get("ARC-Authentication-Results") or ""
    assert aar.startswith("i=1; mx.test;") and "spf=pass" in aar and "arc=none" in aar
    assert "cv=none" in (message.get("ARC-Seal") or "").replace(" ", "")
    found, _, _ = await verify(message.raw)
    assert [(c.result, c.reason) for c in found] == [("pass", "1 ARC set(s) sealed by mx.test")]
    assert dkimpy_verdict(message.raw, zone, key) == (dkim.CV_Pass, "success")


async def test_sealing_extends_a_passing_chain_with_cv_pass(zone: ZoneServer, key: SealKey, tmp_path: Path) -> None:
    plugin = ARC(seal_settings(key, tmp_path))  # verifies and seals in one entry
    hop1 = key.seal(MESSAGE, "hop1.test")
    message = Message(b"Authentication-Results: MX.test 1; dkim=none\r\n" + hop1)  # authserv-id: any case
    session, transaction = hook_args()
    await plugin.data(session, transaction, message)
    assert "cv=pass" in (message.get("ARC-Seal") or "").replace(" ", "")
    assert "i=2" in (message.get("ARC-Seal") or "")
    assert "arc=pass" in (message.get("ARC-Authentication-Results") or "")
    found, transaction, _ = await verify(message.raw)
    assert [c.result for c in found] == ["pass"]
    assert transaction.notes["arc"].sealers == ("hop1.test", "mx.test")
    assert dkimpy_verdict(message.raw, zone, key) == (dkim.CV_Pass, "success")


async def test_no_seal_without_our_authentication_results(zone: ZoneServer, key: SealKey, tmp_path: Path) -> None:
    plugin = ARC(seal_settings(key, tmp_path, verify=False))
    message = Message(b"Authentication-Results: someone-else.test; spf=pass\r\n" + MESSAGE)
    session, transaction = hook_args()
    verdict = await plugin.data(session, transaction, message)
    assert verdict is not None and verdict.tags == ("arc:not-sealed",)
    assert "ARC-Seal" not in message and not message.modified
    assert checks(transaction, "arc") == []  # verify: false records nothing


async def test_no_seal_when_the_chain_could_not_be_checked(zone: ZoneServer, key: SealKey, tmp_path: Path) -> None:
    zone.timeout_names.add("slow._domainkey.hop1.test")
    plugin = ARC(seal_settings(key, tmp_path))
    message = Message(b"Authentication-Results: mx.test; spf=pass\r\n"
                      + key.seal(MESSAGE, "hop1.test", selector="slow"))
    session, transaction = hook_args()
    verdict = await plugin.data(session, transaction, message)
    assert verdict is not None and "arc:not-sealed" in verdict.tags
    assert len(message.get_all("ARC-Seal")) == 1 and not message.modified  # only hop1's set


@pytest.mark.parametrize("writer", ["auth_results", "a fixed header without arc="])
async def test_verify_and_seal_entries_around_the_ar_writer_over_smtp(  # noqa: PLR0917
    proxy_factory: ProxyFactory, sink: Sink, zone: ZoneServer, key: SealKey, tmp_path: Path, writer: str,
) -> None:
    verifier = ARC()
    ar_writer: object = (
        AuthResults(AuthResults.Settings(authserv_id="mx.test")) if writer == "auth_results"
        else AddHeaders(AddHeaders.Settings(add={"Authentication-Results": "mx.test; spf=pass"}))
    )
    sealer = ARC(seal_settings(key, tmp_path, verify=False))
    proxy = await proxy_factory(verifier, ar_writer, sealer, upstream=sink.port,
                                dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 1})
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    hop1 = key.seal(MESSAGE, "hop1.test")
    code, _ = await talk.send_message("alice@example.test", ["list@lists.test"], hop1)
    assert code == 250
    await talk.close()
    delivered = sink.messages[0].content
    assert delivered.endswith(hop1)
    aar = Message(delivered).get("ARC-Authentication-Results") or ""
    assert aar.startswith("i=2; mx.test;") and "arc=pass" in aar  # the verifier's result, sealed
    assert dkimpy_verdict(delivered, zone, key) == (dkim.CV_Pass, "success")


def test_seal_settings_and_key_are_checked(tmp_path: Path) -> None:
    seal = {"domain": "mx.test", "selector": "arc", "key_file": str(tmp_path / "none.pem"), "authserv_id": "mx.test"}
    with pytest.raises(ValueError, match=f"DKIM key file {tmp_path / 'none.pem'}: cannot read it"):
        ARC(ARC.Settings.model_validate({"seal": seal}))
    with pytest.raises(pydantic.ValidationError, match="authserv-id"):
        ARC.Settings.model_validate({"seal": {**seal, "authserv_id": "mx.test; spf=pass"}})
    with pytest.raises(pydantic.ValidationError):
        ARC.Settings.model_validate({"seal": {**seal, "algorithm": "ed25519-sha256"}})
    assert ARC.Settings().seal is None and ARC.Settings().verify
