"""Matching a client address against configured networks (relay_networks, PROXY sources, who
may connect to the milter, the policy service and the metrics endpoint).

One place, so that every such check treats an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
what a dual-stack listener reports for IPv4 clients) as the IPv4 address it is.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

__all__ = ["LOOPBACK", "IPNetwork", "ip_in_networks", "others_shut_out", "peer_in_networks",
           "shut_out_warning"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))
"""This host: who may connect to a listener without authentication unless its ``clients`` say more."""


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


def peer_in_networks(peername: object, networks: Iterable[IPNetwork]) -> bool:
    """Whether a TCP connection's peer (``transport.get_extra_info("peername")``) lies in
    ``networks``. A peer whose address is unknown (the connection already gone) does not."""
    return isinstance(peername, tuple) and bool(peername) and ip_in_networks(str(peername[0]), networks)


def others_shut_out(host: str, clients: Iterable[IPNetwork]) -> bool:
    """Whether a listener on *host* is reachable from other hosts while its *clients* let only
    this one in: the default ``clients`` with a wider ``listen``/``address``, most likely an
    admin who meant other hosts to connect (said at check-config and at start)."""
    addr = _address(host.strip("[]"))
    if addr is None or addr.is_loopback:  # a name: cannot tell; loopback: nothing is shut out
        return False
    return all(net.network_address.is_loopback and net.broadcast_address.is_loopback for net in clients)


def shut_out_warning(section: str, listen: str, host: str, clients: Iterable[IPNetwork]) -> str | None:
    """What to tell the admin when :func:`others_shut_out` (check-config prints it, the
    listener logs it at start as ``clients_only_this_host``), or None."""
    if not others_shut_out(host, clients):
        return None
    return (f"{section} listens on {listen}, but {section}.clients lets only this host connect; "
            f"list the hosts that should (e.g. {section}.clients: [192.0.2.0/24])")
