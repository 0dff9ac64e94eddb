"""What one listener is configured with, and what every session of a proxy shares.

The SMTP front end (:mod:`smtpproxy.inbound`) reads both; the server builds them from the
configuration (and a reload replaces them for new sessions).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from smtpproxy.auth import PasswordFile
from smtpproxy.chain import Chain
from smtpproxy.delivery import Delivery
from smtpproxy.history import HistoryRecorder
from smtpproxy.limits import ConnectionLimiter
from smtpproxy.loginthrottle import LoginThrottle
from smtpproxy.metrics import NullRecorder
from smtpproxy.proxyprotocol import ProxyProtocolSettings
from smtpproxy.quarantine import QuarantineStore
from smtpproxy.relay import RelayPolicy
from smtpproxy.reload import ChainLeases
from smtpproxy.senderlogin import SenderLoginPolicy
from smtpproxy.spool import DEFAULT_SPOOL_THRESHOLD
from smtpproxy.store.quarantine import DatabaseQuarantine

__all__ = ["ListenerPolicy", "OpenSession", "Services"]


class OpenSession(Protocol):
    """What shutdown needs of a running session."""

    delivering: asyncio.Event | None
    """Set while a message is with the delivery backend; shutdown waits for its reply."""

    def request_close(self) -> None:
        """Graceful: idle sessions close now, busy ones after their command."""

    def force_close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ListenerPolicy:
    """Everything one listener needs to know about limits and protocol behaviour."""

    hostname: str
    banner: str = "ESMTP smtpproxy"
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_line_length: int = 1000
    max_command_line: int = 512
    max_commands: int = 10_000
    max_errors: int = 20
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    session_timeout: float = 3600.0
    normalize_bare_newlines: bool = False
    spool_threshold: int = DEFAULT_SPOOL_THRESHOLD
    """Messages above this size are spooled to a temporary file (see smtpproxy.spool)."""
    spool_directory: str | None = None
    smtputf8: bool = True
    pipelining: bool = True
    require_starttls: bool = False
    auth: PasswordFile | None = None
    """Users for SMTP AUTH; None: AUTH is not offered."""
    auth_required: bool = False
    """MAIL FROM needs a successful AUTH first."""
    proxy_protocol: ProxyProtocolSettings | None = None
    """Read a PROXY protocol header before anything else; None: no header expected."""
    sender_login: SenderLoginPolicy | None = None
    """Which logins may use which senders (smtpproxy.senderlogin); None: not checked."""


@dataclass(slots=True)
class Services:
    """The shared parts every session of a proxy uses."""

    chain: Chain
    delivery: Delivery
    quarantine: QuarantineStore | DatabaseQuarantine
    relay: RelayPolicy
    limiter: ConnectionLimiter
    sessions: set[OpenSession]
    background: set[asyncio.Task[None]]
    drained: asyncio.Event
    """Set whenever no session is open (graceful shutdown waits on it)."""
    stopping: bool = False
    """Set when shutdown begins; sessions still setting up are turned away with 421."""
    metrics: NullRecorder = field(default_factory=NullRecorder)
    """Metrics recorder; the no-op one unless metrics are enabled."""
    leases: ChainLeases = field(default_factory=ChainLeases)
    """Which chain each session runs on; a reload swaps ``chain`` for new sessions only."""
    login_throttle: LoginThrottle | None = None
    """Brakes on password guessing, shared by every listener (smtpproxy.loginthrottle)."""
    history: HistoryRecorder | None = None
    """Where each decision is queued for the store's history (None: no store, or history off)."""
    node: str = ""
    """This proxy's name in the store's records."""
