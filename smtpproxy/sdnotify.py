"""systemd readiness notifications (``Type=notify``): READY, RELOADING, STOPPING.

The protocol is one datagram to the unix socket named by ``$NOTIFY_SOCKET`` (see
sd_notify(3)); without that variable (not started by systemd) nothing is sent. Written
here in a few lines rather than depending on a binding to libsystemd.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "ready"]


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    """``READY=1`` with this process as the service's main one: every listener is open
    (``Type=notify`` then lets units ordered after this one start)."""
    return notify("READY=1", f"MAINPID={os.getpid()}")


def monotonic_usec() -> str:
    """``MONOTONIC_USEC=...``, which systemd wants alongside RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
