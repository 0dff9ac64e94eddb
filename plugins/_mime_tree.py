"""A bounded walk over a message's MIME tree that knows where every part lies in the bytes.

The stdlib parser builds the whole tree recursively and cannot be stopped half way; a message
of 10,000 parts, or message/rfc822 nested a thousand deep, costs it memory and a
RecursionError. This walk is iterative, counts parts and depth as it goes, checks a deadline
between parts and stops at the first limit with a :class:`TooComplex` problem, and never
raises for anything the input contains. Each leaf part comes with its byte span in the
message (when it lies in the message as sent, not inside a decoded part), which is what lets
the ``attachments`` plugin replace one part while every other byte stays as it was.

Delimiters follow RFC 2046 section 5.1.1: a line that is ``--`` boundary, optionally followed
by whitespace, the CRLF before it belonging to the delimiter; ``--`` boundary ``--`` closes.
What clients tolerate but the RFC forbids (no closing delimiter, a boundary reused by a nested
multipart, junk in base64) is walked the lenient way clients do and reported as malformed.
"""

from __future__ import annotations

import binascii
import re
import threading
import time
from dataclasses import dataclass, field
from email.message import Message as HeaderBlock
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["Limits", "Part", "ScanTimeout", "Walk", "walk"]

CRLF = b"\r\n"
#: A part's header block is looked for this far; more is no header block any client shows.
MAX_HEADER_BLOCK = 256 * 1024
_SINGLE = ("content-type", "content-transfer-encoding", "content-disposition")
_B64_TEXT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "
_HEADERS = BytesHeaderParser(policy=compat32)


class ScanTimeout(Exception):
    """The scan ran out of time (or was told to stop) at one of its checkpoints."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_parts: int = 1000
    max_depth: int = 20
    max_decoded: int = 64 * 1024 * 1024
    deadline: float = float("inf")  # time.monotonic() value
    stop: threading.Event | None = None

    def check_time(self) -> None:
        if time.monotonic() > self.deadline or (self.stop is not None and self.stop.is_set()):
            raise ScanTimeout


@dataclass(slots=True)
class Part:
    """One leaf part: its headers, decoded content and, if it has one, its span in the message."""

    number: str  # "1.2.1": MIME part numbering; "" for a single-part message
    headers: HeaderBlock
    content_type: str  # lower-cased type/subtype (text/plain when absent or invalid)
    payload: bytes  # the decoded body
    span: tuple[int, int] | None  # [start, end) of headers+body in the message; None if not there
    depth: int

    @property
    def disposition(self) -> str:
        value = self.headers.get("content-disposition", "")
        return str(value).split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class Walk:
    parts: list[Part] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # what clients tolerate, RFCs forbid
    too_complex: str | None = None  # the limit that stopped the walk


@dataclass(slots=True)
class _Entity:
    data: bytes
    start: int
    end: int
    depth: int
    number: str
    original: bool  # data is the message itself, so offsets are message offsets
    boundaries: tuple[bytes, ...]  # of the enclosing multiparts


def _split_headers(data: bytes, start: int, end: int) -> tuple[bytes, int, bool]:
    """The header block of the entity at [start, end), where its body starts, and whether
    the block was cut at :data:`MAX_HEADER_BLOCK` (then the rest is taken as body)."""
    if data.startswith(CRLF, start):
        return b"", start + 2, False
    limit = min(end, start + MAX_HEADER_BLOCK)
    blank = data.find(b"\r\n\r\n", start, limit)
    if blank != -1:
        return data[start : blank + 2], blank + 4, False
    if limit == end:
        return data[start:end], end, False
    cut = data.rfind(CRLF, start, limit)
    cut = limit if cut == -1 else cut + 2
    return data[start:cut], cut, True


def _content_type(headers: HeaderBlock) -> str:
    value = headers.get_content_type()  # compat32 falls back to text/plain for nonsense
    return value.lower()


@dataclass(slots=True)
class _Split:
    parts: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each body part
    closed: bool = False
    lookalike: bool = False  # a line starting with the delimiter that is not one


def _delimiters(data: bytes, start: int, end: int, boundary: bytes) -> _Split:
    """The body parts between delimiter lines, whether the multipart was closed, and whether
    a line only looked like a delimiter (``--boundaryX``: some clients split there, RFC 2046
    does not)."""
    dash = b"--" + boundary
    split = _Split()
    part_start: int | None = None
    pos = start
    while True:
        at = data.find(dash, pos, end)
        if at == -1:
            break
        pos = at + len(dash)
        if at != start and data[at - 2 : at] != CRLF:
            continue  # not at the start of a line
        eol = data.find(CRLF, pos, end)
        rest = data[pos : end if eol == -1 else eol]
        closing = rest.startswith(b"--")
        if not closing and rest.strip(b" \t"):
            split.lookalike = True
            continue
        if part_start is not None:
            split.parts.append((part_start, max(part_start, at - 2 if at != start else at)))
        if closing:
            split.closed = True
            return split
        part_start = end if eol == -1 else eol + 2
    if part_start is not None:
        split.parts.append((part_start, end))
    return split


def _decode(headers: HeaderBlock, body: bytes, walk: Walk, number: str) -> bytes:
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        if body.translate(None, _B64_TEXT):  # anything left is junk (C speed, unlike a regex)
            walk.malformed.append(f"part {number or 'body'}: junk in base64")
        try:
            return binascii.a2b_base64(body)
        except binascii.Error:
            compact = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
            compact = compact[: len(compact) - len(compact) % 4]
            walk.malformed.append(f"part {number or 'body'}: base64 that does not decode")
            try:
                return binascii.a2b_base64(compact)
            except binascii.Error:
                return b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte in ("x-uuencode", "uuencode", "x-uue"):  # not in RFC 2045, yet decoded by some clients
        return _uudecode(body, walk, number)
    return body


def _uudecode(body: bytes, walk: Walk, number: str) -> bytes:
    """The lines between ``begin`` and ``end``, as uudecode reads them."""
    out: list[bytes] = []
    inside = False
    for line in body.split(CRLF):
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`"):
            if line.strip() == b"end":
                break
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            walk.malformed.append(f"part {number or 'body'}: uuencoded line that does not decode")
            break
    return b"".join(out)


def _estimate(headers: HeaderBlock, size: int) -> int:
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    return size * 3 // 4 if cte == "base64" else size


def walk(message: bytes, limits: Limits) -> Walk:
    """Every leaf part of ``message`` within ``limits``; raises only :class:`ScanTimeout`."""
    result = Walk()
    stack = [_Entity(message, 0, len(message), 0, "", True, ())]
    count = 0
    decoded = 0
    while stack:
        limits.check_time()
        entity = stack.pop()
        count += 1
        if count > limits.max_parts:
            result.too_complex = f"more than {limits.max_parts} MIME parts"
            return result
        if entity.depth > limits.max_depth:
            result.too_complex = f"MIME parts nested more than {limits.max_depth} deep"
            return result
        data = entity.data
        where = f"part {entity.number or 'body'}"
        raw_headers, body_start, cut = _split_headers(data, entity.start, entity.end)
        headers = _HEADERS.parsebytes(raw_headers)
        ctype = _content_type(headers)
        if cut:
            result.malformed.append(f"{where}: header block over {MAX_HEADER_BLOCK} bytes")
        if headers.defects:
            result.malformed.append(f"{where}: bad header block")
        for name in _SINGLE:  # clients disagree on which of two wins
            if len(headers.get_all(name, ())) > 1:
                result.malformed.append(f"{where}: more than one {name} field")
        if ctype.startswith("multipart/"):
            boundary = _boundary(headers)
            if boundary is None:
                result.malformed.append(f"{where}: multipart without a boundary")
                # Clients show such a part as text or not at all; check its bytes as one part.
            elif boundary in entity.boundaries:
                result.malformed.append(
                    f"{where}: nested multipart reuses its parent's boundary"
                )
            if boundary is not None:
                split = _delimiters(data, body_start, entity.end, boundary)
                children = split.parts
                if split.lookalike:
                    result.malformed.append(f"{where}: a line starts with the boundary but is no delimiter")
                if not children:
                    result.malformed.append(
                        f"{where}: boundary never appears in the multipart"
                    )
                else:
                    if not split.closed:
                        result.malformed.append(f"{where}: multipart not closed")
                    prefix = f"{entity.number}." if entity.number else ""
                    for index in range(len(children), 0, -1):  # stack: first child popped first
                        start, end = children[index - 1]
                        stack.append(_Entity(data, start, end, entity.depth + 1, f"{prefix}{index}",
                                             entity.original, (*entity.boundaries, boundary)))
                    continue
        body = data[body_start : entity.end]
        decoded += _estimate(headers, len(body))
        if decoded > limits.max_decoded:
            result.too_complex = f"more than {limits.max_decoded} bytes of decoded content"
            return result
        payload = _decode(headers, body, result, entity.number)
        span = (entity.start, entity.end) if entity.original else None
        if ctype == "message/partial":  # reassembled by some clients: no fragment shows the whole
            result.malformed.append(f"{where}: message/partial fragment")
        if ctype in ("message/rfc822", "message/global"):
            original = entity.original and payload is body
            inner = payload if not original else data
            start, end = (body_start, entity.end) if original else (0, len(payload))
            number = f"{entity.number}.1" if entity.number else "1"
            stack.append(_Entity(inner, start, end, entity.depth + 1, number, original, entity.boundaries))
            continue
        result.parts.append(Part(entity.number, headers, ctype, payload, span, entity.depth))
    return result


def _boundary(headers: HeaderBlock) -> bytes | None:
    try:
        value = headers.get_boundary()
    except (ValueError, IndexError, TypeError, LookupError):
        return None
    if not value:
        return None
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        return value.encode("utf-8", errors="replace")
