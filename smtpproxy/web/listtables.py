"""The lists plugin's allow and block tables as the console reads and edits them.

Which tables: those the first enabled ``lists`` plugin of the configuration names (its
``allow`` and ``block`` settings). Which keys a viewer manages: an admin any; a domain admin
``domain``, ``@domain`` and ``someone@domain`` of their domains; a recipient their own address.
Entries are what the plugin matches (:func:`check_entry`). ``file`` and ``redis`` tables are
edited through :mod:`smtpproxy.tables.edit`, like ``smtpproxy tables add|remove``; the other
types are shown, not written (:attr:`ListTable.read_only_reason` says why).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpproxy.allowsender import lists_plugin
from smtpproxy.blocking import run_blocking
from smtpproxy.config.fields import DOMAIN_NAME
from smtpproxy.tables import Table, TableError, Tables, TableUnavailable, address_keys
from smtpproxy.tables.edit import WRITABLE, Edit, edit_file, edit_redis, file_rows, split_entries
from smtpproxy.tables.memory import InlineBackend
from smtpproxy.tables.redis import RedisBackend

if TYPE_CHECKING:
    from smtpproxy.config import Config
    from smtpproxy.web.accounts import Viewer

__all__ = ["ListTable", "ListTables", "check_entry", "check_key", "list_tables", "lists_plugin_tables",
           "may_manage"]

KINDS = ("block", "allow")
MAX_ROWS = 5000
_LOCAL = re.compile(r"[^\s@,;:<>()\[\]\\\"]{1,64}\Z")


def _domain(text: str) -> str | None:
    text = text.lower().rstrip(".")
    return text if DOMAIN_NAME.match(text) else None


def check_entry(text: str) -> str:
    """An allow/block entry as the lists plugin matches it, normalised (lower case):
    ``someone@domain``, ``domain``, ``@domain`` or ``*.domain``; ValueError saying what is wrong."""
    entry = text.strip().lower()
    if not entry:
        raise ValueError("enter an address, a domain or *.domain")
    if len(entry) > 320 or any(c.isspace() or c == "," or not c.isprintable() for c in entry):
        raise ValueError("one entry: no spaces, commas or control characters")
    if entry.startswith("*."):
        rest, prefix = entry[2:], "*."
    elif entry.startswith("@"):
        rest, prefix = entry[1:], "@"
    elif "@" in entry:
        local, _, rest = entry.rpartition("@")
        if not _LOCAL.match(local) or local.startswith("#"):
            raise ValueError(f"{text.strip()!r} is not an address (local@domain)")
        prefix = local + "@"
    else:
        rest, prefix = entry, ""
    domain = _domain(rest)
    if domain is None:
        raise ValueError(f"{rest!r} is not a domain name")
    return prefix + domain


def check_key(text: str) -> str:
    """Whom a list belongs to, normalised: ``someone@domain``, ``@domain``, ``domain`` or
    ``.domain`` (the domain's subdomains); ValueError saying what is wrong."""
    key = text.strip().lower()
    if key.startswith("*."):
        raise ValueError("a list belongs to an address, @domain, a domain or .domain (its subdomains)")
    if key.startswith("."):
        domain = _domain(key[1:])
        if domain is None:
            raise ValueError(f"{key[1:]!r} is not a domain name")
        return "." + domain
    return check_entry(key)


def key_domain(key: str) -> str | None:
    """The domain a key is about (None for ``.domain``, which is about its subdomains)."""
    if key.startswith("."):
        return None
    return key.rpartition("@")[2]


def may_manage(viewer: Viewer, key: str) -> bool:
    """Whether *viewer* may see and change the list kept under *key* (a checked key)."""
    if viewer.role == "admin":
        return True
    if viewer.role == "domain":
        return key_domain(key) in viewer.domains
    return key == viewer.name.lower()


@dataclass
class ListTable:
    """One of the lists plugin's tables (``kind`` allow or block)."""

    kind: str
    table: Table
    spec: Any  # a validated tables.NAME section
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def writable(self) -> bool:
        return self.spec.type in WRITABLE

    @property
    def listable(self) -> bool:
        return self.spec.type in ("inline", "file", "redis")

    @property
    def read_only_reason(self) -> str | None:
        if self.writable:
            return None
        if self.spec.type == "inline":
            return "its entries are written in the configuration file; change them there"
        if self.spec.type == "regexp":
            return "it is a list of regular expressions; change them in the configuration"
        return (f"it is a {self.spec.type} table: smtpproxy reads it but never writes it; change it "
                "where it is kept")

    @property
    def applies(self) -> str:
        """When a change reaches the proxies."""
        if self.spec.type == "file":
            return "at the proxy's next reload (smtpproxy reload), when it reads the file again"
        return "live, as soon as the proxies' cached answer expires"

    async def rows(self) -> list[tuple[str, list[str]]]:
        """Every key and its entries (a listable table), sorted; at most MAX_ROWS."""
        try:
            return await self._rows()
        except (TableUnavailable, TableError):
            raise
        except Exception as exc:  # a backend's library raises its own errors (redis)
            raise TableUnavailable(self.table.name, f"{type(exc).__name__}: {exc}") from None

    async def _rows(self) -> list[tuple[str, list[str]]]:
        backend = self.table.backend
        if self.spec.type == "file":
            rows = await run_blocking(file_rows, Path(self.spec.file))
        elif isinstance(backend, InlineBackend):
            rows = [(k, split_entries(v)) for k, v in backend.items()]
        elif isinstance(backend, RedisBackend):
            rows = []
            for key in (await backend.keys())[:MAX_ROWS]:
                rows.append((key, split_entries(await backend.lookup(key))))
        else:
            return []
        return sorted(rows)[:MAX_ROWS]

    async def entries(self, key: str) -> list[str]:
        """The entries kept under exactly *key* (read afresh: no cached answer)."""
        if self.spec.type == "file":
            return dict(await run_blocking(file_rows, Path(self.spec.file))).get(key, [])
        self.table.forget()
        return split_entries(await self.table.lookup(key))

    async def edit(self, key: str, entry: str, *, add: bool) -> Edit:
        """Add or remove one entry (a writable table only); TableUnavailable if it cannot."""
        try:
            return await self._edit(key, entry, add=add)
        except (TableUnavailable, TableError):
            raise
        except Exception as exc:  # a write's own library errors (redis), a file that cannot be written
            raise TableUnavailable(self.table.name, f"{type(exc).__name__}: {exc}") from None

    async def _edit(self, key: str, entry: str, *, add: bool) -> Edit:
        async with self.lock:
            if self.spec.type == "file":
                result = await run_blocking(edit_file, Path(self.spec.file), key, entry, add=add)
            else:
                backend = self.table.backend
                assert isinstance(backend, RedisBackend)
                result = await edit_redis(backend, key, entry, add=add)
            self.table.forget()
            return result


@dataclass
class ListTables:
    """The allow and block tables there are (by kind) and the recipient delimiter."""

    tables: dict[str, ListTable]
    delimiter: str = "+"

    def keys_of(self, address: str) -> list[str]:
        """The keys the plugin asks for *address*, most specific first."""
        return address_keys(address, self.delimiter)


def lists_plugin_tables(config: Config) -> dict[str, str]:
    """``{"allow": NAME, "block": NAME}`` (those set) of the first enabled lists plugin."""
    spec = lists_plugin(config)
    if spec is None:
        return {}
    settings = spec.settings
    return {kind: str(settings[kind]) for kind in KINDS
            if isinstance(settings.get(kind), str) and settings[kind] in config.tables}


def list_tables(config: Config, tables: Tables) -> ListTables | None:
    """The lists plugin's tables, built (None when there is no lists plugin)."""
    names = lists_plugin_tables(config)
    spec = lists_plugin(config)
    if not names or spec is None:
        return None
    delimiter = str(spec.settings.get("recipient_delimiter", "+"))
    built = {kind: ListTable(kind, tables[name], config.tables[name]) for kind, name in names.items()}
    return ListTables(built, delimiter)
