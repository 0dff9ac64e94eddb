"""``smtpproxy quarantine report --spam|--ham`` and ``quarantine release --allow-sender`` on a
SQLite store, as real processes. The learning plugins here are a small module next to the
configuration (the real rspamd and spamd learning is tested against the daemons in
tests/plugins); the allow table is a real ``file`` table the lists plugin reads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from smtpproxy.quarantine import QuarantineStore
from smtpproxy.store import open_store
from tests.store.test_store_cli import maildir, run
from tests.wire.test_quarantine import quarantine

LEARNERS = '''
import json
from pathlib import Path
from smtpproxy import hookimpl

class Notebook:
    """Writes what it was taught to notebook.jsonl next to the configuration."""
    @hookimpl
    def learn(self, message, verdict, reporter, recipients):
        line = {"verdict": verdict, "subject": message.get("Subject"), "reporter": reporter,
                "recipients": recipients}
        with (Path(__file__).parent / "notebook.jsonl").open("a") as out:
            out.write(json.dumps(line) + "\\n")
        return f"noted as {verdict}"

class Broken:
    @hookimpl
    async def learn(self, verdict):
        raise ConnectionRefusedError("engine down")
'''


def config(tmp_path: Path, plugins: str, tables: str = "") -> Path:
    (tmp_path / "learners.py").write_text(LEARNERS)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "delivery:\n  type: maildir\n  path: mail\n"
        "quarantine:\n  path: q\n  admin_only: [clamav]\n"
        "store:\n  sqlite: store.db\n  node: mx7\n"
        f"plugin_paths: [{tmp_path}]\n{tables}plugins:\n{plugins}")
    return path


NOTEBOOK = "  - {name: notebook, use: 'learners:Notebook'}\n"
BROKEN = "  - {name: broken, use: 'learners:Broken'}\n"
LISTS = "  - {name: lists, settings: {allow: allow}}\n"


@pytest.fixture
def held(tmp_path: Path) -> list[str]:
    """Two messages held for bob and carol, imported into the store."""
    directory = QuarantineStore(tmp_path / "q")
    ids = [quarantine(directory, 1), quarantine(directory, 2)]
    assert run(config(tmp_path, NOTEBOOK), "quarantine", "import").returncode == 0
    return ids


def notebook(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "notebook.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def audit(tmp_path: Path) -> list[tuple[str, str, str | None, list[str], str | None]]:
    async def read() -> list[tuple[str, str, str | None, list[str], str | None]]:
        store = open_store(sqlite=tmp_path / "store.db")
        try:
            return [(a.actor, a.action, a.qid, a.recipients, a.detail) for a in await store.audit_log()]
        finally:
            await store.close()

    return asyncio.run(read())


def test_report_spam_teaches_every_learning_plugin_and_is_audited(tmp_path: Path, held: list[str]) -> None:
    cfg = config(tmp_path, NOTEBOOK + BROKEN)
    result = run(cfg, "quarantine", "report", held[0], "--spam")
    assert result.returncode == 0, result.stdout + result.stderr  # one plugin learned it
    assert f"{held[0]}: reported as spam: notebook: noted as spam" in result.stdout
    assert f"{held[0]}: reported as spam: broken: FAILED: ConnectionRefusedError: engine down" in result.stdout
    assert notebook(tmp_path) == [{"verdict": "spam", "subject": "quarantined 1", "reporter": "cli",
                                   "recipients": ["bob@dest.test", "carol@dest.test"]}]
    [entry] = [a for a in audit(tmp_path) if a[1] == "report_spam"]
    assert entry[:4] == ("cli", "report_spam", held[0], ["bob@dest.test", "carol@dest.test"])
    assert "engine down" in (entry[4] or "")
    assert maildir(tmp_path) == []  # spam stays held


def test_report_ham_and_release_one_recipient(tmp_path: Path, held: list[str]) -> None:
    cfg = config(tmp_path, NOTEBOOK)
    result = run(cfg, "quarantine", "report", held[1], "--ham", "--release", "--recipient", "carol@dest.test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reported as ham: notebook: noted as ham" in result.stdout
    assert f"{held[1]}: released for carol@dest.test to " in result.stdout
    assert len(maildir(tmp_path)) == 1
    assert notebook(tmp_path)[0]["recipients"] == ["carol@dest.test"]
    assert f"{held[1]}" in run(cfg, "quarantine", "list", "--recipient", "bob@dest.test").stdout


def test_report_refusals(tmp_path: Path, held: list[str]) -> None:
    only_broken = config(tmp_path, BROKEN)
    failed = run(only_broken, "quarantine", "report", held[0], "--ham")
    assert failed.returncode == 1 and "broken: FAILED: ConnectionRefusedError: engine down" in failed.stdout
    (tmp_path / "allow").write_text("")
    nobody = run(config(tmp_path, LISTS, "tables:\n  allow: {type: file, file: allow}\n"),
                 "quarantine", "report", held[0], "--spam")
    assert nobody.returncode == 1 and "no plugin of the configured chain learns" in nobody.stdout
    cfg = config(tmp_path, NOTEBOOK)
    both = run(cfg, "quarantine", "report", held[0], "--spam", "--ham")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert run(cfg, "quarantine", "report", held[0]).returncode == 2  # --spam or --ham is required
    spam_release = run(cfg, "quarantine", "report", held[0], "--spam", "--release")
    assert spam_release.returncode == 2 and "--release goes with --ham" in spam_release.stderr
    unknown = run(cfg, "quarantine", "report", "nosuchid", "--spam")
    assert unknown.returncode == 1 and "no quarantined message nosuchid" in unknown.stdout
    stranger = run(cfg, "quarantine", "report", held[0], "--spam", "--recipient", "eve@dest.test")
    assert stranger.returncode == 1 and "no recipient eve@dest.test" in stranger.stdout
    assert notebook(tmp_path) == []


def test_release_and_allow_the_sender(tmp_path: Path, held: list[str]) -> None:
    allow = tmp_path / "allow"
    allow.write_text("# allow lists\nbob@dest.test  friend@partner.test\n")
    cfg = config(tmp_path, LISTS, "tables:\n  allow: {type: file, file: allow}\n")
    result = run(cfg, "quarantine", "release", held[0], "--recipient", "bob@dest.test", "--allow-sender")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{held[0]}: a@sender.test added to bob@dest.test" in result.stdout
    assert allow.read_text() == "# allow lists\nbob@dest.test  friend@partner.test, a@sender.test\n"
    assert len(maildir(tmp_path)) == 1
    assert [a[:4] for a in audit(tmp_path) if a[1] == "allow_sender"] == [
        ("cli", "allow_sender", held[0], ["bob@dest.test"])]
    query = run(cfg, "tables", "query", "allow", "carol@dest.test")
    assert query.returncode == 3  # only the released recipient's list changed


@pytest.mark.parametrize(("plugins", "tables", "why"), [
    (NOTEBOOK, "", "no lists plugin is configured"),
    (LISTS, "tables:\n  allow: {type: inline, entries: {a: b}}\n", "the allow table allow (inline) is not writable here: only file and redis tables are"),
])
def test_allow_sender_needs_a_writable_allow_table(tmp_path: Path, held: list[str], plugins: str, tables: str,
                                                    why: str) -> None:
    result = run(config(tmp_path, plugins, tables), "quarantine", "release", held[0], "--allow-sender")
    assert result.returncode == 2 and f"cannot allow the sender: {why}" in result.stderr, result.stderr
    assert maildir(tmp_path) == []  # nothing released either


@pytest.mark.parametrize("use", [None, "lists", "smtpproxy_plugins.lists:Lists"])
def test_allow_sender_and_the_list_pages_find_the_same_lists_plugin(tmp_path: Path, use: str | None) -> None:
    from smtpproxy.allowsender import allow_table
    from smtpproxy.web.listtables import lists_plugin_tables
    from tests.conftest import make_config

    (tmp_path / "allow").write_text("")
    config = make_config(tmp_path, tables={"allow": {"type": "file", "file": str(tmp_path / "allow")}},
                         plugins=[{"name": "mylists" if use else "lists", "use": use,
                                   "settings": {"allow": "allow"}}])
    assert lists_plugin_tables(config) == {"allow": "allow"}
    assert allow_table(config).name == "allow" and allow_table(config).writable
