"""Who may send mail where: the rule that keeps every configuration from being an open relay.

A recipient is accepted when its domain is one we receive mail for (``relay.domains``),
or the client is trusted (``relay.networks``, or authenticated when allowed). RFC 5321
requires ``postmaster`` without a domain to be accepted from anyone.

A local part can route mail elsewhere: ``u%evil.com@example.com`` (the "percent hack"),
``evil.com!u@example.com`` (UUCP bang paths) and ``"u@evil.com"@example.com`` all name
example.com, but an upstream that trusts the proxy (Postfix with the proxy in
``mynetworks`` and no XCLIENT) rewrites them and relays to evil.com. For untrusted clients
such recipients are refused unless ``relay.allow_routing_local_parts`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from smtpproxy.addresses import Address
from smtpproxy.networks import IPNetwork, ip_in_networks
from smtpproxy.verdicts import Reply

__all__ = ["RelayPolicy", "RelaySettings", "routes_elsewhere"]


class RelaySettings(Protocol):
    """The ``relay`` section as the rule reads it (smtpproxy.config's ``Relay``)."""

    @property
    def domains(self) -> Iterable[str]: ...
    @property
    def networks(self) -> Iterable[IPNetwork]: ...
    @property
    def allow_authenticated(self) -> bool: ...
    @property
    def allow_routing_local_parts(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    domains: frozenset[str]
    """Exact domains, lower-case."""
    suffixes: tuple[str, ...]
    """From ``*.example.com`` entries: ``.example.com`` (subdomains only)."""
    networks: tuple[IPNetwork, ...]
    allow_authenticated: bool = True
    allow_routing_local_parts: bool = False

    @classmethod
    def from_config(
        cls, domains: Iterable[str], networks: Iterable[IPNetwork], allow_authenticated: bool,
        allow_routing_local_parts: bool = False,
    ) -> RelayPolicy:
        exact, suffixes = set(), []
        for entry in (d.lower() for d in domains):
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                exact.add(entry)
        return cls(frozenset(exact), tuple(suffixes), tuple(networks), allow_authenticated,
                   allow_routing_local_parts)

    @classmethod
    def of(cls, settings: RelaySettings) -> RelayPolicy:
        """The rule of a configuration's ``relay`` section (the proxy's and the tracer's)."""
        return cls.from_config(settings.domains, settings.networks, settings.allow_authenticated,
                               settings.allow_routing_local_parts)

    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower()
        return domain in self.domains or domain.endswith(self.suffixes)

    def is_trusted_client(self, ip: str, auth_user: str | None) -> bool:
        if auth_user is not None and self.allow_authenticated:
            return True
        return ip_in_networks(ip, self.networks)

    def refusal(self, recipient: Address, client_ip: str, auth_user: str | None) -> str | None:
        """Why *recipient* may not be sent to by this client, or None when it may."""
        if recipient.domain == "" and recipient.local.lower() == "postmaster":
            return None
        if self.is_trusted_client(client_ip, auth_user):
            return None
        if not self.is_local_domain(recipient.domain):
            return "relay_denied"
        if not self.allow_routing_local_parts and routes_elsewhere(recipient.local):
            return "routing_local_part"
        return None


def refusal_reply(address: Address, why: str) -> Reply:
    """What the client hears for a :meth:`RelayPolicy.refusal` (the proxy and the tracer)."""
    detail = "" if why == "relay_denied" else " (the local part routes elsewhere)"
    return Reply(554, "5.7.1", f"<{address.text}>: Relay access denied{detail}")


_ROUTING_CHARACTERS = frozenset("%!@")


def routes_elsewhere(local: str) -> bool:
    """True when a local part carries a route (``%``, ``!``, or an ``@`` inside quotes)."""
    return not _ROUTING_CHARACTERS.isdisjoint(local)
