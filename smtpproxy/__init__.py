"""smtpproxy: a transparent, before-queue SMTP filtering proxy with an async plugin chain.

The public API for plugin authors is what this module exports; everything else is
internal and may change.
"""

from smtpproxy.addresses import Address
from smtpproxy.blocking import run_blocking
from smtpproxy.eventlog import EventLog
from smtpproxy.hookspecs import hookimpl
from smtpproxy.message import HeaderError, Message, validate_header
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
from smtpproxy.settings import SettingsError
from smtpproxy.verdicts import Action, Reply, Verdict

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Address",
    "Client",
    "Decision",
    "Envelope",
    "EventLog",
    "HeaderError",
    "Message",
    "Outcome",
    "Recipient",
    "Reply",
    "Results",
    "Session",
    "SettingsError",
    "TLSInfo",
    "Transaction",
    "Verdict",
    "__version__",
    "hookimpl",
    "run_blocking",
    "validate_header",
]
