"""The quarantine store and ``smtpproxy quarantine list|show|release|delete`` as a real process."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smtpproxy.addresses import parse_mailbox
from smtpproxy.quarantine import QuarantineError, QuarantineStore
from smtpproxy.session import Client, Envelope, Outcome, Session
from smtpproxy.verdicts import Action
from tests.conftest import closed_port

EXE = [sys.executable, "-m", "smtpproxy"]
CONTENT = (
    b"X-Spam-Status: Yes, score=12.0 tests=SUBJ_PILLS\r\n"
    b"From: a@sender.test\r\nTo: bob@dest.test\r\nSubject: quarantined %d\r\n\r\nBody %d.\r\n"
)


def quarantine(store: QuarantineStore, n: int = 1, reason: str = "score 12.0: SUBJ_PILLS=12") -> str:
    session = Session(Client("192.0.2.7", 40000, "mx.sender.test"))
    session.helo = "mx.sender.test"
    transaction = session.begin_transaction(
        Envelope(parse_mailbox("a@sender.test", allow_utf8=False), {"BODY": "8BITMIME"})
    )
    for rcpt in ("bob@dest.test", "carol@dest.test"):
        transaction.envelope.add_recipient(parse_mailbox(rcpt, allow_utf8=False))
    transaction.results.add(Outcome("score", "data", Action.QUARANTINE, 0.01, reason=reason, score=12.0))
    return asyncio.run(store.store(session, transaction, CONTENT % (n, n), reason))


def config(tmp_path: Path, delivery: str = "delivery:\n  type: maildir\n  path: mail\n") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text("listeners:\n  - address: 127.0.0.1\n    port: 0\n" + delivery + "quarantine:\n  path: q\n")
    return path


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, "quarantine", *args, "-c", str(cfg)], capture_output=True, text=True,
                          timeout=60)


def maildir(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "mail" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> QuarantineStore:
    return QuarantineStore(tmp_path / "q")


def test_list_show_release_through_the_cli(tmp_path: Path, store: QuarantineStore) -> None:
    cfg = config(tmp_path)
    qid = quarantine(store)

    listed = cli(cfg, "list")
    assert listed.returncode == 0, listed.stderr
    header, row, total = listed.stdout.splitlines()
    assert header.split()[:6] == ["ID", "TIME", "(UTC)", "SENDER", "RCPTS", "SCORE"]
    assert re.match(rf"{re.escape(qid)}\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\s+a@sender\.test\s+2\s+12\.0\s+"
                    r"score 12\.0: SUBJ_PILLS=12$", row), row
    assert total == "1 message(s)"

    shown = cli(cfg, "show", qid)
    assert shown.returncode == 0, shown.stderr
    record_text, headers = shown.stdout.split("\n\n", 1)
    record = json.loads(record_text)
    assert record["id"] == qid and record["recipients"] == ["bob@dest.test", "carol@dest.test"]
    assert record["outcomes"][0]["reason"] == "score 12.0: SUBJ_PILLS=12"
    assert headers == ("X-Spam-Status: Yes, score=12.0 tests=SUBJ_PILLS\nFrom: a@sender.test\n"
                       "To: bob@dest.test\nSubject: quarantined 1\n")

    released = cli(cfg, "release", qid)
    assert released.returncode == 0, released.stdout + released.stderr
    assert re.fullmatch(rf"{re.escape(qid)}: released to maildir:\S+: 250 2\.0\.0 .*\n", released.stdout)
    [delivered] = maildir(tmp_path)
    trace = (b"Return-Path: <a@sender.test>\r\nDelivered-To: bob@dest.test\r\n"
             b"Delivered-To: carol@dest.test\r\n")
    assert delivered.startswith(trace + b"Received: from ")  # received_header: auto (Maildir)
    assert delivered.endswith(b"\r\n" + CONTENT % (1, 1))
    assert list(store.path.glob(f"{qid}.*")) == []
    moved = json.loads((store.released_path / f"{qid}.json").read_text())
    assert moved["released"]["reply"].startswith("250 2.0.0")
    assert (store.released_path / f"{qid}.eml").read_bytes() == CONTENT % (1, 1)
    assert cli(cfg, "list").stdout.startswith("quarantine is empty")

    again = cli(cfg, "release", qid)
    assert again.returncode == 1
    assert again.stdout == f"{qid}: FAILED: {qid} was already released\n"
    assert len(maildir(tmp_path)) == 1


def test_release_many_shows_progress_and_fails_for_unknown_ids(tmp_path: Path, store: QuarantineStore) -> None:
    cfg = config(tmp_path)
    first, second = quarantine(store, 1), quarantine(store, 2)
    result = cli(cfg, "release", first, "nosuchid", second)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"[1/3] {first}: released to maildir:")
    assert lines[1] == "[2/3] nosuchid: FAILED: no quarantined message nosuchid"
    assert lines[2].startswith(f"[3/3] {second}: released to maildir:")
    assert lines[3] == "2 released, 1 failed"
    assert len(maildir(tmp_path)) == 2


def test_release_to_an_unreachable_upstream_keeps_the_message(tmp_path: Path, store: QuarantineStore) -> None:
    cfg = config(tmp_path, "delivery:\n  type: smtp\n  host: 127.0.0.1\n"
                           f"  port: {closed_port()}\n  tls: none\n  connect_timeout: 2\n")
    qid = quarantine(store)
    result = cli(cfg, "release", qid)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.match(rf"{re.escape(qid)}: FAILED: delivery refused it: 4\d\d 4\.\d\.\d .*it stays in quarantine$",
                    result.stdout), result.stdout
    assert sorted(p.name for p in store.path.iterdir()) == [f"{qid}.eml", f"{qid}.json"]
    assert [r["id"] for r in store.list()] == [qid]


def test_delete(tmp_path: Path, store: QuarantineStore) -> None:
    cfg = config(tmp_path)
    qid = quarantine(store)
    assert cli(cfg, "delete", qid).stdout == f"{qid}: deleted\n"
    assert list(store.path.iterdir()) == []
    gone = cli(cfg, "delete", qid)
    assert gone.returncode == 1 and "no quarantined message" in gone.stdout


def test_usage_and_config_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cli(cfg, "show").returncode == 2
    assert cli(cfg, "list", "x").returncode == 2
    missing = cli(cfg, "show", "nosuchid")
    assert missing.returncode == 1 and "no quarantined message nosuchid" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("quarantine:\n  pth: q\n")
    result = cli(broken, "list")
    assert result.returncode == 2
    assert "quarantine.pth: unknown key" in result.stderr


def test_ids_cannot_escape_the_store(store: QuarantineStore) -> None:
    for bad in ("../etc/passwd", "a/b", "..", ""):
        with pytest.raises(QuarantineError):
            store.show(bad)


@pytest.mark.parametrize("order", ["options-first", "id-first", "split"])
def test_options_and_ids_in_either_order(tmp_path: Path, store: QuarantineStore, order: str) -> None:
    cfg = config(tmp_path)
    first, second = quarantine(store, 1), quarantine(store, 2)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EXE, "quarantine", *args], capture_output=True, text=True, timeout=60)

    if order == "options-first":
        show = run("show", "-c", str(cfg), first)
        delete = run("delete", "-c", str(cfg), first, second)
    elif order == "id-first":
        show = run("show", first, "-c", str(cfg))
        delete = run("delete", first, second, "--config", str(cfg))
    else:
        show = run("show", "--config", str(cfg), first)
        delete = run("delete", first, "-c", str(cfg), second)
    assert show.returncode == 0, show.stderr
    assert "Subject: quarantined 1" in show.stdout
    assert delete.returncode == 0, delete.stderr
    assert delete.stdout.splitlines() == [f"{first}: deleted", f"{second}: deleted"]
    assert store.list() == []


def test_release_takes_the_config_before_the_id(tmp_path: Path, store: QuarantineStore) -> None:
    cfg = config(tmp_path)
    qid = quarantine(store)
    result = subprocess.run([*EXE, "quarantine", "release", "-c", str(cfg), qid], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(maildir(tmp_path)) == 1


def test_an_unknown_option_is_still_refused(tmp_path: Path) -> None:
    result = subprocess.run([*EXE, "quarantine", "show", "-c", str(config(tmp_path)), "x", "--bogus"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_list_and_show_do_not_import_the_plugins(tmp_path: Path, store: QuarantineStore) -> None:
    """A plugin that only imports on the proxy's PYTHONPATH must not stop the admin commands."""
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text() + "plugins:\n  - name: site\n    use: not_on_this_path:Filter\n")
    qid = quarantine(store)
    assert subprocess.run([*EXE, "check-config", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=60).returncode == 2
    listed = cli(cfg, "list")
    assert listed.returncode == 0, listed.stderr
    assert qid in listed.stdout
    shown = cli(cfg, "show", qid)
    assert shown.returncode == 0, shown.stderr
    assert "Subject: quarantined 1" in shown.stdout
