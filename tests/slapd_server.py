"""A private OpenLDAP for tests: Debian's ``slapd`` on a free loopback port.

Its own slapd.conf (core, cosine, inetorgperson schemas, one mdb database ``dc=example,dc=test``)
and data directory in a temp dir; the LDIF a test gives is loaded with ``ldapadd`` (ldap-utils)
over the network, as an admin would. Readiness is polled with ``ldapsearch``, never slept on.
Tests skip with the reason only where slapd or ldap-utils is absent (CI installs both).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import free_port, stop_process

__all__ = ["BASE", "ROOT_DN", "ROOT_PASSWORD", "SlapdServer", "slapd_server", "start_slapd"]

BASE = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PASSWORD = "secret-admin"

_SLAPD = next((p for p in ("/usr/sbin/slapd", shutil.which("slapd")) if p and Path(p).exists()), None)
_MODULES = next((d for d in ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap") if Path(d).is_dir()), None)


@dataclass
class SlapdServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def add(self, ldif: str) -> None:
        """Load entries with ldapadd, bound as the root DN."""
        subprocess.run(["ldapadd", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
                       input=ldif.encode(), check=True, stdout=subprocess.DEVNULL)

    def modify(self, ldif: str) -> None:
        """Change or delete entries with ldapmodify (``changetype:`` in the LDIF), as the root DN."""
        subprocess.run(["ldapmodify", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
                       input=ldif.encode(), check=True, stdout=subprocess.DEVNULL)

    def ready(self) -> bool:
        done = subprocess.run(["ldapsearch", "-x", "-H", self.url, "-b", "", "-s", "base",
                               "-o", "nettimeout=1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return done.returncode == 0

    def stop(self) -> None:
        """Stop it (to test a backend that is down); idempotent."""
        stop_process(self.process)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_slapd(base_ldif: str = "") -> SlapdServer:
    if _SLAPD is None or _MODULES is None or shutil.which("ldapadd") is None:
        pytest.skip("slapd or ldap-utils is not installed: apt-get install slapd ldap-utils")
    workdir = Path(tempfile.mkdtemp(prefix="smtpproxy-slapd-"))
    (workdir / "db").mkdir()
    schema = Path("/etc/ldap/schema")
    (workdir / "slapd.conf").write_text(
        f"include {schema}/core.schema\n"
        f"include {schema}/cosine.schema\n"
        f"include {schema}/inetorgperson.schema\n"
        f"pidfile {workdir}/slapd.pid\n"
        f"modulepath {_MODULES}\n"
        "moduleload back_mdb\n"
        "database mdb\n"
        f"suffix \"{BASE}\"\n"
        f"rootdn \"{ROOT_DN}\"\n"
        f"rootpw {ROOT_PASSWORD}\n"
        f"directory {workdir}/db\n"
        "maxsize 16777216\n"
        "access to * by * read\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [_SLAPD, "-d", "0", "-f", str(workdir / "slapd.conf"), "-h", f"ldap://127.0.0.1:{port}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = SlapdServer(port, process, workdir)
    deadline = time.monotonic() + 30
    while not server.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            server.remove()
            raise RuntimeError(f"slapd did not start on port {port}")
        time.sleep(0.05)
    server.add(f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
               f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n" + base_ldif)
    return server


@pytest.fixture
def slapd_server() -> Iterator[SlapdServer]:
    server = start_slapd()
    yield server
    server.remove()
