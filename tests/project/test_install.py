"""A release is what docs/releasing.md says: ``python -m build`` makes an sdist and a wheel that
pass ``twine check``; the wheel carries the proxy, the first-party plugins, their entry points
and the extras; installed in a fresh virtual environment (its dependencies resolved by pip, as
a user's would be), it checks the shipped configuration, delivers a first mail, and loads a
plugin package built and installed next to it.

The build is tests/release_build.py's, once per session (the units' tests install the same wheel).
pip may take packages from the machine's cache and configured index; nothing else is fetched.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import smtpproxy
from smtpproxy.versions import PLUGIN_API_VERSION
from tests.daemons import LogLines
from tests.release_build import ROOT, build, copy_tree

VERSION = smtpproxy.__version__
@pytest.fixture(scope="module")
def wheel(release_dist: Path) -> Path:
    return release_dist / f"smtpproxy-{VERSION}-py3-none-any.whl"


@pytest.fixture(scope="module")
def sdist(release_dist: Path) -> Path:
    return release_dist / f"smtpproxy-{VERSION}.tar.gz"


def test_the_build_makes_exactly_an_sdist_and_a_wheel_that_pass_twine_check(release_dist: Path) -> None:
    assert sorted(p.name for p in release_dist.iterdir()) == [f"smtpproxy-{VERSION}-py3-none-any.whl",
                                                      f"smtpproxy-{VERSION}.tar.gz"]
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, release_dist.iterdir())],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("PASSED") == 2


def test_the_sdist_holds_the_source_the_changelog_and_the_config_but_no_half_test_suite(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
        pkg_info = archive.extractfile(f"smtpproxy-{VERSION}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "smtpproxy/__init__.py",
            "smtpproxy/versions.py", "plugins/headers.py", "config/smtpproxy.yaml",
            "config/smtpproxy.service"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert f"\nVersion: {VERSION}\n" in metadata


def test_the_wheel_holds_the_proxy_the_plugins_and_the_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [dist_info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert dist_info == f"smtpproxy-{VERSION}.dist-info"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "smtpproxy").rglob("*.py")}
    modules |= {"smtpproxy_plugins/" + p.name for p in (ROOT / "plugins").glob("*.py")}
    assert sorted(modules - names) == []  # smtpproxy.config was missing: the package list is by hand
    assert "smtpproxy/py.typed" in names
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nDescription-Content-Type: text/markdown\n" in metadata
    for extra in ("metrics", "redis", "uvloop", "test", "plugin-test"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "headers = smtpproxy_plugins.headers:AddHeaders" in entry_points
    assert "smtpproxy = smtpproxy.pytest_plugin" in entry_points
    assert "smtpproxy = smtpproxy.cli:main" in entry_points


# -- installed in a fresh virtual environment -------------------------------------------------------


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Iterator[Path]:
    """A new virtual environment with the wheel installed by pip, dependencies and all, and
    examples/role-addresses built and installed as a plugin package."""
    home = tmp_path_factory.mktemp("venv")
    made = subprocess.run([sys.executable, "-m", "venv", str(home)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=900, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    plugin_source = tmp_path_factory.mktemp("plugin-source")
    copy_tree(["pyproject.toml", "src"], ROOT / "examples" / "role-addresses", plugin_source)
    plugin_dist = tmp_path_factory.mktemp("plugin-dist")
    built = build(plugin_source, plugin_dist, "--wheel")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [plugin_wheel] = plugin_dist.glob("*.whl")
    install = subprocess.run([str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", str(plugin_wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    yield home


def _in_venv(venv: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "smtpproxy"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=clean | env)


def test_the_installed_wheel_runs_from_the_venv_and_checks_the_shipped_config(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import smtpproxy, smtpproxy_plugins.headers as h; print(smtpproxy.__file__); "
                            "print(h.__file__)"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(venv)) for line in where.stdout.splitlines()), where.stdout
    version = _in_venv(venv, "--version", cwd=tmp_path)
    assert version.stdout.startswith(f"smtpproxy {VERSION} (plugin API {PLUGIN_API_VERSION}, ")
    check = _in_venv(venv, "check-config", "-c", str(ROOT / "config" / "smtpproxy.yaml"), cwd=tmp_path,
                     UPSTREAM_HOST="127.0.0.1")
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


def test_the_installed_wheel_delivers_a_first_mail_through_a_plugin_package(venv: Path, tmp_path: Path) -> None:
    listed = _in_venv(venv, "plugins", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "roles_inside_only" in listed.stdout and "smtpproxy_example_roles:RolesInsideOnly" in listed.stdout
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "hostname: fresh.test\n"
        "delivery:\n  type: maildir\n  path: mail\n"
        "plugins:\n  - name: roles_inside_only\n    settings: {roles: [noc]}\n"
        "  - name: headers\n    settings: {add: {X-Installed: fresh}}\n"
    )
    assert _in_venv(venv, "check-config", "-c", str(config), cwd=tmp_path).returncode == 0
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([str(venv / "bin" / "smtpproxy"), "run", "-c", str(config)], stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=clean)
    try:
        assert proc.stderr is not None
        lines = LogLines(proc.stderr)
        listening = lines.wait_line(r"event=listening ")
        assert f"version={VERSION} " in listening and "plugins=roles_inside_only,headers" in listening
        port = int(listening.split(" port=")[1].split()[0])
        message = b"From: a@sender.test\r\nTo: bob@localhost\r\nSubject: first\r\n\r\nHello.\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("a@sender.test", ["bob@localhost"], message) == {}
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # the plugin package at work
                client.sendmail("a@sender.test", ["noc@localhost"], message)
        [delivered] = (tmp_path / "mail" / "new").iterdir()
        assert b"X-Installed: fresh\r\n" in delivered.read_bytes()
        assert delivered.read_bytes().endswith(b"Hello.\r\n")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
