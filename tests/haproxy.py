"""A private HAProxy for tests: Debian's ``haproxy`` in TCP mode on a free loopback port.

It runs the configuration docs/deploy-cluster.md shows (on loopback addresses, with faster
health checks): SMTP balanced over several smtpproxy processes, each sent a PROXY v2 header
and health-checked with HTTP GET /readyz on its metrics port. Readiness (every server up)
is polled over HAProxy's admin socket, never slept on. Tests skip with the reason only where
haproxy is not installed (CI installs it).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import free_port, stop_process

__all__ = ["HAProxy", "documented_config", "start_haproxy"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy-cluster.md"


def documented_config() -> str:
    """The haproxy.cfg of docs/deploy-cluster.md, as written there."""
    [config] = [b for b in re.findall(r"^```text\n(.*?)^```", DOC.read_text(), re.M | re.S) if "listen smtp" in b]
    return str(config)


def loopback_config(socket_path: Path, port: int, servers: str) -> str:
    """The documented configuration on loopback: the test's socket, port and servers, and
    health checks every 200 ms (a server is up at the first good answer, down at the second
    bad one)."""
    config = documented_config()
    replaced = config.replace("/run/haproxy/admin.sock", str(socket_path))
    replaced = replaced.replace("    bind :25\n", f"    bind 127.0.0.1:{port}\n")
    replaced = replaced.replace("inter 2s fall 2 rise 2", "inter 200ms fall 2 rise 1")
    # A check's whole timeout is ``inter`` unless ``timeout check`` is set: on a loaded test
    # machine a /readyz answer can take longer than 200 ms, and two late answers would take
    # a working proxy out (both, in a burst: HAProxy then closes the clients' connections).
    replaced = replaced.replace("    timeout connect 5s\n", "    timeout connect 5s\n    timeout check 2s\n")
    replaced = re.sub(r"(?m)^    server mx-.*\n", "", replaced) + servers + "\n"
    assert replaced.count(str(socket_path)) == 1 and f"127.0.0.1:{port}" in replaced, config
    assert "inter 200ms" in replaced and "timeout check 2s" in replaced, config
    return replaced


@dataclass
class HAProxy:
    port: int
    socket_path: Path
    config: str
    process: subprocess.Popen[bytes]

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self) -> dict[str, str]:
        """{server name: UP/DOWN/...} from ``show stat``."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, wanted: dict[str, str], timeout: float = 20, *, exact: bool = False) -> None:
        """Until each server's status starts with (*exact*: is) the wanted one; "UP 1/2" is
        a server that is up but has failed a check, or has not been checked yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.server_status()
            except OSError:
                status = {}
            if all(status.get(name, "") == state if exact else status.get(name, "").startswith(state)
                   for name, state in wanted.items()):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy servers never reached {wanted}: {status}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)


def start_haproxy(workdir: Path, servers: dict[str, tuple[int, int]]) -> HAProxy:
    """HAProxy in front of ``servers`` ({name: (smtp port, health port)}), all up."""
    binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if binary is None:
        pytest.skip("haproxy is not installed: apt-get install haproxy")
    port = free_port()
    socket_path = workdir / "haproxy.sock"
    lines = "\n".join(f"    server {name} 127.0.0.1:{smtp} check port {health}"
                      for name, (smtp, health) in servers.items())
    config = loopback_config(socket_path, port, lines)
    path = workdir / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    proxy = HAProxy(port, socket_path, config, process)
    try:
        proxy.wait_status(dict.fromkeys(servers, "UP"), exact=True)  # checked, not just started
    except Exception:
        proxy.stop()
        raise
    return proxy
