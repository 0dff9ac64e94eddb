"""iprev: forward-confirmed reverse DNS against a real authoritative server on loopback.

The proxy sees the client's address through a PROXY header (as behind a load balancer), so
the test clients can have the documentation addresses the zone describes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from dnslib import PTR, QTYPE, RR, A, DNSLabel
from smtpproxy_plugins.iprev import IPRev

from smtpproxy import Session, Transaction, auth_checks, hookimpl
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import ZoneServer

PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}
ZONE = """
7.2.0.192.in-addr.arpa. 300 IN PTR mail.good.test.
mail.good.test. 300 IN A 192.0.2.7
8.2.0.192.in-addr.arpa. 300 IN PTR forged.test.
forged.test. 300 IN A 198.51.100.1
10.2.0.192.in-addr.arpa. 300 IN PTR first.test.
10.2.0.192.in-addr.arpa. 300 IN PTR second.test.
first.test. 300 IN A 198.51.100.2
second.test. 300 IN A 192.0.2.10
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa. 300 IN PTR six.good.test.
six.good.test. 300 IN AAAA 2001:db8::1
"""


@pytest.fixture
def zone(dns_server: ZoneServer) -> ZoneServer:
    dns_server.add(ZONE)
    # A PTR name with control characters (CR LF: a header injection if it were written
    # anywhere) whose A record does point back: still not a hostname.
    evil = DNSLabel([b"evil\x07\r\nX-Injected: 1", b"good", b"test"])
    dns_server.records += [RR("12.2.0.192.in-addr.arpa", QTYPE.PTR, rdata=PTR(evil), ttl=300),
                           RR(evil, QTYPE.A, rdata=A("192.0.2.12"), ttl=300)]
    dns_server.timeout_names.add("11.2.0.192.in-addr.arpa")
    return dns_server


class Seen:
    """After iprev: what the session and transaction carry."""

    name = "seen"

    def __init__(self) -> None:
        self.hostnames: list[str | None] = []
        self.checks: list[tuple[str, str, dict[str, str]]] = []

    @hookimpl
    async def connect(self, session: Session) -> None:
        self.hostnames.append(session.client.hostname)

    @hookimpl
    async def mail_from(self, transaction: Transaction) -> None:
        self.checks += [(c.method, c.result, c.properties) for c in auth_checks(transaction, "iprev")]


def iprev(**settings: Any) -> IPRev:
    plugin = IPRev(IPRev.Settings.model_validate(settings))
    plugin.timeout = 5  # type: ignore[attr-defined]
    return plugin


async def session_from(port: int, ip: str) -> tuple[Talk, int]:
    talk = await Talk.open(port)
    family = "TCP6" if ":" in ip else "TCP4"
    talk.send(f"PROXY {family} {ip} {'2001:db8::25' if ':' in ip else '192.0.2.25'} 40001 25\r\n")
    code, _ = await talk.greeting()
    return talk, code


async def start(proxy_factory: ProxyFactory, zone: ZoneServer, *plugins: object, sink: Sink) -> int:
    server = await proxy_factory(*plugins, listeners=[PROXIED], upstream=sink.port,
                                 dns={"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 0.5})
    return port_of(server)


@pytest.mark.parametrize(("ip", "result", "hostname"), [
    ("192.0.2.7", "pass", "mail.good.test"),
    ("192.0.2.8", "fail", None),           # the PTR name points elsewhere: forged
    ("192.0.2.9", "fail", None),           # no PTR at all
    ("192.0.2.10", "pass", "second.test"),  # the second of two PTR names confirms
    ("192.0.2.11", "temperror", None),     # the PTR lookup times out
    ("2001:db8::1", "pass", "six.good.test"),
    ("192.0.2.12", "fail", None),          # the PTR name is not a hostname, though it points back
])
async def test_client_name_is_confirmed_forward(  # noqa: PLR0917 - parameters and fixtures
    ip: str, result: str, hostname: str | None, proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    seen = Seen()
    port = await start(proxy_factory, zone, iprev(), seen, sink=sink)
    talk, code = await session_from(port, ip)
    assert code == 220  # on_fail: continue is the default: nobody is refused
    await talk.cmd("EHLO client.test")
    assert (await talk.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    await talk.close()
    assert seen.hostnames == [hostname]
    assert seen.checks == [("iprev", result, {"policy.iprev": ip})]
    assert any(f"event=iprev result={result}" in r.getMessage() for r in caplog.records)


async def test_reject_on_fail_refuses_at_connect_like_postfix(
    proxy_factory: ProxyFactory, zone: ZoneServer, sink: Sink
) -> None:
    port = await start(proxy_factory, zone, iprev(on_fail="reject", on_temperror="tempfail"), sink=sink)
    for ip, expected in (("192.0.2.8", 554), ("192.0.2.11", 421), ("192.0.2.7", 220)):
        talk, code = await session_from(port, ip)
        assert code == expected, ip
        await talk.close()


async def test_loopback_clients_are_not_looked_up(zone: ZoneServer) -> None:
    from smtpproxy_plugins.iprev import check

    from smtpproxy import Resolver
    from smtpproxy.dns import configure

    configure(Resolver(["127.0.0.1"], port=zone.port, timeout=0.5))
    assert (await check("127.0.0.1")).result == "none"
    assert zone.queries == []
    assert (await check("192.0.2.7")).hostname == "mail.good.test"
    assert zone.queries  # and a real address is
