"""The delivery backend a configuration asks for, built in one place.

The proxy and ``smtpproxy quarantine release`` both need one, so neither imports the other.
"""

from __future__ import annotations

import socket
from pathlib import Path

from smtpproxy.config import Config, MaildirDeliveryConfig
from smtpproxy.delivery import Delivery
from smtpproxy.delivery.maildir import MaildirDelivery
from smtpproxy.delivery.smtp import SmtpDelivery

__all__ = ["config_hostname", "make_delivery"]


def make_delivery(config: Config) -> Delivery:
    """A Maildir or an SMTP delivery (with its routes and connection pool), as configured."""
    d = config.delivery
    if isinstance(d, MaildirDeliveryConfig):
        return MaildirDelivery(Path(d.path), received=config.received_header,
                              hostname=config_hostname(config))
    return SmtpDelivery.from_config(d, config_hostname(config), received=config.received_header)


def config_hostname(config: Config) -> str:
    """The proxy's own name: ``hostname`` in the configuration, else the machine's."""
    # gethostname, not getfqdn: getfqdn asks DNS and can hang a machine without it.
    return config.hostname or socket.gethostname()
