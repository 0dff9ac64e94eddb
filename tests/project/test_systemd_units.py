"""The systemd units in config/ are ones systemd accepts: every key known, every path
consistent (``systemd-analyze verify``, offline, with the units' /opt/smtpproxy paths pointed
at this environment's ``smtpproxy``). systemd warns about an unknown key and ignores it, so a
misspelt hardening or logging setting would otherwise go unnoticed until a user reads the journal."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_verifies_the_units_without_a_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: apt-get install systemd")
    smtpproxy = Path(sys.executable).with_name("smtpproxy")
    assert smtpproxy.exists(), "pip install -e . puts the command beside the interpreter"
    units = sorted([*ROOT.glob("config/*.service"), *ROOT.glob("config/*.timer")])
    assert {u.name for u in units} >= {"smtpproxy.service", "smtpproxy-web.service",
                                       "smtpproxy-digest.service", "smtpproxy-digest.timer"}
    for unit in units:
        text = unit.read_text().replace("/opt/smtpproxy/bin/smtpproxy", str(smtpproxy))
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", *(u.name for u in units)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr
