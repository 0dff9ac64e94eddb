"""The DATA reader: exact end of data, dot-unstuffing, limits, bare CR/LF — by property."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.datareader import DataProblem, DataReader, complete_lines


def feed_stream(reader: DataReader, stream: bytes) -> tuple[bool, bytes]:
    """Split a byte stream the way the proxy's StreamReader does: at CRLF only."""
    pos = 0
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return False, stream[pos:]
        if reader.feed(stream[pos:end + 2]):
            return True, stream[end + 2:]
        pos = end + 2


def dot_stuff(content: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", content)


crlf_lines = st.lists(
    st.binary(max_size=80).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    ),
    max_size=30,
)


@given(crlf_lines)
def test_round_trip_of_clean_messages(lines: list[bytes]) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    reader = DataReader(10**7, 1000)
    done, rest = feed_stream(reader, dot_stuff(content) + b".\r\nQUIT\r\n")
    assert done and rest == b"QUIT\r\n"
    assert reader.problem is None
    assert reader.content() == content


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_end_early_or_leak_bare_newlines(data: bytes) -> None:
    for normalize in (False, True):
        reader = DataReader(10**7, 1000, normalize_bare_newlines=normalize)
        done, _ = feed_stream(reader, data)
        if done:
            # only a real CRLF.CRLF (or a leading .CRLF) can end the data
            assert data.startswith(b".\r\n") or b"\r\n.\r\n" in data
        if reader.problem is None:
            content = reader.content()
            assert content.count(b"\n") == content.count(b"\r\n") == content.count(b"\r")
        else:
            assert not normalize or reader.problem is not DataProblem.BARE_NEWLINE


def test_bare_newlines_rejected_by_default_and_data_drained() -> None:
    reader = DataReader(10**7, 1000)
    done, rest = feed_stream(reader, b"a\n.\nMAIL FROM:<x@y>\r\nmore\r\n.\r\nNOOP\r\n")
    assert done and rest == b"NOOP\r\n"
    assert reader.problem is DataProblem.BARE_NEWLINE
    assert reader.problem.reply(1, 1).code == 550


def test_normalize_turns_bare_cr_and_lf_into_crlf() -> None:
    reader = DataReader(10**7, 1000, normalize_bare_newlines=True)
    done, _ = feed_stream(reader, b"a\rb\nc\r\n.\r\n")
    assert done
    assert reader.content() == b"a\r\nb\r\nc\r\n"
    assert reader.bare_newlines_seen == 1


def test_size_limit_counts_unstuffed_bytes_and_keeps_draining() -> None:
    reader = DataReader(10, 1000)
    done, rest = feed_stream(reader, b"12345678\r\n12345678\r\n.\r\nX")
    assert done and rest == b"X"
    assert reader.problem is DataProblem.TOO_BIG


def test_line_limit_allows_a_transparency_dot_only_on_dot_lines() -> None:
    reader = DataReader(10**7, 10)
    feed_stream(reader, b".12345678\r\n")  # 11 bytes with CRLF: 10 + the stuffing dot
    assert reader.problem is None
    reader = DataReader(10**7, 10)
    feed_stream(reader, b"12345678\r\n")  # 10 bytes with CRLF: the limit exactly
    assert reader.problem is None
    feed_stream(reader, b"123456789\r\n")  # 11 bytes, no dot: one too many
    assert reader.problem is DataProblem.LINE_TOO_LONG


@given(st.integers(min_value=1, max_value=1100), st.booleans())
def test_line_limit_is_exact(length: int, dotted: bool) -> None:
    """A text line of *length* octets plus CRLF fits exactly when length + 2 <= max_line."""
    line = (b"." if dotted else b"") + b"x" * length + b"\r\n"
    wire = (b"." if line[:1] == b"." else b"") + line  # dot-stuffed as a client sends it
    reader = DataReader(10**7, 1000)
    done, _ = feed_stream(reader, wire + b".\r\n")
    assert done
    text_octets = len(line)
    if text_octets <= 1000:
        assert reader.problem is None
        assert reader.content() == line
    else:
        assert reader.problem is DataProblem.LINE_TOO_LONG


nul_payloads = st.tuples(crlf_lines, crlf_lines, st.binary(max_size=20)).map(
    lambda t: b"".join(x + b"\r\n" for x in t[0])
    + t[2].replace(b"\r", b"").replace(b"\n", b"") + b"\x00"
    + b"".join(x + b"\r\n" for x in t[1])
)


@given(nul_payloads, st.booleans())
def test_nul_is_always_refused_and_the_data_drained(payload: bytes, normalize: bool) -> None:
    reader = DataReader(10**7, 10**6, normalize_bare_newlines=normalize)
    stream = re.sub(rb"(?m)^\.", b"..", payload) + b"\r\n.\r\nNOOP\r\n"
    done, rest = feed_stream(reader, stream)
    assert done and rest == b"NOOP\r\n"
    assert reader.problem is DataProblem.NUL
    assert reader.problem.reply(1, 1).code == 550


def test_nul_dot_line_does_not_end_the_data() -> None:
    reader = DataReader(10**7, 1000)
    done, rest = feed_stream(reader, b"Hi\r\n\x00.\r\nMAIL FROM:<x@y>\r\n.\r\nQUIT\r\n")
    assert done and rest == b"QUIT\r\n"
    assert reader.problem is DataProblem.NUL


def test_fragments_of_an_overlong_line() -> None:
    reader = DataReader(10**7, 1000)
    assert not reader.feed(b"x" * 600, complete=False)
    assert not reader.feed(b"x" * 600, complete=False)
    assert not reader.feed(b"\r\n")
    assert reader.feed(b".\r\n")  # the end of data is still recognised after the fragments
    assert reader.problem is DataProblem.LINE_TOO_LONG


def feed_like_the_proxy(reader: DataReader, arrivals: list[bytes]) -> tuple[bool, bytes]:
    """The proxy's DATA loop: one line read, then the complete lines already buffered in one
    go (``complete_lines`` + ``feed_lines``); more data arrives only when no line is complete."""
    buffer = bytearray()
    pending = list(arrivals)
    while True:
        end = buffer.find(b"\r\n")
        if end < 0:
            if not pending:
                return False, bytes(buffer)
            buffer += pending.pop(0)
            continue
        line = bytes(buffer[:end + 2])
        del buffer[:end + 2]
        if reader.feed(line):
            return True, bytes(buffer) + b"".join(pending)
        if ready := complete_lines(buffer):
            block = bytes(buffer[:ready])
            del buffer[:ready]
            reader.feed_lines(block)


_PIECES = st.lists(st.sampled_from([b"a", b"xyz", b".", b"..", b"\r\n", b"\r", b"\n", b"\x00", b" ",
                                    b"\r\n.\r\n", b"\r\n.", b"-" * 30]), max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(stream=_PIECES, cuts=st.lists(st.integers(0, 400), max_size=6), max_line=st.integers(3, 40),
       max_size=st.integers(0, 300), normalize=st.booleans())
def test_taking_buffered_lines_in_one_go_equals_one_line_at_a_time(
    stream: bytes, cuts: list[int], max_line: int, max_size: int, normalize: bool,
) -> None:
    """Whatever the data and however it arrives, the block path ends, refuses, counts and
    stores exactly what the line-at-a-time reader does (also what stays buffered after)."""
    stream += b"\r\n.\r\nQUIT\r\n"
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    arrivals = [stream[a:b] for a, b in itertools.pairwise(points)]
    one, many = (DataReader(max_size, max_line, normalize_bare_newlines=normalize) for _ in range(2))
    expected = feed_stream(one, stream)
    assert feed_like_the_proxy(many, arrivals) == expected
    assert (many.problem, many.size, many.bare_newlines_seen) == (one.problem, one.size, one.bare_newlines_seen)
    if one.problem is None:
        assert many.content() == one.content()
