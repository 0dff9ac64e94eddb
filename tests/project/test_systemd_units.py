"""The systemd units in config/ are ones systemd accepts and sandboxes, checked offline with
``systemd-analyze`` on copies whose /opt/smtpproxy paths point at this environment's
``smtpproxy``.

systemd warns about an unknown key and ignores it, so a misspelt hardening or logging setting
would go unnoticed until a user reads the journal; and each unit is held to the proxy's
sandbox (``systemd-analyze security``: an exposure of 1.7-1.8, "OK"), so a unit added or edited
later cannot quietly run with capabilities, the kernel log or other users' processes in reach.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = {"smtpproxy.service", "smtpproxy-milter.service", "smtpproxy-policy.service",
         "smtpproxy-web.service", "smtpproxy-digest.service", "smtpproxy-digest.timer"}
MOST_EXPOSED = 2.0
"""systemd-analyze's exposure (0 safest, 10 worst) that no unit may exceed."""


@pytest.fixture
def units(tmp_path: Path) -> tuple[str, list[str]]:
    """systemd-analyze, and the units' names, copied into *tmp_path* (the working directory)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: apt-get install systemd")
    smtpproxy = Path(sys.executable).with_name("smtpproxy")
    assert smtpproxy.exists(), "pip install -e . puts the command beside the interpreter"
    found = sorted([*ROOT.glob("config/*.service"), *ROOT.glob("config/*.timer")])
    assert {unit.name for unit in found} >= UNITS
    for unit in found:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/smtpproxy/bin/smtpproxy", str(smtpproxy)))
    return analyze, [unit.name for unit in found]


def test_systemd_verifies_the_units_without_a_warning(units: tuple[str, list[str]], tmp_path: Path) -> None:
    analyze, names = units
    done = subprocess.run([analyze, "verify", "--man=no", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


def test_every_service_is_sandboxed_like_the_proxy(units: tuple[str, list[str]], tmp_path: Path) -> None:
    analyze, names = units
    exposure = {}
    for name in (n for n in names if n.endswith(".service")):
        done = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", f"./{name}"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        assert match is not None, done.stdout + done.stderr
        exposure[name] = float(match.group(1))
    assert {name: level for name, level in exposure.items() if level > MOST_EXPOSED} == {}, exposure
