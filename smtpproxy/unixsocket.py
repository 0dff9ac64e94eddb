"""Unix socket files of the listeners that may use one (the milter, the policy service):
a stale file from an earlier run is removed, a live one is never taken over."""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path

__all__ = ["clear_stale_socket", "remove_socket"]


def clear_stale_socket(path: str) -> None:
    """Remove a socket file a previous run left behind; refuse if something still answers."""
    target = Path(path)
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        target.unlink()
    else:
        raise OSError(f"another process is listening on {path}")
    finally:
        probe.close()


def remove_socket(path: str) -> None:
    """Remove the socket file at shutdown (already gone is fine)."""
    with contextlib.suppress(OSError):
        Path(path).unlink()
