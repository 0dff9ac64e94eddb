"""The DATA reader: exact end of data, dot-unstuffing, limits, bare CR/LF — by property."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.datareader import DataProblem, DataReader
from smtpproxy.message import Message


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


# -- block reading: the same answers as line by line ------------------------------------------


def readuntil_slices(stream: bytes, separator: bytes, limit: int) -> list[tuple[bytes, bool]]:
    """What asyncio's StreamReader gives for ``readuntil(separator)`` with this ``limit`` (the
    proxy reads the slice ``exc.consumed`` after a LimitOverrunError), all data available:
    (chunk, ends_at_separator). Stops where the stream ends without a separator."""
    out, pos = [], 0
    while pos < len(stream):
        buf = stream[pos:]
        isep = buf.find(separator)
        if isep >= 0 and isep <= limit:
            out.append((buf[: isep + len(separator)], True))
            pos += isep + len(separator)
        elif isep > limit:
            out.append((buf[:isep], False))
            pos += isep
        elif len(buf) + 1 - len(separator) > limit:
            consumed = len(buf) + 1 - len(separator)
            out.append((buf[:consumed], False))
            pos += consumed
        else:
            break
    return out


def by_lines(stream: bytes, max_line: int, normalize: bool, max_size: int) -> tuple[DataReader, bool]:
    reader = DataReader(max_size, max_line, normalize_bare_newlines=normalize)
    for chunk, complete in readuntil_slices(stream, b"\r\n", max_line + 3):
        if reader.feed(chunk, complete=complete):
            return reader, True
    return reader, False


def by_blocks(stream: bytes, max_line: int, normalize: bool, max_size: int, limit: int) -> tuple[DataReader, bool]:
    reader = DataReader(max_size, max_line, normalize_bare_newlines=normalize)
    for chunk, _ in readuntil_slices(stream, b".\r\n", limit):
        if reader.feed_block(chunk):
            return reader, True
    return reader, False


pieces = st.lists(st.sampled_from([
    b"a", b"text ", b".", b"..", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"\r", b"\n", b"\x00", b"x" * 40,
    b"=\r\n", b"\r\n..\r\n", b"Regards.\r\n", b"\n.\n", b"\r.\r", b"\xff",
]), max_size=60)


@given(pieces, st.integers(min_value=3, max_value=200), st.integers(min_value=8, max_value=120),
       st.booleans(), st.integers(min_value=50, max_value=2000))
def test_blocks_give_what_lines_give(parts: list[bytes], limit: int, max_line: int, normalize: bool,
                                     max_size: int) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    lines, lines_done = by_lines(stream, max_line, normalize, max_size)
    blocks, blocks_done = by_blocks(stream, max_line, normalize, max_size, limit)
    assert blocks_done == lines_done
    assert blocks.problem == lines.problem
    if lines.problem is None:
        assert blocks.content() == lines.content()
        assert blocks.bare_newlines_seen == lines.bare_newlines_seen
        # What the proxy wraps with received_message(), which trusts this and checks nothing.
        Message(blocks.content())  # raises on a bare CR or LF


@given(crlf_lines, st.integers(min_value=3, max_value=5000))
def test_blocks_round_trip_clean_messages(lines: list[bytes], limit: int) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    reader, done = by_blocks(dot_stuff(content) + b".\r\nQUIT\r\n", 1000, False, 10**7, limit)
    assert done and reader.problem is None
    assert reader.content() == content


def test_an_empty_message_and_a_first_line_dot() -> None:
    reader = DataReader(10**6, 1000)
    assert reader.feed_block(b".\r\n")  # the DATA command's CRLF went before
    assert reader.content() == b""
    reader = DataReader(10**6, 1000)
    assert not reader.feed_block(b"..\r\n")
    assert reader.feed_block(b".\r\n")
    assert reader.content() == b".\r\n"


# -- read_data on a real StreamReader: the end of data taken whole when it is there ----------


def _read_from_packets(packets: list[bytes], max_line: int, normalize: bool, max_size: int,
                       limit: int, *, first_waiting: bool = True) -> tuple[DataReader, bool, bytes, int]:
    """read_data() on an asyncio StreamReader fed *packets* one loop turn apart (the first
    one before it starts unless *first_waiting*); the reader, whether it saw the end, what is
    left in the stream after it, and the blocks it took."""
    import asyncio

    from smtpproxy.datareader import read_data

    async def main() -> tuple[DataReader, bool, bytes, int]:
        stream = asyncio.StreamReader(limit=limit)
        reader = DataReader(max_size, max_line, normalize_bare_newlines=normalize)
        blocks = 0

        def before_block() -> None:
            nonlocal blocks
            blocks += 1

        if not first_waiting and packets:
            stream.feed_data(packets[0])

        async def feed() -> None:
            for packet in packets[0 if first_waiting else 1:]:
                stream.feed_data(packet)
                await asyncio.sleep(0)
            stream.feed_eof()

        feeder = asyncio.ensure_future(feed())
        done = await read_data(stream, reader, before_block)
        await feeder
        return reader, done, await stream.read(), blocks

    return asyncio.run(main())


@given(parts=pieces, cuts=st.lists(st.integers(min_value=1, max_value=80), max_size=8),
       max_line=st.integers(min_value=8, max_value=120), normalize=st.booleans(),
       max_size=st.integers(min_value=50, max_value=2000), limit=st.integers(min_value=3, max_value=200),
       first_waiting=st.booleans())
def test_read_data_gives_what_lines_give_however_the_packets_come(
        *, parts: list[bytes], cuts: list[int], max_line: int, normalize: bool, max_size: int, limit: int,
        first_waiting: bool) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    points = sorted({c for c in cuts if c < len(stream)})
    packets = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    lines, lines_done = by_lines(stream, max_line, normalize, max_size)
    reader, done, rest, _ = _read_from_packets(packets, max_line, normalize, max_size, limit,
                                               first_waiting=first_waiting)
    assert done == lines_done
    assert reader.problem == lines.problem
    if lines.problem is None:
        assert reader.content() == lines.content()
        assert reader.bare_newlines_seen == lines.bare_newlines_seen
    if done:  # nothing after the end of data was taken
        _, rest_by_lines = feed_stream(DataReader(max_size, max_line, normalize_bare_newlines=normalize),
                                       stream)
        assert rest == rest_by_lines


def test_a_message_already_in_the_buffer_is_one_block() -> None:
    """Lines ending in a full stop no longer cut the message into blocks when its end is there."""
    message = b"Subject: x\r\n\r\nOne.\r\nTwo.\r\n..Three.\r\n.\r\nQUIT\r\n"
    reader, done, rest, blocks = _read_from_packets([message], 100, False, 10_000, 1000, first_waiting=False)
    assert done and rest == b"QUIT\r\n" and blocks == 1
    # arriving while read_data waits: the first ".CRLF" ends a block, the rest is one more
    assert _read_from_packets([message], 100, False, 10_000, 1000)[3] == 2
    assert reader.content() == b"Subject: x\r\n\r\nOne.\r\nTwo.\r\n.Three.\r\n"
    # the end's CRLF in one packet, its dot in the next: still found
    reader, done, rest, _ = _read_from_packets([b"a\r\n", b".\r\nQUIT\r\n"], 100, False, 10_000, 1000)
    assert done and rest == b"QUIT\r\n" and reader.content() == b"a\r\n"
    reader, done, rest, _ = _read_from_packets([b"a\r", b"\n.\r\nQUIT\r\n"], 100, False, 10_000, 1000)
    assert done and rest == b"QUIT\r\n" and reader.content() == b"a\r\n"
    # the end right after a block that ended with a CRLF, a look-alike further on: the first wins
    for packets in ([b"x.\r\n.\r\nmore\r\n.\r\nQUIT\r\n"], [b"x.\r\n", b".\r\nmore\r\n.\r\nQUIT\r\n"]):
        reader, done, rest, _ = _read_from_packets(packets, 100, False, 10_000, 1000)
        assert done and reader.content() == b"x.\r\n" and rest == b"more\r\n.\r\nQUIT\r\n"
