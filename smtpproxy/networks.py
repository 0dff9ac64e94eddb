"""Matching a client address against configured networks (relay_networks, PROXY sources...).

One place, so that every such check treats an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
what a dual-stack listener reports for IPv4 clients) as the IPv4 address it is.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = ["IPNetwork", "ip_in_networks"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_in_networks(ip: str, networks: Iterable[IPNetwork]) -> bool:
    """True when ``ip`` (any textual form) lies in one of ``networks``; False if not an IP."""
    addr = _address(ip)
    if addr is None:
        return False
    return any(addr in net for net in networks)


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The parsed address (an IPv4-mapped one as IPv4), or None; parsed once per client
    address, not for every recipient of every message."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
