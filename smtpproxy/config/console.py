"""The console's accounts from LDAP (``console.ldap``): who may sign in, and with which role.

Part of the schema (:class:`smtpproxy.config.schema.Console` holds it); the sign-in itself is
:mod:`smtpproxy.web.directory`. The usual way mail admins let people log in with LDAP: find
the person's entry with a service account, bind as that entry with the password given, and
take the role from the groups the entry is a member of.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from smtpproxy.config.fields import DOMAIN_NAME, field_error, seconds
from smtpproxy.config.section import Section as _Model
from smtpproxy.config.tables import check_ldap_filter, check_ldap_url

__all__ = ["ConsoleLDAP", "parse_role"]

def parse_role(text: str) -> tuple[str, tuple[str, ...]]:
    """``admin``, ``recipient`` or ``domain:a.example,b.example`` as (role, domains);
    ValueError saying what is wrong."""
    role, _, rest = text.strip().partition(":")
    domains = tuple(d.strip().lower() for d in rest.split(",") if d.strip())
    if role in ("admin", "recipient") and not rest:
        return role, ()
    if role == "domain":
        if not domains:
            raise ValueError("a domain admin needs domains: 'domain:example.com,example.org'")
        bad = [d for d in domains if not DOMAIN_NAME.match(d)]
        if bad:
            raise ValueError(f"not a domain: {bad[0]!r}")
        return role, domains
    raise ValueError("a role is 'admin', 'recipient' or 'domain:DOMAIN,DOMAIN'")


class ConsoleLDAP(_Model):
    """Console accounts in LDAP (with ``console.accounts: ldap``): a bind as the person."""

    url: str = Field(description="ldap://host:port or ldaps://host:port.")
    base: str = Field(description="Where people are searched, e.g. ou=people,dc=example,dc=com.")
    filter: str = Field(
        default="(|(uid=%s)(mail=%s))",
        description="Finds the entry of the name typed at sign-in: %s the name, %u its local part, "
        "%d its domain (each escaped per RFC 4515). Exactly one entry must match.")
    scope: Literal["sub", "one", "base"] = Field(default="sub", description="Search scope.")
    bind_dn: str | None = Field(
        default=None, description="The service account that searches (none: anonymous search).")
    bind_password: str | None = Field(default=None, description="Its password (use ${ENV}).")
    mail_attribute: str = Field(
        default="mail", description="The attribute with the person's address (a recipient's identity).")
    groups: dict[str, str] = Field(
        default={},
        description="Group DN -> role ('admin', 'domain:example.com,example.org' or 'recipient'); "
        "the first group (in this order) the person's entry is a member of gives the role.")
    member_attribute: str = Field(
        default="member", description="The group attribute listing member DNs (member or uniqueMember).")
    recipients: bool = Field(
        default=True, strict=True,
        description="Everyone else in the directory signs in as a recipient of their own mail "
        "(mail_attribute); false: only members of the groups may sign in.")
    timeout: float = seconds(5.0, "Seconds the directory may take to answer a sign-in.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_ldap_url(value, "ldap_url")
        try:
            import ldap3  # noqa: F401 - only whether it is installed
        except ImportError:
            raise field_error("ldap_missing", "needs ldap3: pip install 'smtpproxy[ldap]'") from None
        return value

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        return check_ldap_filter(value, "ldap_filter")

    @field_validator("groups")
    @classmethod
    def _roles(cls, value: dict[str, str]) -> dict[str, str]:
        for dn, role in value.items():
            try:
                parse_role(role)
            except ValueError as exc:
                raise field_error("console_role", str(exc), loc_suffix=(dn,)) from None
        return value
