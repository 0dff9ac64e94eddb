"""Tests of the roles example, written as its author would, with smtpproxy's pytest fixtures."""

from __future__ import annotations

import pytest
from smtpproxy_example_roles import RolesInsideOnly

from smtpproxy import ConfigError
from smtpproxy.pytest_plugin import make_plugin, recipient


def plugin() -> object:
    return make_plugin(RolesInsideOnly, roles=["noc", "All-Staff"], inside=["10.0.0.0/8"])


def test_one_hook_directly(smtpproxy_session) -> None:
    roles = plugin()
    outside = smtpproxy_session(client_ip="203.0.113.7")
    verdict = roles.rcpt_to(outside, recipient("all-staff@corp.example"))
    assert verdict is not None and str(verdict.reply) == "550 5.7.1 This address takes no mail from outside"
    assert roles.rcpt_to(outside, recipient("alice@corp.example")) is None
    assert roles.rcpt_to(smtpproxy_session(client_ip="10.1.2.3"), recipient("noc@corp.example")) is None
    assert roles.rcpt_to(smtpproxy_session(auth_user="bob"), recipient("noc@corp.example")) is None


def test_postmaster_cannot_be_closed() -> None:
    with pytest.raises(ConfigError, match="RFC 5321"):
        make_plugin(RolesInsideOnly, roles=["postmaster"])


@pytest.mark.asyncio
async def test_through_the_phases(smtpproxy_run, smtpproxy_message) -> None:
    trace = await smtpproxy_run(plugin(), smtpproxy_message(), sender="x@outside.example",
                                recipients=["noc@corp.example", "alice@corp.example"],
                                client_ip="198.51.100.1")
    assert trace.decision == "delivered"
    assert trace.accepted_recipients == ["alice@corp.example"]
    assert trace.refused_recipients == [
        ("noc@corp.example", "550 5.7.1 This address takes no mail from outside", "roles_inside_only")]
    [step] = trace.phase("rcpt_to")[0].steps
    assert step.reason == "role address noc@corp.example from outside"


@pytest.mark.asyncio
async def test_real_proxy_inside_and_outside(smtpproxy_proxy, smtpproxy_message) -> None:
    proxy = await smtpproxy_proxy(plugins=[{"name": "roles", "use": "roles_inside_only",
                                            "settings": {"inside": ["10.0.0.0/8"]}}],
                                  relay={"domains": ["corp.example"]})
    outside = await proxy.send("x@outside.example", ["noc@corp.example"], smtpproxy_message(),
                               client_ip="198.51.100.1")
    assert outside.code == 550 and outside.stage == "rcpt"
    inside = await proxy.send("monitor@corp.example", ["noc@corp.example"], smtpproxy_message(),
                              client_ip="10.0.0.5")
    assert inside.ok, inside
    [got] = proxy.received
    assert got.recipients == ["noc@corp.example"] and got.sender == "monitor@corp.example"
