"""The ``policies:`` section: named policy groups, one gateway and many tenants (docs/multi-domain.md).

A group is chosen per recipient (first match wins; none matches: the implicit ``default``
group, the global configuration) and overrides plugins (on, off, settings merged over the
global ones) and the quarantine's retention. The overrides' plugin settings are validated by
the plugins themselves when the chains are built (smtpproxy.groups), with the same located
errors as the global ones.
"""

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from smtpproxy.config.fields import PLUGIN_NAME, Network, field_error
from smtpproxy.config.problems import describe_value
from smtpproxy.config.section import Section as _Model
from smtpproxy.config.tables import TABLE_NAME

__all__ = ["DEFAULT_GROUP", "PluginOverride", "PolicyGroup", "check_policies"]

DEFAULT_GROUP = "default"
"""The implicit group of recipients no group selects: the global configuration."""

_DOMAIN = re.compile(r"(\*\.)?[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?\Z")


class PluginOverride(_Model):
    """What a group changes about one plugin of the global ``plugins:`` list."""

    enabled: bool | None = Field(
        default=None, strict=True,
        description="Turn the plugin on or off for this group (default: as in plugins:).",
    )
    enforce: bool | None = Field(
        default=None, strict=True,
        description=(
            "false: shadow mode for this group (the plugin's verdicts are only logged and counted, "
            "as the global plugins' enforce: false); default: as in plugins:."
        ),
    )
    settings: dict[str, Any] = Field(
        default={},
        description=(
            "Settings merged over the global plugin's settings (key by key, top level), then "
            "validated by the plugin as the global ones are."
        ),
    )


class PolicyGroup(_Model):
    """One policy group: who it is for (every selector given must match) and what it changes."""

    name: str = Field(description="The group's name (in logs and metrics): a-z, 0-9, '_', '.', '-'.")
    recipients: list[str] = Field(
        default=[],
        description=(
            "Recipient selectors: 'example.org' (the domain), '*.example.org' (its subdomains), "
            "'user@example.org' (one address), or 'table:NAME' (a lookup table that has the "
            "address or its domain: every key of docs/tables.md's address search order)."
        ),
    )
    auth_users: list[str] = Field(
        default=[], description="Only for sessions authenticated (SMTP AUTH) as one of these logins."
    )
    client_networks: list[Network] = Field(
        default=[], description="Only for clients in these networks."
    )
    listeners: list[int] = Field(
        default=[], description="Only for sessions on these listening ports (e.g. 587)."
    )
    plugins: dict[str, PluginOverride] = Field(
        default={}, description="Per plugin name (of plugins:): enabled and settings for this group."
    )
    route: str | None = Field(
        default=None,
        description=(
            "Deliver this group's recipients by this route of delivery.routes (its name), or "
            "'default' (the default upstreams), instead of the route their domain gives."
        ),
    )
    quarantine_retention_days: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description=(
            "Days this group's recipients' quarantined messages are kept (a store's quarantine); "
            "a message for several groups is kept for the longest."
        ),
    )

    @property
    def selects_anything(self) -> bool:
        """True when the group has no selector (it takes every recipient)."""
        return not (self.recipients or self.auth_users or self.client_networks or self.listeners)

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value: str) -> str:
        if not PLUGIN_NAME.match(value):
            raise field_error("group_name", f"must consist of lower-case letters, digits, '_', '.' and '-' "
                                            f"(got {describe_value(value)})")
        return value

    @field_validator("recipients")
    @classmethod
    def _recipients_valid(cls, value: list[str]) -> list[str]:
        cleaned = []
        for index, entry in enumerate(value):
            text = entry.strip().lower()
            if text.startswith("table:"):
                if not re.fullmatch(TABLE_NAME, text[6:]):
                    raise field_error("group_selector", f"'table:' needs a table name (got {entry!r})",
                                      loc_suffix=(index,))
                cleaned.append("table:" + entry.strip()[6:])
                continue
            domain = text.rpartition("@")[2]
            if not _DOMAIN.match(domain) or text.startswith("@") or ("@" in text and domain.startswith("*.")):
                raise field_error(
                    "group_selector",
                    f"must be a domain, '*.domain', an address or 'table:NAME' (got {entry!r})",
                    loc_suffix=(index,),
                )
            cleaned.append(text)
        return cleaned

    @model_validator(mode="after")
    def _default_has_no_selector(self) -> "PolicyGroup":
        if self.name == DEFAULT_GROUP and not self.selects_anything:
            raise field_error(
                "group_default",
                "the group named 'default' takes every recipient no other group selects: it has "
                "no selectors (recipients, auth_users, client_networks, listeners)",
                loc_suffix=("name",),
            )
        return self


def check_policies(groups: list[PolicyGroup], plugin_names: set[str], table_names: set[str],
                   route_names: list[str] | None) -> None:
    """The rules across groups (raises a located validation error): unique names, known plugins,
    tables and routes (*route_names* None: the delivery has no routes, a Maildir), and no group
    after one that takes every recipient (it could never match)."""
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        first = seen.setdefault(group.name, index)
        if first != index:
            raise field_error("duplicate_group", f"group name {group.name!r} is already used by "
                                                 f"policies[{first}]", loc_suffix=(index, "name"))
        if group.selects_anything and index != len(groups) - 1:
            what = "the 'default' group" if group.name == DEFAULT_GROUP else "a group without selectors"
            raise field_error(
                "group_unreachable",
                f"{what} takes every recipient, so the groups after it could never match: put it last",
                loc_suffix=(index, "name"),
            )
        for name in group.plugins:
            if name not in plugin_names:
                known = ", ".join(sorted(plugin_names)) or "none are configured"
                raise field_error("group_plugin_unknown", f"no plugin named {name!r} in plugins: ({known})",
                                  loc_suffix=(index, "plugins", name))
        if group.route is not None and (route_names is None or group.route not in route_names):
            known = ", ".join(route_names) if route_names is not None else "none: delivery is not smtp"
            raise field_error("route_unknown", f"no route named {group.route!r} in delivery.routes ({known})",
                              loc_suffix=(index, "route"))
        for position, selector in enumerate(group.recipients):
            if selector.startswith("table:") and selector[6:] not in table_names:
                known = ", ".join(sorted(table_names)) or "none are defined"
                raise field_error("table_unknown", f"no table named {selector[6:]!r} in tables ({known})",
                                  loc_suffix=(index, "recipients", position))
