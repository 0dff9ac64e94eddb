"""Mail at rest is readable by its owner only, whatever the umask the proxy was started with.

A quarantined message or a Maildir file holds someone's mail, and its record names who sent
it to whom: ``0600`` for files and ``0700`` for their directories. The modes are given when
the file or directory is created (``os.open``/``os.mkdir`` with a mode, which the umask can
only narrow), never set by a ``chmod`` afterwards, which would leave a moment in which the
file is readable by others. Files and directories left wider by an older version (or
created by hand) are narrowed when the store starts, with one ``file_modes_corrected`` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from smtpproxy.eventlog import event

__all__ = ["DIR_MODE", "FILE_MODE", "make_private_dirs", "narrow_modes", "open_private"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dirs(path: Path) -> None:
    """Create *path* and any missing parent, each ``0700`` from its creation."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.mkdir(directory, DIR_MODE)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")


def open_private(path: Path) -> BinaryIO:
    """A new file at *path*, ``0600`` from its creation, open for writing.

    A leftover at *path* (a ``.tmp`` of an interrupted write) is replaced, never reused:
    its mode may be wider.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "wb")


def narrow_modes(directories: Iterable[Path], *, store: str) -> int:
    """Take group and other permissions away from *directories* and the files directly in
    them (symbolic links are left alone). Returns how many were narrowed; logs one line."""
    narrowed: list[str] = []
    for directory in directories:
        if not directory.is_dir():
            continue
        entries = [directory, *directory.iterdir()]
        for entry in entries:
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue  # gone meanwhile (a release, a delivery)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue
            if st.st_mode & 0o077:
                os.chmod(entry, stat.S_IMODE(st.st_mode) & 0o700)
                narrowed.append(entry.name or str(entry))
    if narrowed:
        event("file_modes_corrected", level=logging.WARNING, store=store, count=len(narrowed),
              first=narrowed[0])
    return len(narrowed)
