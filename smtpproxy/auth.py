"""SMTP AUTH for submission listeners: the users file, password checks, and SASL PLAIN/LOGIN.

The users file has one ``user:hash`` line per user; blank lines and lines starting with
``#`` are ignored. Hashes are bcrypt (``$2a$``, ``$2b$``, ``$2y$``, as made by
``htpasswd -B`` or ``doveadm pw -s BLF-CRYPT`` without the scheme prefix) or Argon2
(``$argon2id$`` or ``$argon2i$``). The well-kept ``bcrypt`` and ``argon2-cffi`` libraries do
the checking, in the shared thread pool, because both are slow by design. An unknown user
costs as much time as a known one, so the reply time does not tell which users exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from pathlib import Path

import argon2
import bcrypt

from smtpproxy.blocking import run_blocking

__all__ = ["PasswordFile", "PasswordFileError", "challenge_line", "decode_plain", "decode_response",
           "hash_problem"]

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")
_BCRYPT_MAX_PASSWORD = 72  # bcrypt only ever used this many bytes; tools that hash truncate
_MAX_PARALLEL_CHECKS = 4  # each Argon2 check may take tens of MiB; do not let AUTH floods hog the pool
_argon2 = argon2.PasswordHasher()


class PasswordFileError(ValueError):
    """The users file cannot be used; str() is ``file:line: problem`` (or ``file: problem``)."""

    def __init__(self, file: str, line: int | None, problem: str):
        self.file, self.line, self.problem = file, line, problem
        super().__init__(f"{file}:{line}: {problem}" if line is not None else f"{file}: {problem}")


def hash_problem(hashed: str) -> str | None:
    """Why *hashed* is not a hash we can check, or None when it is fine."""
    if hashed.startswith("$2"):
        return None if _BCRYPT.match(hashed) else "malformed bcrypt hash"
    if hashed.startswith(_ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(hashed)
        except (argon2.exceptions.InvalidHashError, ValueError):
            return "malformed Argon2 hash"
        return None
    return "unsupported hash: expected bcrypt ('$2b$...') or Argon2 ('$argon2id$...')"


def _check(hashed: str, password: bytes) -> bool:
    """Blocking: does *password* match *hashed*? Never raises for a bad password."""
    if hashed.startswith("$2"):
        try:
            return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed.encode("ascii"))
        except ValueError:
            return False
    try:
        return _argon2.verify(hashed, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False


class PasswordFile:
    """The users of one listener, loaded once at startup."""

    def __init__(self, users: dict[str, str], source: str = "<memory>"):
        self.source = source
        self._users = dict(users)
        # A real hash for unknown users, so a miss takes as long as a wrong password.
        self._dummy = next(iter(self._users.values()), None)
        self._gate = asyncio.Semaphore(_MAX_PARALLEL_CHECKS)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PasswordFile:
        """Read and check a users file; :class:`PasswordFileError` names the file and line."""
        file = os.fspath(path)
        try:
            text = Path(file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PasswordFileError(file, None, "not valid UTF-8 text") from None
        except OSError as exc:
            raise PasswordFileError(file, None, f"cannot read users file: {exc.strerror or exc}") from None
        users: dict[str, str] = {}
        first_seen: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, hashed = line.partition(":")
            if not colon or not user or not hashed:
                raise PasswordFileError(file, number, "expected 'user:hash'")
            if any(c.isspace() or not c.isprintable() for c in user):
                raise PasswordFileError(file, number, "user name contains spaces or control characters")
            problem = hash_problem(hashed)
            if problem is not None:
                raise PasswordFileError(file, number, f"user {user!r}: {problem}")
            if user in users:
                raise PasswordFileError(
                    file, number, f"user {user!r} is already defined on line {first_seen[user]}"
                )
            users[user] = hashed
            first_seen[user] = number
        return cls(users, file)

    async def verify(self, user: str, password: str | bytes) -> bool:
        """True when *user* exists and *password* matches; runs off the event loop."""
        secret = password.encode("utf-8") if isinstance(password, str) else password
        hashed = self._users.get(user)
        target = hashed if hashed is not None else self._dummy
        if target is None:
            return False
        async with self._gate:
            matched = await run_blocking(_check, target, secret)
        return matched and hashed is not None


# -- SASL (RFC 4954, RFC 4616) ----------------------------------------------------------


def challenge_line(challenge: bytes) -> bytes:
    """A ``334`` continuation line; the space is required even for an empty challenge."""
    return b"334 " + base64.b64encode(challenge) + b"\r\n"


def decode_response(text: str) -> bytes | None:
    """A client's base64 SASL response (``=`` is the empty response); None if not base64."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def decode_plain(blob: bytes) -> tuple[bytes, bytes, bytes] | None:
    """PLAIN's ``authzid NUL authcid NUL password``, or None when it is not three fields."""
    parts = blob.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]
