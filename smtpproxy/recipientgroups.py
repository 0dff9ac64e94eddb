"""Which policy group each recipient of a kept message is in, where no session is running:
spam reports and "release and allow sender" (docs/multi-domain.md).

The proxy's own selector code decides (:meth:`smtpproxy.groups.Policies.choose`), with the
selector tables opened for the question. A table that cannot answer is :class:`GroupUnknown`,
never the default group: a tenant's report must not teach another tenant's filter, nor its
allow entry land in another's table. Of the session selectors only the client address is
known afterwards (the quarantine record keeps it); no login or listener port is kept, so a
group that selects by ``auth_users`` or ``listeners`` is not chosen here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from smtpproxy.chain import Chain
from smtpproxy.config.policies import DEFAULT_GROUP
from smtpproxy.config.tables import TableConfig
from smtpproxy.tables import TableError, Tables, TableUnavailable, build_tables

__all__ = ["GroupUnknown", "RecipientGroup", "client_of", "recipient_groups"]


class GroupUnknown(Exception):
    """A recipient's policy group cannot be told (a selector table is down or unreadable)."""


@dataclass(frozen=True, slots=True)
class RecipientGroup:
    """One policy group and the recipients (of those asked about) it selects."""

    name: str
    chain: Chain
    recipients: list[str] = field(default_factory=list)


async def recipient_groups(chain: Chain, table_specs: Mapping[str, TableConfig], recipients: Sequence[str], *,
                           client_ip: str = "") -> list[RecipientGroup]:
    """*recipients* by policy group, in the order of their first recipient. *chain*: the
    configured default chain (its groups in :attr:`Chain.policies`); without groups, one."""
    policies = chain.policies
    if policies is None or not recipients:
        return [RecipientGroup(DEFAULT_GROUP, chain, list(recipients))]
    names = policies.selector_tables
    try:
        tables = build_tables({name: table_specs[name] for name in names}) if names else Tables()
    except TableError as exc:
        raise GroupUnknown(f"the policy groups cannot be told: {exc}") from None
    found: dict[str, RecipientGroup] = {}
    try:
        for recipient in recipients:
            try:
                choice = await policies.choose(recipient, client_ip=client_ip, tables=tables)
            except TableUnavailable as exc:
                raise GroupUnknown(f"the policy group of {recipient} is unknown: {exc}") from None
            group = choice.group
            found.setdefault(group.name, RecipientGroup(group.name, group.chain)).recipients.append(recipient)
    finally:
        await tables.close()
    return list(found.values())


def client_of(record: Mapping[str, Any]) -> str:
    """The client address a quarantine record kept ("" when none)."""
    client = record.get("client")
    ip = client.get("ip") if isinstance(client, Mapping) else None
    return ip if isinstance(ip, str) else ""
