"""The floor: the least a Python milter on uvloop can do per message, for postfix_rows.py's ``floor`` row.

    python bench/milter_floor.py PORT

It speaks just enough of the milter protocol for Postfix to pass mail through it: it agrees
to every "no reply" step Postfix offers (``smtpproxy milter`` does so where no plugin needs
an answer, but always answers RCPT), answers the option negotiation and each end of message
with "continue", acknowledges the DATA macros at once (as ``smtpproxy milter`` does, or
Postfix waits 40 ms), and does nothing else: no parsing beyond the packet frames, no
session, no log line, no plugin. What it costs per message is the event loop, two round
trips, the connection Postfix opens per SMTP session, and the kernel; what ``smtpproxy
milter`` costs above it is its own Python (bench/README.md). Not a milter to deploy: it
checks nothing it reads.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import sys
from typing import cast

import uvloop

_NO_REPLY = sum(1 << bit for bit in (7, 12, 13, 14, 15, 16, 17, 18, 19))  # SMFIP_NR_* (HDR, CONN..BODY)
_NOT_SENT = (1 << 8) | (1 << 9)  # SMFIP_NOUNKNOWN, SMFIP_NODATA
_CONTINUE = struct.pack(">Ic", 1, b"c")


class FloorMilter(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.buffer = b""

    def _ack_now(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def data_received(self, data: bytes) -> None:
        buffer, at, out = self.buffer + data, 0, []
        while len(buffer) - at >= 4:
            (length,) = struct.unpack_from(">I", buffer, at)
            if len(buffer) - at - 4 < length:
                break
            command = buffer[at + 4 : at + 5]
            if command == b"O":  # SMFIC_OPTNEG: version, actions, protocol
                version, _, offered = struct.unpack_from(">III", buffer, at + 5)
                out.append(struct.pack(">IcIII", 13, b"O", version, 0, offered & (_NO_REPLY | _NOT_SENT)))
            elif command == b"D" and buffer[at + 5 : at + 6] == b"T":  # the DATA macros: no reply,
                self._ack_now()  # and Postfix holds its next write for our ACK (docs/deploy-milter.md)
            elif command == b"E":  # SMFIC_BODYEOB
                out.append(_CONTINUE)
            elif command == b"Q":  # SMFIC_QUIT
                self.transport.close()
                return
            at += 4 + length
        self.buffer = buffer[at:]
        if out:
            self.transport.write(b"".join(out))


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(FloorMilter, "127.0.0.1", port, backlog=1024)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1])))
