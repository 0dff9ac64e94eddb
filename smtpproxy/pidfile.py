"""The pid file ``smtpproxy reload`` reads: written by whichever process owns the port.

A leaf module: the proxy (one process) and the workers' supervisor both use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["remove_pid_file", "write_pid_file"]


def write_pid_file(path: Path) -> None:
    """Our pid, written atomically (``smtpproxy reload`` never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it is still ours (a newer process may have replaced it)."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
