"""The proxy's floor: the least a Python SMTP relay on uvloop does per message in front of Postfix.

    python bench/proxy_floor.py PORT UPSTREAM_PORT [--identity xclient|xforward]

For postfix_rows.py's ``proxy-floor`` rows: what ``smtpproxy run`` without plugins does on
the wire with Postfix (bench/README.md compares the two), nothing else. The client gets ours'
EHLO reply, 250 to MAIL, the upstream's reply to each RCPT (MAIL goes with the first, as in
``rcpt_mode: relay``), 354 at once, the upstream's reply to the message. Upstream, ``xclient``:
a new connection per message, greeting, XCLIENT (an EHLO first only on the first connection,
to learn the attributes), EHLO as the client, MAIL+RCPT in one write, ``BDAT <size> LAST``
with the message (DATA without CHUNKING), QUIT. ``xforward``: pooled connections (ours'
defaults), XFORWARD in MAIL's write, no RSET. No Received: field (ours writes none when the
upstream is told the client), no parsing beyond line ends, the dot and reply codes, no log,
no plugin, no timeout, no task: each session is a generator its connections' callbacks
resume. What is left is the event loop, the connections and the kernel. Not a proxy to
deploy: it checks nothing it relays.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, cast

import uvloop

HOST = "127.0.0.1"
NAME = b"floor.bench"
EHLO_REPLY = (b"250-" + NAME + b"\r\n250-PIPELINING\r\n250-SIZE 125829120\r\n250-8BITMIME\r\n"
              b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n")  # what smtpproxy run says
LOST = b"451 4.4.2 Upstream connection lost, try again later\r\n"
XCLIENT_ORDER = (b"ADDR", b"PORT", b"NAME", b"HELO", b"PROTO", b"LOGIN", b"DESTADDR", b"DESTPORT")
XFORWARD_ORDER = (b"ADDR", b"PORT", b"NAME", b"HELO", b"PROTO", b"SOURCE")
MAX_IDLE, MAX_MESSAGES = 32, 100
LINE, BODY, CONNECT = "line", "body", "connect"  # what a session waits for, or (octets, replies)

Script = Generator[Any, Any, bytes]


class Refused(Exception):
    """The upstream failed before the message; ``args[0]``: the reply for the client's RCPT."""


def offered(ehlo: bytes, keyword: bytes) -> frozenset[bytes] | None:
    """The parameters of *keyword* in an EHLO reply (None: not offered)."""
    for line in ehlo.split(b"\r\n"):
        words = line[4:].upper().split()
        if words and words[0] == keyword:
            return frozenset(words[1:])
    return None


class Upstream(asyncio.Protocol):
    """One connection to the upstream: the replies its session waits for, whole."""

    def __init__(self, session: Session):
        self.session = session
        self.buffer = b""
        self.due, self.got, self.messages = 0, cast(list[bytes], []), 0
        self.closed = self.quitting = self.chunking = False
        self.xforward: frozenset[bytes] = frozenset()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def take(self) -> list[bytes] | None:
        """The replies due, once all are in (a reply ends at "NNN ", not "NNN-")."""
        buffer, at, line = self.buffer, 0, 0
        while (nl := buffer.find(b"\n", line)) != -1:
            if buffer[line + 3 : line + 4] != b"-":
                self.got.append(buffer[at : nl + 1])
                at = nl + 1
                if len(self.got) == self.due:
                    break
            line = nl + 1
        self.buffer = buffer[at:]
        if len(self.got) < self.due:
            return None
        self.due, got, self.got = 0, self.got, []
        return got

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.quitting:  # QUIT's reply: done
            self.transport.close()
        elif self.due and (replies := self.take()) is not None:
            self.session.resume(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.due:
            self.due, got = 0, self.got + [LOST] * (self.due - len(self.got))
            self.session.resume(got)


@dataclass
class Relay:
    """What the client sessions share: the mode, the upstream, what it offers, the pool."""

    upstream_port: int
    identity: str
    xclient: frozenset[bytes] | None = None  # learned from the first connection's EHLO
    idle: deque[Upstream] = field(default_factory=deque)

    def release(self, up: Upstream, reply: bytes) -> None:
        up.messages += 1
        if reply is LOST or up.closed:
            up.transport.close()
        elif self.identity == "xclient" or up.messages >= MAX_MESSAGES or len(self.idle) >= MAX_IDLE:
            up.quitting = True
            up.transport.write(b"QUIT\r\n")
        else:
            self.idle.append(up)


class Session(asyncio.Protocol):
    """One client session: :meth:`script` in a generator, resumed with what it waits for."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.buffer = self.helo = b""
        self.closed = self.esmtp = False
        self.scan = self.accepted = 0
        self.mail: bytes | None = None
        self.up: Upstream | None = None
        self.want: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer, self.local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        self.script_ = self.script()
        self.resume(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.up is not None:  # in a transaction: it ends with the connection
            self.up.transport.close()
        self.script_.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.want in (LINE, BODY) and (value := self.take(self.want)) is not None:
            self.resume(value)

    def take(self, want: str) -> bytes | None:
        """The next command line, or the message up to the line with the dot; None: not in yet."""
        buffer = self.buffer
        if want == LINE:
            end = buffer.find(b"\r\n")
            if end == -1:
                return None
            self.buffer = buffer[end + 2 :]
            return buffer[:end]
        end = 0 if buffer[:3] == b".\r\n" else buffer.find(b"\r\n.\r\n", max(self.scan - 4, 0)) + 2
        if end == 1:
            self.scan = len(buffer)
            return None
        self.scan, self.buffer = 0, buffer[end + 3 :]
        return buffer[:end]

    def resume(self, value: Any) -> None:
        """Run the script with *value* until it waits for something that is not here yet."""
        while not self.closed:
            try:
                want = self.want = self.script_.send(value)
            except StopIteration:
                self.transport.close()
                return
            if want is LINE or want is BODY:
                if (value := self.take(want)) is None:
                    return
            elif want is CONNECT:
                return self.connect_upstream()
            else:  # (octets, replies) for the upstream
                if self.up is None or self.up.closed:
                    value = [LOST] * want[1]
                    continue
                self.up.due = want[1]
                if want[0]:
                    self.up.transport.write(want[0])
                if (value := self.up.take()) is None:
                    return

    def connect_upstream(self) -> None:
        up, loop = Upstream(self), asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: up, HOST, self.relay.upstream_port))
        task.add_done_callback(lambda t: self.resume(None if t.cancelled() or t.exception() else up))

    def script(self) -> Script:
        write = self.transport.write
        write(b"220 " + NAME + b" ESMTP floor\r\n")
        while True:
            line = yield LINE
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reset()
                self.helo, self.esmtp = line[5:].strip(), verb == b"EHLO"
                write(EHLO_REPLY if self.esmtp else b"250 " + NAME + b"\r\n")
            elif verb == b"MAIL":
                self.mail = line
                write(b"250 2.1.0 Sender OK\r\n")
            elif verb == b"RCPT" and self.mail is not None:
                reply = yield from self.rcpt(line + b"\r\n")
                self.accepted += reply[:1] == b"2"
                write(reply)
            elif verb == b"DATA" and self.accepted:
                write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                write((yield from self.message((yield BODY))))
            elif verb in (b"RSET", b"NOOP"):
                if verb == b"RSET":
                    self.reset()
                write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                write(b"221 2.0.0 Bye\r\n")
                return b""
            else:
                write(b"503 5.5.1 Bad sequence of commands\r\n" if verb in (b"RCPT", b"DATA")
                      else b"502 5.5.2 Command not implemented\r\n")

    def drop(self, reply: bytes) -> bytes:
        """The upstream failed before the message: its refusal (or ours) for this RCPT."""
        if self.up is not None:
            self.up.transport.close()
            self.up = None
        return reply if reply[:1] in b"45" else b"451 4.4.0 Upstream sent an unexpected reply\r\n"

    def rcpt(self, rcpt: bytes) -> Script:
        """The upstream's reply to RCPT; for the first, MAIL goes with it (and XFORWARD before)."""
        if self.up is not None:
            return cast(bytes, (yield rcpt, 1)[0])
        try:
            yield from self.connect()
        except Refused as exc:
            return cast(bytes, exc.args[0])
        assert self.up is not None and self.mail is not None
        prelude = b""
        if self.relay.identity == "xforward" and self.up.xforward:
            prelude = b"XFORWARD " + self.attributes(self.up.xforward, XFORWARD_ORDER) + b"\r\n"
        replies = yield prelude + self.mail + b"\r\n" + rcpt, 3 if prelude else 2
        if prelude and replies.pop(0)[:1] != b"2":
            return self.drop(b"451 4.7.0 XFORWARD refused\r\n")
        return cast(bytes, replies[1]) if replies[0][:1] == b"2" else self.drop(replies[0])

    def connect(self) -> Script:
        """A connection ready for MAIL as :attr:`up`: an idle one (xforward), or a new one
        (greeting, EHLO as the proxy where needed, XCLIENT and EHLO as the client); else Refused."""
        relay, xclient = self.relay, self.relay.identity == "xclient"
        while not xclient and relay.idle:
            up = relay.idle.popleft()
            if not up.closed:
                self.up, up.session = up, self
                return b""
        self.up = yield CONNECT
        if self.up is None:
            raise Refused(b"451 4.4.1 Upstream mail server not reachable, try again later\r\n")
        reply = yield from self.ask(b"", b"220")
        if not xclient or relay.xclient is None:
            reply = yield from self.ask(b"EHLO " + NAME + b"\r\n", b"250")
            relay.xclient = offered(reply, b"XCLIENT") or frozenset() if xclient else None
        if relay.xclient is not None:
            yield from self.ask(b"XCLIENT " + self.attributes(relay.xclient, XCLIENT_ORDER) + b"\r\n", b"220")
            reply = yield from self.ask(b"EHLO " + (self.helo or NAME) + b"\r\n", b"250")
        self.up.chunking = offered(reply, b"CHUNKING") is not None
        self.up.xforward = offered(reply, b"XFORWARD") or frozenset()
        return b""

    def ask(self, command: bytes, code: bytes) -> Script:
        [reply] = yield command, 1
        if reply[:3] != code:
            raise Refused(self.drop(reply))
        return cast(bytes, reply)

    def attributes(self, names: frozenset[bytes], order: tuple[bytes, ...]) -> bytes:
        helo = self.helo if all(33 <= b <= 126 and b not in b"+=" for b in self.helo) else b""  # no xtext
        values = {b"ADDR": self.peer[0].encode(), b"PORT": b"%d" % self.peer[1], b"NAME": b"[UNAVAILABLE]",
                  b"HELO": helo or b"[UNAVAILABLE]", b"PROTO": b"ESMTP" if self.esmtp else b"SMTP",
                  b"LOGIN": b"[UNAVAILABLE]", b"DESTADDR": self.local[0].encode(),
                  b"DESTPORT": b"%d" % self.local[1], b"SOURCE": b"REMOTE"}
        return b" ".join(name + b"=" + values[name] for name in order if name in names)

    def message(self, stuffed: bytes) -> Script:
        """The upstream's reply to the message: BDAT (unstuffed) or DATA (as it came)."""
        self.mail, self.accepted, up = None, 0, self.up
        if up is None:  # lost after a recipient was taken
            return LOST
        if up.chunking:
            body = stuffed.replace(b"\r\n.", b"\r\n")
            body = body[1:] if body[:1] == b"." else body
            [reply] = yield b"BDAT %d LAST\r\n" % len(body) + body, 1
        else:
            [reply] = yield b"DATA\r\n", 1
            if reply[:3] == b"354":
                [reply] = yield stuffed + b".\r\n", 1
        self.up = None
        self.relay.release(up, reply)
        return cast(bytes, reply)

    def reset(self) -> None:
        """No message after all (RSET, a new EHLO): the upstream transaction ends with its connection."""
        self.mail, self.accepted = None, 0
        self.drop(b"")


async def _serve(port: int, upstream_port: int, identity: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(upstream_port, identity)
    server = await loop.create_server(lambda: Session(relay), HOST, port, backlog=1024)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--identity", choices=["xclient", "xforward"], default="xclient")
    args = parser.parse_args()
    uvloop.run(_serve(args.port, args.upstream_port, args.identity))
