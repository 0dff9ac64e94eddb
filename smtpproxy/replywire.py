"""The inbound side's replies as bytes on the wire, each made once.

Every message gets the same few replies (Sender OK, Recipient OK, 354, the greeting, the
EHLO list, the upstream's usual answers relayed): making a :class:`Reply` checks its text,
and turning one into bytes splits, formats and encodes it. The fixed ones are made here at
import, the others kept as they are first sent (bounded, as an upstream's "queued as"
replies are all different).
"""

from __future__ import annotations

import functools

from smtpproxy.disposal import LOCAL_ERROR
from smtpproxy.verdicts import Reply

__all__ = ["BYE", "OK", "RECIPIENT_OK", "SENDER_OK", "START_DATA", "WIRE", "ehlo_reply",
           "greeting", "wire"]

SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")

_MAX_SEEN = 1024


def _encode(reply: Reply, encoding: str) -> bytes:
    return "".join(f"{line}\r\n" for line in reply.lines()).encode(encoding, "replace")


WIRE = {r: _encode(r, "ascii") for r in (SENDER_OK, RECIPIENT_OK, START_DATA, OK, BYE, LOCAL_ERROR)}
"""The fixed replies' bytes, the same in ASCII and UTF-8."""

_seen: dict[str, dict[int, tuple[Reply, bytes]]] = {"ascii": {}, "utf-8": {}}
"""Per encoding, by the reply object's id: the reply and its bytes. A Reply hashes all its
fields in Python each time (a dataclass), and every reply sent was two such lookups; the
reply objects sent are mostly the same few (the constants above, the lru-cached greeting,
EHLO list and upstream replies). The entry holds the reply, so its id is not reused while
the entry lives, and a lookup checks that the object is the one kept."""


def wire(reply: Reply, encoding: str) -> bytes:
    """*reply* as CRLF-ended lines in *encoding* ("ascii" or "utf-8"; unencodable characters
    replaced)."""
    seen = _seen[encoding]
    entry = seen.get(id(reply))
    if entry is not None and entry[0] is reply:
        return entry[1]
    data = WIRE.get(reply) or _encode(reply, encoding)
    if len(seen) >= _MAX_SEEN:
        seen.clear()
    seen[id(reply)] = (reply, data)
    return data


@functools.lru_cache(maxsize=64)
def greeting(hostname: str, ident: str) -> Reply:
    """The 220 banner of a listener."""
    return Reply(220, None, f"{hostname} {ident}")


@functools.lru_cache(maxsize=256)
def ehlo_reply(lines: tuple[str, ...]) -> Reply:
    """EHLO's answer: the same few per listener (whether STARTTLS and AUTH are offered)."""
    return Reply(250, None, "\n".join(lines))
