"""Reading the DATA section safely: the defence against SMTP smuggling lives here.

The end of data is exactly ``CRLF . CRLF``; nothing else ends it. A bare LF or bare CR
anywhere is either rejected (default) or normalised to CRLF here, *before any plugin runs*,
so plugins, DKIM and the upstream all see the same bytes, and no ``\\n.\\n`` or ``\\r.\\r``
can ever turn one message into two further down the line (aiosmtplib and many MTAs treat a
bare LF as a line end). A NUL octet is always refused, whatever ``bare_newlines`` says: it
has no place in SMTP text (RFC 5321 2.3.8, RFC 5322 2.3), no canonical replacement, and an
upstream that strips NULs would read a ``\\x00.`` line as the end of data. Lines are
dot-unstuffed (RFC 5321 4.5.2). Limits on the total size and the line length are enforced
while reading; the line length includes the CRLF, and only a line that starts with a dot
gets one octet more (the transparency dot the client added). The reader keeps consuming to
the real end of data so the reply lands where the client expects it (RFC 5321 4.2.5).
"""

from __future__ import annotations

import asyncio
import enum
import mmap
import re
from collections.abc import Callable

from smtpproxy.spool import DEFAULT_SPOOL_THRESHOLD, Spool
from smtpproxy.verdicts import Reply

__all__ = ["BLOCK_SEPARATOR", "DATA_BUFFER", "DataProblem", "DataReader", "read_data"]

_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
END_OF_DATA = b".\r\n"
BLOCK_SEPARATOR = END_OF_DATA
"""What the front end reads blocks up to (``StreamReader.readuntil``), for :meth:`DataReader.feed_block`."""


class DataProblem(enum.Enum):
    """Why a message was refused while it was being read, with the reply to send."""

    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"
    BARE_NEWLINE = "bare_newline"
    NUL = "nul"

    def reply(self, max_size: int, max_line: int) -> Reply:
        if self is DataProblem.TOO_BIG:
            return Reply(552, "5.3.4", f"Message size exceeds fixed limit of {max_size} bytes")
        if self is DataProblem.LINE_TOO_LONG:
            return Reply(
                500, "5.5.2",
                f"Line too long: text lines are limited to {max_line} bytes (RFC 5321 4.5.3.1.6)",
            )
        if self is DataProblem.NUL:
            return Reply(550, "5.6.0", "NUL characters in message data are not allowed")
        return Reply(
            550, "5.5.2",
            "Bare CR or LF in message data is not allowed; lines must end with CRLF "
            "(see https://www.postfix.org/smtp-smuggling.html)",
        )


class DataReader:
    """Accumulates one message from DATA lines and says when it is complete.

    Feed it what the stream gives: each complete line *including* its CRLF, or a fragment
    of an over-long line with ``complete=False``. ``feed`` returns True at end of data.
    Big messages are spooled to a temporary file (see :mod:`smtpproxy.spool`).
    """

    __slots__ = (
        "_buffer", "_last2", "_line_len", "_line_limit", "_long_text", "_normalize", "_partial",
        "bare_newlines_seen", "max_line", "max_size", "problem", "size",
    )

    def __init__(self, max_size: int, max_line: int, *, normalize_bare_newlines: bool = False,
                 spool_threshold: int = DEFAULT_SPOOL_THRESHOLD, spool_dir: str | None = None):
        self.max_size = max_size
        self.max_line = max_line
        self._normalize = normalize_bare_newlines
        self._buffer = Spool(spool_threshold, spool_dir)
        self._line_len = 0  # bytes seen so far of the current (unfinished) line
        self._line_limit = max_line  # for the current line: one more when it starts with a dot
        self.size = 0
        self.problem: DataProblem | None = None
        self.bare_newlines_seen = 0
        # feed_block's state: the unfinished last line, and the last two octets seen (the
        # DATA command's CRLF to begin with), which say whether a "." starts a line.
        self._partial = b""
        self._last2 = b"\r\n"
        # The shortest text (without CRLF) that may be too long: a dotted line's longest.
        self._long_text = max(1, max_line - 1)

    def feed(self, chunk: bytes, *, complete: bool = True) -> bool:
        """Take one line (or a fragment of a long one). Returns True at end of data."""
        if complete and self._line_len == 0 and chunk == END_OF_DATA:
            return True
        if self._line_len == 0:
            # The limit counts the CRLF; a stuffed leading dot is the client's, not the text's.
            self._line_limit = self.max_line + (chunk[:1] == b".")
        self._line_len += len(chunk)
        if self._line_len > self._line_limit:
            self._fail(DataProblem.LINE_TOO_LONG)
        if complete:
            self._line_len = 0
        if self.problem is not None:
            return False
        if not complete:
            # Only reachable for lines within max_line but longer than the stream buffer;
            # the caller sizes its buffer above max_line, so treat it as too long.
            self._fail(DataProblem.LINE_TOO_LONG)
            return False
        line = chunk[1:] if chunk[:1] == b"." else chunk
        if b"\x00" in line:
            self._fail(DataProblem.NUL)
            return False
        text = line[:-2]
        if b"\n" in text or b"\r" in text:
            self.bare_newlines_seen += 1
            if not self._normalize:
                self._fail(DataProblem.BARE_NEWLINE)
                return False
            line = _ANY_NEWLINE.sub(b"\r\n", line)
        self.size += len(line)
        if self.size > self.max_size:
            self._fail(DataProblem.TOO_BIG)
            return False
        self._buffer.write(line)
        return False

    def feed_block(self, chunk: bytes) -> bool:
        """Take the next octets of the DATA section, any number of lines. True at end of data.

        The stream is read up to each :data:`BLOCK_SEPARATOR` (``.CRLF``) or in slices that
        stop short of one, so a chunk holds no end of data but at its very end; the result
        is exactly what feeding the same octets line by line to :meth:`feed` gives, at a
        fraction of the cost: a run of clean lines (no NUL, no bare CR or LF, none too
        long) is checked, unstuffed and stored with a few whole-run operations, and only a
        run with something wrong goes line by line to find and report it.
        """
        context = self._last2 + chunk
        self._last2 = context[-2:]
        if chunk.endswith(END_OF_DATA) and context[-5:-3] == b"\r\n":
            data = self._partial + chunk[:-3]  # ends at a CRLF, or is empty
            self._partial = b""
            if data and self.problem is None:
                self._lines(data)
            return True
        if self.problem is not None:
            return False  # draining: only the end of data matters
        data = self._partial + chunk
        cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0
        self._partial = data[cut:]
        if cut:
            self._lines(data[:cut])
        if self.problem is None and len(self._partial) > self.max_line:
            # No CRLF within the longest line allowed (a dotted one): too long, whatever follows.
            self._partial = b""
            self._fail(DataProblem.LINE_TOO_LONG)
        return False

    def end_within(self, buffer: bytes | bytearray) -> int:
        """How many octets of *buffer*, the next ones of the DATA section, reach to the end
        of data and no further; 0 when *buffer* does not hold it. Taken as one block, they
        hold no end of data but at their very end, as :meth:`feed_block` wants."""
        last2 = self._last2  # the end's CRLF may have come with the block before
        if last2 == b"\r\n" and buffer[:3] == END_OF_DATA:
            return 3
        if last2[1:] == b"\r" and buffer[:4] == b"\n" + END_OF_DATA:
            return 4
        end = buffer.find(b"\r\n" + END_OF_DATA)
        return end + 5 if end >= 0 else 0

    def feed_section(self, section: bytes) -> None:
        """Take a whole DATA section ending with the end of data, cut into blocks exactly
        as the SMTP front end reads them from its stream (the offline tracer uses this)."""
        start = 0
        while True:
            end = section.find(BLOCK_SEPARATOR, start)
            if end < 0:
                raise ValueError("the DATA section has no end of data")
            end += len(BLOCK_SEPARATOR)
            if self.feed_block(section[start:end]):
                return
            start = end

    def _lines(self, run: bytes) -> None:
        """A run of whole lines, each ending with CRLF, none of them the end of data."""
        lines = run.count(b"\r\n")
        if (b"\x00" in run or run.count(b"\r") != lines or run.count(b"\n") != lines
                or (len(run) >= self._long_text and max(map(len, run.split(b"\r\n"))) >= self._long_text)):
            self._line_by_line(run)
            return
        text = run[1:] if run[:1] == b"." else run
        text = text.replace(b"\r\n.", b"\r\n")  # one transparency dot off each line
        self.size += len(text)
        if self.size > self.max_size:
            self._fail(DataProblem.TOO_BIG)
            return
        self._buffer.write(text)

    def _line_by_line(self, run: bytes) -> None:
        start = 0
        while start < len(run) and self.problem is None:
            end = run.index(b"\r\n", start) + 2
            self.feed(run[start:end])
            start = end

    def _fail(self, problem: DataProblem) -> None:
        if self.problem is None:
            self.problem = problem
            self._buffer.discard()  # free the memory now; we only drain from here on

    def content(self) -> bytes | mmap.mmap:
        """The message as received (dot-unstuffed, CRLF only). Only valid without a problem.

        Small messages come back as ``bytes``; spooled ones as a read-only memory map of the
        spool file, which :class:`~smtpproxy.message.Message` accepts without copying.
        """
        if self.problem is not None:
            raise RuntimeError(f"message was refused: {self.problem.value}")
        return self._buffer.finish()


DATA_BUFFER = 64 * 1024
"""The stream's buffer limit while a message comes in (asyncio pauses reading at twice it):
big enough that a message is read in few, large blocks."""


async def read_data(stream: asyncio.StreamReader, reader: DataReader,
                    before_block: Callable[[], None]) -> bool:
    """Read a DATA section from *stream* into *reader*; False when the client went away.

    Blocks, not lines: everything up to the end of data when the stream's buffer holds it,
    else up to each ".CRLF" (where the end of data can be) or a slice of the stream's buffer,
    raised for the message from one line's worth (the command reader's bound on what a
    silent client can make us hold) to :data:`DATA_BUFFER`, and put back after.
    *before_block* runs before each read (the front end's DATA timer).
    """
    line_limit: int = stream._limit  # type: ignore[attr-defined]
    stream._limit = max(line_limit, DATA_BUFFER)  # type: ignore[attr-defined]
    try:
        while True:
            before_block()
            try:
                # The end of data already in the buffer (a small message, as a rule): all of it
                # in one block, instead of a block per ".CRLF" (every line ending in a full stop).
                end = reader.end_within(stream._buffer)  # type: ignore[attr-defined]
                chunk = await (stream.readexactly(end) if end else stream.readuntil(BLOCK_SEPARATOR))
            except asyncio.LimitOverrunError as exc:
                chunk = await stream.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return False
            if reader.feed_block(chunk):
                return True
    finally:
        stream._limit = line_limit  # type: ignore[attr-defined]
