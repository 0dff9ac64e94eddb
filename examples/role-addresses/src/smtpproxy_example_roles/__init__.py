"""roles_inside_only: internal role addresses take mail only from inside.

Addresses like ``noc@``, ``hostmaster@`` or ``all-staff@`` are for colleagues and monitoring;
mail to them from the Internet is spam or social engineering. This plugin refuses them at
RCPT TO unless the client is in one of the ``inside`` networks or authenticated::

    plugins:
      - name: roles
        use: roles_inside_only
        settings:
          roles: [noc, hostmaster, all-staff]
          inside: [10.0.0.0/8, 192.168.0.0/16]

``postmaster`` cannot be listed: RFC 5321 4.5.1 requires it to take mail from anyone.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from smtpproxy import PluginSettings, Recipient, Session, Verdict, hookimpl

__all__ = ["RolesInsideOnly"]

_MUST_ACCEPT = {"postmaster"}  # RFC 5321 4.5.1


class RolesInsideOnly:
    """Refuse outside mail to internal role addresses."""

    requires_plugin_api = "1.0"  # refused at load by an smtpproxy without API 1.x (x >= 0)

    class Settings(PluginSettings):
        roles: list[str] = Field(
            default=["noc", "hostmaster", "all-staff"],
            description="Local parts (any domain) that take mail from inside only; case-insensitive.",
        )
        inside: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
            default=[], description="Client networks that count as inside."
        )
        allow_authenticated: bool = Field(default=True, description="Authenticated clients count as inside.")
        reply: str = Field(default="This address takes no mail from outside", min_length=1)

        @field_validator("roles")
        @classmethod
        def _no_postmaster(cls, value: list[str]) -> list[str]:
            lowered = [v.lower() for v in value]
            refused = sorted(_MUST_ACCEPT.intersection(lowered))
            if refused:
                raise ValueError(f"{refused[0]} must take mail from anyone (RFC 5321 4.5.1)")
            return lowered

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        self._roles = frozenset(self.settings.roles)

    def is_inside(self, session: Session) -> bool:
        if session.auth_user is not None and self.settings.allow_authenticated:
            return True
        try:
            ip = ipaddress.ip_address(session.client.ip)
        except ValueError:
            return False
        return any(ip in net for net in self.settings.inside)

    @hookimpl
    def rcpt_to(self, session: Session, recipient: Recipient) -> Verdict | None:
        if recipient.address.local.lower() not in self._roles or self.is_inside(session):
            return None
        return Verdict.reject(self.settings.reply, code=550, enhanced="5.7.1",
                              reason=f"role address {recipient.address.text} from outside")
