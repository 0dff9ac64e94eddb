"""The MTA's side of the milter codec: what only the tests' fake MTA needs.

The product decodes commands and encodes responses (:mod:`smtpproxy.milter.codec`); the
tests also encode commands and decode responses, with the codec's own framing helpers.
"""

from __future__ import annotations

from smtpproxy.milter.codec import (
    _EMPTY_COMMANDS,
    _EMPTY_RESPONSES,
    _U16,
    FAMILY_UNKNOWN,
    AddHeader,
    AddRecipient,
    Body,
    ChangeFrom,
    ChangeHeader,
    Command,
    Connect,
    DeleteRecipient,
    EndOfBody,
    Header,
    Helo,
    InsertHeader,
    Macro,
    Mail,
    MilterProtocolError,
    OptNeg,
    Quarantine,
    Rcpt,
    ReplaceBody,
    ReplyCode,
    Response,
    Unknown,
    _cstr,
    _decode_optneg,
    _encode_optneg,
    _Reader,
    encode_packet,
)

__all__ = ["decode_response", "encode_command"]


def encode_command(command: Command) -> bytes:
    """Frame a command as an MTA would send it."""
    match command:
        case OptNeg():
            return _encode_optneg(command)
        case Macro(for_command, pairs):
            if len(for_command) != 1:
                raise ValueError("a macro's command code is one character")
            payload = for_command.encode("latin-1") + b"".join(
                _cstr(name) + _cstr(value) for name, value in pairs
            )
            return encode_packet(b"D", payload)
        case Connect(hostname, family, port, address):
            payload = _cstr(hostname) + family.encode("latin-1")
            if family != FAMILY_UNKNOWN:
                payload += _U16.pack(port) + _cstr(address)
            return encode_packet(b"C", payload)
        case Helo(hostname):
            return encode_packet(b"H", _cstr(hostname))
        case Mail(args):
            return encode_packet(b"M", b"".join(_cstr(a) for a in args))
        case Rcpt(args):
            return encode_packet(b"R", b"".join(_cstr(a) for a in args))
        case Header(name, value):
            return encode_packet(b"L", _cstr(name) + _cstr(value))
        case Body(chunk):
            return encode_packet(b"B", chunk)
        case EndOfBody(chunk):
            return encode_packet(b"E", chunk)
        case Unknown(text):
            return encode_packet(b"U", _cstr(text))
    for code, empty in _EMPTY_COMMANDS.items():
        if command == empty:
            return encode_packet(code)
    raise TypeError(f"not a milter command: {command!r}")


def decode_response(code: bytes, payload: bytes) -> Response:
    """Turn one packet from a filter into a typed response."""
    empty = _EMPTY_RESPONSES.get(code)
    if empty is not None:
        if payload:
            raise MilterProtocolError(f"response {code!r} takes no payload")
        return empty
    what = f"response {code!r}"
    if code == b"O":
        return _decode_optneg(what, payload)
    if code == b"b":
        return ReplaceBody(payload)
    r = _Reader(what, payload)
    response: Response
    if code == b"y":
        response = ReplyCode(r.string())
    elif code == b"q":
        response = Quarantine(r.string())
    elif code == b"h":
        name = r.string()
        response = AddHeader(name, r.string())
    elif code in (b"i", b"m"):
        index = r.u32()
        name = r.string()
        value = r.string()
        response = InsertHeader(index, name, value) if code == b"i" else ChangeHeader(index, name, value)
    elif code == b"e":
        address = r.string()
        response = ChangeFrom(address, None if r.done else r.string())
    elif code == b"+":
        response = AddRecipient(r.string())
    elif code == b"2":
        address = r.string()
        response = AddRecipient(address, r.string())
    elif code == b"-":
        response = DeleteRecipient(r.string())
    else:
        raise MilterProtocolError(f"unknown response code {code!r}")
    r.end()
    return response
