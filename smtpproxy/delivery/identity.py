"""How the original client is told to the upstream: XCLIENT and XFORWARD attributes.

Postfix takes ``NAME=value`` pairs whose values are RFC 3461 xtext, for the attributes its
EHLO offered. The encoding is kept apart from the connections (upstream.py), which send
it once per connection (XCLIENT) or per message (XFORWARD) and cache it by
:func:`identity_key`.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from smtpproxy.session import Session

__all__ = ["MAX_HELO", "helo_octets", "helo_value", "identity_key", "xclient_attributes",
           "xforward_attributes", "xtext"]


def xtext(value: str) -> str:
    """RFC 3461 xtext, the encoding XCLIENT and XFORWARD attribute values use.

    Encodes the value's octets: UTF-8, and octets that were not valid UTF-8 (kept as
    surrogate escapes by the inbound side) exactly as the client sent them.
    """
    if _XTEXT_PLAIN.fullmatch(value):
        return value  # nothing to encode: the usual address, port or host name
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8", "surrogateescape")
    )


_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*")
"""Printable ASCII without '+' and '=': xtext as it is."""


MAX_HELO = 255
"""Postfix refuses a longer XCLIENT/XFORWARD HELO= (501, VALID_HOSTNAME_LEN)."""


def helo_octets(helo: str) -> bytes:
    """The client's HELO argument as it came over the wire (no CR, LF or controls: the
    inbound command reader refused those)."""
    return helo.encode("utf-8", "surrogateescape")


def identity_key(command: bytes, session: Session, offered: frozenset[str]) -> tuple[object, ...]:
    """What the *command* (XCLIENT or XFORWARD) attributes *offered* encode for *session*: the
    values of only those attributes. A server that is not offered the client's port (smtp-sink,
    an older Postfix) gets the same identity for every connection from one client, so the
    encoded attributes are made once, not per message."""
    client = session.client
    return (command, offered,
            client.ip if "ADDR" in offered else None,
            client.port if "PORT" in offered else None,
            client.hostname if "NAME" in offered else None,
            session.helo if "HELO" in offered else None,
            session.esmtp if "PROTO" in offered else None,
            session.auth_user if "LOGIN" in offered else None,
            session.local_ip if "DESTADDR" in offered else None,
            session.local_port if "DESTPORT" in offered else None)


def _addr(ip: str) -> str:
    return f"IPV6:{ip}" if ":" in ip else ip


def _client_attributes(session: Session, offered: Collection[str]) -> list[str]:
    """``NAME=xtext`` for what XCLIENT and XFORWARD both say about the original client, in
    this order, for the attributes the server offers."""
    client = session.client
    attributes = []
    if "ADDR" in offered and client.ip:
        attributes.append("ADDR=" + xtext(_addr(client.ip)))
    if "PORT" in offered:
        attributes.append(f"PORT={client.port}")
    if "NAME" in offered:
        attributes.append("NAME=" + xtext(client.hostname or "[UNAVAILABLE]"))
    if "HELO" in offered:
        attributes.append("HELO=" + xtext(helo_value(session.helo)))
    if "PROTO" in offered:
        attributes.append("PROTO=ESMTP" if session.esmtp else "PROTO=SMTP")
    return attributes


def helo_value(helo: str | None) -> str:
    """HELO= for XCLIENT/XFORWARD: the client's argument (xtext-encoded), or
    ``[UNAVAILABLE]`` when there is none or it is longer than the upstream accepts."""
    if not helo or len(helo_octets(helo)) > MAX_HELO:
        return "[UNAVAILABLE]"
    return helo


def xclient_attributes(session: Session, offered: frozenset[str]) -> list[str]:
    attributes = _client_attributes(session, offered)
    if "LOGIN" in offered:
        attributes.append("LOGIN=" + xtext(session.auth_user or "[UNAVAILABLE]"))
    if "DESTADDR" in offered and session.local_ip:
        attributes.append("DESTADDR=" + xtext(_addr(session.local_ip)))
    if "DESTPORT" in offered and session.local_port:
        attributes.append(f"DESTPORT={session.local_port}")
    return attributes


def xforward_attributes(session: Session, offered: frozenset[str]) -> list[str]:
    attributes = _client_attributes(session, offered)
    if "SOURCE" in offered:
        attributes.append("SOURCE=REMOTE")
    return attributes
