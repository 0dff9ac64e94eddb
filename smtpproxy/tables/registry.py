"""The tables of a configuration, built at start and at each reload, and found by name.

Building is cheap and opens nothing: remote backends connect at their first lookup. The
process's current set is installed with :func:`install`; features and plugins ask
:func:`get_table` at the time they need it, so a reload's new tables serve new lookups.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from smtpproxy.tables.base import Backend, Table, Values
from smtpproxy.tables.errors import TableError
from smtpproxy.tables.memory import InlineBackend, RegexpBackend, inline_values, parse_regexp, read_entries

TableConfig = Any
"""A validated ``tables.NAME`` section (smtpproxy.config.schema.TableConfig; not imported here,
since the schema's validators import this package)."""

__all__ = ["Tables", "build_tables", "get_table", "install", "installed"]


class Tables(Mapping[str, Table]):
    """Named tables (a read-only mapping)."""

    def __init__(self, tables: Iterable[Table] = ()):
        self._tables = {t.name: t for t in tables}

    def __getitem__(self, name: str) -> Table:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    async def close(self) -> None:
        """Close every table's connections (errors while closing are not the caller's)."""
        await asyncio.gather(*(t.close() for t in self._tables.values()), return_exceptions=True)


def build_table(name: str, spec: TableConfig) -> Table:
    """One table from its configuration section; TableError if a file no longer reads."""
    from smtpproxy.tables.ldap import LDAPBackend
    from smtpproxy.tables.redis import RedisBackend
    from smtpproxy.tables.sql import PostgresBackend, SQLiteBackend

    backend: Backend
    fold = spec.fold_case
    if spec.type == "inline":
        backend = InlineBackend({k: inline_values(v, f"tables.{name}.{k}") for k, v in spec.entries.items()},
                                fold_case=fold)
    elif spec.type == "file":
        backend = InlineBackend({k: (v,) for k, v, _ in read_entries(spec.file)}, fold_case=fold, kind="file")
    elif spec.type == "regexp":
        patterns = []
        for item in spec.patterns:
            ((pattern, values),) = item.items()
            patterns.append(parse_regexp(pattern, inline_values(values, pattern), f"tables.{name}"))
        if spec.file is not None:
            patterns += [parse_regexp(k, (v,), where) for k, v, where in read_entries(spec.file, regexp=True)]
        backend = RegexpBackend(patterns)
    elif spec.type == "redis":
        backend = RedisBackend(spec.url, prefix=spec.prefix, structure=spec.structure, timeout=spec.timeout)
    elif spec.type == "sqlite":
        backend = SQLiteBackend(spec.path, spec.query, timeout=spec.timeout)
    elif spec.type == "postgresql":
        backend = PostgresBackend(spec.url, spec.query, timeout=spec.timeout, pool_size=spec.pool_size)
    elif spec.type == "ldap":
        backend = LDAPBackend(spec.url, spec.base, spec.filter, list(spec.attributes), scope=spec.scope,
                              bind_dn=spec.bind_dn, bind_password=spec.bind_password, timeout=spec.timeout)
    else:  # pragma: no cover - the schema's discriminator allows no other
        raise TableError(f"tables.{name}: unknown type")
    if not backend.remote:
        return Table(name, backend, timeout=5.0, fold_case=fold)
    return Table(name, backend, timeout=spec.timeout, cache_size=spec.cache_size,
                 cache_ttl=spec.cache_ttl, negative_ttl=spec.negative_ttl, fold_case=fold)


def build_tables(specs: Mapping[str, TableConfig]) -> Tables:
    """Every table of a ``tables:`` section; TableError (``tables.NAME: ...``) if one fails."""
    built = []
    for name, spec in specs.items():
        try:
            built.append(build_table(name, spec))
        except TableError as exc:
            raise TableError(f"tables.{name}: {exc}") from None
    return Tables(built)


_current = Tables()


def install(tables: Tables) -> Tables:
    """Make *tables* the process's current set; returns the set it replaces."""
    global _current
    previous, _current = _current, tables
    return previous


def installed() -> Tables:
    """The process's current tables."""
    return _current


def get_table(name: str) -> Table:
    """The current table called *name*; KeyError (naming the known ones) if there is none."""
    try:
        return _current[name]
    except KeyError:
        known = ", ".join(sorted(_current)) or "none"
        raise KeyError(f"no lookup table named {name!r} (tables: {known})") from None


def values_of(found: Values | None) -> Values:
    """*found* or the empty tuple: for callers to whom "not there" and "no values" are one."""
    return found or ()
