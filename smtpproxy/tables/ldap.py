"""A table in LDAP: a search whose filter holds the key, RFC 4515-escaped, and the values of
the result attributes of every entry found (Postfix's ldap_table).

The library is ldap3: pure Python (no OpenLDAP headers or compiler to install), maintained in
Debian and used widely; it is synchronous, so each lookup runs in the shared worker pool
(smtpproxy.blocking), bounded by the connect and receive timeouts as well as the table's.
(bonsai's native asyncio needs libldap's headers to build and has no Linux wheels.)

In the filter ``%s`` is the key, ``%u`` its local part, ``%d`` its domain and ``%%`` a ``%``;
a key without ``@`` has no ``%d``, so a filter that needs one finds nothing (as in Postfix).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from smtpproxy.blocking import run_blocking
from smtpproxy.tables.base import Backend, Values
from smtpproxy.tables.errors import TableError, TableUnavailable

__all__ = ["LDAPBackend", "check_filter", "escape_filter_value", "expand_filter"]

_SPECIAL = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}
_EXPANSION = re.compile(r"%(.)")


def escape_filter_value(value: str) -> str:
    """*value* as an RFC 4515 assertion value: ``\\ * ( )`` and NUL as ``\\XX``; the rest
    (UTF-8 included) as it is, which RFC 4515's UTF1SUBSET allows."""
    return "".join(_SPECIAL.get(c, c) for c in value)


def expand_filter(template: str, key: str) -> str | None:
    """The filter for *key* (None when it needs a part the key lacks: no search)."""
    local, at, domain = key.rpartition("@")
    if not at:
        local, domain = key, ""
    missing = False

    def part(match: re.Match[str]) -> str:
        nonlocal missing
        code = match.group(1)
        if code == "%":
            return "%"
        value = {"s": key, "u": local, "d": domain}[code]
        if not value:
            missing = True
        return escape_filter_value(value)

    out = _EXPANSION.sub(part, template)
    return None if missing else out


def check_filter(template: str) -> str:
    """The filter, if its ``%`` expansions are known and it holds the key; TableError if not."""
    codes = [m.group(1) for m in _EXPANSION.finditer(template)]
    if any(code not in "sud%" for code in codes):
        raise TableError("the filter may use %s (the key), %u (its local part), %d (its domain), %%")
    if not set(codes) & set("sud"):
        raise TableError("the filter must hold the key: %s, %u or %d")
    if template.replace("%%", "").count("%") != len([c for c in codes if c != "%"]) or \
            template.count("(") != template.count(")") or not template.startswith("("):
        raise TableError("the filter is not an LDAP filter in parentheses, e.g. (mail=%s)")
    return template


class LDAPBackend(Backend):
    kind = "ldap"
    remote = True

    def __init__(self, url: str, base: str, filter: str, attributes: list[str], *,
                 scope: Literal["sub", "one", "base"] = "sub", bind_dn: str | None = None,
                 bind_password: str | None = None, timeout: float = 2.0):
        self.url = url
        self.base = base
        self.filter = check_filter(filter)
        self.attributes = attributes
        self.scope = scope
        self.bind_dn = bind_dn
        self.bind_password = bind_password
        self.timeout = timeout

    def _search(self, key: str) -> Values | None:
        import ldap3
        from ldap3.core.exceptions import LDAPException

        query = expand_filter(self.filter, key)
        if query is None:
            return None
        scope = {"sub": ldap3.SUBTREE, "one": ldap3.LEVEL, "base": ldap3.BASE}[self.scope]
        server = ldap3.Server(self.url, connect_timeout=self.timeout, get_info=ldap3.NONE)
        conn: Any = ldap3.Connection(server, user=self.bind_dn, password=self.bind_password,
                                     receive_timeout=math.ceil(self.timeout),  # an int: SO_RCVTIMEO
                                     raise_exceptions=False,
                                     read_only=True)
        try:
            if not conn.bind():
                raise TableUnavailable("ldap", f"bind failed: {conn.result.get('description')}")
            ok = conn.search(self.base, query, search_scope=scope, attributes=self.attributes,
                             time_limit=max(1, round(self.timeout)))
            if not ok and conn.result.get("result") not in (0, 32):  # 32: noSuchObject
                raise TableUnavailable("ldap", f"search failed: {conn.result.get('description')}")
            values: list[str] = []
            for entry in conn.response or ():
                if entry.get("type") != "searchResEntry":
                    continue
                for attribute in self.attributes:
                    found = entry.get("attributes", {}).get(attribute)
                    if found is None:
                        continue
                    values.extend(str(v) for v in (found if isinstance(found, list) else [found]))
            return tuple(dict.fromkeys(values)) or None
        except LDAPException as exc:
            raise TableUnavailable("ldap", f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.unbind()

    async def lookup(self, key: str) -> Values | None:
        return await run_blocking(self._search, key)
