"""The shared resolver against a real DNS server on loopback: the contract plugins rely on."""

from __future__ import annotations

import pytest

from smtpproxy.dns import DNSTemporaryError, Resolver
from tests.dns_server import ZoneServer


def resolver(server: ZoneServer, **kwargs: float) -> Resolver:
    return Resolver(["127.0.0.1"], port=server.port, timeout=kwargs.get("timeout", 2.0))


async def test_records_nxdomain_nodata_and_long_txt(dns_server: ZoneServer) -> None:
    dns_server.add('example.test. 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"')
    dns_server.add("example.test. 300 IN MX 10 mx.example.test.")
    dns_server.add("mx.example.test. 300 IN A 192.0.2.25")
    dns_server.add("25.2.0.192.in-addr.arpa. 300 IN PTR mx.example.test.")
    dns_server.txt("sel._domainkey.example.test", "v=DKIM1; k=rsa; p=" + "A" * 400)
    r = resolver(dns_server)
    assert await r.txt("example.test") == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert await r.mx("example.test") == [(10, "mx.example.test")]
    assert await r.a("mx.example.test") == ["192.0.2.25"]
    assert await r.ptr("192.0.2.25") == ["mx.example.test"]
    assert await r.txt("sel._domainkey.example.test") == [b"v=DKIM1; k=rsa; p=" + b"A" * 400]
    assert await r.txt("nosuch.example.test") == []  # NXDOMAIN
    assert await r.aaaa("mx.example.test") == []  # NODATA


async def test_timeouts_and_servfail_are_temporary_errors(dns_server: ZoneServer) -> None:
    dns_server.timeout_names.add("slow.example.test")
    dns_server.servfail_names.add("broken.example.test")
    r = resolver(dns_server, timeout=0.3)
    with pytest.raises(DNSTemporaryError):
        await r.txt("slow.example.test")
    with pytest.raises(DNSTemporaryError):
        await r.txt("broken.example.test")


async def test_answers_are_cached_by_ttl(dns_server: ZoneServer) -> None:
    dns_server.add('cached.example.test. 300 IN TXT "one"')
    r = resolver(dns_server)
    assert await r.txt("cached.example.test") == [b"one"]
    assert await r.txt("cached.example.test") == [b"one"]
    assert dns_server.queries.count(("cached.example.test", "TXT")) == 1
    sync = r.sync_resolver()  # the blocking twin shares the cache
    assert [b"".join(x.strings) for x in sync.resolve("cached.example.test", "TXT")] == [b"one"]
    assert dns_server.queries.count(("cached.example.test", "TXT")) == 1
