"""One shared DNS resolver for every plugin (SPF, DKIM, DMARC, DNSBL, rDNS).

Configured once from the ``dns:`` section (nameservers, port, timeout, cache) so a
deployment can point all lookups at a local caching resolver and the tests at a server on
loopback. Answers are cached with their TTLs by dnspython's own LRU cache. The contract
that mail authentication needs: a name that does not exist, or has no records of the type,
gives an empty list; a lookup that could not be answered (timeout, SERVFAIL, refused)
raises :class:`DNSTemporaryError`, which the plugins turn into their ``temperror`` action.

Blocking libraries (pyspf, dkimpy) get :meth:`Resolver.sync_resolver`, a dnspython resolver
with the same settings and cache, for use inside ``run_blocking``. What plugins make of
answers (pyspf-ready records, parsed DKIM keys, DMARC records) can be kept in the resolver's
:meth:`Resolver.derived_cache`, each entry no longer than the DNS answer it came from.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = ["DNSTemporaryError", "Resolver", "TTLCache", "configure", "get_resolver"]

R = TypeVar("R", bound=dns.resolver.BaseResolver)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """Values until their expiration (a ``time.time()`` instant, e.g. a DNS answer's), the least
    recently used going first when full. Thread-safe: plugins' worker threads read it too.

    The time left is taken from the wall clock once, when a value is put, and then runs on
    the monotonic clock: setting the system clock (NTP stepping it, an admin) neither keeps
    answers past their TTL nor throws the whole cache away."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        entry = self.entry(key)
        return None if entry is None else entry[0]

    def entry(self, key: K) -> tuple[V, float] | None:
        """The value and the ``time.monotonic()`` instant it expires, or None: for a value
        derived from several cached ones, which may be kept no longer than the first of them."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1], entry[0]

    def put(self, key: K, value: V, expiration: float) -> None:
        """Keep ``value`` until ``expiration``; one already expired (TTL 0) is not kept."""
        self.put_until(key, value, time.monotonic() + (expiration - time.time()))

    def put_until(self, key: K, value: V, deadline: float) -> None:
        """Keep ``value`` until ``deadline``, a ``time.monotonic()`` instant (see :meth:`entry`)."""
        if self.size <= 0 or deadline <= time.monotonic():
            return
        with self._lock:
            self._entries[key] = (deadline, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class DNSTemporaryError(Exception):
    """DNS did not answer (timeout, SERVFAIL, no reachable server): try again later."""


class Resolver:
    """Async lookups with the contract above. Thread-safe to share; one per process."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        port: int = 53,
        timeout: float = 5.0,
        cache_size: int = 10_000,
    ):
        self.nameservers = list(nameservers) if nameservers else None
        self.port = port
        self.timeout = timeout
        self.cache_size = cache_size
        self._cache = dns.resolver.LRUCache(cache_size) if cache_size > 0 else None
        self._derived: dict[str, TTLCache[Any, Any]] = {}
        self._derived_lock = threading.Lock()
        self._async: dns.asyncresolver.Resolver = self._configure(
            dns.asyncresolver.Resolver(configure=self.nameservers is None)
        )

    def _configure(self, resolver: R) -> R:
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
        resolver.port = self.port
        resolver.timeout = self.timeout
        resolver.lifetime = self.timeout
        resolver.cache = self._cache
        return resolver

    def sync_resolver(self) -> dns.resolver.Resolver:
        """A blocking dnspython resolver with the same servers and cache (for worker threads)."""
        return self._configure(dns.resolver.Resolver(configure=self.nameservers is None))

    async def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """Records of one type; [] for NXDOMAIN or no data; DNSTemporaryError otherwise."""
        try:
            answer = await self._async.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.name.EmptyLabel:
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise DNSTemporaryError(f"{rdtype} {name}: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DNSTemporaryError(f"{rdtype} {name}: {type(exc).__name__}: {exc}") from exc
        return list(answer)

    def derived_cache(self, kind: str) -> TTLCache[Any, Any]:
        """A cache for what a plugin derives from this resolver's answers (``kind`` names it),
        as big as the answer cache (``cache_size: 0`` keeps nothing). A resolver configured
        anew (other servers, a reload) starts with empty ones."""
        with self._derived_lock:
            cache = self._derived.get(kind)
            if cache is None:
                cache = self._derived[kind] = TTLCache(self.cache_size)
            return cache

    async def answer(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """dnspython's answer itself (no records of the type: one without ``rrset``), for a
        caller that needs its expiration or CNAME chain; raises dnspython's exceptions."""
        return await self._async.resolve(name, rdtype, search=False, raise_on_no_answer=False)

    async def txt(self, name: str) -> list[bytes]:
        """TXT records, each with its character-strings joined (as SPF, DKIM and DMARC want)."""
        return [b"".join(r.strings) for r in await self.query(name, "TXT")]  # type: ignore[attr-defined]

    async def a(self, name: str) -> list[str]:
        return [r.to_text() for r in await self.query(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [r.to_text() for r in await self.query(name, "AAAA")]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted(
            (r.preference, r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
            for r in await self.query(name, "MX")
        )

    async def ptr(self, ip: str) -> list[str]:
        reverse = dns.reversename.from_address(str(ipaddress.ip_address(ip))).to_text()
        return [r.to_text().rstrip(".") for r in await self.query(reverse, "PTR")]


_resolver: Resolver | None = None


def configure(resolver: Resolver) -> None:
    """Install the process-wide resolver (the proxy does this at start from ``dns:``)."""
    global _resolver  # noqa: PLW0603 - one resolver per process, by design
    _resolver = resolver


def get_resolver() -> Resolver:
    """The process-wide resolver; the system's (/etc/resolv.conf) until configured."""
    global _resolver  # noqa: PLW0603
    if _resolver is None:
        _resolver = Resolver()
    return _resolver
