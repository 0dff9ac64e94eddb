"""smtpproxy: a transparent, before-queue SMTP filtering proxy with an async plugin chain.

The public API for plugin authors is what this module exports; everything else is
internal and may change. Its version is :data:`PLUGIN_API_VERSION` and what it promises is
in docs/compatibility.md.
"""

from typing import TYPE_CHECKING

from smtpproxy.addresses import Address, AddressError
from smtpproxy.authresults import AuthCheck
from smtpproxy.authresults import checks as auth_checks
from smtpproxy.authresults import record as record_auth_check
from smtpproxy.blocking import run_blocking
from smtpproxy.config import Config, ConfigError, Network
from smtpproxy.deprecation import Renamed, deprecated_names
from smtpproxy.dns import DNSTemporaryError, Resolver, TTLCache, get_resolver
from smtpproxy.eventlog import EventLog
from smtpproxy.hookspecs import hookimpl
from smtpproxy.message import Buffer, HeaderError, Message, validate_header
from smtpproxy.networks import IPNetwork, ip_in_networks
from smtpproxy.session import (
    Client,
    Decision,
    Envelope,
    Outcome,
    Recipient,
    Results,
    Session,
    TLSInfo,
    Transaction,
)
from smtpproxy.settings import PluginSettings, SettingsError
from smtpproxy.tables import Table, TableName, TableUnavailable, address_keys, domain_keys, get_table
from smtpproxy.verdicts import Action, Reply, Verdict
from smtpproxy.versions import PLUGIN_API_VERSION, __version__  # written once, there

__all__ = [
    "PLUGIN_API_VERSION",
    "Action",
    "Address",
    "AddressError",
    "AuthCheck",
    "Buffer",
    "Client",
    "Config",
    "ConfigError",
    "DNSTemporaryError",
    "Decision",
    "Envelope",
    "EventLog",
    "HeaderError",
    "IPNetwork",
    "Message",
    "Network",
    "Outcome",
    "PluginSettings",
    "Recipient",
    "Reply",
    "Resolver",
    "Results",
    "Session",
    "SettingsError",
    "TLSInfo",
    "TTLCache",
    "Table",
    "TableName",
    "TableUnavailable",
    "Transaction",
    "Verdict",
    "__version__",
    "address_keys",
    "auth_checks",
    "domain_keys",
    "get_resolver",
    "get_table",
    "hookimpl",
    "ip_in_networks",
    "record_auth_check",
    "run_blocking",
    "validate_header",
]

_RENAMED: dict[str, Renamed] = {}
"""Old public names kept working after a rename: ``"Old": Renamed("New", since=, removed_in=)``
(docs/compatibility.md#deprecation: with a DeprecationWarning, until a release that may break)."""

if not TYPE_CHECKING:  # mypy would otherwise accept any name from smtpproxy
    __getattr__ = deprecated_names(__name__, _RENAMED)
