"""Which route (upstream pool) a recipient goes to: one rule for delivery and the tracer.

Routes are tried in configured order and the first whose ``domains`` match the recipient's
domain wins; anything else takes the ``default`` route. One transaction goes to one route,
so the SMTP front end refuses (452) a recipient of another route in the same transaction,
and the tracer applies the same rule offline.
"""

from __future__ import annotations

from collections.abc import Sequence

from smtpproxy.addresses import Address
from smtpproxy.relay import RelayPolicy

__all__ = ["DEFAULT_ROUTE", "RouteTable"]

DEFAULT_ROUTE = "default"


class RouteTable:
    """Route keys ``route0``, ``route1``, ... for the configured routes' domain lists."""

    __slots__ = ("_matchers",)

    def __init__(self, domain_lists: Sequence[Sequence[str]] = ()):
        self._matchers = tuple(
            (f"route{index}", RelayPolicy.from_config(domains, (), False))
            for index, domains in enumerate(domain_lists)
        )

    @property
    def keys(self) -> tuple[str, ...]:
        """The configured routes' keys, in order (without ``default``)."""
        return tuple(key for key, _ in self._matchers)

    def key_of(self, address: Address) -> str:
        """The route of a recipient: the first whose domains match, else ``default``."""
        for key, matcher in self._matchers:
            if address.domain and matcher.is_local_domain(address.domain):
                return key
        return DEFAULT_ROUTE
