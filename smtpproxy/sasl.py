"""The SASL exchange of SMTP AUTH (RFC 4954), PLAIN and LOGIN, behind a connection's lines.

The SMTP front end checks when AUTH may be used (a listener with users, after HELO, over
TLS, not twice, not inside a transaction) and hands the command's argument to
:func:`authenticate` with a :class:`SaslPeer`: the few things the exchange needs of the
connection (write a challenge, read the answer, reply, count an error, close). Here the
mechanism is parsed, the credentials decoded, the login throttle asked and told, and the
password checked (:mod:`smtpproxy.auth`).
"""

from __future__ import annotations

import logging
from typing import Protocol

from smtpproxy.auth import PasswordFile, challenge_line, decode_plain, decode_response
from smtpproxy.eventlog import event
from smtpproxy.loginthrottle import LoginThrottle
from smtpproxy.verdicts import Reply

__all__ = ["MECHANISMS", "SaslPeer", "authenticate"]

MECHANISMS = ("PLAIN", "LOGIN")
LOCKED_OUT = Reply(421, "4.7.0", "Too many failed logins from your address, try again later")


class SaslPeer(Protocol):
    """What the exchange needs of the client's connection."""

    async def write(self, data: bytes) -> None:
        """Send raw octets (a ``334`` challenge line)."""

    async def read_line(self) -> bytes | None:
        """The client's next line without CRLF; None when it was bad (answered) or is gone."""

    async def reply(self, reply: Reply) -> None: ...

    async def error(self, reply: Reply) -> None:
        """Reply, counting a protocol error (too many close the session)."""

    def close(self) -> None: ...


async def authenticate(
    peer: SaslPeer, arg: str, *, users: PasswordFile, throttle: LoginThrottle | None, client_ip: str,
) -> tuple[str, str] | None:
    """Run AUTH's exchange: (user, mechanism) once the password checked out, else None
    (every refusal, and a lock-out's ``421`` and close, already sent)."""
    mechanism, _, initial = arg.partition(" ")
    mechanism, initial = mechanism.upper(), initial.strip()
    if not mechanism or " " in initial:
        await peer.error(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        return None
    if mechanism not in MECHANISMS:
        await peer.error(Reply(504, "5.5.4", "Unrecognized authentication type"))
        return None
    exchange = _Exchange(peer, throttle, client_ip)
    if mechanism == "PLAIN":
        credentials = await exchange.plain(initial)
    else:
        credentials = await exchange.login(initial)
    if credentials is None:
        return None  # cancelled or malformed, and answered
    login, password = credentials
    try:
        user: str | None = login.decode("utf-8")
    except UnicodeDecodeError:
        user = None  # no such user can exist
    shown = login.decode("utf-8", "backslashreplace")
    if throttle is not None and (await throttle.admit(client_ip, shown)).locked:
        await peer.reply(LOCKED_OUT)
        peer.close()
        return None
    ok = user is not None and await users.verify(user, password)
    if not ok or user is None:
        await exchange.failed(mechanism, login, password)
        return None
    if throttle is not None:
        await throttle.succeeded(client_ip, user)
    return user, mechanism


class _Exchange:
    """One AUTH command's exchange of challenges and responses."""

    __slots__ = ("client_ip", "peer", "throttle")

    def __init__(self, peer: SaslPeer, throttle: LoginThrottle | None, client_ip: str) -> None:
        self.peer, self.throttle, self.client_ip = peer, throttle, client_ip

    async def response(self, initial: str | None, challenge: bytes) -> bytes | None:
        """The client's decoded SASL response: *initial*, or its answer to a 334 challenge.

        None when the exchange ends here (cancelled with ``*``, not base64, connection
        gone); the client has then had its reply.
        """
        if initial is None:
            await self.peer.write(challenge_line(challenge))
            line = await self.peer.read_line()
            if line is None:
                return None
            initial = line.decode("ascii", "replace").strip()
            if initial == "*":
                await self.peer.reply(Reply(501, "5.7.0", "Authentication cancelled"))
                return None
        decoded = decode_response(initial)
        if decoded is None:
            await self.peer.error(Reply(501, "5.5.2", "Cannot decode base64 response"))
        return decoded

    async def plain(self, initial: str) -> tuple[bytes, bytes] | None:
        """RFC 4616 PLAIN: ``authzid NUL authcid NUL password``; authzid empty or authcid."""
        blob = await self.response(initial or None, b"")
        if blob is None:
            return None
        fields = decode_plain(blob)
        if fields is None:
            await self.peer.error(Reply(501, "5.5.2", "Malformed PLAIN response"))
            return None
        authzid, login, password = fields
        if authzid and authzid != login:  # acting as another user is not supported
            await self.failed("PLAIN", login, password)
            return None
        return login, password

    async def login(self, initial: str) -> tuple[bytes, bytes] | None:
        """The LOGIN mechanism: user name, then password, each base64 after a 334 prompt."""
        login = await self.response(initial or None, b"Username:")
        if login is None:
            return None
        password = await self.response(None, b"Password:")
        if password is None:
            return None
        return login, password

    async def failed(self, mechanism: str, login: bytes, password: bytes) -> None:
        """535, counted by the login throttle (which logs ``auth_failed``) when there is one."""
        user = login.decode("utf-8", "backslashreplace")
        if self.throttle is not None:
            await self.throttle.failed(self.client_ip, user, password, mechanism=mechanism)
        else:
            event("auth_failed", level=logging.WARNING, client=self.client_ip,
                  mechanism=mechanism, user=user)
        await self.peer.error(Reply(535, "5.7.8", "Authentication credentials invalid"))
