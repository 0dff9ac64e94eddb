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


def test_ttl_cache_expires_entries_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import smtpproxy.dns as dns_module
    from smtpproxy.dns import TTLCache

    now = [1_000_000.0]
    monkeypatch.setattr(dns_module.time, "time", lambda: now[0])
    monkeypatch.setattr(dns_module.time, "monotonic", lambda: now[0] - 999_000.0)  # both clocks run
    cache: TTLCache[str, int] = TTLCache(size=2)
    cache.put("a", 1, now[0] + 10)
    cache.put("gone", 2, now[0])  # already expired (TTL 0): not kept
    assert cache.get("a") == 1 and cache.get("gone") is None
    now[0] += 10
    assert cache.get("a") is None  # its TTL is over
    for key in ("b", "c", "d"):
        cache.put(key, 3, now[0] + 60)
    assert cache.get("b") is None and cache.get("d") == 3 and len(cache) == 2  # least recently used went
    nothing: TTLCache[str, int] = TTLCache(size=0)
    nothing.put("a", 1, now[0] + 60)
    assert nothing.get("a") is None  # cache_size: 0 keeps nothing


def test_ttl_cache_expires_on_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the system clock after a value is put changes nothing; only time passing does."""
    import smtpproxy.dns as dns_module
    from smtpproxy.dns import TTLCache

    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(dns_module.time, "time", lambda: wall[0])
    monkeypatch.setattr(dns_module.time, "monotonic", lambda: mono[0])
    cache: TTLCache[str, int] = TTLCache(size=4)
    cache.put("a", 1, wall[0] + 10)
    wall[0] += 3600  # the clock is stepped forward: the answer has 10 s left all the same
    assert cache.get("a") == 1
    wall[0] -= 7200  # and back: it does not live longer either
    mono[0] += 10
    assert cache.get("a") is None


def test_derived_caches_belong_to_their_resolver() -> None:
    from smtpproxy.dns import Resolver

    first, second = Resolver(["127.0.0.1"]), Resolver(["127.0.0.1"])
    assert first.derived_cache("x") is first.derived_cache("x")
    assert first.derived_cache("x") is not first.derived_cache("y")
    assert first.derived_cache("x") is not second.derived_cache("x")  # a reconfigured resolver starts empty
