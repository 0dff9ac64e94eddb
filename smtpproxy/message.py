"""The message as plugins see it at the DATA phase.

:class:`Message` wraps the exact bytes received from the client and lets
plugins read and edit header fields and replace the body, with two
guarantees the rest of the proxy depends on:

* **Lossless.**  Header fields a plugin did not touch are re-emitted
  byte-for-byte (original folding and odd whitespace included), and so is
  an untouched body, because DKIM signatures and other integrity checks
  covering them must still verify downstream.
* **Lazy.**  Nothing is parsed until a plugin asks for header information,
  and the body is never scanned or copied just to forward it: an
  unmodified message serialises to the very ``bytes`` object it was built
  from.  A big message arrives as a read-only memory map of its spool file
  (:mod:`smtpproxy.spool`); it is parsed in place, and :meth:`Message.parts`
  streams it out without ever holding a second copy.

Every write is validated so that a plugin can never put a bare CR or LF,
a NUL or another control character on the wire; the serialisation always
keeps the "CRLF line endings only" invariant the SMTP layer relies on to
prevent header and message smuggling.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as _default_policy
from typing import Literal, NamedTuple

__all__ = ["MAILBOX_LINE", "POSTFIX_LINE_LIMIT", "Change", "HeaderError", "Message", "received_message",
           "validate_header"]

CRLF = b"\r\n"
_WSP = b" \t"

#: RFC 5322 section 2.1.1: lines must not exceed 998 octets excluding CRLF.
MAX_LINE_OCTETS = 998
#: Longest field name accepted from plugins; keeps "Name: " well inside a line.
MAX_NAME_LENGTH = 76

# A header field line as Postfix's is_header() sees one: a name of printable ASCII except ":",
# then optional SP/HTAB (RFC 5322 section 4.5 obsolete syntax), then ":". Group 1 is the name.
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
#: Postfix's ``line_length_limit`` default: smtpd hands cleanup a longer line in pieces of this
#: many octets, and is_header() sees only the first one, so a name and colon not inside it do
#: not make a header field.
POSTFIX_LINE_LIMIT = 2048
#: The field name Postfix's smtpd puts before a first line that starts with ``From `` (after
#: any ``>``), turning an mbox separator line into a header field (smtpd.c receive_data_message()).
MAILBOX_LINE = "X-Mailbox-Line"
_MBOX_FROM = re.compile(rb">*From ")
# A whole field: a field line (group 1 the name, group 2 up to the colon), then its continuation
# lines; every line CRLF-terminated (a message has no bare CR or LF, so [^\r\n]* runs to CRLF).
_WHOLE_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)([ \t]*:)[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
_MBOX_FIRST_LINE = re.compile(rb">*From [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
_VALID_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# C0 controls except HTAB, DEL and C1 controls (Unicode category Cc minus HTAB).
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_NON_WSP = re.compile(rb"[^ \t]")
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")

Buffer = bytes | memoryview | mmap.mmap
"""What :meth:`Message.parts` yields: byte buffers to write out, in order, without copying."""


class HeaderError(ValueError):
    """A header name or value a plugin tried to write is not safe to put on the wire."""


@dataclass(frozen=True, slots=True)
class Change:
    """One modification, recorded in order so a dry-run tracer can show what would change."""

    op: Literal["add", "remove", "replace", "replace_body"]
    name: str | None  # header name (None for replace_body)
    value: str | None  # new value for add/replace, None otherwise


@dataclass(frozen=True, slots=True)
class _Savepoint:
    """A message's edit state at one moment (the chain undoes a shadowed plugin's edits)."""

    fields: list[_Field] | None
    headers_dirty: bool
    body: bytes | None
    sep: bytes
    changes: int
    raw: bytes | None
    email: EmailMessage | None


class _Field(NamedTuple):
    """One header field: its exact wire bytes plus the decoded view plugins read.

    A named tuple, not a frozen dataclass: every field of every message is built as one, and
    a frozen dataclass's ``__init__`` (``object.__setattr__`` per attribute) cost twice as much."""

    name: str  # as written
    key: str  # lower-cased name, for case-insensitive lookups
    value: str  # unfolded, stripped, decoded for display
    raw: bytes  # the whole field including folds and the final CRLF
    prefix: bytes = b""  # what Postfix puts before raw (an mbox "From " line: X-Mailbox-Line)

    @property
    def wire(self) -> bytes:
        """The field as re-emitted once the header block was edited."""
        return self.prefix + self.raw


def _field_from_raw(raw: bytes, name_end: int, colon: int) -> _Field:
    """Build a field from its wire bytes: the name is ``raw[:name_end]``, ``colon`` the index
    of its colon (after any obsolete whitespace)."""
    name = raw[:name_end].decode("ascii")
    # Within a field every CRLF is either a fold (followed by WSP) or the
    # terminator, so dropping all of them is exactly RFC 5322 unfolding.
    value = raw[colon + 1 :].replace(CRLF, b"").strip(_WSP)
    return _Field(name, name.lower(), value.decode("utf-8", errors="replace"), raw)


_new_field = tuple.__new__
"""``_Field(...)`` without the named tuple's Python-level ``__new__`` (all five values given)."""


def _mailbox_line(raw: bytes) -> _Field:
    """An mbox ``From `` first line, as the field Postfix makes of it (see :class:`Message`)."""
    value = raw.replace(CRLF, b"").strip(_WSP)
    return _Field(MAILBOX_LINE, MAILBOX_LINE.lower(), value.decode("utf-8", errors="replace"), raw,
                  MAILBOX_LINE.encode("ascii") + b": ")


def _key(name: str) -> str | None:
    """Case-fold a lookup name; non-ASCII never matches (avoids e.g. KELVIN SIGN == 'k')."""
    return name.lower() if name.isascii() else None


def received_message(raw: bytes | mmap.mmap) -> Message:
    """A :class:`Message` of what :class:`~smtpproxy.datareader.DataReader` took in, without
    :class:`Message`'s check for bare CR or LF: the reader checked every line as it came
    (tests/unit/test_datareader.py), and the check is three more passes over the message, or
    a regular expression over a spooled one: about a second of CPU per 50 MB, on the loop."""
    message = Message.__new__(Message)
    message._wrap(raw)
    return message


def _check_crlf_only(data: bytes, what: str) -> None:
    """Raise ValueError unless every CR and LF in ``data`` is part of a CRLF pair."""
    cr = data.count(b"\r")
    lf = data.count(b"\n")
    # Each CRLF accounts for one CR and one LF, so the counts agree iff none is bare.
    if cr != lf or cr != data.count(CRLF):
        raise ValueError(f"{what} contains a bare CR or LF; only CRLF line endings are allowed")


def _validate_name(name: str) -> None:
    """Refuse names that are not RFC 5322 ftext, so a name cannot smuggle anything."""
    if not isinstance(name, str):
        raise TypeError(f"header name must be str, not {type(name).__name__}")
    if not name:
        raise HeaderError("header name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise HeaderError(f"header name is longer than {MAX_NAME_LENGTH} characters: {name!r}")
    if not _VALID_NAME.fullmatch(name):
        raise HeaderError(
            "header name may only contain printable ASCII other than ':' "
            f"(no spaces, colons, controls or non-ASCII): {name!r}"
        )


def _validate_value(name: str, value: str) -> bytes:
    """Refuse values that could fold, break or inject lines; return them UTF-8 encoded."""
    if not isinstance(value, str):
        raise TypeError(f"header value must be str, not {type(value).__name__}")
    bad = _BAD_VALUE_CHAR.search(value)
    if bad is not None:
        raise HeaderError(
            f"value of header {name!r} contains control character {bad.group()!r} at "
            f"position {bad.start()}; CR, LF, NUL and other controls (except TAB) are not "
            "allowed, and folding is done by Message itself"
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HeaderError(
            f"value of header {name!r} is not encodable as UTF-8 ({exc.reason})"
        ) from None


def validate_header(name: str, value: str = "") -> None:
    """Raise :class:`HeaderError` unless ``add_header(name, value)`` would accept them.

    For plugins that check header names and templates in their settings at load time.
    """
    _validate_name(name)
    _validate_value(name, value)


def _fold(line: bytes, first_min: int) -> bytes:
    """Fold a generated field line (without CRLF) at whitespace so lines fit in 998 octets.

    Each fold inserts CRLF before an existing SP/HTAB, so unfolding gives back
    ``line`` exactly.  No line is made whitespace-only, and the first line
    keeps at least ``first_min`` octets (the name, colon and start of the
    value).  A run of more than 998 octets without whitespace cannot be
    folded and is left over-long.
    """
    if len(line) <= MAX_LINE_OCTETS:
        return line + CRLF
    parts: list[bytes] = []
    start = 0
    while len(line) - start > MAX_LINE_OCTETS:
        first = _NON_WSP.search(line, start)
        if first is None:  # only whitespace left; cannot fold without a blank line
            break
        earliest = first.start() + 1  # the line must keep at least one non-WSP octet
        if start == 0:
            earliest = max(earliest, first_min)
        limit = start + MAX_LINE_OCTETS  # fold point p leaves line[start:p], p - start <= 998
        fold = max(line.rfind(b" ", earliest, limit + 1), line.rfind(b"\t", earliest, limit + 1))
        if fold == -1:  # no whitespace early enough: fold at the first opportunity
            after = max(earliest, limit + 1)
            candidates = [p for p in (line.find(b" ", after), line.find(b"\t", after)) if p != -1]
            if not candidates:
                break
            fold = min(candidates)
        parts.append(line[start:fold])
        start = fold
    parts.append(line[start:])
    return CRLF.join(parts) + CRLF


def _make_field(name: str, value: str) -> _Field:
    """Validate and generate a new field; leading/trailing SP/HTAB of the value are dropped."""
    _validate_name(name)
    encoded = _validate_value(name, value).strip(_WSP)
    prefix = name.encode("ascii") + b":"
    # The first line keeps "Name: " and the value's first octet: no empty-looking first line.
    raw = _fold(prefix + b" " + encoded, len(prefix) + 2) if encoded else prefix + CRLF
    return _Field(name, name.lower(), encoded.decode("utf-8"), raw)


class Message:
    """A received message: exact bytes, lazily parsed headers, validated edits.

    The input must use CRLF line endings only (the SMTP layer guarantees it)
    and every edit keeps it that way.  Where the header block ends and what
    each field is are decided exactly as Postfix decides them, so that plugins
    and the MTA behind never disagree (a field Postfix delivers is a field
    every plugin sees):

    * A field line is a name of printable ASCII other than ``:`` (no space,
      control or 8-bit octet), optional SP/HTAB, then ``:`` -- Postfix
      ``src/global/is_header.c`` ``is_header_buf()``, which accepts the
      obsolete ``Name : value`` of RFC 5322 section 4.5.  The name is the
      part before the whitespace; the bytes stay as received.
    * A line starting with SP/HTAB continues the field above
      (``src/global/mime_state.c`` ``mime_state_update()``, primary header
      state); as the first line it continues nothing and starts the body,
      as ``src/smtpd/smtpd.c`` ``smtpd_data()`` arranges by inserting an
      empty record before it.
    * The header block ends at the first empty line, or just before the
      first other line (that line and everything after it is the body, with
      no separator line; Postfix inserts an empty line there).  A final line
      without CRLF is never part of the header block.
    * A first line starting with ``From `` (after any ``>``), an mbox
      separator, is a field named ``X-Mailbox-Line`` whose value is the
      whole line: ``src/smtpd/smtpd.c`` ``receive_data_message()`` writes
      ``X-Mailbox-Line: `` before it (Postfix 3.7.11 as tested does too).
      The bytes are forwarded unchanged while the header block is; once it
      is edited, the field is written out with that prefix, so that a field
      prepended above it cannot turn ``From : x`` into a From field behind.
    * smtpd hands cleanup lines longer than ``line_length_limit`` (2048) in
      pieces and is_header_buf() sees only the first piece, so a line whose
      name and colon do not lie within its first :data:`POSTFIX_LINE_LIMIT`
      octets is not a field line.

    ``tests/postfix/test_postfix_headers.py`` checks this against a real Postfix
    over a generated corpus of odd header lines.
    """

    __slots__ = (
        "_body_cache",
        "_body_start",
        "_changes",
        "_email",
        "_fields",
        "_header_end",
        "_headers_dirty",
        "_orig",
        "_raw_cache",
        "_received",
        "_sep",
    )

    def __init__(self, raw: bytes | mmap.mmap) -> None:
        """Wrap ``raw`` (after dot-unstuffing) without parsing it.

        A (read-only) :class:`mmap.mmap` is used in place: it is how spooled big messages
        arrive, and copying it would defeat the spool.
        """
        if isinstance(raw, mmap.mmap):
            if _BARE_CR_OR_LF.search(raw):
                raise ValueError("message contains a bare CR or LF; only CRLF line endings are allowed")
        else:
            raw = bytes(raw)  # no copy for bytes; freezes bytearray/memoryview input
            _check_crlf_only(raw, "message")
        self._wrap(raw)

    def _wrap(self, raw: bytes | mmap.mmap) -> None:
        self._orig: bytes | mmap.mmap = raw
        self._raw_cache: bytes | None = None
        self._fields: list[_Field] | None = None
        self._received: tuple[_Field, ...] = ()  # the fields as parsed, whatever edits follow
        self._header_end = 0  # end of the original header fields
        self._sep = b""  # the original blank separator line, if any
        self._body_start = 0  # start of the original body
        self._headers_dirty = False
        self._body_cache: bytes | None = None
        self._changes: list[Change] = []
        self._email: EmailMessage | None = None

    def __repr__(self) -> str:
        return f"<Message size={self.size} modified={self.modified}>"

    # -- parsing ---------------------------------------------------------

    def _parse(self) -> list[_Field]:
        """Split the original header block into fields, once, on first use.

        One match of :data:`_WHOLE_FIELD` per field (its first line and its continuation
        lines), rather than a search and a match per line: the rules of :class:`Message`,
        line by line, as ``_parse_by_line`` (kept for the tests) applies them."""
        if self._fields is not None:
            return self._fields
        raw = self._orig
        fields: list[_Field] = []
        pos = 0
        first = _MBOX_FIRST_LINE.match(raw)
        if first is not None:  # an mbox "From " first line, with its continuation lines
            pos = first.end()
            fields.append(_mailbox_line(raw[:pos]))
        match = _WHOLE_FIELD.match
        while True:
            found = match(raw, pos)
            if found is None or found.end(2) - pos > POSTFIX_LINE_LIMIT:
                break  # not a field line (or its colon lies past what Postfix looks at)
            end = found.end()
            # _field_from_raw(raw[pos:end], ...), inline: once per field of every message
            name = found.group(1).decode("ascii")
            value = raw[found.end(2) : end].replace(CRLF, b"").strip(_WSP).decode("utf-8", "replace")
            fields.append(_new_field(_Field, (name, name.lower(), value, raw[pos:end], b"")))
            pos = end
        sep = CRLF if raw[pos : pos + 2] == CRLF else b""
        self._header_end = pos
        self._sep = sep
        self._body_start = pos + len(sep)
        self._fields = fields
        self._received = tuple(fields)
        return fields

    def _parse_by_line(self) -> tuple[list[_Field], int, bytes]:
        """The header block line by line, as Postfix reads it: (fields, end, separator).
        What :meth:`_parse` computes faster; the tests compare the two."""
        raw = self._orig
        fields: list[_Field] = []
        field_start = -1  # start of the field being collected, -1 if none
        colon = 0  # colon offset of that field, relative to its start
        name_end = 0  # end of its name (before obsolete whitespace), relative to its start
        mbox = False  # the field being collected is an mbox "From " first line
        pos = 0
        sep = b""

        def collected(end: int) -> _Field:
            chunk = raw[field_start:end]
            return _mailbox_line(chunk) if mbox else _field_from_raw(chunk, name_end, colon)

        while True:
            eol = raw.find(CRLF, pos)
            if eol == -1:  # end of data, or an unterminated final line (body)
                break
            if eol == pos:  # empty line: the separator
                sep = CRLF
                break
            first = raw[pos : pos + 1]
            if first in (b" ", b"\t"):
                if field_start == -1:  # continuation with nothing to continue
                    break
            elif pos == 0 and _MBOX_FROM.match(raw, 0, eol):
                field_start, mbox = 0, True
            else:
                match = _FIELD_START.match(raw, pos, min(eol, pos + POSTFIX_LINE_LIMIT))
                if match is None:  # not a field line: the header block ends here
                    break
                if field_start != -1:
                    fields.append(collected(pos))
                field_start, mbox = pos, False
                name_end = match.end(1) - pos
                colon = match.end() - 1 - pos
            pos = eol + 2
        if field_start != -1:
            fields.append(collected(pos))
        return fields, pos, sep

    # -- serialisation ---------------------------------------------------

    def _body_view(self) -> bytes | memoryview:
        """The current body without copying the original."""
        if self._body_cache is not None:  # replaced, or already copied out
            return self._body_cache
        return memoryview(self._orig)[self._body_start :]

    def _separator(self, fields: list[_Field], body: bytes | memoryview) -> bytes:
        """The separator to emit between header block and body.

        The original had no blank line if its header block ended at an
        invalid line or an unterminated one; if that line starts with
        whitespace and fields now precede it, it would be read back as a
        continuation of the last field, so a blank line is inserted.
        """
        if self._sep or not self._changes or not fields:
            return self._sep
        return CRLF if bytes(body[:1]) in (b" ", b"\t") else b""

    def _head(self, fields: list[_Field]) -> bytes | memoryview:
        if self._headers_dirty:
            return b"".join(f.wire for f in fields)
        return memoryview(self._orig)[: self._header_end]

    @property
    def raw(self) -> bytes:
        """The bytes to send upstream; the input object itself while unmodified."""
        if not self._changes:
            if isinstance(self._orig, bytes):
                return self._orig
            if self._raw_cache is None:  # a spooled message, asked for as bytes: copy once
                self._raw_cache = bytes(self._orig)
            return self._raw_cache
        if self._raw_cache is None:
            fields = self._parse()
            body = self._body_view()
            self._raw_cache = b"".join((self._head(fields), self._separator(fields, body), body))
        return self._raw_cache

    @property
    def size(self) -> int:
        """Length of :attr:`raw`, computed without serialising a modified message."""
        if not self._changes:
            return len(self._orig)
        if self._raw_cache is not None:
            return len(self._raw_cache)
        fields = self._parse()
        body = self._body_view()
        head = sum(len(f.wire) for f in fields) if self._headers_dirty else self._header_end
        return head + len(self._separator(fields, body)) + len(body)

    def parts(self) -> tuple[Buffer, ...]:
        """The bytes of :attr:`raw` as a few buffers, for writing out without a copy.

        Deliveries stream these; a 50 MB message is never duplicated on its way out,
        even after a plugin edited its headers.
        """
        if not self._changes:
            return (self._orig,)
        if self._raw_cache is not None:
            return (self._raw_cache,)
        fields = self._parse()
        body = self._body_view()
        return (self._head(fields), self._separator(fields, body), body)

    @property
    def modified(self) -> bool:
        """Whether any plugin changed the message (else it is forwarded byte-identical)."""
        return bool(self._changes)

    @property
    def changes(self) -> tuple[Change, ...]:
        """Every modification in the order it was made."""
        return tuple(self._changes)

    @property
    def received_header_bytes(self) -> bytes:
        """The header block as it arrived, without the blank separator line, whatever plugins
        changed since (a milter turns the difference into header actions)."""
        self._parse()
        return bytes(memoryview(self._orig)[: self._header_end])

    @property
    def header_bytes(self) -> bytes:
        """The header block as it will be serialised, without the blank separator line."""
        return bytes(self._head(self._parse()))

    @property
    def received_field_bytes(self) -> list[bytes]:
        """:attr:`received_header_bytes` field by field (each with its folds and final CRLF),
        whatever plugins changed since: a milter compares them with :attr:`header_field_bytes`
        without cutting either block up again."""
        self._parse()
        return [f.raw for f in self._received]

    @property
    def header_field_bytes(self) -> list[bytes]:
        """:attr:`header_bytes` field by field: each field as it will be serialised (an mbox
        first line with its ``X-Mailbox-Line:`` prefix once the header block was edited)."""
        fields = self._parse()
        if self._headers_dirty:
            return [f.wire for f in fields]
        return [f.raw for f in fields]

    @property
    def body(self) -> bytes:
        """Everything after the header block and separator (``b""`` if none).

        Copies the original body on first access (then cached), so prefer
        :attr:`raw` for forwarding.
        """
        if self._body_cache is None:
            self._parse()
            start = self._body_start
            self._body_cache = bytes(self._orig) if start == 0 else self._orig[start:]
        return self._body_cache

    # -- reading headers -------------------------------------------------

    @property
    def headers(self) -> list[tuple[str, str]]:
        """All fields as ``(name as written, unfolded value)``, in order.

        Values are decoded as UTF-8 with replacement characters for display
        only; the wire bytes are never altered by reading.
        """
        return [(f.name, f.value) for f in self._parse()]

    @property
    def raw_fields(self) -> list[bytes]:
        """Each header field's exact bytes, in order: name, colon, value, folds and final
        CRLF, as received or as a plugin wrote it (an mbox first line without the
        ``X-Mailbox-Line:`` prefix), for a plugin that hashes or re-parses header bytes."""
        return [f.raw for f in self._parse()]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of the first field called ``name`` (case-insensitive)."""
        key = _key(name)
        for f in self._parse():
            if f.key == key:
                return f.value
        return default

    def get_all(self, name: str) -> list[str]:
        """The values of every field called ``name`` (case-insensitive), in order."""
        key = _key(name)
        return [f.value for f in self._parse() if f.key == key]

    def __contains__(self, name: object) -> bool:
        """Whether a field called ``name`` is present (case-insensitive)."""
        if not isinstance(name, str):
            return False
        key = _key(name)
        return any(f.key == key for f in self._parse())

    # -- editing ---------------------------------------------------------

    def _record(self, change: Change, *, headers: bool) -> None:
        self._changes.append(change)
        if headers:
            self._headers_dirty = True
        self._raw_cache = None
        self._email = None

    def add_header(self, name: str, value: str, *, prepend: bool = True) -> None:
        """Add a field at the top (trace-style, the default) or after the last field.

        Leading and trailing SP/HTAB of ``value`` are dropped; lines longer
        than 998 octets are folded at whitespace.  Raises :class:`HeaderError`
        for an unsafe name or value.
        """
        field = _make_field(name, value)
        fields = self._parse()
        if prepend:
            fields.insert(0, field)
        else:
            fields.append(field)
        self._record(Change("add", name, field.value), headers=True)

    def remove_header(self, name: str, *, matching: Callable[[str], bool] | None = None) -> int:
        """Remove every field called ``name`` (case-insensitive); return how many.

        With ``matching``, only the fields whose (unfolded) value it accepts go; the others
        stay exactly where and as they were. Removing nothing is not a modification and is
        not recorded.
        """
        key = _key(name)
        fields = self._parse()
        kept = [f for f in fields if f.key != key or (matching is not None and not matching(f.value))]
        removed = len(fields) - len(kept)
        if removed:
            fields[:] = kept
            self._record(Change("remove", name, None), headers=True)
        return removed

    def replace_header(self, name: str, value: str) -> None:
        """Replace the first field called ``name`` in place and drop the others.

        If there is none, the field is added at the top.  Recorded as a
        ``replace`` change either way.  Raises :class:`HeaderError` for an
        unsafe name or value.
        """
        field = _make_field(name, value)
        key = field.key
        fields = self._parse()
        new: list[_Field] = []
        placed = False
        for f in fields:
            if f.key != key:
                new.append(f)
            elif not placed:
                new.append(field)
                placed = True
        if not placed:
            new.insert(0, field)
        fields[:] = new
        self._record(Change("replace", name, field.value), headers=True)

    def replace_body(self, body: bytes) -> None:
        """Replace everything after the header block.

        ``body`` must use CRLF line endings only (else ValueError); a
        non-empty body not ending in CRLF gets one.  A blank separator line
        is always emitted before the new body so it can never be read as
        header fields.
        """
        body = bytes(body)
        _check_crlf_only(body, "body")
        if body and not body.endswith(CRLF):
            body += CRLF
        self._parse()
        self._body_cache = body
        self._sep = CRLF
        self._record(Change("replace_body", None, None), headers=False)

    # -- undoing (the chain's, for shadowed plugins) -------------------------

    def _savepoint(self) -> _Savepoint:
        """The edit state now, for :meth:`_rollback`: a shadowed plugin's edits are undone."""
        fields = list(self._fields) if self._fields is not None else None
        return _Savepoint(fields, self._headers_dirty, self._body_cache, self._sep,
                          len(self._changes), self._raw_cache, self._email)

    def _rollback(self, savepoint: _Savepoint) -> tuple[Change, ...]:
        """Back to *savepoint*; returns the changes made since, which are no longer applied."""
        undone = tuple(self._changes[savepoint.changes:])
        if not undone:
            return ()
        self._fields = savepoint.fields
        self._headers_dirty = savepoint.headers_dirty
        self._body_cache = savepoint.body
        self._sep = savepoint.sep
        del self._changes[savepoint.changes:]
        self._raw_cache = savepoint.raw
        self._email = savepoint.email
        return undone

    # -- MIME view -------------------------------------------------------

    @property
    def email(self) -> EmailMessage:
        """A parsed :mod:`email` view of :attr:`raw`, for plugins that walk MIME parts.

        Built lazily and cached until the next modification.  It is a
        read-only view: changes made to it are NOT sent; use the methods
        of :class:`Message` to modify the message.
        """
        if self._email is None:
            self._email = BytesParser(policy=_default_policy).parsebytes(self.raw)
        return self._email
