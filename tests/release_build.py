"""The release procedure's build (docs/releasing.md), once per test session: ``python -m build``
on a copy of the tree makes the sdist, then the wheel from that sdist. tests/project/test_install.py
checks and installs them; tests/systemd_pid1.py installs the wheel under systemd.

The build reads a copy (setuptools writes build/ and *.egg-info into its source).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["ROOT", "SOURCES", "build", "copy_tree", "release_dist"]

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "smtpproxy", "plugins", "config"]
"""What ``python -m build`` reads from a checkout (MANIFEST.in names the rest of the sdist)."""


def copy_tree(names: list[str], source: Path, target: Path) -> None:
    for name in names:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source / name, target / name)


def build(source: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "build", *args, "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def release_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory with this tree's sdist and the wheel built from it (nothing else)."""
    source = tmp_path_factory.mktemp("source")
    copy_tree(SOURCES, ROOT, source)
    out = tmp_path_factory.mktemp("dist")
    done = build(source, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out
