"""Connection caps: a global limit and a per-IP limit, which aiosmtpd does not have.

Without them one client (or a botnet) can hold every file descriptor and every byte of
memory; with them the excess gets a prompt ``421 4.7.0`` and the server lives on.
"""

from __future__ import annotations

from collections import Counter

from smtpproxy.verdicts import Reply

__all__ = ["ConnectionLimiter"]


class ConnectionLimiter:
    def __init__(self, max_sessions: int, max_per_ip: int):
        self.max_sessions = max_sessions
        self.max_per_ip = max_per_ip
        self.active = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str) -> Reply | None:
        """Count a new session in; return the refusal reply when a cap is reached."""
        if self.active >= self.max_sessions:
            return Reply(421, "4.7.0", "Too many connections, try again later")
        if self._per_ip[ip] >= self.max_per_ip:
            return Reply(421, "4.7.0", "Too many connections from your address, try again later")
        self.active += 1
        self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.active -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def sessions_from(self, ip: str) -> int:
        return self._per_ip[ip]
