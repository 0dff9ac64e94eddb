"""The console's sessions, kept on the server.

The session cookie is signed, and a signature cannot be taken back: a cookie copied before
its owner signed out (from a shared computer, a proxy's log, a stolen laptop) would open the
console until it expired. So the cookie carries only a random id, and a session is live
while its id is in this table: signing out ends it, an admin can end anyone's (the
Sessions page), it ends after its lifetime or an idle spell, and a restart of
``smtpproxy web`` ends them all. A password session's account is looked up again at its
source every :data:`RECHECK` seconds (the console does that, :meth:`SessionTable.due`).

The table is bounded: each name keeps at most :data:`PER_NAME` live sessions (a new one ends
that name's least recently used), and sessions past their lifetime or idle time are dropped.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpproxy.web.accounts import Viewer

__all__ = ["PER_NAME", "RECHECK", "LiveSession", "SessionTable"]

PER_NAME = 20
"""Live sessions one name may have: a browser each, with room to spare. A digest link can be
followed any number of times; this keeps someone who does so from growing the table."""

RECHECK = 300.0
"""Seconds between two lookups of a session's account at its source: an account removed or
changed there ends its sessions within this time."""


@dataclass(slots=True)
class LiveSession:
    """One signed-in browser. ``id`` is the cookie's secret; ``handle`` names the session on
    the Sessions page and in the audit log, where the id must not appear."""

    viewer: Viewer
    via: str
    """How it signed in: ``password`` or ``link``."""
    client: str
    started: float
    seen: float
    login: str | None = None
    """The name typed at a password sign-in, to look the account up again; None for a link."""
    stamp: str = ""
    """The account's password stamp at sign-in (:func:`smtpproxy.web.accounts.stamp`)."""
    checked: float = 0.0
    """When its account was last looked up (or signed in)."""
    id: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    handle: str = field(default_factory=lambda: secrets.token_hex(6))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class SessionTable:
    """The live sessions of this process, by id. No I/O: the routes ask it."""

    def __init__(self, lifetime: float, idle: float | None = None, *, recheck: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self.idle = lifetime if idle is None else idle
        self.recheck = RECHECK if recheck is None else recheck
        self._clock = clock
        self._sessions: dict[str, LiveSession] = {}

    def start(self, viewer: Viewer, via: str, client: str, *, login: str | None = None,
              stamp: str = "") -> LiveSession:
        now = self._clock()
        self._drop_expired(now)
        mine = sorted((s for s in self._sessions.values() if s.viewer.name == viewer.name),
                      key=lambda s: s.seen)
        for oldest in mine[: max(0, len(mine) - PER_NAME + 1)]:
            del self._sessions[oldest.id]
        session = LiveSession(viewer, via, client, started=now, seen=now, login=login, stamp=stamp,
                              checked=now)
        self._sessions[session.id] = session
        return session

    def find(self, session_id: object) -> LiveSession | None:
        """The live session with this id (marked as seen now), or None: unknown, ended, expired."""
        if not isinstance(session_id, str):
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if self._over(session, now):
            del self._sessions[session_id]
            return None
        session.seen = now
        return session

    def due(self, session: LiveSession) -> bool:
        """Whether *session*'s account is to be looked up again now; if so, it is marked as
        checked (a source that cannot answer is asked again only after the interval too)."""
        now = self._clock()
        if session.login is None or now - session.checked < self.recheck:
            return False
        session.checked = now
        return True

    def end(self, session_id: str) -> LiveSession | None:
        return self._sessions.pop(session_id, None)

    def end_handle(self, handle: str) -> LiveSession | None:
        """End the live session the Sessions page names *handle*; the session, or None."""
        return next(iter(self._end_where(lambda s: s.handle == handle)), None)

    def end_all(self, name: str) -> list[LiveSession]:
        """End every live session of *name* (a lost laptop, a password changed in LDAP)."""
        return self._end_where(lambda s: s.viewer.name == name)

    def _end_where(self, chosen: Callable[[LiveSession], bool]) -> list[LiveSession]:
        """End the live sessions *chosen* picks (one past its time is not counted as ended now)."""
        self._drop_expired(self._clock())
        ended = [s for s in self._sessions.values() if chosen(s)]
        for session in ended:
            del self._sessions[session.id]
        return ended

    def live(self) -> list[LiveSession]:
        """The live sessions, the most recently seen first."""
        self._drop_expired(self._clock())
        return sorted(self._sessions.values(), key=lambda s: s.seen, reverse=True)

    def _over(self, session: LiveSession, now: float) -> bool:
        return now - session.started >= self.lifetime or now - session.seen >= self.idle

    def _drop_expired(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if self._over(s, now)]:
            del self._sessions[session.id]
