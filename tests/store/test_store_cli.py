"""``smtpproxy quarantine`` and ``smtpproxy history`` on a store (SQLite here; PostgreSQL in
tests/postfix/test_cluster.py), as real processes: filters, per-recipient release, purge, import of
a directory quarantine, history search/export/erase."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smtpproxy.quarantine import QuarantineStore
from smtpproxy.store import HistoryEntry, Search, open_store
from smtpproxy.store_cli import parse_when
from tests.wire.test_quarantine import quarantine

EXE = [sys.executable, "-m", "smtpproxy"]


def config(tmp_path: Path, *, store: bool = True) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "delivery:\n  type: maildir\n  path: mail\n"
        "quarantine:\n  path: q\n  admin_only: [clamav]\n"
        + ("store:\n  sqlite: store.db\n  node: mx7\n" if store else ""))
    return path


def run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args, "-c", str(cfg)], capture_output=True, text=True, timeout=60)


def maildir(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "mail" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, list[str]]:
    """Two messages quarantined the old way (a directory), then imported into the store."""
    directory = QuarantineStore(tmp_path / "q")
    ids = [quarantine(directory, 1), quarantine(directory, 2, reason="virus Eicar-Test found")]
    cfg = config(tmp_path)
    result = run(cfg, "quarantine", "import")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 message(s) imported from "), result.stdout
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["imported"]
    return cfg, ids


def test_import_is_complete_and_idempotent(tmp_path: Path, imported: tuple[Path, list[str]]) -> None:
    cfg, ids = imported
    listing = run(cfg, "quarantine", "list")
    assert listing.returncode == 0 and listing.stdout.endswith("2 message(s)\n"), listing.stdout
    for qid in ids:
        assert qid in listing.stdout
    shown = run(cfg, "quarantine", "show", ids[0])
    assert shown.returncode == 0
    record = json.loads(shown.stdout[: shown.stdout.index("\n}\n") + 2])
    assert record["recipients_state"] == {"bob@dest.test": "held", "carol@dest.test": "held"}
    assert record["sender_params"] == {"BODY": "8BITMIME"}
    assert "Subject: quarantined 1" in shown.stdout
    # The files were set aside; put them back: a second import finds them in the store already.
    for path in (tmp_path / "q" / "imported").iterdir():
        path.rename(tmp_path / "q" / path.name)
    again = run(cfg, "quarantine", "import", str(tmp_path / "q"))
    assert again.stdout.startswith("0 message(s) imported") and "2 already in the store" in again.stdout


def test_list_filters(tmp_path: Path, imported: tuple[Path, list[str]]) -> None:
    cfg, ids = imported
    virus = run(cfg, "quarantine", "list", "--reason", "EICAR")
    assert ids[1] in virus.stdout and ids[0] not in virus.stdout
    assert run(cfg, "quarantine", "list", "--subject", "quarantined 1").stdout.count("quarantined 1") == 1
    assert "no quarantined messages match" in run(cfg, "quarantine", "list", "--sender", "x@y.test").stdout
    assert run(cfg, "quarantine", "list", "--since", "1h").stdout.endswith("2 message(s)\n")
    assert "no quarantined messages match" in run(cfg, "quarantine", "list", "--until", "1h").stdout
    assert run(cfg, "quarantine", "list", "--recipient", "carol@dest.test").stdout.endswith("2 message(s)\n")
    bad = run(cfg, "quarantine", "list", "--since", "yesterday")
    assert bad.returncode == 2 and "is not a time" in bad.stderr


def test_release_per_recipient_then_the_rest(tmp_path: Path, imported: tuple[Path, list[str]]) -> None:
    cfg, ids = imported
    first = run(cfg, "quarantine", "release", ids[0], "--recipient", "carol@dest.test")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith(f"{ids[0]}: released for carol@dest.test to "), first.stdout
    assert len(maildir(tmp_path)) == 1
    twice = run(cfg, "quarantine", "release", ids[0], "--recipient", "carol@dest.test")
    assert twice.returncode == 1 and "already released for carol@dest.test" in twice.stdout
    unknown = run(cfg, "quarantine", "release", ids[0], "--recipient", "eve@dest.test")
    assert unknown.returncode == 1 and "has no recipient eve@dest.test" in unknown.stdout
    listing = run(cfg, "quarantine", "list", "--recipient", "bob@dest.test")
    assert ids[0] in listing.stdout and "bob@dest.test " in listing.stdout
    rest = run(cfg, "quarantine", "release", ids[0])
    assert rest.returncode == 0 and "released for bob@dest.test to " in rest.stdout, rest.stdout
    assert len(maildir(tmp_path)) == 2
    assert ids[0] not in run(cfg, "quarantine", "list").stdout
    assert ids[0] in run(cfg, "quarantine", "list", "--all").stdout
    gone = run(cfg, "quarantine", "release", ids[0])
    assert gone.returncode == 1 and "already released" in gone.stdout


def test_delete_and_purge(tmp_path: Path, imported: tuple[Path, list[str]]) -> None:
    cfg, ids = imported
    assert run(cfg, "quarantine", "delete", ids[0]).stdout == f"{ids[0]}: deleted\n"
    missing = run(cfg, "quarantine", "delete", ids[0])
    assert missing.returncode == 1 and "no quarantined message" in missing.stdout
    assert run(cfg, "quarantine", "purge").stdout == "0 expired message(s) removed\n"

    async def expire() -> None:
        store = open_store(sqlite=tmp_path / "store.db")
        await store._execute([("UPDATE quarantine SET expires = ?", (time.time() - 1,))])
        await store.close()

    asyncio.run(expire())
    assert run(cfg, "quarantine", "purge").stdout == "1 expired message(s) removed\n"
    assert "no quarantined messages match" in run(cfg, "quarantine", "list", "--all").stdout


def test_history_search_export_and_erase(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def fill() -> None:
        store = open_store(sqlite=tmp_path / "store.db")
        now = time.time()
        await store.add_history([
            HistoryEntry(id="a", time=now - 10, node="mx7", sender="eve@x.test", recipients=["bob@dest.test"],
                         decision="rejected", decided_by="dnsbl", reason="listed", subject="Hi Bob"),
            HistoryEntry(id="b", time=now - 5, node="mx7", sender="ann@y.test",
                         recipients=["eve@x.test", "bob@dest.test"], decision="delivered",
                         message_id="<1@y.test>"),
            HistoryEntry(id="c", time=now, node="mx7", sender="ann@y.test", recipients=["bob@dest.test"],
                         decision="delivered", message_id="<2@y.test>"),
        ])
        await store.close()

    asyncio.run(fill())
    text = run(cfg, "history", "search", "--recipient", "bob@dest.test")
    assert text.returncode == 0 and text.stdout.endswith("3 entries (newest first)\n"), text.stdout
    assert "dnsbl" in text.stdout and "Hi Bob / listed" in text.stdout
    exported = run(cfg, "history", "export", "--message-id", "<1@y.test>")
    [line] = exported.stdout.splitlines()
    assert json.loads(line)["recipients"] == ["eve@x.test", "bob@dest.test"]
    assert run(cfg, "history", "search", "--decision", "rejected", "--json").stdout.count("\n") == 1
    erased = run(cfg, "history", "erase", "eve@x.test")
    assert erased.stdout == "eve@x.test: 2 history entries and 0 quarantined message(s) erased\n"

    async def left() -> list[str]:
        store = open_store(sqlite=tmp_path / "store.db")
        try:
            return [e.id for e in await store.search_history(Search())]
        finally:
            await store.close()

    assert asyncio.run(left()) == ["c"]


def test_history_search_and_export_by_policy_group(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def fill() -> None:
        store = open_store(sqlite=tmp_path / "store.db")
        now = time.time()
        await store.add_history([
            HistoryEntry(id="g", time=now - 5, node="mx7", sender="ann@y.test",
                         recipients=["bob@sales.test", "carol@dest.test"], decision="delivered",
                         subject="Grouped", policy_group="default,sales",
                         groups={"bob@sales.test": "sales", "carol@dest.test": "default"}),
            HistoryEntry(id="n", time=now, node="mx7", sender="ann@y.test", recipients=["carol@dest.test"],
                         decision="delivered", subject="Ungrouped"),
        ])
        await store.close()

    asyncio.run(fill())
    text = run(cfg, "history", "search", "--group", "sales")
    assert text.returncode == 0 and text.stdout.endswith("1 entry (newest first)\n"), text.stdout
    header, row = text.stdout.splitlines()[:2]
    assert "GROUP" in header.split() and "default,sales" in row.split() and "Grouped" in row
    listing = run(cfg, "history", "search").stdout.splitlines()
    assert "-" in listing[1].split() and "Ungrouped" in listing[1]  # recorded without groups
    assert "no history entries match" in run(cfg, "history", "search", "--group", "sales",
                                             "--recipient", "carol@dest.test").stdout
    [line] = run(cfg, "history", "export", "--group", "default").stdout.splitlines()
    exported = json.loads(line)
    assert (exported["id"], exported["policy_group"]) == ("g", "default,sales")
    assert exported["groups"] == {"bob@sales.test": "sales", "carol@dest.test": "default"}


def test_store_commands_need_a_store(tmp_path: Path) -> None:
    cfg = config(tmp_path, store=False)
    for args in (("history", "search"), ("quarantine", "purge"), ("quarantine", "import"),
                 ("quarantine", "list", "--sender", "a@b.test")):
        result = run(cfg, *args)
        assert result.returncode == 2 and "configures no store" in result.stderr, args
    assert run(cfg, "quarantine", "list").stdout.startswith("quarantine is empty")  # the directory


def test_times() -> None:
    assert parse_when("2026-12-01") == 1796083200.0
    assert parse_when("2026-12-01T01:00+01:00") == 1796083200.0
    assert abs(parse_when("2d") - (time.time() - 172800)) < 5
    assert re.match(r"\d+\.\d+", str(parse_when("90m")))
