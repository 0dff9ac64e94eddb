"""Policy groups: which group's chain a recipient gets, and which recipients share a transaction.

The configuration's ``policies:`` list is built once (at load and at each reload, by
:func:`smtpproxy.registry.build_chain`) into :class:`Policies`, attached to the default
chain: a session that holds the chain holds its groups too, so a reload swaps all groups
at once and a session in flight finishes on the set it started with.

The rules (docs/multi-domain.md):

- the connect, HELO and MAIL phases run on the default group's chain (the group is not
  known before the first RCPT); groups govern ``rcpt_to``, ``data`` and ``after_message``;
- per recipient, the first group whose selectors all match is chosen (a group's
  ``recipients:`` match when any entry does); none: the ``default`` group;
- a group's *transaction key* is the plugins of its ``data`` and ``after_message`` phases,
  each with its effective settings (plugin instances are shared exactly when the plugin and
  its settings are the same, so the instances are the key). Recipients whose key (and
  route) equals the transaction's share it, one scan and one reply; another key is refused
  with 452 4.5.3 and the client sends that recipient again in a new transaction;
- a selector table that cannot answer is a temporary failure for the recipient, never the
  default group (a tenant's rules must not silently become another's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from smtpproxy.chain import Chain
from smtpproxy.config.policies import DEFAULT_GROUP, PolicyGroup
from smtpproxy.networks import IPNetwork, ip_in_networks
from smtpproxy.tables import Table, address_keys, get_table, strip_extension

__all__ = ["DEFAULT_GROUP", "Choice", "Group", "Policies", "transaction_key"]

TransactionKey = tuple[tuple[str, int, bool], ...]


def transaction_key(chain: Chain) -> TransactionKey:
    """What must be equal for two recipients to share one DATA reply and one message body:
    the plugins (and instances, so their settings) of the data and after_message phases, and
    whether each is enforced (shadow mode)."""
    enforced = {step.name: step.enforce for step in chain.steps}
    return tuple((name, id(plugin), enforced[name]) for hook in ("data", "after_message")
                 for name, plugin in chain.phase_plugins(hook))


@dataclass(frozen=True, slots=True)
class Group:
    """One built group: its selectors, its chain and its transaction key."""

    name: str
    chain: Chain
    retention_days: float | None = None
    route: str | None = None
    """The route key this group's recipients are delivered by (None: their domain's)."""
    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    auth_users: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()
    key: TransactionKey = field(default=(), compare=False)

    @classmethod
    def of(cls, config: PolicyGroup, chain: Chain) -> Group:
        addresses, domains, suffixes, tables = set(), set(), [], []
        for entry in config.recipients:
            if entry.startswith("table:"):
                tables.append(entry[6:])
            elif "@" in entry:
                addresses.add(entry)
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                domains.add(entry)
        return cls(config.name, chain, config.quarantine_retention_days, config.route, frozenset(addresses),
                   frozenset(domains), tuple(suffixes), tuple(tables),
                   frozenset(u.lower() for u in config.auth_users), tuple(config.client_networks),
                   frozenset(config.listeners), transaction_key(chain))

    @classmethod
    def default(cls, chain: Chain) -> Group:
        return cls(DEFAULT_GROUP, chain, key=transaction_key(chain))

    def session_matches(self, auth_user: str | None, client_ip: str, local_port: int) -> str | None:
        """Why the session fits this group's session selectors ("" when it has none), or
        None when it does not."""
        why = []
        if self.auth_users:
            if auth_user is None or auth_user.lower() not in self.auth_users:
                return None
            why.append(f"auth user {auth_user}")
        if self.networks:
            if not ip_in_networks(client_ip, self.networks):
                return None
            why.append(f"client {client_ip}")
        if self.ports:
            if local_port not in self.ports:
                return None
            why.append(f"listener port {local_port}")
        return ", ".join(why)

    def static_match(self, address: str) -> str | None:
        """Why *address* (lower case) fits the group's address and domain selectors, or None."""
        local, _, domain = address.rpartition("@")
        domain = domain.rstrip(".")
        if self.addresses:
            for candidate in (address, f"{strip_extension(local, '+')}@{domain}"):
                if candidate in self.addresses:
                    return f"recipient {candidate}"
        if domain in self.domains:
            return f"domain {domain}"
        for suffix in self.suffixes:
            if domain.endswith(suffix):
                return f"domain *{suffix}"
        return None

    async def table_match(self, address: str, tables: Mapping[str, Table] | None = None) -> str | None:
        """Why a selector table has *address* (its keys in docs/tables.md's order), or None;
        :class:`~smtpproxy.tables.TableUnavailable` when a table cannot answer. *tables*: where
        to find them (default: the process's installed tables)."""
        for name in self.tables:
            table = get_table(name) if tables is None else tables[name]
            for key in address_keys(address):
                if await table.lookup(key) is not None:
                    return f"table {name} has {key}"
        return None


@dataclass(frozen=True, slots=True)
class Choice:
    """The group chosen for one recipient, and why (for the tracer and the logs)."""

    group: Group
    why: str


class Policies:
    """The configured groups in order, and the default group (the global configuration)."""

    __slots__ = ("by_name", "default", "groups")

    def __init__(self, default: Group, groups: Sequence[Group]):
        self.default = default
        self.groups = tuple(groups)
        self.by_name = {g.name: g for g in (default, *self.groups)}

    @property
    def names(self) -> tuple[str, ...]:
        """Every group's name (the bounded set of metric labels)."""
        return tuple(self.by_name)

    @property
    def selector_tables(self) -> tuple[str, ...]:
        """The tables the groups' ``table:`` selectors look into, each once."""
        return tuple(dict.fromkeys(name for g in self.groups for name in g.tables))

    async def choose(self, address: str, *, auth_user: str | None = None, client_ip: str = "",
                     local_port: int = 0, tables: Mapping[str, Table] | None = None) -> Choice:
        """The first group whose selectors all match *address* and the session; else default.

        A selector table that cannot answer raises TableUnavailable (the caller tempfails):
        whether this group matches is then unknown, and so is every later one's turn.
        *tables*: the selector tables (default: the process's installed ones).
        """
        address = address.lower()
        for group in self.groups:
            session_why = group.session_matches(auth_user, client_ip, local_port)
            if session_why is None:
                continue
            if not (group.addresses or group.domains or group.suffixes or group.tables):
                return Choice(group, session_why or "takes every recipient")
            why = group.static_match(address)
            if why is None and group.tables:
                why = await group.table_match(address, tables)
            if why is not None:
                return Choice(group, ", ".join(w for w in (why, session_why) if w))
        return Choice(self.default, "no group selects it")
