"""A private PostgreSQL for tests: Debian's server binaries on a free loopback port.

One server per test session (initdb takes seconds), its own data directory, trust
authentication on 127.0.0.1 only; each test gets a fresh database of its own
(``postgres_url``). As root the server runs as the ``postgres`` user (it refuses root).
Tests skip with the reason only where the binaries are absent (CI installs ``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import free_port, stop_process

__all__ = ["PostgresServer", "postgres_bindir", "postgres_server", "postgres_url"]


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    binary = shutil.which("postgres")
    return Path(binary).parent if binary else None


@dataclass
class PostgresServer:
    port: int
    process: subprocess.Popen[bytes]
    datadir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.datadir, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed: apt-get install postgresql")
    as_user: list[str] = []
    datadir = Path(tempfile.mkdtemp(prefix="smtpproxy-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(datadir, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir / "data"), "-U", "postgres",
                    "-A", "trust", "--no-sync", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    process = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(datadir / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={datadir}",
         "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = PostgresServer(port, process, datadir)
    deadline = time.monotonic() + 30
    while True:
        ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ready.returncode == 0:
            return server
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"PostgreSQL did not start on port {port}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.url(postgres_server.create_database())
