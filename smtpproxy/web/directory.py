"""Console sign-in against LDAP (``console.accounts: ldap``): a bind as the person.

As mail admins know it from their webmail and admin tools: the service account
(``console.ldap.bind_dn``, or an anonymous search) finds exactly one entry for the name typed,
the password is checked by binding as that entry (smtpproxy never sees a hash), and the role
comes from the first configured group whose member attribute names the entry; everyone else
with an address signs in as a recipient of their own mail (unless ``recipients: false``).

ldap3 is synchronous, so a sign-in runs in the shared worker pool (smtpproxy.blocking),
bounded by the connect and receive timeouts. A directory that is down or refuses the service
bind raises :class:`AccountsUnavailable`; a wrong password, an unknown or ambiguous name is
"no" (None). An empty password is refused before any bind: LDAP treats a simple bind without
a password as an anonymous bind that succeeds (RFC 4513 5.1.2).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from smtpproxy.blocking import run_blocking
from smtpproxy.config.console import ConsoleLDAP, parse_role
from smtpproxy.eventlog import event
from smtpproxy.tables.ldap import escape_filter_value, expand_filter
from smtpproxy.web.accounts import Account, AccountsUnavailable, Viewer

__all__ = ["DirectoryAccounts"]

_INVALID_CREDENTIALS = 49
_SCOPES = {"sub": "SUBTREE", "one": "LEVEL", "base": "BASE"}


class DirectoryAccounts:
    """Accounts in LDAP. A session's person is looked up again (:meth:`current`, the service
    account's search and the groups, no bind as the person): removed from the directory or
    from their group, their sessions end. A changed password is not visible here."""

    def __init__(self, section: ConsoleLDAP) -> None:
        self.section = section

    async def verify(self, name: str, password: str) -> Account | None:
        if not password or not name:
            return None
        return await run_blocking(self._look_up, name, password)

    async def current(self, name: str) -> Account | None:
        return await run_blocking(self._look_up, name, None) if name else None

    def _connection(self, ldap3: Any, server: Any, user: str | None, password: str | None) -> Any:
        return ldap3.Connection(server, user=user, password=password, read_only=True,
                                receive_timeout=math.ceil(self.section.timeout),  # an int: SO_RCVTIMEO
                                raise_exceptions=False)

    def _look_up(self, name: str, password: str | None) -> Account | None:
        """The one entry *name* finds, bound as with *password* (None: not bound, a re-check)."""
        import ldap3
        from ldap3.core.exceptions import LDAPException

        s = self.section
        query = expand_filter(s.filter, name)
        if query is None:
            return None
        server = ldap3.Server(s.url, connect_timeout=s.timeout, get_info=ldap3.NONE)
        service = self._connection(ldap3, server, s.bind_dn, s.bind_password)
        try:
            if not service.bind():
                raise AccountsUnavailable(f"the search bind failed: {service.result.get('description')}")
            ok = service.search(s.base, query, search_scope=getattr(ldap3, _SCOPES[s.scope]),
                                attributes=[s.mail_attribute], size_limit=2,
                                time_limit=max(1, round(s.timeout)))
            if not ok and service.result.get("result") not in (0, 4, 32):  # sizeLimit, noSuchObject
                raise AccountsUnavailable(f"the search failed: {service.result.get('description')}")
            entries = [e for e in service.response or () if e.get("type") == "searchResEntry"]
            if len(entries) != 1:
                if entries:
                    event("console_ldap_ambiguous", level=logging.WARNING, name=name, entries=len(entries))
                return None
            dn = str(entries[0]["dn"])
            mail = _first(entries[0].get("attributes", {}).get(s.mail_attribute))
            if password is not None:
                person = self._connection(ldap3, server, dn, password)
                try:
                    if not person.bind():
                        if person.result.get("result") == _INVALID_CREDENTIALS:
                            return None
                        raise AccountsUnavailable(f"the bind failed: {person.result.get('description')}")
                finally:
                    person.unbind()
            viewer = self._viewer(ldap3, service, dn, name, mail)
            return Account(viewer) if viewer is not None else None
        except LDAPException as exc:
            raise AccountsUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            service.unbind()

    def _viewer(self, ldap3: Any, conn: Any, dn: str, name: str, mail: str | None) -> Viewer | None:
        """The role of the first group naming *dn*; else a recipient of *mail* (or nobody)."""
        s = self.section
        member = f"({s.member_attribute}={escape_filter_value(dn)})"
        for group, text in s.groups.items():
            ok = conn.search(group, member, search_scope=ldap3.BASE, attributes=[],
                             time_limit=max(1, round(s.timeout)))
            if not ok and conn.result.get("result") not in (0, 32):
                raise AccountsUnavailable(f"the group search failed: {conn.result.get('description')}")
            if any(e.get("type") == "searchResEntry" for e in conn.response or ()):
                role, domains = parse_role(text)
                if role == "recipient":
                    return Viewer(mail.lower(), "recipient") if mail else None
                return Viewer(mail.lower() if mail else name, role, domains)
        if s.recipients and mail and "@" in mail:
            return Viewer(mail.lower(), "recipient")
        return None


def _first(value: object) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None
