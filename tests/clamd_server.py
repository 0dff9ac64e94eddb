"""A private clamd for tests and benches: Debian's ``clamav-daemon``, with a database written here.

clamd listens on a unix socket in ``workdir`` and on a free loopback TCP port. Its signature
database is written here too, so nothing is downloaded and freshclam never runs: an ``.ndb``
body signature for the EICAR test string and one for a PUA marker, and an ``.hdb`` hash
signature for :data:`PAYLOAD`. ClamAV names signatures from databases it did not sign
``<name>.UNOFFICIAL``. The config turns on what docs/plugins/clamav.md recommends
(``AlertExceedsMax``, ``AlertEncrypted``) plus ``DetectPUA``, with small limits so that "not
fully scanned" and "over StreamMaxLength" are reachable with small messages. Loading even a
tiny database takes clamd a moment: start it once per test module. Readiness is polled with
``zPING``, never slept on; where clamd is not installed, the caller is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import free_port, stop_process

__all__ = ["EICAR", "MAX_FILE_SIZE", "PAYLOAD", "PUA_MARKER", "STREAM_MAX", "Clamd", "start_clamd"]

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
PUA_MARKER = b"smtpproxy-pua-marker-7f3a"
PAYLOAD = b"smtpproxy custom test payload \x00\x01\x02, harmless but signed\n" * 4
MAX_FILE_SIZE = 200 * 1024
STREAM_MAX = 4 * 1024 * 1024


@dataclass
class Clamd:
    socket_path: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def unix(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"zPING\0")
                return sock.recv(16) == b"PONG\0"
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)


def clamd_binary() -> str | None:
    return shutil.which("clamd") or next(
        (p for p in ("/usr/sbin/clamd", "/usr/local/sbin/clamd") if Path(p).exists()), None
    )


def start_clamd(workdir: Path, *, alert_exceeds_max: bool = True) -> Clamd:
    """Write the config and database into ``workdir`` (keep its path short) and start clamd.

    ``alert_exceeds_max=False`` makes the clamd the docs warn about: over-limit scans are OK.
    """
    binary = clamd_binary()
    if binary is None:
        pytest.skip("clamd is not installed: apt-get install clamav-daemon")
    workdir.chmod(0o755)
    db = workdir / "db"
    db.mkdir()
    (db / "smtpproxy.ndb").write_text(
        f"Smtpproxy.Test.EICAR:0:*:{EICAR.hex()}\nPUA.Win.Tool.SmtpproxyTest:0:*:{PUA_MARKER.hex()}\n"
    )
    (db / "smtpproxy.hdb").write_text(f"{hashlib.md5(PAYLOAD).hexdigest()}:{len(PAYLOAD)}:Smtpproxy.Test.Custom\n")
    port = free_port()
    sock = workdir / "clamd.sock"
    log = workdir / "clamd.log"
    config = workdir / "clamd.conf"
    config.write_text(
        f"LocalSocket {sock}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nDatabaseDirectory {db}\n"
        f"TemporaryDirectory {workdir}\nLogFile {log}\nForeground yes\nSelfCheck 0\n"
        f"AlertExceedsMax {'yes' if alert_exceeds_max else 'no'}\nAlertEncrypted yes\nDetectPUA yes\n"
        f"MaxFileSize {MAX_FILE_SIZE}\nStreamMaxLength {STREAM_MAX}\nMaxThreads 4\n"
    )
    process = subprocess.Popen([binary, "--config-file", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, cwd=workdir)
    server = Clamd(sock, port, process, log)
    deadline = time.monotonic() + 60
    while not server.ping():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"clamd did not start:\n{text}")
        time.sleep(0.05)
    return server
