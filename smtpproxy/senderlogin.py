"""Sender/login binding: Postfix's ``smtpd_sender_login_maps`` with ``reject_sender_login_mismatch``.

A map says which logins own a sender address. On a submission listener:

- an authenticated client may use only a sender its login owns (``553 5.7.1 <a@b>: Sender
  address rejected: not owned by user alice``, Postfix's words); a sender the map does not
  know is refused too (``unknown_senders: reject``, Postfix's reject_sender_login_mismatch)
  or let through (``allow``, its reject_known_sender_login_mismatch);
- an unauthenticated client may not use a sender the map knows (``553 5.7.1 <a@b>: Sender
  address rejected: not logged in``, reject_unauthenticated_sender_login_mismatch);
- the null sender is not checked, as in Postfix (``state->sender && *state->sender``).

The search order is Postfix's for a sender ``user+ext@domain``: ``user+ext@domain``, then
``user@domain`` (the recipient delimiter and what follows it removed), then ``@domain``; the
first key found decides. Keys are compared without regard to case (Postfix folds lookup keys),
and so are login names (``strcasecmp_utf8``). A key ``/regex/`` matches addresses by pattern;
its logins may use the pattern's groups (``$1``).

With ``headers: true`` every address in the ``From:`` and ``Sender:`` fields is held to the
same rule, and so is an address-like text in a display name (``"ceo@bank.test" <me@my.test>``):
what the reader sees must be owned too.

The map is a :class:`LoginLookup` (key -> logins), so other tables can stand in for it:
``sender_login: {table: NAME}`` uses a lookup table (smtpproxy.tables) by name. A table that
cannot answer gives ``451 4.3.0 <a@b>: Sender address rejected: temporary lookup failure``
(Postfix's reply for a table that is down), never a pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from pathlib import Path
from typing import Literal, Protocol

from smtpproxy.message import Message
from smtpproxy.tables import Table, TableUnavailable, address_keys, get_table
from smtpproxy.tables.errors import TableError
from smtpproxy.tables.memory import logical_lines
from smtpproxy.verdicts import Reply


class SenderLoginSection(Protocol):
    """What a validated ``sender_login`` section gives (smtpproxy.config.schema.SenderLogin,
    whose validators import this module)."""

    @property
    def map(self) -> Mapping[str, str | list[str]]: ...
    @property
    def file(self) -> Path | None: ...
    @property
    def table(self) -> str | None: ...
    @property
    def recipient_delimiter(self) -> str: ...
    @property
    def unknown_senders(self) -> Literal["reject", "allow"]: ...
    @property
    def headers(self) -> bool: ...

__all__ = [
    "LoginLookup",
    "NamedTableLogins",
    "SenderLoginMapError",
    "SenderLoginPolicy",
    "StaticTable",
]

_SPLIT = re.compile(r"[,\s]+")
_GROUP = re.compile(r"\$(\d|\{\d\})")
_LOOKS_LIKE_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:@]+@[^\s<>()\[\]\"',;:@]+\.[^\s<>()\[\]\"',;:@.]+")


class LoginLookup(Protocol):
    """A lookup table: the values stored under a key, or None when the key is not there."""

    async def lookup(self, key: str) -> tuple[str, ...] | None: ...


class SenderLoginMapError(ValueError):
    """A map entry cannot be used; str() is ``file:line: problem`` (or ``where: problem``)."""


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    logins: tuple[str, ...]


class StaticTable:
    """Keys and ``/regex/`` patterns from the configuration file or a map file, in memory."""

    def __init__(self, exact: Mapping[str, tuple[str, ...]], patterns: Iterable[_Pattern] = ()):
        self._exact = dict(exact)
        self._patterns = tuple(patterns)

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    async def lookup(self, key: str) -> tuple[str, ...] | None:
        found = self._exact.get(key.lower())
        if found is not None or key.startswith("@"):
            return found
        for pattern in self._patterns:
            match = pattern.regex.search(key)
            if match is not None:
                return tuple(_expand(match, v) for v in pattern.logins)
        return None

    @classmethod
    def build(cls, entries: Iterable[tuple[str, str | Iterable[str], str]]) -> StaticTable:
        """From ``(key, logins, where)``; logins a list or a comma/space separated string.
        A key given twice gets the logins of both. SenderLoginMapError says where."""
        exact: dict[str, tuple[str, ...]] = {}
        patterns: list[_Pattern] = []
        for key, value, where in entries:
            logins = tuple(v for v in (_SPLIT.split(value) if isinstance(value, str) else value) if v)
            if not logins:
                raise SenderLoginMapError(f"{where}: {key!r} has no logins")
            if any(not v.isprintable() or _SPLIT.search(v) for v in logins):
                raise SenderLoginMapError(f"{where}: {key!r}: a login contains spaces or control characters")
            if len(key) >= 2 and key.startswith("/") and key.endswith("/"):
                try:
                    regex = re.compile(key[1:-1], re.IGNORECASE)
                except re.error as exc:
                    raise SenderLoginMapError(f"{where}: bad pattern {key}: {exc}") from None
                for v in logins:
                    for g in _GROUP.finditer(v):
                        if int(g.group(1).strip("{}")) > regex.groups:
                            raise SenderLoginMapError(
                                f"{where}: {key}: {g.group(0)} but the pattern has {regex.groups} groups")
                patterns.append(_Pattern(regex, logins))
                continue
            _, at, domain = key.rpartition("@")
            if not at or not domain or "." not in domain.strip(".") or any(c.isspace() for c in key):
                raise SenderLoginMapError(
                    f"{where}: {key!r} is not 'user@domain', '@domain' or '/pattern/'")
            folded = key.lower()
            exact[folded] = tuple(dict.fromkeys(exact.get(folded, ()) + logins))
        return cls(exact, patterns)

    @classmethod
    def merged(cls, first: StaticTable, second: StaticTable) -> StaticTable:
        """Both tables in one: a key in both gets the logins of both; patterns in order."""
        exact = dict(first._exact)
        for key, logins in second._exact.items():
            exact[key] = tuple(dict.fromkeys(exact.get(key, ()) + logins))
        return cls(exact, first._patterns + second._patterns)

    @classmethod
    def load(cls, path: str | Path) -> StaticTable:
        """Read a map file: ``key  login, login`` per line, Postfix style (``#`` comments,
        a line starting with white space continues the one before)."""
        file = str(path)
        try:
            logical = logical_lines(file)
        except TableError as exc:
            raise SenderLoginMapError(str(exc)) from None
        entries = []
        for number, line in logical:
            key, _, value = line.partition(" ") if " " in line else line.partition("\t")
            entries.append((key, value.strip(), f"{file}:{number}"))
        return cls.build(entries)


class NamedTableLogins:
    """The logins in a lookup table, found by name at each lookup (a reload's new table serves
    the next one); a value may hold several logins, separated by commas or white space."""

    def __init__(self, name: str, tables: Mapping[str, Table] | None = None):
        self.name = name
        self.tables = tables
        """The tables to find it in (None: the process's current ones, smtpproxy.tables.install)."""

    async def lookup(self, key: str) -> tuple[str, ...] | None:
        table = get_table(self.name) if self.tables is None else self.tables[self.name]
        found = await table.lookup(key)
        if found is None:
            return None
        logins = tuple(dict.fromkeys(v for value in found for v in _SPLIT.split(value) if v))
        return logins or None


def _expand(match: re.Match[str], login: str) -> str:
    """*login* with ``$1`` (``${1}``) replaced by the pattern's group (lower case)."""
    return _GROUP.sub(lambda g: (match.group(int(g.group(1).strip("{}"))) or "").lower(), login)


def _owned(login: str, owners: tuple[str, ...]) -> bool:
    folded = login.casefold()
    return any(folded == owner.casefold() for owner in owners)


class SenderLoginPolicy:
    """Who may use which sender, for one listener; see the module text."""

    def __init__(self, table: LoginLookup, *, recipient_delimiter: str = "+",
                 unknown_senders: Literal["reject", "allow"] = "reject", headers: bool = False):
        self.table = table
        self.delimiter = recipient_delimiter
        self.unknown_senders = unknown_senders
        self.headers = headers

    @classmethod
    def load(cls, entries: Mapping[str, str | list[str]], file: str | Path | None = None, *,
             recipient_delimiter: str = "+", unknown_senders: Literal["reject", "allow"] = "reject",
             headers: bool = False, table: str | None = None,
             tables: Mapping[str, Table] | None = None) -> SenderLoginPolicy:
        """The policy of a ``sender_login`` section: its map, then its file (read now; a
        reload calls this again), or the lookup table named *table*. SenderLoginMapError says
        which entry is wrong, and where."""
        if table is not None:
            return cls(NamedTableLogins(table, tables), recipient_delimiter=recipient_delimiter,
                       unknown_senders=unknown_senders, headers=headers)
        static = StaticTable.build((k, v, f"sender_login.map[{k!r}]") for k, v in entries.items())
        if file is not None:
            static = StaticTable.merged(static, StaticTable.load(file))
        return cls(static, recipient_delimiter=recipient_delimiter, unknown_senders=unknown_senders,
                   headers=headers)

    @classmethod
    def from_section(cls, section: SenderLoginSection,
                     tables: Mapping[str, Table] | None = None) -> SenderLoginPolicy:
        """The policy of a validated ``sender_login`` section (*tables*: where its table is)."""
        return cls.load(section.map, section.file, recipient_delimiter=section.recipient_delimiter,
                        unknown_senders=section.unknown_senders, headers=section.headers,
                        table=section.table, tables=tables)

    async def owners(self, address: str) -> tuple[str, ...] | None:
        """The logins that own *address*, in Postfix's search order; None: not in the map."""
        if "@" not in address:
            return None
        for key in address_keys(address, self.delimiter, domain=False):
            found = await self.table.lookup(key)
            if found is not None:
                return found
        return None

    async def mismatch(self, address: str, login: str | None, *, unknown_ok: bool = False) -> str | None:
        """Why *login* (None: not logged in) may not use *address*, or None when it may."""
        owners = await self.owners(address)
        if login is None:
            return "not logged in" if owners is not None else None
        if owners is None:
            return None if unknown_ok or self.unknown_senders == "allow" else f"not owned by user {login}"
        return None if _owned(login, owners) else f"not owned by user {login}"

    async def envelope_refusal(self, sender: str, login: str | None) -> Reply | None:
        """The ``553 5.7.1`` for a MAIL FROM *login* may not use; the null sender passes."""
        if not sender:
            return None
        try:
            why = await self.mismatch(sender, login)
        except TableUnavailable:
            return Reply(451, "4.3.0", f"<{sender}>: Sender address rejected: temporary lookup failure")
        if why is None:
            return None
        return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: {why}")

    async def header_refusal(self, message: Message, login: str | None) -> tuple[Reply, str] | None:
        """The ``550 5.7.1`` (and the offending text) when a From:/Sender: address, or an
        address in a display name, is not the login's; None when all are (or headers: off)."""
        if not self.headers:
            return None
        try:
            return await self._header_refusal(message, login)
        except TableUnavailable as exc:
            return Reply(451, "4.3.0", "From:/Sender: check failed: temporary lookup failure"), exc.table

    async def _header_refusal(self, message: Message, login: str | None) -> tuple[Reply, str] | None:
        for name in ("From", "Sender"):
            for value in message.get_all(name):
                addresses, problem = _field_addresses(name, value)
                if problem:
                    return Reply(550, "5.7.1", f"{name}: field rejected: {problem}"), problem
                for address, display in addresses:
                    why = await self.mismatch(address, login, unknown_ok=login is None)
                    if why is not None:
                        return Reply(550, "5.7.1", f"{name}: <{address}> rejected: {why}"), address
                    for shown in _LOOKS_LIKE_ADDRESS.findall(display):
                        if shown.lower() == address.lower():
                            continue
                        why = await self.mismatch(shown, login, unknown_ok=login is None)
                        if why is not None:
                            return Reply(550, "5.7.1", f"{name}: display name {shown!r} rejected: "
                                         f"{why}"), shown
        return None


_REGISTRY = HeaderRegistry()


def _field_addresses(name: str, value: str) -> tuple[list[tuple[str, str]], str]:
    """Each (address, display name) of one From/Sender value, or ([], why it is unusable)."""
    try:
        header = _REGISTRY(name, value)
        found = header.addresses  # type: ignore[attr-defined]
        problems = [d for d in header.defects if "InvalidHeaderDefect" in type(d).__name__]
    except Exception as exc:  # the stdlib parser raises assorted errors on garbage
        return [], f"cannot be parsed ({type(exc).__name__})"
    if problems:
        return [], "cannot be parsed"
    out = []
    for address in found:
        if not address.username or not address.domain:
            return [], "an address without a domain"
        out.append((f"{address.username}@{address.domain}", address.display_name or ""))
    return out, ""
