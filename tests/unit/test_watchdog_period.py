"""Whether systemd watches this process, and with what period (sd_watchdog_enabled(3))."""

from __future__ import annotations

import os

import pytest

from smtpproxy.watchdog import watchdog_period


@pytest.mark.parametrize(("usec", "pid", "period"), [
    (None, None, None),  # no WatchdogSec=
    ("30000000", None, 30.0),  # WATCHDOG_PID is optional
    ("30000000", "own", 30.0),
    ("30000000", "other", None),  # set for the proxy, inherited by a plugin's helper process
    ("0", None, None),
    ("soon", None, None),
    ("", None, None),
])
def test_watchdog_period(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                         period: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", {"own": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid or ""))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert watchdog_period() == period
