"""Sending the message to the upstream block by block, so a big message is never copied whole.

aiosmtplib's ``SMTP.data()`` takes the message as one ``bytes`` and, before writing it,
normalises line endings, dot-stuffs and appends the terminator: three full copies next to
the original, so a 50 MB message costs 200 MB. Our messages are already CRLF-only (the
DATA reader guarantees it), so all that is left is dot-stuffing, which we do on blocks of
256 KiB cut at line ends, writing each with flow control.

To a server that offers CHUNKING (RFC 3030; Postfix does since 3.4) the message goes as one
``BDAT <size> LAST`` chunk instead, when the DATA command was not already sent (pipelined in
``rcpt_mode: at_data``): the command rides on the message's first write, so there is no
354 round trip (one write and one wait less per message) and no dot-stuffing. The octets
the upstream receives are the same as with DATA: a final line without CRLF gets one.

This uses three internals of aiosmtplib's ``SMTPProtocol`` (``write``, ``_drain_helper``
and ``_response_pending``); they are exercised by every delivery test, and
``pyproject.toml`` pins aiosmtplib below its next major version.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Iterator, Sequence

import aiosmtplib
from aiosmtplib.response import SMTPResponse

from smtpproxy.delivery.pipelining import OutOfStep, PipeliningProtocol, adopt, pipeline
from smtpproxy.message import Buffer

__all__ = ["BLOCK_SIZE", "bdat_chunk", "dot_stuffed", "send_data"]

BLOCK_SIZE = 256 * 1024
TERMINATOR = b".\r\n"


def _stuff(block: bytes) -> bytes:
    """Dot-stuff a run of whole lines (RFC 5321 4.5.2)."""
    out = block.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out[:1] == b"." else out


def dot_stuffed(parts: Iterable[Buffer], block_size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """The DATA payload of a CRLF-only message, terminator included, in blocks of whole lines.

    A final line without CRLF gets one, as the terminator must start a line. Parts are
    gathered up to *block_size* before a block is yielded, and the terminator rides on the
    last: a small message goes out in one write, also when a plugin's header edit split it
    into parts (head, separator, body). Each write is a system call and, on loopback, a
    wake-up of the upstream.
    """
    carry = b""
    pending: list[bytes] = []  # stuffed lines not yet yielded, fewer than block_size octets
    size = 0
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), block_size):
            block = carry + view[start : start + block_size]
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # no line end yet: keep collecting
                carry = block
                continue
            carry = block[cut:]
            if size >= block_size:
                yield b"".join(pending)
                pending, size = [], 0
            stuffed = _stuff(block[:cut])
            pending.append(stuffed)
            size += len(stuffed)
    pending.append(_stuff(carry) + b"\r\n" + TERMINATOR if carry else TERMINATOR)
    yield b"".join(pending)


def bdat_chunk(parts: Sequence[Buffer], block_size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """``BDAT <size> LAST`` and the message as one chunk (RFC 3030), in blocks of at most
    *block_size* after the first; the command rides on the first block, so a small message
    goes out in one write. A final line without CRLF gets one, as with DATA."""
    parts = [part for part in parts if len(part)]
    ends_with_crlf = not parts or b"".join(bytes(part[-2:]) for part in parts[-2:])[-2:] == b"\r\n"
    tail = b"" if ends_with_crlf else b"\r\n"
    size = sum(len(part) for part in parts) + len(tail)
    command = b"BDAT %d LAST\r\n" % size
    if size <= block_size:
        yield b"".join([command, *parts, tail])
        return
    first = True
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), block_size):
            block = view[start : start + block_size]
            if first:
                yield command + block
                first = False
            else:
                yield bytes(block)
    if tail:
        yield tail


async def send_data(client: aiosmtplib.SMTP, parts: Iterable[Buffer], limit: float,
                    *, started: bool = False, chunking: bool = False) -> SMTPResponse:
    """DATA, the message, and the upstream's final reply, all within ``limit`` seconds.

    *started*: DATA was sent already (pipelined) and answered 354; only the message follows.
    *chunking*: the upstream offered CHUNKING; unless *started*, the message goes as
    ``BDAT <size> LAST`` with the command in its first write (no 354 to wait for).

    Raises what ``SMTP.data()`` raises: SMTPDataError for a refusal (DATA's, or the final reply),
    SMTPTimeoutError, SMTPServerDisconnected; and OutOfStep for a reply where none was due
    (before the end of the message, or a second one after it). The connection is closed
    whenever the message was not answered exactly once, at its end.
    """
    if client.protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    protocol = adopt(client.protocol)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    try:
        bdat = chunking and not started
        if not started and not bdat:
            # A group of one, within what is left of our time limit
            [start] = await pipeline(client, [b"DATA"], max(deadline - loop.time(), 0))
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
        blocks = bdat_chunk(tuple(parts)) if bdat else dot_stuffed(parts)
        # The limit as the connection's reply deadline: every wait below is for the reply
        # (alone, or with the drain), which then ends in TimeoutError; no timer of its own.
        protocol.expect_by(deadline)
        # A reply before the terminator was written answers nothing we sent: the upstream
        # is out of step (a "250 queued" there is for a message it has not seen).
        protocol._response_pending = True
        waiter = protocol._response_waiter
        for block in blocks:
            if protocol._buffer or waiter is None or waiter.done():
                raise _early(client, await protocol.read_response(timeout=None))
            protocol.write(block)
            if protocol._paused and not await _drained_unless_answered(protocol, waiter):
                raise _early(client, await protocol.read_response(timeout=None))
        response = await protocol.read_response(timeout=None)
        if protocol._buffer:  # a second answer to one message: which one was it?
            raise OutOfStep(protocol.unsolicited_code(), "Server answered the message twice")
    except (TimeoutError, aiosmtplib.SMTPReadTimeoutError) as exc:
        client.close()
        raise aiosmtplib.SMTPTimeoutError(f"Timed out sending the message after {limit:g}s") from exc
    except ConnectionError as exc:
        client.close()
        raise aiosmtplib.SMTPServerDisconnected(f"Connection lost while sending the message: {exc}") from exc
    except OutOfStep:
        client.close()
        raise
    finally:
        protocol._deadline = math.inf
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _drained_unless_answered(protocol: PipeliningProtocol, reply: asyncio.Future[SMTPResponse]) -> bool:
    """Wait until the upstream takes more of the message; False if it answered meanwhile
    (it stopped reading to say so: waiting for the drain would wait for the time limit)."""
    drain = asyncio.ensure_future(protocol._drain_helper())
    await asyncio.wait((drain, reply), return_when=asyncio.FIRST_COMPLETED)
    if drain.done():
        drain.result()  # a lost connection raises here
        return not reply.done()
    drain.cancel()
    return False


def _early(client: aiosmtplib.SMTP, response: SMTPResponse) -> aiosmtplib.SMTPResponseException:
    """A reply that came before the end of the message. A refusal (a 552 when the size limit
    is passed) is the upstream's answer to the message, relayed; anything else is out of
    step. Either way the connection is closed: the rest of the message was never sent."""
    client.close()
    if response.code >= 400:
        return aiosmtplib.SMTPDataError(response.code, response.message)
    return OutOfStep(response.code, "Server answered before the end of the message")
