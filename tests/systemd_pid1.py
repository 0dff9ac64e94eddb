"""A real systemd as process 1, for the shipped units in config/ as docs/operations.md installs them.

``unshare --pid --mount --uts --net`` starts Debian's ``/lib/systemd/systemd`` as process 1 of
new namespaces, at an empty target: it starts nothing but what a test asks for. The file
system is the machine's, so every unit a test starts gets a drop-in with
``DefaultDependencies=no``: ``sysinit.target`` would run systemd-tmpfiles (which empties
``/tmp``), sysctl, sysusers and the rest against this machine; they are masked as well
(:data:`MASKED`). The drop-in also sets ``LD_LIBRARY_PATH`` for an interpreter built with a
shared libpython, and (for the watchdog test) a shorter ``WatchdogSec=``; nothing else of the
unit changes: ``Type=notify``, the user, the capability, the sandbox and the journal are as
shipped.

In the namespace's own mounts (the machine does not see them): ``/opt/smtpproxy`` is a
virtual environment as the docs make it, with the wheel of this tree installed (``--no-deps``;
the dependencies are the test interpreter's, listed in a ``.pth``); the interpreter is at
``/opt/py`` (the user ``smtpproxy`` could not reach ``/root`` or ``/tmp`` through the
sandbox); ``/etc/smtpproxy`` and ``/var/spool/smtpproxy`` are empty tmpfs, and
``/etc/passwd`` and ``/etc/group`` are copies with the user ``smtpproxy`` in them. The
network namespace has its own loopback, so the proxy takes port 25 on 127.0.0.1.

Tests skip with the reason where it cannot run: not root, no ``unshare``, or a systemd that
does not come up within 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.release_build import ROOT

__all__ = ["Pid1", "pid1"]

SYSTEMD = Path("/lib/systemd/systemd")
PY = "/opt/py"
VENV = "/opt/smtpproxy"

_BOOT = """set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system
printf '[Unit]\\nDescription=Nothing but what a test starts\\n' > /run/systemd/system/idle.target
for unit in {masked}; do ln -s /dev/null /run/systemd/system/$unit; done
ip link set lo up
exec env container=other {systemd} --system --unit=idle.target --log-target=journal --log-level=notice
"""

MASKED = ("sysinit.target", "basic.target", "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
          "systemd-tmpfiles-setup-dev-early.service", "systemd-tmpfiles-clean.service", "systemd-sysctl.service",
          "systemd-sysusers.service", "systemd-remount-fs.service", "systemd-modules-load.service",
          "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-random-seed.service")
"""Masked in the namespaces' /run (``systemctl mask --runtime``) before systemd starts: what would
act on this machine's /tmp, /etc, kernel settings or devices cannot start, whatever asks for it."""

_DROP_IN = """[Unit]
DefaultDependencies=no

[Service]
Environment=LD_LIBRARY_PATH={py}/lib
{extra}
"""


class Pid1:
    """systemd as process 1 of private namespaces; every call enters them."""

    def __init__(self, process: subprocess.Popen[bytes], pid: int):
        self.process = process
        self.pid = pid

    def run(self, *command: str, check: bool = True, timeout: float = 60,
            namespaces: tuple[str, ...] = ("-a",), input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", "-t", str(self.pid), *namespaces, *command], capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def write(self, path: str, text: str, mode: str = "644") -> None:
        self.run("sh", "-c", f"mkdir -p \"$(dirname {path})\" && cat > {path} && chmod {mode} {path}",
                 input=text)

    def configure(self, text: str, path: str = "/etc/smtpproxy/smtpproxy.yaml") -> None:
        """A configuration file as docs/operations.md installs it: root's, the service's group
        may read it (0640)."""
        self.write(path, text, mode="640")
        self.run("chgrp", "smtpproxy", path)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def install_unit(self, name: str, *, extra: str = "", copy: bool = True) -> None:
        """config/NAME as /run/systemd/system/NAME (a unit directory systemd reads, in the
        namespace's own /run), with the drop-in described above (*copy* False: the unit
        file is there already)."""
        if copy:
            self.write(f"/run/systemd/system/{name}", (ROOT / "config" / name).read_text())
        self.write(f"/run/systemd/system/{name}.d/test.conf", _DROP_IN.format(py=PY, extra=extra))
        self.systemctl("daemon-reload")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"--property={p}" for p in properties]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, want: dict[str, str], timeout: float = 30) -> dict[str, str]:
        """Poll ``systemctl show`` until every property has its wanted value."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.show(unit, *want)
            if all(props.get(k) == v for k, v in want.items()):
                return props
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: {props}, wanted {want}\n{self.journal_text(unit)}")
            time.sleep(0.1)

    def journal(self, unit: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", f"--unit={unit}", "--output=json", "--no-pager", "--all").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_text(self, unit: str) -> str:
        return self.run("journalctl", f"--unit={unit}", "--no-pager", "--all", check=False).stdout

    def python(self, code: str, timeout: float = 30) -> str:
        """*code* run by this interpreter in the namespaces' network (a client of 127.0.0.1 there)."""
        return self.run(sys.executable, "-c", code, namespaces=("-n",), timeout=timeout).stdout


def _boot(console_file: Path) -> Pid1 | str:
    if os.geteuid() != 0:
        return "systemd as process 1 needs root (CI runs as root)"
    if not SYSTEMD.exists() or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return f"no {SYSTEMD}, unshare or nsenter"
    # systemd's console (what it says before the journal runs): a file, since a pipe nobody
    # reads would fill and stop it
    console = console_file.open("wb")
    process = subprocess.Popen(["unshare", "--fork", "--pid", "--mount", "--uts", "--net", "--mount-proc",
                                "sh", "-c", _BOOT.format(systemd=SYSTEMD, masked=" ".join(MASKED))],
                               stdout=console, stderr=subprocess.STDOUT)
    console.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        child = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        if child:
            pid1 = Pid1(process, int(child[0]))
            state = pid1.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                return pid1
        if process.poll() is not None:
            break
        time.sleep(0.2)
    _stop(process)
    output = console_file.read_text(errors="replace")[-2000:]
    return f"systemd did not come up as process 1 in namespaces here: {output}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the namespaces' process 1 (the kernel then kills everything in them)."""
    child = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for pid in child:
        os.kill(int(pid), signal.SIGKILL)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _site_dirs() -> list[str]:
    """Where the test interpreter's packages are: its own site-packages, and a venv's."""
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    return list(dict.fromkeys(dirs))


def _prepare(pid1: Pid1, wheel: Path, work: Path) -> None:
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = work / "packages"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--target", str(packages), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    passwd = work / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text()
                      + "smtpproxy:x:990:990:smtpproxy:/nonexistent:/usr/sbin/nologin\n")
    group = work / "group"
    group.write_text(Path("/etc/group").read_text() + "smtpproxy:x:990:\n")
    mounts = [
        # journald keeps its files here when the directory exists: not in the machine's
        "mkdir -p /var/log/journal && mount -t tmpfs tmpfs /var/log/journal",
        "mount -t tmpfs tmpfs /opt",
        "mkdir -p /etc/smtpproxy /var/spool/smtpproxy",
        "mount -t tmpfs tmpfs /etc/smtpproxy",
        "mount -t tmpfs tmpfs /var/spool/smtpproxy",
        f"mount --bind {passwd} /etc/passwd",
        f"mount --bind {group} /etc/group",
        # docs/operations.md, "Installing as a service", step 3
        "chown root:smtpproxy /etc/smtpproxy && chmod 0750 /etc/smtpproxy",
        "chown smtpproxy:smtpproxy /var/spool/smtpproxy && chmod 0750 /var/spool/smtpproxy",
        "install -d -m 0700 -o smtpproxy -g smtpproxy /var/spool/smtpproxy/quarantine",
        f"mkdir -p {PY} && mount --bind {base} {PY}",
    ]
    site_dirs = []
    for index, directory in enumerate(_site_dirs()):
        inside = f"/opt/site{index}"
        mounts.append(f"mkdir -p {inside} && mount --bind {directory} {inside}")
        site_dirs.append(inside)
    mounts += [
        f"LD_LIBRARY_PATH={PY}/lib {PY}/bin/{version} -m venv --without-pip {VENV}",
        f"mkdir -p {VENV}/packages && mount --bind {packages} {VENV}/packages",
        # The journal, which sysinit.target would have started (socket first, as at boot)
        "systemctl start systemd-journald.socket systemd-journald.service",
    ]
    pid1.run("sh", "-c", " && ".join(mounts))
    # The wheel's packages first (importlib.metadata takes the first smtpproxy it finds), then
    # the dependencies; a .pth in the venv, as pip would have put them in its site-packages.
    pid1.write(f"{VENV}/lib/{version}/site-packages/test-dependencies.pth",
               "\n".join([f"{VENV}/packages", *site_dirs]) + "\n")
    pid1.write(f"{VENV}/bin/smtpproxy",
               f"#!{VENV}/bin/python\nimport sys\nfrom smtpproxy.cli import main\nsys.exit(main())\n",
               mode="755")


@pytest.fixture(scope="module")
def pid1(tmp_path_factory: pytest.TempPathFactory, release_dist: Path) -> Iterator[Pid1]:
    work = tmp_path_factory.mktemp("pid1")
    booted = _boot(work / "console.log")
    if isinstance(booted, str):
        pytest.skip(booted)
    try:
        [wheel] = release_dist.glob("*.whl")  # the release procedure's (tests/release_build.py)
        _prepare(booted, wheel, work)
        yield booted
    finally:
        # stopped by systemd first: it removes their PrivateTmp= directories in the machine's /tmp
        booted.systemctl("stop", "smtpproxy*.service", check=False)
        _stop(booted.process)
