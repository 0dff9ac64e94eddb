"""The ``tables`` section: lookup tables (inline, file, regexp, Redis, SQLite, PostgreSQL, LDAP).

Part of the schema (:mod:`smtpproxy.config.schema` assembles it); docs/configuration.md is
generated from these models.
"""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from smtpproxy.config.fields import ExistingFile, field_error, in_base_dir, seconds
from smtpproxy.config.section import Section as _Model

TABLE_NAME = r"[a-z0-9_.-]+"


class _Table(_Model):
    fold_case: bool = Field(
        default=True, strict=True,
        description="Look keys up in lower case (Postfix folds keys); false: exactly as given.",
    )


class _RemoteTable(_Table):
    timeout: float = seconds(
        2.0, "Seconds a lookup may take; a backend that does not answer in time (or is down) "
        "makes the lookup fail: a temporary failure, never a default.")
    cache_size: int = Field(
        default=10000, strict=True, ge=0,
        description="Answers kept in memory (least recently used dropped first); 0: no cache.",
    )
    cache_ttl: float = Field(
        default=60.0, strict=True, ge=0, allow_inf_nan=False,
        description="Seconds a found value is reused from the cache.",
    )
    negative_ttl: float = Field(
        default=30.0, strict=True, ge=0, allow_inf_nan=False,
        description="Seconds a 'not there' answer is reused from the cache (failures are never cached).",
    )


class InlineTable(_Table):
    """Keys and values written in the configuration file."""

    type: Literal["inline"]
    entries: dict[str, str | list[str]] = Field(
        default={}, description="Key to value (a string) or values (a list of strings).")

    @field_validator("entries")
    @classmethod
    def _entries_valid(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        from smtpproxy.tables.errors import TableError
        from smtpproxy.tables.memory import inline_values

        for key, values in value.items():
            try:
                inline_values(values, f"{key!r}")
            except TableError as exc:
                raise field_error("table_entry", str(exc), loc_suffix=(key,)) from None
        return value


class FileTable(_Table):
    """A file of 'key value' lines (Postfix's table format), read at start and at each reload."""

    type: Literal["file"]
    file: ExistingFile = Field(description="The file; relative to the config file.")

    @field_validator("file")
    @classmethod
    def _file_loads(cls, value: Path, info: ValidationInfo) -> Path:
        from smtpproxy.tables.errors import TableError
        from smtpproxy.tables.memory import read_entries

        target = in_base_dir(value, info)
        try:
            read_entries(target)
        except TableError as exc:
            raise field_error("table_file", str(exc)) from None
        return target


class RegexpTable(_Table):
    """Regular expressions tried in order (Postfix's regexp_table): the first match answers."""

    type: Literal["regexp"]
    patterns: list[dict[str, str | list[str]]] = Field(
        default=[],
        description="Each a one-key mapping '/pattern/flags': value; $1 in the value is the first group.",
    )
    file: ExistingFile | None = Field(
        default=None,
        description="A file of '/pattern/ value' lines, tried after patterns; re-read at reload.",
    )

    @field_validator("patterns")
    @classmethod
    def _patterns_valid(cls, value: list[dict[str, str | list[str]]]) -> list[dict[str, str | list[str]]]:
        from smtpproxy.tables.errors import TableError
        from smtpproxy.tables.memory import inline_values, parse_regexp

        for index, item in enumerate(value):
            if len(item) != 1:
                raise field_error("table_pattern", "each entry is one '/pattern/': value",
                                  loc_suffix=(index,))
            ((pattern, values),) = item.items()
            try:
                parse_regexp(pattern, inline_values(values, pattern), pattern)
            except TableError as exc:
                raise field_error("table_pattern", str(exc), loc_suffix=(index,)) from None
        return value

    @field_validator("file")
    @classmethod
    def _file_loads(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        from smtpproxy.tables.errors import TableError
        from smtpproxy.tables.memory import parse_regexp, read_entries

        if value is None:
            return None
        target = in_base_dir(value, info)
        try:
            for key, text, where in read_entries(target, regexp=True):
                parse_regexp(key, (text,), where)
        except TableError as exc:
            raise field_error("table_file", str(exc)) from None
        return target

    @model_validator(mode="after")
    def _not_empty(self) -> "RegexpTable":
        if not self.patterns and self.file is None:
            raise field_error("table_empty", "needs 'patterns' or 'file' (or both)", loc_suffix=("patterns",))
        return self


def _check_query(value: str) -> str:
    from smtpproxy.tables.errors import TableError
    from smtpproxy.tables.sql import check_query

    try:
        return check_query(value)
    except TableError as exc:
        raise field_error("table_query", str(exc)) from None


class RedisTable(_RemoteTable):
    """Values in Redis under prefix + key: a string (one value) or a set (its members)."""

    type: Literal["redis"]
    url: str = Field(description="redis://host:port/db, rediss:// or unix://.")
    prefix: str = Field(default="", description="Put before every key (e.g. 'allow:').")
    structure: Literal["string", "set"] = Field(
        default="string", description="'string': GET, one value; 'set': SMEMBERS, its members.")

    @field_validator("url")
    @classmethod
    def _redis_usable(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise field_error("redis_url", "must be a redis://, rediss:// or unix:// URL")
        try:
            import redis.asyncio  # noqa: F401 - only whether it is installed
        except ImportError:
            raise field_error(
                "redis_missing", "needs the redis package: pip install 'smtpproxy[redis]'"
            ) from None
        return value


class SQLiteTable(_RemoteTable):
    """A query on an SQLite file (opened read-only, in a worker thread)."""

    type: Literal["sqlite"]
    path: ExistingFile = Field(description="The database file; relative to the config file.")
    query: Annotated[str, AfterValidator(_check_query)] = Field(
        description="SQL naming the key as :key (a bound parameter); each row's first column is a value.")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        return in_base_dir(value, info)


class PostgresTable(_RemoteTable):
    """A query on PostgreSQL (psycopg 3, asyncio, a small pool)."""

    type: Literal["postgresql"]
    url: str = Field(description="A libpq URL or conninfo: postgresql://user@host:port/db.")
    query: Annotated[str, AfterValidator(_check_query)] = Field(
        description="SQL naming the key as :key (a bound parameter); each row's first column is a value.")
    pool_size: int = Field(default=4, strict=True, ge=1, le=64,
                           description="Most connections this table opens (per proxy process).")

    @field_validator("url")
    @classmethod
    def _psycopg_usable(cls, value: str) -> str:
        try:
            import psycopg_pool  # noqa: F401 - only whether it is installed
        except ImportError:
            raise field_error("psycopg_missing",
                              "needs psycopg: pip install 'smtpproxy[postgresql]'") from None
        return value


def check_ldap_url(value: str, kind: str) -> str:
    """An ldap:// or ldaps:// URL (a located *kind* error otherwise)."""
    if not value.startswith(("ldap://", "ldaps://")):
        raise field_error(kind, "must be an ldap:// or ldaps:// URL")
    return value


def check_ldap_filter(value: str, kind: str) -> str:
    """A search filter with %s/%u/%d/%% placeholders, checked as the lookup expands it."""
    from smtpproxy.tables.errors import TableError
    from smtpproxy.tables.ldap import check_filter

    try:
        return check_filter(value)
    except TableError as exc:
        raise field_error(kind, str(exc)) from None


class LDAPTable(_RemoteTable):
    """An LDAP search (Postfix's ldap_table); the values of the result attributes."""

    type: Literal["ldap"]
    url: str = Field(description="ldap://host:port or ldaps://host:port.")
    base: str = Field(description="Search base, e.g. ou=people,dc=example,dc=com.")
    filter: str = Field(
        description="Search filter: %s the key, %u its local part, %d its domain (each escaped "
        "per RFC 4515), %% a %; e.g. (mail=%s).")
    attributes: list[str] = Field(min_length=1, description="Attributes whose values are the answer.")
    scope: Literal["sub", "one", "base"] = Field(default="sub", description="Search scope.")
    bind_dn: str | None = Field(default=None, description="Bind as this DN (none: anonymous).")
    bind_password: str | None = Field(default=None, description="The bind DN's password (use ${ENV}).")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_ldap_url(value, "table_url")

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        return check_ldap_filter(value, "table_filter")


TableConfig = Annotated[
    InlineTable | FileTable | RegexpTable | RedisTable | SQLiteTable | PostgresTable | LDAPTable,
    Field(discriminator="type"),
]
TABLE_TYPES: dict[str, type[_Table]] = {
    "inline": InlineTable, "file": FileTable, "regexp": RegexpTable, "redis": RedisTable,
    "sqlite": SQLiteTable, "postgresql": PostgresTable, "ldap": LDAPTable,
}
