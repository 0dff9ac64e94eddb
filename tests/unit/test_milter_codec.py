"""The milter packet codec: round trips for every command and response, and strictness.

Hypothesis drives both: any typed value must survive encode → frame → decode unchanged,
however the byte stream is chunked, and any malformed packet must raise
MilterProtocolError (never another exception, never a silent misread).
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.milter import codec
from smtpproxy.milter.codec import FrameDecoder, MilterProtocolError
from tests import milter_mta

MAX = 1 << 20

# Strings without NUL, including arbitrary (8-bit, non-UTF-8) octets via surrogateescape.
octet_strings = st.binary(max_size=40).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape")
)
u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)

commands = st.one_of(
    st.builds(codec.OptNeg, u32, u32, u32, st.tuples()),
    st.builds(codec.Macro, st.sampled_from("CHMRTLNEBU"),
              st.lists(st.tuples(octet_strings, octet_strings), max_size=4).map(tuple)),
    st.builds(codec.Connect, octet_strings, st.just("U")),
    st.builds(codec.Connect, octet_strings, st.sampled_from("46L"),
              st.integers(0, 65535), octet_strings),
    st.builds(codec.Helo, octet_strings),
    st.builds(codec.Mail, st.lists(octet_strings, min_size=1, max_size=4).map(tuple)),
    st.builds(codec.Rcpt, st.lists(octet_strings, min_size=1, max_size=4).map(tuple)),
    st.builds(codec.Header, octet_strings, octet_strings),
    st.builds(codec.Body, st.binary(max_size=200)),
    st.builds(codec.EndOfBody, st.binary(max_size=50)),
    st.builds(codec.Unknown, octet_strings),
    st.sampled_from([codec.EndOfHeaders(), codec.Abort(), codec.Quit(),
                     codec.QuitNewConnection(), codec.Data()]),
)

responses = st.one_of(
    st.builds(codec.OptNeg, u32, u32, u32,
              st.lists(st.tuples(u32, octet_strings), max_size=3).map(tuple)),
    st.sampled_from([codec.Continue(), codec.Accept(), codec.Reject(), codec.Tempfail(),
                     codec.Discard(), codec.Progress()]),
    st.builds(codec.ReplyCode, octet_strings),
    st.builds(codec.Quarantine, octet_strings),
    st.builds(codec.AddHeader, octet_strings, octet_strings),
    st.builds(codec.InsertHeader, u32, octet_strings, octet_strings),
    st.builds(codec.ChangeHeader, u32, octet_strings, octet_strings),
    st.builds(codec.ReplaceBody, st.binary(max_size=200)),
    st.builds(codec.ChangeFrom, octet_strings, st.none() | octet_strings),
    st.builds(codec.AddRecipient, octet_strings, st.none() | octet_strings),
    st.builds(codec.DeleteRecipient, octet_strings),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(commands, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_commands_round_trip_however_chunked(items: list[codec.Command], cuts: list[int]) -> None:
    stream = b"".join(milter_mta.encode_command(c) for c in items)
    decoder = FrameDecoder(MAX)
    packets = []
    for piece in split_at(stream, cuts):
        packets += decoder.feed(piece)
    assert decoder.pending == 0
    assert [codec.decode_command(code, payload) for code, payload in packets] == items


@given(responses)
def test_responses_round_trip(response: codec.Response) -> None:
    (packet,) = FrameDecoder(MAX).feed(codec.encode_response(response))
    assert milter_mta.decode_response(*packet) == response


@given(st.binary(max_size=64), st.sampled_from(list(b"ABCDEHKLMNOQRTU")))
def test_any_payload_decodes_or_raises_protocol_error(payload: bytes, code: int) -> None:
    try:
        command = codec.decode_command(bytes([code]), payload)
    except MilterProtocolError:
        return
    # Whatever decoded must encode back to exactly the bytes received.
    assert milter_mta.encode_command(command) == codec.encode_packet(bytes([code]), payload)


@given(st.binary(max_size=64), st.sampled_from(list(b"+-2abcdehimpqrty")))
def test_any_response_payload_decodes_or_raises_protocol_error(payload: bytes, code: int) -> None:
    try:
        response = milter_mta.decode_response(bytes([code]), payload)
    except MilterProtocolError:
        return
    assert codec.encode_response(response) == codec.encode_packet(bytes([code]), payload)


@given(st.binary(min_size=1, max_size=1).filter(lambda c: c not in b"ABCDEHKLMNOQRTU"))
def test_unknown_command_code_is_a_protocol_error(code: bytes) -> None:
    with pytest.raises(MilterProtocolError, match="unknown command"):
        codec.decode_command(code, b"")


def test_zero_length_is_a_protocol_error() -> None:
    with pytest.raises(MilterProtocolError, match="length 0"):
        FrameDecoder(MAX).feed(b"\0\0\0\0")


@given(st.integers(min_value=101, max_value=0xFFFFFFFF))
def test_oversize_is_refused_from_the_header_alone(length: int) -> None:
    # Refused before the payload arrives: nothing to buffer, nothing to wait for.
    with pytest.raises(MilterProtocolError, match="exceeds the limit of 100"):
        FrameDecoder(100).feed(struct.pack(">I", length))


def test_truncated_packet_waits_for_more() -> None:
    decoder = FrameDecoder(MAX)
    whole = milter_mta.encode_command(codec.Helo("mx.example"))
    assert decoder.feed(whole[:-1]) == []
    assert decoder.pending == len(whole) - 1
    assert decoder.feed(whole[-1:]) == [(b"H", b"mx.example\0")]


@pytest.mark.parametrize(
    ("code", "payload", "problem"),
    [
        (b"H", b"no-terminator", "NUL"),
        (b"H", b"one\0two\0", "trailing"),
        (b"L", b"Subject\0", "NUL"),
        (b"C", b"host\0" + b"4" + b"\x00", "16-bit"),
        (b"C", b"host\0X", "address family"),
        (b"O", b"\0\0\0\x06\0\0", "32-bit"),
        (b"D", b"Mj\0", "pair"),
        (b"M", b"", "no address"),
        (b"A", b"x", "no payload"),
    ],
)
def test_malformed_payloads(code: bytes, payload: bytes, problem: str) -> None:
    with pytest.raises(MilterProtocolError, match=problem):
        codec.decode_command(code, payload)


def test_postfix_connect_and_macro_layout() -> None:
    # Exactly what Postfix's milter8_conn_event writes for an IPv4 client.
    payload = b"[192.0.2.1]\x004" + struct.pack(">H", 40000) + b"192.0.2.1\0"
    assert codec.decode_command(b"C", payload) == codec.Connect("[192.0.2.1]", "4", 40000, "192.0.2.1")
    macro = codec.decode_command(b"D", b"Cj\0mx.test\0{daemon_addr}\x00127.0.0.1\0")
    macros = codec.Macros()
    assert isinstance(macro, codec.Macro)
    macros.update(macro)
    assert macros.get("j") == "mx.test"
    assert macros.get("{daemon_addr}") == macros.get("daemon_addr") == "127.0.0.1"
    assert macros.get("{auth_authen}") is None


def test_strings_with_nul_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NUL"):
        codec.encode_response(codec.AddHeader("X-A", "a\0b"))


def _strict_reference(code: bytes, payload: bytes) -> codec.Command:
    """Macros, headers, MAIL, RCPT, HELO and CONNECT decoded field by field, as the codec
    did before its split fast paths."""
    r = codec._Reader("ref", payload)
    if code == b"D":
        for_command = r.byte()
        values = r.strings()
        if len(values) % 2:
            raise codec.MilterProtocolError("odd")
        return codec.Macro(for_command, tuple(zip(values[::2], values[1::2], strict=True)))
    if code in (b"M", b"R"):
        args = r.strings()
        if not args:
            raise codec.MilterProtocolError("no address")
        return codec.Mail(args) if code == b"M" else codec.Rcpt(args)
    if code == b"H":
        helo = codec.Helo(r.string())
        r.end()
        return helo
    if code == b"C":
        hostname, family = r.string(), r.byte()
        if family == "U":
            connect = codec.Connect(hostname, family)
        elif family in "46L" and family:
            port = r.u16()
            connect = codec.Connect(hostname, family, port, r.string())
        else:
            raise codec.MilterProtocolError("family")
        r.end()
        return connect
    name = r.string()
    command = codec.Header(name, r.string())
    r.end()
    return command


@given(st.one_of(st.binary(max_size=40), st.lists(st.binary(max_size=6).filter(lambda b: b"\0" not in b), max_size=6)
                 .map(lambda parts: b"".join(p + b"\0" for p in parts))),
       st.sampled_from([b"D", b"L", b"M", b"R", b"H", b"C"]),
       st.sampled_from([b"", b"C", b"\0", b"host\x004", b"h\x006\0\0", b"\x00L\x00\x19", b"[h]\0U"]))
def test_the_fast_paths_decode_as_the_strict_reader(payload: bytes, code: bytes, prefix: bytes) -> None:
    """Well-formed or not, a macro, header, MAIL, RCPT, HELO or CONNECT packet decodes to the
    same command (or is refused)."""
    payload = prefix + payload
    try:
        expected: codec.Command | None = _strict_reference(code, payload)
    except codec.MilterProtocolError:
        expected = None
    if expected is None:
        with pytest.raises(codec.MilterProtocolError):
            codec.decode_command(code, payload)
    else:
        assert codec.decode_command(code, payload) == expected


@given(st.sampled_from("CHMRTLNEBU"), st.lists(st.tuples(octet_strings, octet_strings), max_size=4).map(tuple))
def test_a_decoded_macro_is_the_macro_it_was(for_command: str, pairs: tuple[tuple[str, str], ...]) -> None:
    """A macro packet's strings are decoded only when read: until then, and after, it equals,
    hashes, prints and matches as the macro that was encoded."""
    made = codec.Macro(for_command, pairs)
    decoded = codec.decode_command(b"D", milter_mta.encode_command(made)[5:])
    assert decoded == made and made == decoded and hash(decoded) == hash(made)
    assert repr(decoded) == repr(made)
    match decoded:
        case codec.Macro(code, got):
            assert (code, got) == (for_command, pairs)
    assert isinstance(decoded, codec.Macro)
    macros = codec.Macros()
    macros.update(decoded)
    for name, _ in pairs:
        values = [value for other, value in pairs if codec.macro_key(other) == codec.macro_key(name)]
        assert macros.get(name) == (values[-1] or None)


def test_macros_nobody_reads_stay_undecoded() -> None:
    macros = codec.Macros()
    packets = [b"Cj\0mx.test\0", b"Mi\x004ABC\0{mail_addr}\0a@b.test\0", b"Li\x004ABC\0", b"Ei\x004ABC\0"]
    decoded = [codec.decode_command(b"D", p) for p in packets]
    for macro in decoded:
        assert isinstance(macro, codec.Macro)
        macros.update(macro)
    assert macros.get("i") == "4ABC"  # end of message's, the latest stage
    assert [m._pairs is not None for m in decoded] == [False, False, False, True]  # type: ignore[union-attr]
    assert macros.get("{mail_addr}") == "a@b.test"  # the headers' stage has no such octets: not decoded
    assert [m._pairs is not None for m in decoded] == [False, True, False, True]  # type: ignore[union-attr]
    assert macros.get("j") == "mx.test"


names = st.sampled_from(["i", "j", "{i}", "auth_authen", "{auth_authen}", "{x", "{}", "é", "\udcff", "\ud800"])


@given(st.lists(st.tuples(st.sampled_from("CHMRLE"), st.lists(st.tuples(names | octet_strings, octet_strings),
                                                                 max_size=3).map(tuple)), max_size=6),
       st.lists(names | octet_strings, max_size=4), st.booleans())
def test_macro_lookups_as_a_dict_per_stage_gives_them(updates: list[tuple[str, tuple[tuple[str, str], ...]]],
                                                       asked: list[str], ended: bool) -> None:
    """Lookups through undecoded stages (passed over when the name's octets are not in them)
    answer as the plain definition: the latest stage that has the name, its value or None."""
    macros = codec.Macros()
    reference: dict[str, dict[str, str]] = {}
    for stage, pairs in updates:
        try:
            payload = milter_mta.encode_command(codec.Macro(stage, pairs))[5:]
        except (ValueError, UnicodeError):
            continue  # not encodable (a lone surrogate of no octet): the MTA cannot send it
        decoded = codec.decode_command(b"D", payload)
        assert isinstance(decoded, codec.Macro)
        macros.update(decoded)
        reference.pop(stage, None)
        reference[stage] = {codec.macro_key(n): v for n, v in pairs}
    if ended:
        macros.end_transaction()
        for stage in "MRTLNBE":
            reference.pop(stage, None)
    for name in asked:
        key = codec.macro_key(name)
        expected = next((values[key] or None for values in reversed(reference.values()) if key in values), None)
        assert macros.get(name) == expected
