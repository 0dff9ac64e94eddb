"""Postfix's policy delegation protocol (SMTPD_POLICY_README), apart from any policy.

A request is ``name=value`` lines, each ended by LF, then an empty line; the answer is one
``action=...`` line and an empty line. One connection carries many requests. Everything a
client sends is bounded here (line length, attribute count, request size): beyond a limit
:class:`PolicyProtocolError` says which, and the server closes the connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["Limits", "PolicyProtocolError", "format_action", "parse_request", "read_request"]


class PolicyProtocolError(Exception):
    """The client broke the protocol or a limit; the connection is closed."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = 4096
    """Longest ``name=value`` line (bytes, without LF). Postfix's own values are far shorter."""
    max_attributes: int = 100
    """Most lines in one request (Postfix 3.x sends about 35)."""
    max_request: int = 65536
    """Most bytes in one request."""


def parse_request(lines: list[bytes], limits: Limits = Limits()) -> dict[str, str]:
    """The attributes of one request (its lines without LF, the empty line excluded).

    A name given twice keeps its last value (Postfix never does that); a line without ``=``
    is an error; a CR before the LF is tolerated. Values are UTF-8 (SMTPUTF8 addresses),
    anything else is kept with surrogate escapes.
    """
    if len(lines) > limits.max_attributes:
        raise PolicyProtocolError(f"more than {limits.max_attributes} attributes in one request")
    attributes: dict[str, str] = {}
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if len(line) > limits.max_line:
            raise PolicyProtocolError(f"attribute line longer than {limits.max_line} bytes")
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            raise PolicyProtocolError(f"not a name=value line: {line[:60]!r}")
        text = name.decode("ascii", "replace")
        if not text.replace("_", "").replace("-", "").isalnum():
            raise PolicyProtocolError(f"bad attribute name: {line[:60]!r}")
        attributes[text] = value.decode("utf-8", "surrogateescape")
    return attributes


async def read_request(reader: asyncio.StreamReader, limits: Limits = Limits()) -> dict[str, str] | None:
    """The next request, or None at a clean end of stream between requests.

    Raises :class:`PolicyProtocolError` for a limit broken or a stream that ends inside a
    request (the client went away mid-request).
    """
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise PolicyProtocolError(f"attribute line longer than {limits.max_line} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if not lines and not exc.partial:
                return None
            raise PolicyProtocolError("connection closed inside a request") from None
        size += len(line)
        if size > limits.max_request:
            raise PolicyProtocolError(f"request larger than {limits.max_request} bytes")
        line = line[:-1]
        if line in (b"", b"\r"):
            return parse_request(lines, limits)
        if len(line) > limits.max_line + 1:
            raise PolicyProtocolError(f"attribute line longer than {limits.max_line} bytes")
        lines.append(line)
        if len(lines) > limits.max_attributes:
            raise PolicyProtocolError(f"more than {limits.max_attributes} attributes in one request")


def format_action(action: str) -> bytes:
    """The answer to one request: ``action=...`` and the empty line (one line, no controls)."""
    text = "".join(c if c.isprintable() else " " for c in action)
    return f"action={text}\n\n".encode("utf-8", "surrogateescape")
