"""Where a message's bytes live while it is being received: memory, or a file once it is big.

A proxy that holds every message in memory, and copies it on the way out, needs several
times the size of its largest message in RAM. Small messages (the vast majority) stay in
a ``bytearray``; once a message passes ``threshold`` bytes it moves to an unlinked
temporary file, and the finished message is memory-mapped read-only. The page cache then
holds the bytes, the process maps them once, and nothing downstream needs a copy: the
:class:`~smtpproxy.message.Message` parses the mapping in place and the delivery streams
from it.
"""

from __future__ import annotations

import mmap
import tempfile
from typing import BinaryIO

__all__ = ["DEFAULT_SPOOL_THRESHOLD", "Spool"]

DEFAULT_SPOOL_THRESHOLD = 1_048_576
"""Messages above 1 MiB go to disk; below, a file costs more than the memory it saves."""


class Spool:
    """An append-only byte store that spills to a temporary file above a threshold."""

    __slots__ = ("_buffer", "_directory", "_file", "size", "threshold")

    def __init__(self, threshold: int = DEFAULT_SPOOL_THRESHOLD, directory: str | None = None):
        self.threshold = threshold
        self._directory = directory
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._buffer += data
        if len(self._buffer) > self.threshold:
            # Unlinked at once: nothing is left behind if the process dies.
            self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115 - closed in finish/discard
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def finish(self) -> bytes | mmap.mmap:
        """The complete content: ``bytes`` when small, a read-only mapping of the file when big.

        The mapping keeps its own reference to the file; it is released with the mapping.
        """
        if self._file is None:
            content = bytes(self._buffer)
            self._buffer = bytearray()
            return content
        file, self._file = self._file, None
        try:
            file.flush()
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        finally:
            file.close()

    def discard(self) -> None:
        """Forget everything written so far (a refused message); frees memory or the file."""
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
