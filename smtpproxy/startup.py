"""Starting a chain: the one path the proxy, a reload, the milter and the tracer share.

Configure the shared DNS resolver, run every plugin's ``startup`` hook, and if any failed,
run the ``shutdown`` hooks (so the plugins that did start release what they opened) and
raise one :class:`StartupError` that names each failing plugin.
"""

from __future__ import annotations

import logging
import sys

from smtpproxy import dns
from smtpproxy.chain import Chain
from smtpproxy.config import DNS as DnsSettings
from smtpproxy.eventlog import event

__all__ = ["StartupError", "cannot_start", "configure_dns", "start_chain"]


class StartupError(Exception):
    """smtpproxy could not start: a port in use, a plugin's ``startup`` hook failed, a
    certificate that does not load, ... The message says which and what to fix."""


def cannot_start(reason: object) -> None:
    """Say why the process does not start: a ``startup_failed`` line at level error (under
    systemd the journal files it as an error), then the sentence for whoever ran the command."""
    event("startup_failed", logging.ERROR, error=str(reason))
    print(f"smtpproxy: cannot start: {reason}", file=sys.stderr)


def configure_dns(settings: DnsSettings) -> None:
    """Make the shared resolver the one the configuration describes."""
    dns.configure(dns.Resolver(settings.nameservers, port=settings.port, timeout=settings.timeout,
                               cache_size=settings.cache_size))


async def start_chain(chain: Chain, dns_settings: DnsSettings | None = None) -> None:
    """Configure DNS (when given) and run every ``startup`` hook; StartupError on failure."""
    if dns_settings is not None:
        configure_dns(dns_settings)
    failures = await chain.notify("startup")
    if failures:
        await chain.notify("shutdown")  # undo what the plugins that did start set up
        raise StartupError("; ".join(f"plugin {name}: startup failed: {err}" for name, err in failures))
