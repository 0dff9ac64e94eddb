"""What the web app's routes share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smtpproxy.links import LinkSigner
from smtpproxy.store import Store
from smtpproxy.store.quarantine import DatabaseQuarantine
from smtpproxy.tables import Tables
from smtpproxy.web.sessions import SessionTable

if TYPE_CHECKING:
    from smtpproxy.chain import Chain
    from smtpproxy.config import Config
    from smtpproxy.delivery import Delivery
    from smtpproxy.loginthrottle import LoginThrottle
    from smtpproxy.web.accounts import AccountSource
    from smtpproxy.web.listtables import ListTables

__all__ = ["WebContext"]


@dataclass
class WebContext:
    """What the routes share: the configuration, the store, the quarantine, the link signer
    and the delivery a release goes through (started and closed with the app); with the
    console on, its accounts, login throttle, session-signing secret and live sessions; the lookup tables it
    uses (closed with the app) and the lists plugin's allow and block tables."""

    config: Config
    store: Store
    quarantine: DatabaseQuarantine
    signer: LinkSigner
    delivery: Delivery
    accounts: AccountSource | None = None
    throttle: LoginThrottle | None = None
    session_secret: str = field(default="", repr=False)
    sessions: SessionTable = field(default_factory=lambda: SessionTable(lifetime=0))
    """The console's live sessions (none can live until the console is configured)."""
    tables: Tables = field(default_factory=Tables)
    lists: ListTables | None = None
    learners: Chain | None = None
    """The configured plugin chain, for "report spam / not spam" (built on first use)."""
