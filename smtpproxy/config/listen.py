"""Milter endpoints in Postfix's syntax (``inet:host:port``, ``unix:/path``), parsed once.

Shared by the configuration check and the server, with no other dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ListenAddress", "parse_listen"]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: TCP ``host``/``port``, or a Unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""


def parse_listen(text: str) -> ListenAddress:
    """Parse Postfix's milter endpoint syntax: ``inet:host:port``, ``inet:[::1]:port``,
    ``unix:/path`` (``local:`` is a synonym). ValueError says what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"expected inet:HOST:PORT or unix:/PATH, got {text!r}")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"a Unix socket needs an absolute path, got {rest!r}")
        return ListenAddress(path=rest)
    if kind != "inet":
        raise ValueError(f"unknown transport {kind!r}: use inet:HOST:PORT or unix:/PATH")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected inet:HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number 0..65535, got {port_text!r}")
    return ListenAddress(host=host, port=int(port_text))
