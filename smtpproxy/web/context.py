"""What the web app's routes share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smtpproxy.links import LinkSigner
from smtpproxy.store import Store
from smtpproxy.store.quarantine import DatabaseQuarantine

if TYPE_CHECKING:
    from smtpproxy.chain import Chain
    from smtpproxy.config import Config
    from smtpproxy.delivery import Delivery
    from smtpproxy.loginthrottle import LoginThrottle
    from smtpproxy.web.accounts import Accounts

__all__ = ["WebContext"]


@dataclass
class WebContext:
    """What the routes share: the configuration, the store, the quarantine, the link signer
    and the delivery a release goes through (started and closed with the app); with the
    console on, its accounts, login throttle and session-signing secret."""

    config: Config
    store: Store
    quarantine: DatabaseQuarantine
    signer: LinkSigner
    delivery: Delivery
    accounts: Accounts | None = None
    throttle: LoginThrottle | None = None
    session_secret: str = field(default="", repr=False)
    learners: Chain | None = None
    """The configured plugin chain, for "report spam / not spam" (built on first use)."""
