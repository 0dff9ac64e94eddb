"""Who may send mail where: the rule that keeps every configuration from being an open relay.

A recipient is accepted when its domain is one we receive mail for (``relay.domains``),
or the client is trusted (``relay.networks``, or authenticated when allowed). RFC 5321
requires ``postmaster`` without a domain to be accepted from anyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from smtpproxy.addresses import Address
from smtpproxy.networks import IPNetwork, ip_in_networks

__all__ = ["RelayPolicy"]


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    domains: frozenset[str]
    """Exact domains, lower-case."""
    suffixes: tuple[str, ...]
    """From ``*.example.com`` entries: ``.example.com`` (subdomains only)."""
    networks: tuple[IPNetwork, ...]
    allow_authenticated: bool = True

    @classmethod
    def from_config(
        cls, domains: Iterable[str], networks: Iterable[IPNetwork], allow_authenticated: bool
    ) -> RelayPolicy:
        exact, suffixes = set(), []
        for entry in (d.lower() for d in domains):
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                exact.add(entry)
        return cls(frozenset(exact), tuple(suffixes), tuple(networks), allow_authenticated)

    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower()
        return domain in self.domains or domain.endswith(self.suffixes)

    def is_trusted_client(self, ip: str, auth_user: str | None) -> bool:
        if auth_user is not None and self.allow_authenticated:
            return True
        return ip_in_networks(ip, self.networks)

    def permits(self, recipient: Address, client_ip: str, auth_user: str | None) -> bool:
        if recipient.domain == "" and recipient.local.lower() == "postmaster":
            return True
        return self.is_local_domain(recipient.domain) or self.is_trusted_client(client_ip, auth_user)
