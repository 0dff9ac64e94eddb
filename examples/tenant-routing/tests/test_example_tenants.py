"""Tests of the tenant-routing example: each tenant's mail reaches its own upstream."""

from __future__ import annotations

import pytest
from smtpproxy_example_tenants import TenantRouting

from smtpproxy import Config, ConfigError
from smtpproxy.pytest_plugin import make_plugin

TENANTS = {"acme": ["acme.example", "acme.co.example"], "globex": ["globex.example"]}


def routes(acme_port: int, globex_port: int) -> list[dict[str, object]]:
    return [
        {"domains": ["*.acme.tenants.internal"], "upstreams": [{"host": "127.0.0.1", "port": acme_port}]},
        {"domains": ["*.globex.tenants.internal"], "upstreams": [{"host": "127.0.0.1", "port": globex_port}]},
    ]


def test_settings_refuse_a_domain_owned_twice() -> None:
    with pytest.raises(ConfigError, match="belongs to both acme and globex"):
        make_plugin(TenantRouting, tenants={"acme": ["x.example"], "globex": ["X.example"]})


@pytest.mark.asyncio
async def test_trace_shows_the_route_per_tenant(smtpproxy_run, smtpproxy_message) -> None:
    config = Config.model_validate({
        "relay": {"domains": ["acme.example", "acme.co.example", "globex.example", "other.example"]},
        "delivery": {"type": "smtp", "host": "10.9.9.9", "routes": routes(2601, 2602)},
        "plugins": [{"name": "tenants", "use": "tenant_routing", "settings": {"tenants": TENANTS}}],
    })
    trace = await smtpproxy_run(config, smtpproxy_message(), sender="a@sender.example",
                                recipients=["bob@acme.example", "eve@globex.example", "zed@other.example"])
    assert trace.decision == "delivered"
    assert trace.accepted_recipients == ["zed@other.example", "bob@acme.example.acme.tenants.internal",
                                         "eve@globex.example.globex.tenants.internal"]
    assert {(r.destination, r.recipients) for r in trace.routes} == {
        ("10.9.9.9:25", ("zed@other.example",)),
        ("127.0.0.1:2601", ("bob@acme.example.acme.tenants.internal",)),
        ("127.0.0.1:2602", ("eve@globex.example.globex.tenants.internal",)),
    }
    [step] = trace.steps_for("tenants")
    assert step.changes == (
        "-rcpt <bob@acme.example>", "+rcpt <bob@acme.example.acme.tenants.internal>",
        "-rcpt <eve@globex.example>", "+rcpt <eve@globex.example.globex.tenants.internal>",
    )
    assert trace.headers_added == []  # nothing in the shared content names another tenant's recipients


@pytest.mark.asyncio
async def test_each_tenant_reaches_its_own_upstream(
    smtpproxy_proxy, smtpproxy_upstream, smtpproxy_message
) -> None:
    acme, globex, fallback = [await smtpproxy_upstream() for _ in range(3)]
    proxy = await smtpproxy_proxy(
        make_plugin(TenantRouting, tenants=TENANTS),
        relay={"domains": ["acme.example", "acme.co.example", "globex.example", "other.example"]},
        delivery={"type": "smtp", "host": "127.0.0.1", "port": fallback.port, "tls": "none",
                  "routes": routes(acme.port, globex.port)},
    )
    # One transaction for two tenants: delivered to both, one reply to the client.
    reply = await proxy.send("a@sender.example", ["bob@acme.example", "carol@acme.co.example",
                                                  "eve@globex.example"], smtpproxy_message())
    assert reply.ok, reply
    [to_acme] = acme.received
    assert to_acme.recipients == ["bob@acme.example.acme.tenants.internal",
                                  "carol@acme.co.example.acme.tenants.internal"]
    [to_globex] = globex.received
    assert to_globex.recipients == ["eve@globex.example.globex.tenants.internal"]
    assert to_acme.content == to_globex.content
    assert fallback.received == []
    # A domain no tenant owns goes to the default upstream, untouched.
    assert (await proxy.send("a@sender.example", ["zed@other.example"], smtpproxy_message())).ok
    assert [m.recipients for m in fallback.received] == [["zed@other.example"]]


@pytest.mark.asyncio
async def test_a_refusing_tenant_server_refuses_the_message(smtpproxy_proxy, smtpproxy_upstream,
                                                            smtpproxy_message) -> None:
    acme, globex = await smtpproxy_upstream(), await smtpproxy_upstream()
    globex.data_reply = "451 4.3.0 Tenant server busy"
    proxy = await smtpproxy_proxy(
        make_plugin(TenantRouting, tenants=TENANTS),
        relay={"domains": ["acme.example", "globex.example"]},
        delivery={"type": "smtp", "host": "127.0.0.1", "port": acme.port, "tls": "none",
                  "routes": routes(acme.port, globex.port)},
    )
    reply = await proxy.send("a@sender.example", ["bob@acme.example", "eve@globex.example"],
                             smtpproxy_message())
    assert reply.code == 451  # not acknowledged, so the client retries: nothing is lost


def test_too_long_an_address_is_refused_not_misrouted() -> None:
    from smtpproxy.pytest_plugin import make_session

    domain = ".".join(["a" * 50] * 4) + ".example"  # valid, but no room left for the suffix
    plugin = make_plugin(TenantRouting, tenants={"acme": [domain]})
    session = make_session(sender="a@sender.example", recipients=["x" * 30 + "@" + domain])
    verdict = plugin.data(session.transaction)
    assert verdict is not None and verdict.reply is not None and verdict.reply.code == 550
    assert "cannot route to its tenant" in verdict.reply.text
