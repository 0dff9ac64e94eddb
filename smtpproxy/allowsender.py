""""Release and allow this sender": an entry in the ``lists`` plugin's allow table.

The ``lists`` plugin matches its allow entries against the message's ``From:`` address (what
the reader sees, and what DMARC/SPF/DKIM authenticate), keyed by recipient. So the entry
added is that address, under the recipient's own address (or ``@domain``, for a domain
admin who allows it for the whole domain). Only a writable table (``file`` or ``redis``,
as for ``smtpproxy tables add``) can take it; otherwise :func:`allow_table` says why not.

With ``policies:``, the table is the one of the recipient's policy group (chosen as at RCPT,
:mod:`smtpproxy.recipientgroups`): a group that overrides the lists plugin's ``allow`` setting
(or turns a lists plugin on) gets its entries in its own table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from smtpproxy.chain import Chain
from smtpproxy.config import Config, PluginSpec
from smtpproxy.message import Message
from smtpproxy.recipientgroups import recipient_groups
from smtpproxy.tables.edit import WRITABLE, one_entry
from smtpproxy.tables_cli import edit_entry

__all__ = ["AllowTable", "allow_table", "allow_tables", "any_allow_table", "author", "lists_plugin"]

@dataclass(frozen=True, slots=True)
class AllowTable:
    """The configured allow table, or why there is none to write to (``problem``)."""

    name: str | None
    problem: str | None = None

    @property
    def writable(self) -> bool:
        return self.problem is None

    async def add(self, config: Config, key: str, sender: str) -> str:
        """Add *sender* to *key*'s allow list; what happened, as one line."""
        assert self.name is not None and self.problem is None
        said: list[str] = []
        await edit_entry(config, self.name, key, sender, add=True, say=said.append)
        return "; ".join(said) or f"{sender} added to {key}"


def lists_plugin(config: Config, group: str | None = None) -> PluginSpec | None:
    """The first enabled ``lists`` plugin of the configuration (by name, or ``use: lists``
    or its class), whose tables the allow button and the console's list pages edit; with
    *group* (a name of ``policies:``), as that group has it (on or off, its settings)."""
    overrides = next((g.plugins for g in config.policies if g.name == group), {})
    for spec in config.plugins:
        target = spec.use or spec.name
        override = overrides.get(spec.name)
        enabled = spec.enabled if override is None or override.enabled is None else override.enabled
        if enabled and (target == "lists" or target.endswith("lists:Lists")):
            if override is not None and override.settings:
                return spec.model_copy(update={"settings": {**spec.settings, **override.settings}})
            return spec
    return None


def allow_table(config: Config, group: str | None = None) -> AllowTable:
    """The allow table of the (first enabled) ``lists`` plugin, if it is writable; with
    *group*, that policy group's."""
    spec = lists_plugin(config, group)
    whose = "" if group is None else f" for policy group {group}"
    if spec is None:
        return AllowTable(None, f"no lists plugin is configured{whose}: there is no allow list")
    name = spec.settings.get("allow")
    if not isinstance(name, str):
        return AllowTable(None, f"the lists plugin ({spec.name}){whose} has no allow table")
    table = config.tables.get(name)
    if table is None:
        return AllowTable(None, f"the lists plugin's allow table {name!r} is not in tables:")
    if table.type not in WRITABLE:
        return AllowTable(None, f"the allow table {name} ({table.type}) is not writable here: "
                                f"only {' and '.join(sorted(WRITABLE))} tables are")
    return AllowTable(name)


def any_allow_table(config: Config) -> AllowTable:
    """A writable allow table of the global lists plugin or of any policy group (the first),
    else why the global one is not: whether "allow sender" can be offered at all."""
    tables = [allow_table(config), *(allow_table(config, g.name) for g in config.policies)]
    return next((t for t in tables if t.writable), tables[0])


async def allow_tables(config: Config, chain: Chain, recipients: Sequence[str], *,
                       client_ip: str = "") -> list[tuple[AllowTable, list[str]]]:
    """Each recipient's allow table (its policy group's; *chain*: the configured chain with
    its groups), with the recipients it is for. GroupUnknown when a group cannot be told."""
    if chain.policies is None:
        return [(allow_table(config), list(recipients))]
    groups = await recipient_groups(chain, config.tables, recipients, client_ip=client_ip)
    return [(allow_table(config, g.name), g.recipients) for g in groups]


def author(content: bytes) -> str | None:
    """The single ``From:`` address of a message, as the lists plugin reads it (None: none or
    several, which the lists plugin never allows, or one the allow table would not keep as
    one entry: ``"x,gmail.com"@attacker.example`` would allow all of gmail.com)."""
    values = Message(content).get_all("From")
    if len(values) != 1:
        return None
    found = {a.lower() for _, a in getaddresses(values) if "@" in a and one_entry(a)}
    if len(found) != 1:
        return None
    return next(iter(found))
