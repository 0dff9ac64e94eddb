"""An authoritative DNS server on loopback for tests: the zones a plugin's lookups need.

A real server (dnslib's threaded UDP+TCP server) on 127.0.0.1 and a free port, so the code
under test does real DNS: the shared resolver, pyspf and dkimpy all query it over the
network. Records are given in zone-file syntax; names can be made to time out (never answer)
or fail (SERVFAIL) to test temperror handling. Answers are authoritative (AA), NXDOMAIN for
unknown names, NODATA for known names without the asked type.

For tests only (the ``smtpproxy_dns`` fixture of :mod:`smtpproxy.pytest_plugin`, smtpproxy's
own tests, the benchmark): it needs dnslib, which the ``plugin-test`` extra installs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

__all__ = ["ZoneServer", "running_zone_server"]


@dataclass
class ZoneServer:
    """Zone data plus behaviour switches; change them freely while the server runs."""

    records: list[RR] = field(default_factory=list)
    timeout_names: set[str] = field(default_factory=set)
    servfail_names: set[str] = field(default_factory=set)
    port: int = 0
    queries: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, zone_text: str) -> None:
        """Add records in zone-file syntax, e.g. ``'example.test. 300 IN TXT "v=spf1 -all"'``.

        Long TXT values are split into 255-byte character-strings automatically.
        """
        with self._lock:
            self.records.extend(RR.fromZone(zone_text))

    def txt(self, name: str, value: str, ttl: int = 300) -> None:
        """Add one TXT record, splitting the value into 255-byte strings (DKIM keys need it)."""
        chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
        quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
        self.add(f"{name.rstrip('.')}. {ttl} IN TXT {quoted}")

    def dns_section(self, timeout: float = 1.0) -> dict[str, Any]:
        """The configuration's ``dns:`` section for a resolver that asks this server, e.g.
        ``smtpproxy_proxy(plugin, dns=zones.dns_section())``."""
        return {"nameservers": ["127.0.0.1"], "port": self.port, "timeout": timeout}

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self.timeout_names.clear()
            self.servfail_names.clear()
            self.queries.clear()

    def _answer(self, request: DNSRecord) -> DNSRecord | None:
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            if qname in self.timeout_names:
                return None
            reply = request.reply()  # AA set: we are authoritative
            if qname in self.servfail_names:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            known = False
            for rr in self.records:
                if str(rr.rname).rstrip(".").lower() != qname:
                    continue
                known = True
                if rr.rtype == request.q.qtype or qtype == "ANY" or (
                    QTYPE[rr.rtype] == "CNAME" and qtype != "CNAME"
                ):
                    reply.add_answer(rr)
            if not known:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, data: ZoneServer):
        self.data = data

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord | None:
        return self.data._answer(request)


class _QuietHandler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, but a None answer means: stay silent (a timeout for the client)."""

    def get_reply(self, data: bytes) -> bytes | None:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        if reply is None:
            return None
        if self.protocol == "udp" and len(reply.pack()) > 512:
            reply = reply.truncate()
        return reply.pack()  # type: ignore[no-any-return]

    def handle(self) -> None:
        if self.server.socket_type == socket.SOCK_STREAM:
            self.protocol = "tcp"
            data = self.request.recv(8192)
            if len(data) < 2:
                return
            length = int.from_bytes(data[:2], "big")
            while len(data) - 2 < length:
                more = self.request.recv(8192)
                if not more:
                    return
                data += more
            reply = self.get_reply(data[2:])
            if reply is not None:
                self.request.sendall(len(reply).to_bytes(2, "big") + reply)
        else:
            self.protocol = "udp"
            data, connection = self.request
            reply = self.get_reply(data)
            if reply is not None:
                connection.sendto(reply, self.client_address)


class _SilentLogger:
    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def _free_port_for_udp_and_tcp() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


@contextlib.contextmanager
def running_zone_server() -> Iterator[ZoneServer]:
    """Start a server (UDP and TCP on one free port) for the duration of the block."""
    data = ZoneServer()
    resolver = _Resolver(data)
    port = _free_port_for_udp_and_tcp()
    servers = [
        DNSServer(resolver, port=port, address="127.0.0.1", tcp=tcp, logger=_SilentLogger(),
                  handler=_QuietHandler)
        for tcp in (False, True)
    ]
    for server in servers:
        # dnslib's start_thread polls for shutdown every 0.5 s; 0.05 s keeps teardown quick.
        thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        server.thread = thread
        thread.start()
    data.port = port
    try:
        yield data
    finally:
        for server in servers:
            server.stop()
            server.server.server_close()
