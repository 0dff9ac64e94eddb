"""Which route (upstream pool) a recipient goes to: one rule for delivery and the tracer.

Routes are tried in configured order and the first whose ``domains`` match the recipient's
domain wins; anything else takes the ``default`` route. One transaction goes to one route,
so the SMTP front end refuses (452) a recipient of another route in the same transaction,
and the tracer applies the same rule offline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from smtpproxy.addresses import Address
from smtpproxy.relay import RelayPolicy

__all__ = ["DEFAULT_ROUTE", "ROUTES_NOTE", "RouteTable", "route_of"]

DEFAULT_ROUTE = "default"
ROUTES_NOTE = "policy_routes"
"""``transaction.notes[ROUTES_NOTE]``: recipients whose policy group gives their route (by
address), overriding the route of their domain (docs/multi-domain.md)."""


def route_of(notes: Mapping[str, Any], address: Address, key_of: Callable[[Address], str]) -> str:
    """The route of a recipient: its policy group's, if it has one, else the domain's."""
    chosen = notes.get(ROUTES_NOTE)
    if chosen:
        key = chosen.get(address.text)
        if key is not None:
            return str(key)
    return key_of(address)


class RouteTable:
    """Route keys for the configured routes' domain lists: a route's name, or ``route0``,
    ``route1``, ... for unnamed ones."""

    __slots__ = ("_matchers",)

    def __init__(self, domain_lists: Sequence[Sequence[str]] = (), names: Sequence[str | None] = ()):
        names = list(names) + [None] * (len(domain_lists) - len(names))
        self._matchers = tuple(
            (names[index] or f"route{index}", RelayPolicy.from_config(domains, (), False))
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
