"""The upstream side's shortcuts give what aiosmtplib itself gives.

``PipeliningProtocol`` parses the usual one-line reply itself and leaves the rest to
aiosmtplib's parser; ``_learn_extensions`` reuses aiosmtplib's reading of an EHLO text seen
before. Both are only cheaper ways to the same result.
"""

from __future__ import annotations

import asyncio

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse
from hypothesis import example, given
from hypothesis import strategies as st

from smtpproxy.delivery.pipelining import PipeliningProtocol
from smtpproxy.delivery.upstream import _learn_extensions


def _parse(protocol_class: type[SMTPProtocol], data: bytes) -> list[object]:
    """Every reply the class reads from *data*, in order (an exception ends the list), and
    what is left in the buffer."""
    loop = asyncio.new_event_loop()
    try:
        protocol = protocol_class(loop=loop)
        protocol._buffer.extend(data)
        out: list[object] = []
        while True:
            try:
                response = protocol._read_response_from_buffer()
            except aiosmtplib.SMTPResponseException as exc:
                out.append(("error", exc.code, exc.message))
                break
            if response is None:
                break
            out.append(response)
        out.append(bytes(protocol._buffer))
        return out
    finally:
        loop.close()


_LINE = st.one_of(
    st.builds(lambda code, sep, text: code + sep + text + b"\r\n",
              st.sampled_from([b"250", b"220", b"354", b"421", b"550", b"2x0", b" 25", b"+25", b"\xd9\xa0\xd9"]),
              st.sampled_from([b" ", b"-", b"", b"\t", b"x"]),
              st.one_of(st.binary(max_size=30), st.sampled_from([b"\tOk \t", b" 2.0.0 Ok\r", b"\xff\xfe"]))
              .filter(lambda b: b"\n" not in b)),
    st.binary(max_size=40),
    st.just(b"250 " + b"a" * 8190 + b"\r\n"),  # at and around aiosmtplib's line limit
    st.just(b"250 " + b"a" * 8187 + b"\r\n"),
    st.just(b"250 " + b"a" * 8188 + b"\r\n"),
)


@given(st.lists(_LINE, max_size=5))
@example([b"250 2.1.5 Ok \t\r\n", b"221 Bye\n"])
@example([b"250 \t\r\r\n"])
@example([b"250-\r\n", b"250-a\r\n", b"250-\r\n", b"250 b\r\n"])
@example([b"250-a\r\n", b"25x-b\r\n", b"250 c\r\n"])
@example([b"250-a\r\n", b"251 b\r\n", b"252-c\r\n"])
@example([b"250-a\r\n", b"250-" + b"b" * 8188 + b"\r\n", b"250 c\r\n"])
def test_the_one_line_shortcut_reads_what_aiosmtplib_reads(lines: list[bytes]) -> None:
    data = b"".join(lines)
    assert _parse(PipeliningProtocol, data) == _parse(SMTPProtocol, data)


@given(st.lists(_LINE, max_size=5))
@example([b"250-a\r\n", b"250 b\r\n", b"250-a\r\n", b"250 b\r\n"])
@example([b"250-a\r\n", b"2", b"50 b\r\n"])
@example([b"250-a\r\n", b"250\r\n", b"250 b\r\n"])
def test_a_reply_read_again_is_read_as_aiosmtplib_reads_it(lines: list[bytes]) -> None:
    """Multi-line replies are kept by their octets once parsed: the second reading of the
    same octets (from what was kept) gives what the first, and aiosmtplib, gave."""
    data = b"".join(lines)
    first = _parse(PipeliningProtocol, data)
    assert _parse(PipeliningProtocol, data) == first == _parse(SMTPProtocol, data)


def test_an_ehlo_reply_seen_before_is_not_parsed_again() -> None:
    ehlo = b"".join(b"250-%s\r\n" % line.encode() for line in _EHLO.split("\n")[:-1]) + b"250 CHUNKING\r\n"
    first = _parse(PipeliningProtocol, ehlo + b"250 2.0.0 Ok\r\n")[:2]
    again = _parse(PipeliningProtocol, ehlo + b"250 2.0.0 Ok\r\n")
    assert first == again[:2] and first[0] == SMTPResponse(250, _EHLO)
    assert again[0] is first[0]  # the same object: kept, not parsed again


def test_the_shortcut_is_taken_for_the_usual_reply() -> None:
    """Not only equal: a one-line reply does not reach aiosmtplib's parser."""
    class Counting(PipeliningProtocol):
        calls = 0

        def _read_response_from_buffer(self) -> SMTPResponse | None:
            return super()._read_response_from_buffer()

    calls: list[int] = []
    original = SMTPProtocol._read_response_from_buffer

    def counted(self: SMTPProtocol) -> SMTPResponse | None:
        calls.append(1)
        return original(self)

    SMTPProtocol._read_response_from_buffer = counted  # type: ignore[method-assign]
    try:
        assert _parse(Counting, b"250 2.1.5 Ok\r\n") == [SMTPResponse(250, "2.1.5 Ok"), b""]
        assert _parse(Counting, b"250-a\r\n250 b\r\n")[0] == SMTPResponse(250, "a\nb")
        assert calls == []  # one line or several: the shortcut
        _parse(Counting, b"250-a\r\n+25 b\r\n")
        assert calls == [1]  # a code that is not three digits: aiosmtplib's parser
    finally:
        SMTPProtocol._read_response_from_buffer = original  # type: ignore[method-assign]


_EHLO = ("mx.example.org\nPIPELINING\nSIZE 10240000\nVRFY\nETRN\nAUTH PLAIN LOGIN\nSTARTTLS\n"
         "XCLIENT NAME ADDR PROTO HELO PORT\nENHANCEDSTATUSCODES\n8BITMIME\nDSN\nSMTPUTF8\nCHUNKING")


def _state(client: aiosmtplib.SMTP) -> tuple[object, ...]:
    return (client.last_ehlo_response, client.esmtp_extensions, client.server_auth_methods,
            client.supports_esmtp, client.is_ehlo_or_helo_needed, client.supports_extension("xclient"))


def test_learning_an_ehlo_seen_before_leaves_the_client_as_the_setter_does() -> None:
    response = SMTPResponse(250, _EHLO)
    first, second, reference = aiosmtplib.SMTP(), aiosmtplib.SMTP(), aiosmtplib.SMTP()
    reference.last_ehlo_response = response
    _learn_extensions(first, response)  # parsed and kept
    _learn_extensions(second, response)  # from what was kept
    assert _state(first) == _state(second) == _state(reference)
    assert second.esmtp_extensions["xclient"] == "NAME ADDR PROTO HELO PORT"
    second.esmtp_extensions["dsn"] = "changed"  # each client has its own copy
    assert "dsn" not in first.esmtp_extensions or first.esmtp_extensions["dsn"] == ""
