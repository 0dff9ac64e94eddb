"""What the web app's routes share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from smtpproxy.links import LinkSigner
from smtpproxy.store import Store
from smtpproxy.store.quarantine import DatabaseQuarantine

if TYPE_CHECKING:
    from smtpproxy.config import Config
    from smtpproxy.delivery import Delivery

__all__ = ["WebContext"]


@dataclass
class WebContext:
    """What the routes share: the configuration, the store, the quarantine, the link signer
    and the delivery a release goes through (started and closed with the app)."""

    config: Config
    store: Store
    quarantine: DatabaseQuarantine
    signer: LinkSigner
    delivery: Delivery
