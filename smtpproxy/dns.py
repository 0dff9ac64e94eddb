"""One shared DNS resolver for every plugin (SPF, DKIM, DMARC, DNSBL, rDNS).

Configured once from the ``dns:`` section (nameservers, port, timeout, cache) so a
deployment can point all lookups at a local caching resolver and the tests at a server on
loopback. Answers are cached with their TTLs by dnspython's own LRU cache. The contract
that mail authentication needs: a name that does not exist, or has no records of the type,
gives an empty list; a lookup that could not be answered (timeout, SERVFAIL, refused)
raises :class:`DNSTemporaryError`, which the plugins turn into their ``temperror`` action.

Blocking libraries (pyspf, dkimpy) get :meth:`Resolver.sync_resolver`, a dnspython resolver
with the same settings and cache, for use inside ``run_blocking``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = ["DNSTemporaryError", "Resolver", "configure", "get_resolver"]

R = TypeVar("R", bound=dns.resolver.BaseResolver)


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
        self._cache = dns.resolver.LRUCache(cache_size) if cache_size > 0 else None
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
