"""The console's accounts and what each may see.

The accounts file has one ``name:hash:role[:domains]`` line per account, with the hashes of
SMTP AUTH's users file (bcrypt or Argon2, checked by :class:`smtpproxy.auth.PasswordFile`):

    root:$2b$12$...:admin
    hostmaster:$argon2id$...:domain:example.com,example.org
    bob@example.com:$2b$12$...:recipient

Instead of the file, ``console.accounts`` may name a lookup table (``table:NAME``) that answers
a sign-in name with ``hash:role[:domains]`` (:class:`TableAccounts`), or ``ldap`` for a bind
as the person (:mod:`smtpproxy.web.directory`). A source that cannot answer raises
:class:`AccountsUnavailable`: the sign-in page then says "try again later", never signs in.

A session's account is looked up again at its source every few minutes
(:meth:`AccountSource.current`): removed, given another role or domains, or (file, table)
given another password, its sessions end.

An admin sees and does everything; a domain admin everything about messages with a
recipient in their domains (and acts for those recipients only); a recipient only their own
mail, for themselves. A recipient also signs in through any valid link of their digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import bcrypt

from smtpproxy.auth import PasswordFile, PasswordFileError, hash_problem
from smtpproxy.config.console import parse_role
from smtpproxy.eventlog import event
from smtpproxy.store import Held, Search
from smtpproxy.tables import Table, TableUnavailable

__all__ = ["Account", "AccountSource", "Accounts", "AccountsUnavailable", "TableAccounts", "Viewer"]

ROLES = ("admin", "domain", "recipient")


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is signed in, and the scope that follows from their role."""

    name: str
    role: str
    domains: tuple[str, ...] = field(default=())

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def scoped(self, search: Search) -> Search:
        """*search* narrowed to what this viewer may see."""
        if self.role == "domain":
            search.domains = self.domains
        elif self.role == "recipient":
            search.recipient = self.name
        return search

    def may_act_for(self, address: str) -> bool:
        if self.role == "admin":
            return True
        if self.role == "domain":
            return address.rpartition("@")[2].lower() in self.domains
        return address.lower() == self.name.lower()

    def recipients(self, held: Held) -> list[str]:
        """The recipients of *held* this viewer sees and acts for (none: not theirs at all)."""
        return [address for address in held.recipients if self.may_act_for(address)]


@dataclass(frozen=True, slots=True)
class Account:
    """An account as its source has it now: who it signs in as, and a stamp of its password
    hash that changes with the password ("" where the source shows no hash: LDAP)."""

    viewer: Viewer
    stamp: str = ""


def stamp(hashed: str) -> str:
    """What a session keeps of its password hash: enough to see it changed, not the hash."""
    return hashlib.sha256(hashed.encode()).hexdigest()[:16]


class Accounts:
    """The accounts file, loaded once; :meth:`verify` runs off the event loop."""

    def __init__(self, passwords: PasswordFile, viewers: dict[str, Viewer],
                 stamps: dict[str, str] | None = None) -> None:
        self.passwords = passwords
        self.viewers = viewers
        self.stamps = stamps or {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Accounts:
        """Read and check the file; :class:`PasswordFileError` names the file and line."""
        file = os.fspath(path)
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PasswordFileError(file, None, f"cannot read accounts file: {exc}") from None
        hashes: dict[str, str] = {}
        viewers: dict[str, Viewer] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) not in (3, 4) or not parts[0]:
                raise PasswordFileError(file, number, "expected 'name:hash:role[:domains]'")
            name, hashed, role = parts[0], parts[1], parts[2]
            domains = tuple(
                d.strip().lower() for d in (parts[3] if len(parts) == 4 else "").split(",") if d.strip()
            )
            if any(c.isspace() or not c.isprintable() for c in name):
                raise PasswordFileError(file, number, "name contains spaces or control characters")
            problem = hash_problem(hashed)
            if problem is not None:
                raise PasswordFileError(file, number, f"account {name!r}: {problem}")
            if role not in ROLES:
                raise PasswordFileError(
                    file, number, f"account {name!r}: role must be admin, domain or recipient"
                )
            if role == "domain" and not domains:
                raise PasswordFileError(file, number, f"account {name!r}: a domain admin needs domains")
            if role == "recipient" and "@" not in name:
                raise PasswordFileError(
                    file, number, f"account {name!r}: a recipient's name is their address"
                )
            if name in hashes:
                raise PasswordFileError(file, number, f"account {name!r} is defined twice")
            hashes[name] = hashed
            viewers[name] = Viewer(name, role, domains)
        return cls(PasswordFile(hashes, file), viewers, {n: stamp(h) for n, h in hashes.items()})

    async def verify(self, name: str, password: str) -> Account | None:
        """The account when *password* is right (an unknown name costs as much time)."""
        if await self.passwords.verify(name, password):
            return await self.current(name)
        return None

    async def current(self, name: str) -> Account | None:
        viewer = self.viewers.get(name)
        return Account(viewer, self.stamps.get(name, "")) if viewer is not None else None


class AccountsUnavailable(Exception):
    """The accounts' source (a table, the directory) cannot answer now: nobody signs in."""


class AccountSource(Protocol):
    """What the console signs in through: :class:`Accounts`, :class:`TableAccounts` or
    :class:`smtpproxy.web.directory.DirectoryAccounts`."""

    async def verify(self, name: str, password: str) -> Account | None:
        """The account *name* signs in as with *password*, or None."""
        ...

    async def current(self, name: str) -> Account | None:
        """The account *name* (as typed at sign-in) signs in as now, asked without a
        password: None when it is gone or signs in no more. Either may raise
        :class:`AccountsUnavailable`."""
        ...


def parse_account(name: str, value: str) -> tuple[str, Viewer]:
    """One ``hash:role[:domains]`` value for *name*: its hash and viewer; ValueError if unusable."""
    if any(c.isspace() or not c.isprintable() for c in name):
        raise ValueError("name contains spaces or control characters")
    hashed, _, rest = value.strip().partition(":")
    problem = hash_problem(hashed)
    if problem is not None:
        raise ValueError(problem)
    role, domains = parse_role(rest)
    if role == "recipient" and "@" not in name:
        raise ValueError("a recipient's name is their address")
    return hashed, Viewer(name, role, domains)


class TableAccounts:
    """Accounts in a lookup table (``console.accounts: table:NAME``): the sign-in name is the
    key, the first value ``hash:role[:domains]``."""

    def __init__(self, table: Table) -> None:
        self.table = table
        # A real hash for names the table does not know, so a miss costs as much as a wrong password.
        self._dummy = bcrypt.hashpw(b"no such account", bcrypt.gensalt(12)).decode()

    async def verify(self, name: str, password: str) -> Account | None:
        found = await self._lookup(name)
        hashed = found[0] if found is not None else self._dummy
        ok = await PasswordFile({name: hashed}, f"table {self.table.name}").verify(name, password)
        return Account(found[1], stamp(hashed)) if ok and found is not None else None

    async def current(self, name: str) -> Account | None:
        found = await self._lookup(name)
        return Account(found[1], stamp(found[0])) if found is not None else None

    async def _lookup(self, name: str) -> tuple[str, Viewer] | None:
        """The hash and viewer the table has for *name*; None if none, or none usable."""
        if self.table.fold_case:
            name = name.lower()
        try:
            found = await self.table.lookup(name)
        except TableUnavailable as exc:
            raise AccountsUnavailable(str(exc)) from None
        if not found:
            return None
        try:
            return parse_account(name, found[0])
        except ValueError as exc:
            event("console_account_invalid", level=logging.WARNING, table=self.table.name,
                  account=name, error=str(exc))
            return None
