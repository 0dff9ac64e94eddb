"""The milter wire format (Sendmail 8 protocol version 6, as Postfix speaks it): pure, no I/O.

A packet is a 4-byte big-endian length, one command byte, then ``length - 1`` payload
bytes. Strings inside a payload are NUL-terminated. The MTA sends *commands* (SMFIC_*),
the filter answers with *responses* (SMFIR_*). Both directions are typed here so the
server decodes what Postfix sends and the tests' fake MTA decodes what we answer.

Decoding is strict: a length of 0 or above the limit, a missing NUL, a short integer,
trailing bytes or an unknown command byte raise :class:`MilterProtocolError`, and the
caller closes the connection. Strings are decoded as UTF-8 with ``surrogateescape`` so
any octets (8-bit headers) survive a decode/encode round trip unchanged.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

__all__ = [
    "ACTIONS",
    "ACTION_NAMES",
    "Abort",
    "Accept",
    "AddHeader",
    "AddRecipient",
    "Body",
    "ChangeFrom",
    "ChangeHeader",
    "Command",
    "Connect",
    "Continue",
    "Data",
    "DeleteRecipient",
    "Discard",
    "EndOfBody",
    "EndOfHeaders",
    "FrameDecoder",
    "Header",
    "Helo",
    "InsertHeader",
    "Macro",
    "Mail",
    "MilterProtocolError",
    "OptNeg",
    "Progress",
    "Quarantine",
    "Quit",
    "QuitNewConnection",
    "Rcpt",
    "Reject",
    "ReplaceBody",
    "ReplyCode",
    "Response",
    "Tempfail",
    "Unknown",
    "action_names",
    "decode_command",
    "encode_packet",
    "encode_response",
    "needed_action",
]

PROTOCOL_VERSION = 6
MAX_BODY_CHUNK = 65535
"""Largest body chunk either side sends (libmilter's MILTER_CHUNK_SIZE)."""

# Actions a filter may ask for (SMFIF_*), announced in option negotiation.
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ACTION_NAMES = {SMFIF_ADDHDRS: "ADDHDRS", SMFIF_CHGBODY: "CHGBODY", SMFIF_ADDRCPT: "ADDRCPT",
                SMFIF_DELRCPT: "DELRCPT", SMFIF_CHGHDRS: "CHGHDRS", SMFIF_QUARANTINE: "QUARANTINE",
                SMFIF_CHGFROM: "CHGFROM", SMFIF_ADDRCPT_PAR: "ADDRCPT_PAR", SMFIF_SETSYMLIST: "SETSYMLIST"}


def action_names(actions: int) -> list[str]:
    """The SMFIF_* names of the flags set in *actions*, lowest first."""
    return [name for flag, name in ACTION_NAMES.items() if actions & flag]


ACTIONS = (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS
           | SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR)
"""Everything we may use; negotiation keeps the part the MTA offers."""

# Protocol steps (SMFIP_*): "do not send" and "no reply" bits plus extensions.
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NR_HDR = 1 << 7
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9
SMFIP_SKIP = 1 << 10
SMFIP_RCPT_REJ = 1 << 11
SMFIP_NR_CONN = 1 << 12
SMFIP_NR_HELO = 1 << 13
SMFIP_NR_MAIL = 1 << 14
SMFIP_NR_RCPT = 1 << 15
SMFIP_NR_DATA = 1 << 16
SMFIP_NR_UNKN = 1 << 17
SMFIP_NR_EOH = 1 << 18
SMFIP_NR_BODY = 1 << 19
SMFIP_HDR_LEADSPC = 1 << 20

# Address families in SMFIC_CONNECT.
FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class MilterProtocolError(Exception):
    """The peer sent something that is not valid milter protocol; close the connection."""


# -- framing ----------------------------------------------------------------------


def encode_packet(code: bytes, payload: bytes = b"") -> bytes:
    """Frame one packet: length (command byte included), command byte, payload."""
    if len(code) != 1:
        raise ValueError(f"a milter command code is one byte, got {code!r}")
    return _U32.pack(len(payload) + 1) + code + payload


class FrameDecoder:
    """Split a byte stream into ``(code, payload)`` packets, however it was chunked."""

    def __init__(self, max_packet: int) -> None:
        if max_packet < 1:
            raise ValueError("max_packet must be at least 1")
        self.max_packet = max_packet
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole packet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return every packet now complete, in order.

        The packets are cut from the received block by offset, each payload copied once
        (a read holds the twenty-odd packets of a message); only an incomplete packet at
        the end is kept, and added to until it is whole.
        """
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) >= 4 and len(buffer) < 4 + check_length(bytes(buffer[:4]), self.max_packet):
                return []  # still inside one packet: no copy of what came so far
            block = bytes(buffer)
            buffer.clear()
        else:
            block = data if type(data) is bytes else bytes(data)
        packets = []
        pos, size = 0, len(block)
        unpack, max_packet = _U32.unpack_from, self.max_packet
        while size - pos >= 4:
            (length,) = unpack(block, pos)
            if not 0 < length <= max_packet:
                check_length(block[pos : pos + 4], max_packet)  # raises, saying which
            end = pos + 4 + length
            if end > size:
                break
            packets.append((block[pos + 4 : pos + 5], block[pos + 5 : end]))
            pos = end
        if pos < size:
            buffer += block[pos:]
        return packets


def check_length(header: bytes, max_packet: int) -> int:
    """The packet length a 4-byte header announces; refuse 0 and anything above the limit."""
    length = int(_U32.unpack(header)[0])
    if length == 0:
        raise MilterProtocolError("packet length 0 (a packet holds at least its command byte)")
    if length > max_packet:
        raise MilterProtocolError(f"packet length {length} exceeds the limit of {max_packet}")
    return length


# -- payload helpers --------------------------------------------------------------


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _octets(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise ValueError(f"a milter string cannot contain NUL: {value!r}")
    return data


def _cstr(value: str) -> bytes:
    return _octets(value) + b"\0"


class _Reader:
    """Consume a payload field by field; every shortfall is a protocol error."""

    def __init__(self, what: str, payload: bytes) -> None:
        self.what = what
        self.data = payload
        self.pos = 0

    def u32(self) -> int:
        if len(self.data) - self.pos < 4:
            raise MilterProtocolError(f"{self.what}: payload too short for a 32-bit integer")
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def u16(self) -> int:
        if len(self.data) - self.pos < 2:
            raise MilterProtocolError(f"{self.what}: payload too short for a 16-bit integer")
        (value,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise MilterProtocolError(f"{self.what}: payload too short")
        value = self.data[self.pos : self.pos + 1]
        self.pos += 1
        return value.decode("latin-1")

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end == -1:
            raise MilterProtocolError(f"{self.what}: string without its NUL terminator")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return _text(value)

    def strings(self) -> tuple[str, ...]:
        """NUL-terminated strings up to the end of the payload."""
        out = []
        while not self.done:
            out.append(self.string())
        return tuple(out)

    def rest(self) -> bytes:
        value = self.data[self.pos :]
        self.pos = len(self.data)
        return value

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if not self.done:
            raise MilterProtocolError(
                f"{self.what}: {len(self.data) - self.pos} unexpected trailing byte(s)"
            )


# -- commands (MTA -> filter) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptNeg:
    """SMFIC_OPTNEG / its reply: version, action flags (SMFIF_*), protocol flags (SMFIP_*).

    A filter's reply may add macro lists (stage number, space-separated names) to ask
    for other macros; we never send any but decode them.
    """

    version: int
    actions: int
    protocol: int
    macro_lists: tuple[tuple[int, str], ...] = ()


class Macro:
    """SMFIC_MACRO: name/value pairs for the command (``for_command``) that follows.

    Decoded from a packet, the names and values stay octets until something reads them
    (:attr:`pairs`, or a lookup through :class:`Macros`): Postfix sends sixteen macro
    packets a message (its ``milter_*_macros`` before each event, the queue id before each
    header field) and the session reads a few values of three or four of them (issue 31's
    profile). Equal, hashed and matched (``case Macro(for_command, pairs)``) like the
    frozen dataclass it was; treat it as immutable.
    """

    __slots__ = ("_pairs", "_raw", "_values", "for_command")
    __match_args__ = ("for_command", "pairs")

    for_command: str
    _pairs: tuple[tuple[str, str], ...] | None
    _raw: bytes
    _values: dict[str, str] | None

    def __init__(self, for_command: str, pairs: tuple[tuple[str, str], ...] = ()) -> None:
        self.for_command = for_command
        self._pairs = pairs
        self._values = None

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        if self._pairs is None:
            fields = self._raw[1:].decode("utf-8", "surrogateescape").split("\0")[:-1]
            self._pairs = tuple(zip(fields[::2], fields[1::2], strict=True))
        return self._pairs

    def values(self) -> dict[str, str]:
        """The values by canonical name (:func:`macro_key`), the last of a name winning."""
        if self._values is None:
            self._values = {macro_key(name): value for name, value in self.pairs}
        return self._values

    def __eq__(self, other: object) -> bool:
        if type(other) is not Macro:
            return NotImplemented
        return self.for_command == other.for_command and self.pairs == other.pairs

    def __hash__(self) -> int:
        return hash((self.for_command, self.pairs))

    def __repr__(self) -> str:
        return f"Macro(for_command={self.for_command!r}, pairs={self.pairs!r})"


_new_macro = object.__new__
_LATIN1 = tuple(map(chr, range(256)))
"""A command code byte as its character (``bytes.decode("latin-1")`` of one byte)."""


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT: the SMTP client. ``port`` and ``address`` are absent for family U."""

    hostname: str
    family: str
    port: int = 0
    address: str = ""


@dataclass(frozen=True, slots=True)
class Helo:
    hostname: str


@dataclass(frozen=True, slots=True)
class Mail:
    """SMFIC_MAIL: ``args[0]`` is the reverse-path (``<a@b>``), the rest ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rcpt:
    """SMFIC_RCPT: ``args[0]`` is the forward-path, the rest ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Header:
    """SMFIC_HEADER: one field; folded values contain ``\\n`` between lines."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True, slots=True)
class Body:
    chunk: bytes


@dataclass(frozen=True, slots=True)
class EndOfBody:
    """SMFIC_BODYEOB; old MTAs may attach a last body chunk."""

    chunk: bytes = b""


@dataclass(frozen=True, slots=True)
class Abort:
    """SMFIC_ABORT: forget the current message; the connection goes on. No reply."""


@dataclass(frozen=True, slots=True)
class Quit:
    """SMFIC_QUIT: the connection ends. No reply."""


@dataclass(frozen=True, slots=True)
class QuitNewConnection:
    """SMFIC_QUIT_NC: this SMTP connection ended, another follows on the same socket."""


@dataclass(frozen=True, slots=True)
class Data:
    """SMFIC_DATA: the client sent DATA (we ask the MTA not to send it)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA did not recognise (we ask not to get it)."""

    command: str


Command = (OptNeg | Macro | Connect | Helo | Mail | Rcpt | Header | EndOfHeaders | Body
           | EndOfBody | Abort | Quit | QuitNewConnection | Data | Unknown)

_EMPTY_COMMANDS: dict[bytes, Command] = {
    b"N": EndOfHeaders(), b"A": Abort(), b"Q": Quit(), b"K": QuitNewConnection(), b"T": Data(),
}


def _decode_optneg(what: str, payload: bytes) -> OptNeg:
    r = _Reader(what, payload)
    version, actions, protocol = r.u32(), r.u32(), r.u32()
    lists = []
    while not r.done:
        stage = r.u32()
        lists.append((stage, r.string()))
    return OptNeg(version, actions, protocol, tuple(lists))


def _encode_optneg(o: OptNeg) -> bytes:
    payload = _U32.pack(o.version) + _U32.pack(o.actions) + _U32.pack(o.protocol)
    for stage, names in o.macro_lists:
        payload += _U32.pack(stage) + _cstr(names)
    return encode_packet(b"O", payload)


def decode_command(code: bytes, payload: bytes) -> Command:
    """Turn one packet from the MTA into a typed command; MilterProtocolError if malformed."""
    # The packets of every message (macros, headers, body), well formed, by a split instead
    # of field by field; anything else takes the strict reader below, which says what is wrong.
    # Macros first: sixteen of a message's thirty-odd packets, their strings left undecoded.
    if code == b"D":
        size = len(payload)
        if size == 1 or (size > 1 and payload[-1] == 0 and not payload.count(b"\0", 1) % 2):
            macro = _new_macro(Macro)  # undecoded (see Macro): sixteen a message
            macro.for_command = _LATIN1[payload[0]]
            macro._pairs = None
            macro._raw = payload
            macro._values = None
            return macro
    elif code == b"L":
        # Decoded whole, then split: a NUL is never inside a UTF-8 sequence, so the parts are
        # those of a split before decoding (and one decode instead of two).
        parts = payload.decode("utf-8", "surrogateescape").split("\0")
        if len(parts) == 3 and not parts[2]:
            return Header(parts[0], parts[1])
    else:
        empty = _EMPTY_COMMANDS.get(code)
        if empty is not None:
            if payload:
                raise MilterProtocolError(f"command {code!r} takes no payload, got {len(payload)} bytes")
            return empty
        if code == b"B":
            return Body(payload)
        if code == b"E":
            return EndOfBody(payload)
        if code in (b"M", b"R") and payload.endswith(b"\0"):
            args = tuple(payload[:-1].decode("utf-8", "surrogateescape").split("\0"))
            return Mail(args) if code == b"M" else Rcpt(args)
        if code == b"H" and payload.endswith(b"\0") and payload.count(b"\0") == 1:
            return Helo(payload[:-1].decode("utf-8", "surrogateescape"))
        if code == b"C":  # hostname NUL, family, then (not for U) port and address NUL
            name_end = payload.find(b"\0")
            family_code = payload[name_end + 1 : name_end + 2]
            if (name_end >= 0 and family_code in (b"4", b"6", b"L") and len(payload) >= name_end + 5
                    and payload.find(b"\0", name_end + 4) == len(payload) - 1):
                return Connect(payload[:name_end].decode("utf-8", "surrogateescape"), _LATIN1[family_code[0]],
                               _U16.unpack_from(payload, name_end + 2)[0],
                               payload[name_end + 4 : -1].decode("utf-8", "surrogateescape"))
    what = f"command {code!r}"
    r = _Reader(what, payload)
    command: Command
    if code == b"O":
        return _decode_optneg(what, payload)
    if code == b"D":
        for_command = r.byte()
        values = r.strings()
        if len(values) % 2:
            raise MilterProtocolError(f"{what}: macro names and values do not pair up")
        pairs = tuple(zip(values[::2], values[1::2], strict=True))
        return Macro(for_command, pairs)
    if code == b"C":
        hostname = r.string()
        family = r.byte()
        if family == FAMILY_UNKNOWN:
            command = Connect(hostname, family)
        elif family in (FAMILY_INET, FAMILY_INET6, FAMILY_UNIX):
            port = r.u16()
            command = Connect(hostname, family, port, r.string())
        else:
            raise MilterProtocolError(f"{what}: unknown address family {family!r}")
    elif code == b"H":
        command = Helo(r.string())
    elif code in (b"M", b"R"):
        args = r.strings()
        if not args:
            raise MilterProtocolError(f"{what}: no address")
        command = Mail(args) if code == b"M" else Rcpt(args)
    elif code == b"L":
        name = r.string()
        command = Header(name, r.string())
    elif code == b"B":
        return Body(r.rest())
    elif code == b"E":
        return EndOfBody(r.rest())
    elif code == b"U":
        command = Unknown(r.string())
    else:
        raise MilterProtocolError(f"unknown command code {code!r}")
    r.end()
    return command


# -- responses (filter -> MTA) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue:
    pass


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    pass


@dataclass(frozen=True, slots=True)
class Tempfail:
    pass


@dataclass(frozen=True, slots=True)
class Discard:
    pass


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: still working; the MTA restarts its timer."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """SMFIR_REPLYCODE: ``"550 5.7.1 text"``; lines of a multi-line reply joined by CRLF."""

    text: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert before position ``index`` (0: the very top)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the ``index``-th (1-based) field called ``name``; an empty value deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    chunk: bytes


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    address: str
    args: str | None = None


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """SMFIR_ADDRCPT, or SMFIR_ADDRCPT_PAR when ``args`` is not None."""

    address: str
    args: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


Response = (OptNeg | Continue | Accept | Reject | Tempfail | Discard | Progress | ReplyCode
            | Quarantine | AddHeader | InsertHeader | ChangeHeader | ReplaceBody | ChangeFrom
            | AddRecipient | DeleteRecipient)

def needed_action(response: Response) -> int:
    """The SMFIF_* flag the MTA must have granted for *response* (0: none is needed)."""
    match response:
        case AddHeader() | InsertHeader():
            return SMFIF_ADDHDRS
        case ChangeHeader():
            return SMFIF_CHGHDRS
        case ReplaceBody():
            return SMFIF_CHGBODY
        case ChangeFrom():
            return SMFIF_CHGFROM
        case AddRecipient(args=None):
            return SMFIF_ADDRCPT
        case AddRecipient():
            return SMFIF_ADDRCPT_PAR
        case DeleteRecipient():
            return SMFIF_DELRCPT
        case Quarantine():
            return SMFIF_QUARANTINE
    return 0


_EMPTY_RESPONSES: dict[bytes, Response] = {
    b"c": Continue(), b"a": Accept(), b"r": Reject(), b"t": Tempfail(), b"d": Discard(),
    b"p": Progress(),
}


def _u32(value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{value} does not fit a 32-bit unsigned integer")
    return _U32.pack(value)


def encode_response(response: Response) -> bytes:
    """Frame one response for the MTA."""
    match response:
        case OptNeg():
            return _encode_optneg(response)
        case ReplyCode(text):
            return encode_packet(b"y", _cstr(text))
        case Quarantine(reason):
            return encode_packet(b"q", _cstr(reason))
        case AddHeader(name, value):
            return encode_packet(b"h", _cstr(name) + _cstr(value))
        case InsertHeader(index, name, value):
            return encode_packet(b"i", _u32(index) + _cstr(name) + _cstr(value))
        case ChangeHeader(index, name, value):
            return encode_packet(b"m", _u32(index) + _cstr(name) + _cstr(value))
        case ReplaceBody(chunk):
            return encode_packet(b"b", chunk)
        case ChangeFrom(address, args):
            return encode_packet(b"e", _cstr(address) + (b"" if args is None else _cstr(args)))
        case AddRecipient(address, None):
            return encode_packet(b"+", _cstr(address))
        case AddRecipient(address, args):
            return encode_packet(b"2", _cstr(address) + _cstr(args or ""))
        case DeleteRecipient(address):
            return encode_packet(b"-", _cstr(address))
    for code, empty in _EMPTY_RESPONSES.items():
        if response == empty:
            return encode_packet(code)
    raise TypeError(f"not a milter response: {response!r}")


# -- macros -------------------------------------------------------------------------


_TRANSACTION_STAGES = ("M", "R", "T", "L", "N", "B", "E")
"""Command codes of the stages inside a transaction (SMFIC_MAIL ... SMFIC_BODYEOB)."""


@functools.lru_cache(maxsize=512)
def macro_key(name: str) -> str:
    """Canonical macro name: ``{auth_authen}`` and ``auth_authen`` are the same macro.
    (Cached: the same few dozen names, a lookup and every stage decoded.)"""
    if len(name) > 2 and name.startswith("{") and name.endswith("}"):
        return name[1:-1]
    return name


@functools.lru_cache(maxsize=512)
def _octets_of(key: str) -> bytes | None:
    """A macro name as the packet's octets hold it (None: no such octets, never passed over)."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return None


@dataclass(slots=True)
class Macros:
    """The macro values the MTA has sent on this connection, kept per stage as libmilter
    does: a stage's packet replaces that stage's values, and the values of a transaction's
    stages (MAIL onwards) end with it (:meth:`end_transaction`), so ``{auth_authen}`` from
    one transaction is never read in the next. A lookup takes the latest stage that has it.
    Each stage keeps its :class:`Macro` as it came; a stage's values are decoded when a
    lookup first reaches it."""

    stages: dict[str, Macro] = field(default_factory=dict)

    def update(self, macro: Macro) -> None:
        stages = self.stages
        stages.pop(macro.for_command, None)  # re-inserted last: the latest stage
        stages[macro.for_command] = macro

    def get(self, name: str) -> str | None:
        """A macro's value by name, with or without braces; None when not sent or empty.
        A stage not decoded yet whose octets do not contain the name's is passed over
        undecoded (``{auth_authen}`` and ``{tls_version}`` are looked for at HELO and at
        every MAIL, and are rarely there)."""
        key = macro_key(name)
        needle = _octets_of(key)
        for macro in reversed(self.stages.values()):
            if macro._pairs is None and needle is not None and needle not in macro._raw:
                continue  # the name's octets are a part of the packet's wherever it is in it
            values = macro.values()
            if key in values:
                return values[key] or None
        return None

    def end_transaction(self) -> None:
        """Forget what MAIL, RCPT, DATA, the headers, the body and end of message set."""
        for stage in _TRANSACTION_STAGES:
            self.stages.pop(stage, None)

    def clear(self) -> None:
        self.stages.clear()
