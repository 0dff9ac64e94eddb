"""Mail at rest is its owner's alone, whatever the umask: files 0600, directories 0700.

The proxy is run under ``umask 000`` (the worst a service manager could hand it): a file
created with Python's defaults would then be 0666. Each store is filled through the proxy's
SMTP port, as in production.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy import Verdict, hookimpl
from smtpproxy.session import Session, Transaction
from smtpproxy.spool import Spool
from tests.conftest import ProxyFactory, Talk, port_of

BODY = b"Subject: private\r\n\r\nfor bob only\r\n"
RELAY = {"domains": ["dest.test"], "networks": []}


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


class QuarantineAll:
    name = "quarantine-all"

    @hookimpl
    async def data(self, session: Session, transaction: Transaction) -> Verdict:
        return Verdict.quarantine("kept for the test")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def send(port: int) -> None:
    client = await Talk.open(port)
    await client.hello("client.example")
    code, text = await client.send_message("a@sender.test", ["bob@dest.test"], BODY)
    assert code == 250, text
    await client.close()


async def test_quarantine_files_and_directories_are_private_under_any_umask(
    proxy_factory: ProxyFactory, tmp_path: Path, umask_000: None
) -> None:
    store = tmp_path / "var" / "quarantine"  # its parent is missing too
    proxy = await proxy_factory(QuarantineAll(), relay=RELAY, quarantine={"path": str(store)})
    await send(port_of(proxy))
    files = sorted(store.iterdir())
    assert [p.suffix for p in files] == [".eml", ".json"]
    assert [mode(p) for p in files] == [0o600, 0o600]
    assert mode(store) == 0o700 and mode(store.parent) == 0o700


async def test_maildir_files_and_directories_are_private_under_any_umask(
    proxy_factory: ProxyFactory, tmp_path: Path, umask_000: None
) -> None:
    maildir = tmp_path / "mail"
    proxy = await proxy_factory(relay=RELAY, delivery={"type": "maildir", "path": str(maildir)})
    await send(port_of(proxy))
    [stored] = (maildir / "new").iterdir()
    assert mode(stored) == 0o600
    assert {sub: mode(maildir / sub) for sub in ("", "tmp", "new", "cur")} == dict.fromkeys(
        ("", "tmp", "new", "cur"), 0o700)


async def test_existing_stores_are_narrowed_at_start(
    proxy_factory: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an older version left (0644 files in a 0755 quarantine, a 0755 Maildir) is
    narrowed when the proxy starts, with one line per store."""
    store, maildir = tmp_path / "quarantine", tmp_path / "mail"
    (store / "released").mkdir(parents=True, mode=0o755)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, mode=0o755)
    old = [store / "20260101T000000-abc.1.eml", store / "20260101T000000-abc.1.json",
           store / "released" / "20251231T000000-def.1.eml", maildir / "new" / "1.old"]
    for path in old:
        path.write_bytes(b"x")
        path.chmod(0o644)
    for directory in (store, store / "released", maildir, *(maildir / s for s in ("tmp", "new", "cur"))):
        directory.chmod(0o755)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        await proxy_factory(quarantine={"path": str(store)}, delivery={"type": "maildir", "path": str(maildir)})
    assert [mode(p) for p in old] == [0o600] * 4
    assert mode(store) == mode(store / "released") == mode(maildir) == mode(maildir / "new") == 0o700
    corrected = [(r.smtpproxy_fields["store"], r.smtpproxy_fields["count"])  # type: ignore[attr-defined]
                 for r in caplog.records if r.msg == "file_modes_corrected"]
    assert sorted(corrected) == [("maildir", 5), ("quarantine", 5)]


def test_a_spooled_message_is_private_under_any_umask(tmp_path: Path, umask_000: None) -> None:
    """The spool file is unlinked at once; while it exists it is 0600 (tempfile's mkstemp)."""
    spool = Spool(threshold=16, directory=str(tmp_path))
    spool.write(b"x" * 64)
    assert spool.on_disk
    assert spool._file is not None
    assert stat.S_IMODE(os.fstat(spool._file.fileno()).st_mode) == 0o600
    spool.discard()
