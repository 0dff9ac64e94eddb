"""smtpproxy: a transparent, before-queue SMTP filtering proxy with an async plugin chain.

The public API for plugin authors is what this module exports; everything else is
internal and may change.
"""

from smtpproxy.addresses import Address, AddressError
from smtpproxy.authresults import AuthCheck
from smtpproxy.authresults import checks as auth_checks
from smtpproxy.authresults import record as record_auth_check
from smtpproxy.blocking import run_blocking
from smtpproxy.config import Config, ConfigError, Network
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
from smtpproxy.verdicts import Action, Reply, Verdict

__version__ = "0.1.0"

__all__ = [
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
    "Transaction",
    "Verdict",
    "__version__",
    "auth_checks",
    "get_resolver",
    "hookimpl",
    "ip_in_networks",
    "record_auth_check",
    "run_blocking",
    "validate_header",
]
