"""Command pipelining with the upstream (RFC 2920) on aiosmtplib's connection.

aiosmtplib sends one command and waits for its reply. Its protocol parses one reply at a time
and drops bytes that arrive while a parsed reply waits to be picked up, so the replies to a
group of pipelined commands, which an MTA sends together, would be lost. :func:`pipeline`
adopts the connection's protocol object into :class:`PipeliningProtocol` (its class changes
once; aiosmtplib creates the object itself and STARTTLS keeps it), which keeps every byte of
a reply that is due and hands the replies out in order.

This relies on aiosmtplib's protocol internals (``_buffer``, ``_response_waiter``,
``_response_pending``, ``_command_lock``, ``_read_response_from_buffer``); they are checked
by tests/unit/test_dependency_internals.py and ``pyproject.toml`` pins aiosmtplib below its next
major version.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

__all__ = ["OutOfStep", "PipeliningProtocol", "adopt", "open_connection", "pipeline", "send_command"]


class OutOfStep(aiosmtplib.SMTPResponseException):
    """The upstream answered where no answer was due (more replies than commands, a reply
    before the end of the message): nothing it says on this connection can be trusted to
    answer what we sent. The connection is closed; the client gets 451."""


_MULTILINE: dict[bytes, SMTPResponse] = {}
"""Multi-line replies parsed before, by their octets (SMTPResponse is immutable)."""
_MAX_MULTILINE = 256


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping the replies still due to a pipelined group."""

    _due: int
    """Replies the current group still waits for; bytes for them are never dropped."""
    _deadline: float
    """Loop time by which the awaited reply must have come (inf: no limit kept here)."""
    _watch: asyncio.TimerHandle | None
    """The connection's one timer for ``_deadline``: it is moved only when the deadline comes
    earlier, and re-arms itself when it finds the deadline moved later (an ``asyncio.timeout``
    per command made and cancelled a timer each time)."""

    def expect_by(self, deadline: float) -> None:
        """The reply awaited next must come by *deadline* (loop time; inf: no limit), or its
        read raises TimeoutError."""
        self._deadline = deadline
        watch = self._watch
        if deadline != math.inf and (watch is None or watch.when() > deadline):
            if watch is not None:
                watch.cancel()
            self._watch = self._loop.call_at(deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._watch = None
        if self._deadline == math.inf:
            return
        if self._loop.time() < self._deadline:
            self._watch = self._loop.call_at(self._deadline, self._deadline_reached)
            return
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            self._set_response_exception(waiter, TimeoutError())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()  # the protocol is not kept alive by its timer
            self._watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is None:
            return  # connection lost; a late callback
        if not (self._response_pending or self._due):
            return  # unsolicited: never paired with a later command (as aiosmtplib does)
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH * max(1, self._due):
            del self._buffer[:]
            if not waiter.done():
                self._set_response_exception(waiter, aiosmtplib.SMTPResponseException(
                    aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"))
            return
        self._hand_out()

    def _hand_out(self) -> None:
        """Parse the next complete reply in the buffer into the waiter, if it is free."""
        waiter = self._response_waiter
        if waiter is None or waiter.done() or not self._buffer:
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:  # a malformed reply: the reader gets aiosmtplib's exception
            self._set_response_exception(waiter, exc)
            return
        if response is not None:
            waiter.set_result(response)

    def _read_response_from_buffer(self) -> SMTPResponse | None:
        """aiosmtplib's reply parser, with a shortcut for the usual replies: lines each with a
        three-digit code and a space or hyphen, none longer than aiosmtplib allows (every reply
        to MAIL, RCPT, the message, XCLIENT, EHLO, QUIT). It gives what the parser gives for
        them (None for an unfinished reply); any other reply goes to the parser."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end == -1:
            return None
        if 4 <= end < MAX_LINE_LENGTH and buffer[3] == 0x20 and buffer[:3].isdigit():
            line = bytes(buffer[:end + 1])  # one line: the usual reply
            del buffer[:end + 1]
            return SMTPResponse(int(line[:3]), line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
        # A reply of several lines (EHLO's) is the same text on every connection to a server:
        # its parse is kept by its octets. The end of the reply is found first (the first
        # line with a space after its code); only octets that parsed before are looked up.
        last = 0
        while end != -1 and not (end - last >= 4 and buffer[last + 3] == 0x20):
            last = end + 1
            end = buffer.find(b"\n", last)
        if end != -1:
            known = _MULTILINE.get(bytes(buffer[:end + 1]))
            if known is not None:
                del buffer[:end + 1]
                return known
        end = buffer.find(b"\n")
        message = bytearray()
        start = 0
        while end != -1:
            if not (4 <= end - start < MAX_LINE_LENGTH and buffer[start + 3] in b" -"
                    and buffer[start:start + 3].isdigit()):
                return super()._read_response_from_buffer()
            if message:  # as aiosmtplib: no line break before the first non-empty text
                message += b"\n"
            message += buffer[start + 4:end + 1].strip(b" \t\r\n")
            if buffer[start + 3] == 0x20:
                code = int(buffer[start:start + 3])
                raw = bytes(buffer[:end + 1])
                del buffer[:end + 1]
                response = SMTPResponse(code, message.decode("utf-8", "surrogateescape"))
                if len(_MULTILINE) >= _MAX_MULTILINE:
                    _MULTILINE.clear()
                _MULTILINE[raw] = response
                return response
            start = end + 1
            end = buffer.find(b"\n", start)
        return None

    def unsolicited_code(self) -> int:
        """The code of the reply in the buffer that nothing asked for (-1: not a whole reply)."""
        try:
            response = self._read_response_from_buffer()
        except Exception:
            return -1
        return response.code if response is not None else -1

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109 (aiosmtplib's signature)
        self._hand_out()  # a reply that came in the same packet as the previous one
        if timeout is not None:
            return await super().read_response(timeout)
        # The caller keeps the time (pipeline(), send_data()): no wait_for and its timer per
        # reply, which cost more than the rest of reading a reply. Otherwise as aiosmtplib.
        waiter = self._response_waiter
        if waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._response_pending = True
        try:
            return await waiter
        finally:
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()


def adopt(protocol: SMTPProtocol) -> PipeliningProtocol:
    """The connection's protocol object, as a PipeliningProtocol (changed once, in place)."""
    if not isinstance(protocol, PipeliningProtocol):
        protocol.__class__ = PipeliningProtocol
        assert isinstance(protocol, PipeliningProtocol)
        protocol._due = 0
        protocol._deadline = math.inf
        protocol._watch = None
    return protocol


async def open_connection(client: aiosmtplib.SMTP, connect_timeout: float) -> SMTPResponse:
    """``client.connect(timeout=connect_timeout)`` for plain TCP to ``client.hostname:client.port``,
    on a PipeliningProtocol from the start: the same exceptions and the greeting (220), but
    no wait_for (a task) for the connect and again for the greeting, no check of every
    setting again, and no connect lock (a Connection is used by one task at a time)."""
    loop = asyncio.get_running_loop()
    host, port = client.hostname or "localhost", client.port or 25
    protocol = adopt(SMTPProtocol(loop=loop, connection_lost_callback=client._on_connection_lost))
    try:
        async with asyncio.timeout(connect_timeout):
            transport, _ = await loop.create_connection(lambda: protocol, host, port)
    except TimeoutError as exc:
        raise aiosmtplib.SMTPConnectTimeoutError(f"Timed out connecting to {host} on port {port}") from exc
    except OSError as exc:
        raise aiosmtplib.SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
    client.loop, client.protocol, client.transport = loop, protocol, transport
    try:
        protocol.expect_by(loop.time() + connect_timeout)
        response = await protocol.read_response()
    except aiosmtplib.SMTPServerDisconnected as exc:
        client.close()
        raise aiosmtplib.SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
    except TimeoutError as exc:
        client.close()
        raise aiosmtplib.SMTPConnectTimeoutError("Timed out waiting for server ready message") from exc
    except BaseException:
        client.close()
        raise
    finally:
        protocol._deadline = math.inf
    if response.code != aiosmtplib.SMTPStatus.ready:
        client.close()
        raise aiosmtplib.SMTPConnectResponseError(response.code, response.message)
    return response


async def send_command(client: aiosmtplib.SMTP, *args: bytes, reply_timeout: float) -> SMTPResponse:
    """One command (its words joined by spaces) and its reply, as ``SMTP.execute_command``
    gives it, but timed with the command's own deadline instead of a ``wait_for`` (a task)
    per reply. Raises what :func:`pipeline` raises."""
    [response] = await pipeline(client, [b" ".join(args)], reply_timeout)
    return response


async def pipeline(client: aiosmtplib.SMTP, commands: Sequence[bytes],
                   reply_timeout: float | None) -> list[SMTPResponse]:
    """Send *commands* (each without CRLF) in one write and return their replies in order.

    More than one command only for a server that offered PIPELINING, and only a group
    RFC 2920 allows: any command that must wait for its reply (EHLO, DATA, QUIT, ...) goes
    last. A group of one is an ordinary command, for any server. *reply_timeout* bounds the
    wait for each reply (None: the caller keeps the time). Raises what
    ``SMTP.execute_command`` raises; on a lost connection or a timeout the connection is
    closed, as it is out of step with the server.
    """
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    for command in commands:
        if COMMAND_INJECTION_REGEX.search(command):
            raise ValueError("Command contains a prohibited control character")
    protocol = adopt(protocol)
    assert protocol._command_lock is not None
    replies: list[SMTPResponse] = []
    try:
        async with protocol._command_lock:
            # Octets left from the last group (a server that answered more than was asked)
            # answer nothing of this one.
            del protocol._buffer[:]
            protocol._response_pending = True
            protocol._due = len(commands)
            try:
                protocol.write(b"\r\n".join(commands) + b"\r\n" if commands else b"")
                loop = protocol._loop
                for _ in commands:
                    if reply_timeout is not None:
                        protocol.expect_by(loop.time() + reply_timeout)
                    replies.append(await protocol.read_response())
                    protocol._due -= 1
                if protocol._buffer:  # more than was asked: whose answer is it?
                    raise OutOfStep(protocol.unsolicited_code(), "Server answered more than was asked")
            finally:
                protocol._due = 0
                protocol._deadline = math.inf
    except TimeoutError as exc:
        client.close()
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
    except (aiosmtplib.SMTPServerDisconnected, OutOfStep):
        client.close()
        raise
    for reply in replies:
        if reply.code == 421:
            client.close()  # the server is closing: as aiosmtplib does for one command
            break
    return replies
