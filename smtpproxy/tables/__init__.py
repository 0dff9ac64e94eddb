"""Lookup tables: one layer every feature uses to ask "the values for this key" (Postfix's maps).

A table is named in the configuration's ``tables:`` section and is one of: ``inline`` (YAML),
``file`` (``key value`` lines, re-read at reload), ``regexp``, ``redis``, ``sqlite``,
``postgresql`` or ``ldap``. Every lookup goes through :class:`Table`: keys folded to lower
case, a timeout, a bounded cache with TTLs for found and not-found answers, and one failure
mode: :class:`TableUnavailable`, which callers turn into a temporary failure (a plugin simply
lets it propagate: the chain tempfails, or does what the plugin's ``on_error`` says).

Plugins::

    from smtpproxy import address_keys, get_table

    table = get_table(self.settings.table)          # at the time of the lookup
    for key in address_keys(recipient.address.text):
        found = await table.lookup(key)             # tuple of strings, or None
        if found is not None:
            ...

docs/tables.md has the configuration and the search order.
"""

from smtpproxy.tables.base import Backend, Table
from smtpproxy.tables.errors import TableError, TableUnavailable
from smtpproxy.tables.fields import TableName
from smtpproxy.tables.keys import address_keys, domain_keys, strip_extension
from smtpproxy.tables.ldap import escape_filter_value
from smtpproxy.tables.registry import Tables, build_tables, get_table, install, installed

__all__ = [
    "Backend",
    "Table",
    "TableError",
    "TableName",
    "TableUnavailable",
    "Tables",
    "address_keys",
    "build_tables",
    "domain_keys",
    "escape_filter_value",
    "get_table",
    "install",
    "installed",
    "strip_extension",
]
