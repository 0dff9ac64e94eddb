"""PROXY protocol v1/v2 on a listener: learn the real client behind HAProxy or a load balancer.

The header is the first thing on the connection, before our greeting. Only peers in
``proxy_protocol_from`` may send one; anything else (another source, a missing, invalid or
late header) closes the connection without a banner and logs one ``proxy_refused`` line.
Parsing is aiosmtpd's :func:`~aiosmtpd.proxy_protocol.get_proxy` (v1 text and v2 binary).

A v2 header whose TLVs do not fit it exactly (a length that overruns the header) is
refused. A ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, which load balancers send for health checks,
is valid and keeps the connection's own addresses, as the specification says.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import PROTO, V2_CMD, get_proxy

from smtpproxy.eventlog import event
from smtpproxy.networks import ip_in_networks
from smtpproxy.session import Client

__all__ = ["ProxyProtocolSettings", "read_proxy_header"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# aiosmtpd's parser warns on its own logger for every bad header; our proxy_refused event
# carries the same reason, so one refused connection stays one log line.
logging.getLogger("mail.debug").setLevel(logging.ERROR)


@dataclass(frozen=True, slots=True)
class ProxyProtocolSettings:
    """Who may send a PROXY header on a listener, and how long it may take."""

    trusted: tuple[IPNetwork, ...]
    timeout: float = 5.0

    def trusts(self, ip: str) -> bool:
        return ip_in_networks(ip, self.trusted)


def _tlvs_fit(tlvs: bytes) -> bool:
    """Whether the v2 header's TLVs (type, 16-bit length, value) end exactly where the header
    does, those nested in PP2_TYPE_SSL too. aiosmtpd hands them over unparsed; one whose
    length runs past the header is a forged or broken header, refused like any other."""
    i = 0
    while i < len(tlvs):
        if i + 3 > len(tlvs):
            return False
        end = i + 3 + int.from_bytes(tlvs[i + 1 : i + 3], "big")
        if end > len(tlvs):
            return False
        if tlvs[i] == _PP2_TYPE_SSL and (end - i - 3 < 5 or not _tlvs_fit(tlvs[i + 8 : end])):
            return False  # client (1 octet), verify (4 octets), then sub-TLVs
        i = end
    return True


_PP2_TYPE_SSL = 0x20


def _refuse(peer: Client, reason: str) -> None:
    event("proxy_refused", level=logging.WARNING, client=peer.ip, port=peer.port, reason=reason)


async def read_proxy_header(
    reader: asyncio.StreamReader, peer: Client, settings: ProxyProtocolSettings
) -> Client | None:
    """The client the PROXY header names (or *peer* for LOCAL/UNKNOWN headers).

    None means the connection must be closed without a word; the reason is logged.
    """
    if not settings.trusts(peer.ip):
        _refuse(peer, "source not in proxy_protocol_from")
        return None
    try:
        async with asyncio.timeout(settings.timeout):
            data = await get_proxy(reader)
    except TimeoutError:
        _refuse(peer, f"no PROXY header within {settings.timeout:g}s")
        return None
    except (asyncio.IncompleteReadError, ConnectionError):
        _refuse(peer, "connection closed before the PROXY header")
        return None
    if not data.valid:
        _refuse(peer, data.error or "invalid PROXY header")
        return None
    if data.protocol not in (PROTO.STREAM, PROTO.UNSPEC):
        _refuse(peer, "PROXY header is not for a TCP connection")
        return None
    src = data.src_addr
    if (data.version == 2 and data.command == V2_CMD.LOCAL) or not isinstance(
        src, ipaddress.IPv4Address | ipaddress.IPv6Address
    ):
        event("proxy_header", logging.DEBUG, version=data.version, client=peer.ip, local=True)
        return peer
    if not _tlvs_fit(bytes(data.rest or b"")):
        _refuse(peer, "PROXYv2 TLV overruns the header")
        return None
    client = Client(str(src), int(data.src_port or 0))
    event("proxy_header", logging.DEBUG, version=data.version, client=client.ip, port=client.port,
          proxy=peer.ip)
    return client
