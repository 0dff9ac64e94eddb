"""TLS to the upstream: opportunistic by default, and when required it is verified, never
silently downgraded to plaintext."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from tests.conftest import ProxyFactory, Sink, Talk, port_of, start_sink

RELAY = {"domains": ["dest.test"], "networks": []}
BODY = b"Subject: tls\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, name: str = "upstream.test") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


async def send_one(proxy_port: int) -> tuple[int, str]:
    client = await Talk.open(proxy_port)
    await client.hello()
    reply = await client.send_message("a@sender.test", ["b@dest.test"], BODY)
    await client.close()
    return reply


@pytest.fixture
async def tls_sink(ca: trustme.CA) -> Sink:
    sink = await start_sink(tls_context=server_context(ca))
    yield sink
    sink.server.close()


async def test_required_starttls_verified_against_ca(
    proxy_factory: ProxyFactory, tls_sink: Sink, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proxy = await proxy_factory(upstream=tls_sink.port, relay=RELAY, delivery={
        "tls": "starttls", "ca_file": str(tmp_path / "ca.pem"), "tls_hostname": "upstream.test"})
    assert (await send_one(port_of(proxy)))[0] == 250
    assert tls_sink.handler.tls_versions == ["TLSv1.3"]


async def test_required_starttls_refuses_an_untrusted_certificate(
    proxy_factory: ProxyFactory, tls_sink: Sink, tmp_path: Path
) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    proxy = await proxy_factory(upstream=tls_sink.port, relay=RELAY, delivery={
        "tls": "starttls", "ca_file": str(tmp_path / "other-ca.pem"), "tls_hostname": "upstream.test"})
    code, text = await send_one(port_of(proxy))
    assert (code, text) == (451, "4.7.5 TLS with the upstream mail server failed, try again later")
    assert tls_sink.messages == []


async def test_required_starttls_refuses_the_wrong_hostname(
    proxy_factory: ProxyFactory, tls_sink: Sink, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    proxy = await proxy_factory(upstream=tls_sink.port, relay=RELAY, delivery={
        "tls": "starttls", "ca_file": str(tmp_path / "ca.pem"), "tls_hostname": "impostor.test"})
    assert (await send_one(port_of(proxy)))[0] == 451
    assert tls_sink.messages == []


async def test_required_starttls_never_falls_back_to_plaintext(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, delivery={"tls": "starttls"})
    assert await send_one(port_of(proxy)) == (
        451, "4.7.5 Upstream does not offer STARTTLS, which is required")
    assert sink.messages == []


async def test_opportunistic_uses_tls_when_offered_without_verifying(
    proxy_factory: ProxyFactory, tls_sink: Sink
) -> None:
    proxy = await proxy_factory(upstream=tls_sink.port, relay=RELAY, delivery={"tls": "opportunistic"})
    assert (await send_one(port_of(proxy)))[0] == 250
    assert tls_sink.handler.tls_versions == ["TLSv1.3"]


async def test_opportunistic_sends_plaintext_when_not_offered(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, delivery={"tls": "opportunistic"})
    assert (await send_one(port_of(proxy)))[0] == 250
    assert sink.handler.tls_versions == [None]


async def test_smarthost_auth_over_tls(proxy_factory: ProxyFactory, ca: trustme.CA, tmp_path: Path) -> None:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: object, session: object, envelope: object, mechanism: str,
                      auth_data: LoginPassword) -> AuthResult:
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret", handled=False)

    sink = await start_sink(tls_context=server_context(ca), authenticator=authenticator,
                            auth_required=True, auth_require_tls=True, auth_exclude_mechanism=["LOGIN"])
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    delivery = {"tls": "starttls", "ca_file": str(tmp_path / "ca.pem"), "tls_hostname": "upstream.test",
                "auth": {"username": "relayuser", "password": "s3cret"}}
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, delivery=delivery)
    assert (await send_one(port_of(proxy)))[0] == 250
    assert logins == [(b"relayuser", b"s3cret")]
    assert sink.handler.tls_versions == ["TLSv1.3"]
    delivery["auth"] = {"username": "relayuser", "password": "wrong"}
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, delivery=delivery)
    assert await send_one(port_of(proxy)) == (451, "4.7.0 Upstream authentication failed, try again later")
    assert len(sink.messages) == 1
    sink.server.close()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_wrong_upstream_ca_is_reported_as_a_certificate_problem(
    proxy_factory: ProxyFactory, ca: trustme.CA, tmp_path: Path, mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

    from tests.conftest import SinkHandler
    from tests.wire.test_metrics import health_port, http, scrape, value

    handler = SinkHandler()
    if mode == "starttls":
        sink = await start_sink(handler, tls_context=server_context(ca))
        server, port = sink.server, sink.port
    else:  # TLS from the first byte, as on port 465
        server = await asyncio.get_running_loop().create_server(
            lambda: AiosmtpdSMTP(handler, hostname="upstream.test"), "127.0.0.1", 0,
            ssl=server_context(ca))
        port = server.sockets[0].getsockname()[1]
    other = trustme.CA()  # the proxy trusts the wrong CA
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    proxy = await proxy_factory(
        upstream=port, relay=RELAY, metrics={"enabled": True, "port": 0, "ready_cache": 0.01},
        delivery={"tls": mode, "ca_file": str(tmp_path / "other-ca.pem"), "tls_hostname": "upstream.test"},
    )
    try:
        assert await send_one(port_of(proxy)) == (
            451, "4.7.5 TLS with the upstream mail server failed, try again later")
        [record] = [r for r in caplog.records if r.msg == "upstream_down"]
        fields = record.smtpproxy_fields  # type: ignore[attr-defined]
        assert record.levelno == logging.WARNING and fields["reason"] == "tls_verify"
        assert "TLS certificate verification failed: unable to get local issuer certificate" in fields["detail"]
        samples = await scrape(proxy)
        assert value(samples, "smtpproxy_upstream_connect_failures_total",
                     upstream=f"127.0.0.1:{port}", reason="tls_verify") == 1
        status, _, body = await http(health_port(proxy), "/readyz")
        assert status == 200  # every proxy shares the upstream: clients hear 451, not a closed port
        assert "\ndelivery unusable: clients get 4xx" in body.decode()
        assert f"upstream 127.0.0.1:{port}: TLS certificate verification failed (" in body.decode()
        samples = await scrape(proxy)
        assert samples[("smtpproxy_upstream_up", frozenset({("upstream", f"127.0.0.1:{port}")}))] == 0
        assert value(samples, "smtpproxy_delivery_ready") == 0
        assert handler.messages == []
    finally:
        server.close()
