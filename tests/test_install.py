"""The install the docs give works: a wheel built from the checkout carries the proxy, the
first-party plugins, their entry points and the extras, and runs from where it is installed.

smtpproxy is not on a package index, so docs/operations.md installs from a checkout or from
a wheel built with ``pip wheel``; this builds that wheel exactly so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of what the build reads, as setuptools writes build/ and *.egg-info into the tree.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("smtpproxy", "plugins"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [built] = out.glob("smtpproxy-*-py3-none-any.whl")
    return built


def test_the_wheel_holds_the_proxy_the_plugins_and_the_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [dist_info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {"smtpproxy/__init__.py", "smtpproxy/py.typed", "smtpproxy/milter/__init__.py",
            "smtpproxy/delivery/__init__.py", "smtpproxy_plugins/headers.py"} <= names
    for extra in ("metrics", "redis", "uvloop", "test"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "headers = smtpproxy_plugins.headers:AddHeaders" in entry_points
    assert "smtpproxy = smtpproxy.pytest_plugin" in entry_points
    assert "smtpproxy = smtpproxy.cli:main" in entry_points


def test_the_installed_wheel_checks_the_shipped_config(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # The wheel's copy comes first on the path; the dependencies come from this environment.
    env = dict(os.environ, PYTHONPATH=str(target), UPSTREAM_HOST="127.0.0.1")
    where = subprocess.run([sys.executable, "-c", "import smtpproxy, smtpproxy_plugins.headers as h; "
                            "print(smtpproxy.__file__); print(h.__file__)"],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(target)) for line in where.stdout.splitlines()), where.stdout
    check = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c",
                            str(ROOT / "config" / "smtpproxy.yaml")],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout
