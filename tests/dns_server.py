"""The authoritative loopback DNS server of smtpproxy's own tests: :mod:`smtpproxy.zoneserver`
(the same server plugin authors get as the ``smtpproxy_dns`` fixture), as two fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smtpproxy.zoneserver import ZoneServer, running_zone_server

__all__ = ["ZoneServer", "dns_server", "module_dns_server", "running_zone_server"]


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    """A running authoritative server; point the resolver at ``127.0.0.1:dns_server.port``."""
    with running_zone_server() as data:
        yield data


@pytest.fixture(scope="module")
def module_dns_server() -> Iterator[ZoneServer]:
    """One server for a whole test module (clear() it between tests)."""
    with running_zone_server() as data:
        yield data
