"""``quarantine report`` and ``quarantine release --allow-sender`` with ``policies:``: each
recipient's policy group (chosen as at RCPT) decides whose learner learns and whose allow
table gets the entry. The messages are held for bob@dest.test and carol@dest.test
(tests/wire/test_quarantine.quarantine); the learner is a small module next to the config
whose ``book`` setting names the file it writes to, so each group's instance is visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.daemons import free_port
from tests.store.test_report_cli import LISTS, audit, config, held, notebook  # noqa: F401 (fixture)
from tests.store.test_store_cli import maildir, run

ENGINE = '''
import json
from pathlib import Path
from pydantic import BaseModel
from smtpproxy import hookimpl

class Engine:
    """A learner with a setting: what it is taught goes to BOOK.jsonl next to the config."""
    class Settings(BaseModel):
        book: str = "global"

    def __init__(self, settings):
        self.book = settings.book

    @hookimpl
    def learn(self, message, verdict, reporter, recipients):
        line = {"verdict": verdict, "recipients": recipients}
        with (Path(__file__).parent / f"{self.book}.jsonl").open("a") as out:
            out.write(json.dumps(line) + "\\n")
        return f"{self.book} learned {verdict}"
'''


def engine_config(tmp_path: Path, bob_book: str, carol_book: str, tables: str = "",
                  bob_selector: str = "bob@dest.test") -> Path:
    (tmp_path / "engine.py").write_text(ENGINE)
    path = config(tmp_path, "  - {name: engine, use: 'engine:Engine', settings: {book: global}}\n", tables)
    path.write_text(path.read_text() + (
        "policies:\n"
        f"  - {{name: bobs, recipients: [{bob_selector}], plugins: {{engine: {{settings: {{book: {bob_book}}}}}}}}}\n"
        f"  - {{name: carols, recipients: [carol@dest.test], plugins: {{engine: {{settings: {{book: {carol_book}}}}}}}}}\n"))
    return path


def book(tmp_path: Path, name: str) -> list[dict[str, object]]:
    path = tmp_path / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_each_recipients_group_learner_gets_the_report(tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    cfg = engine_config(tmp_path, "bobbook", "carolbook")
    result = run(cfg, "quarantine", "report", held[0], "--spam")
    assert result.returncode == 0, result.stdout + result.stderr
    assert book(tmp_path, "bobbook") == [{"verdict": "spam", "recipients": ["bob@dest.test"]}]
    assert book(tmp_path, "carolbook") == [{"verdict": "spam", "recipients": ["carol@dest.test"]}]
    assert book(tmp_path, "global") == []  # the global engine teaches no group's mail
    assert f"{held[0]}: reported as spam: engine (bobs): bobbook learned spam" in result.stdout
    assert f"{held[0]}: reported as spam: engine (carols): carolbook learned spam" in result.stdout
    [entry] = [a for a in audit(tmp_path) if a[1] == "report_spam"]
    assert "bobbook learned spam" in (entry[4] or "") and "carolbook learned spam" in (entry[4] or "")


def test_a_learner_two_groups_share_learns_once(tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    cfg = engine_config(tmp_path, "shared", "shared")
    result = run(cfg, "quarantine", "report", held[0], "--ham", "--recipient", "carol@dest.test",
                 "--recipient", "bob@dest.test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert book(tmp_path, "shared") == [{"verdict": "ham", "recipients": ["carol@dest.test", "bob@dest.test"]}]
    assert f"{held[0]}: reported as ham: engine (carols, bobs): shared learned ham" in result.stdout


def test_a_selector_table_that_is_down_is_an_error_never_the_default_group(
        tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    down = free_port()  # nothing listens there: the Redis is down
    tables = f"tables:\n  staff: {{type: redis, url: 'redis://127.0.0.1:{down}/0', timeout: 0.5}}\n"
    cfg = engine_config(tmp_path, "bobbook", "carolbook", tables, bob_selector="'table:staff'")
    result = run(cfg, "quarantine", "report", held[0], "--spam")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{held[0]}: reported as spam: nothing was taught: the policy group of bob@dest.test is unknown" \
        in result.stdout
    assert book(tmp_path, "global") == book(tmp_path, "bobbook") == book(tmp_path, "carolbook") == []
    assert notebook(tmp_path) == []


def test_allow_sender_writes_to_the_recipients_group_table(tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    (tmp_path / "allow").write_text("")
    (tmp_path / "bobs_allow").write_text("")
    tables = "tables:\n  allow: {type: file, file: allow}\n  bobs_allow: {type: file, file: bobs_allow}\n"
    cfg = config(tmp_path, LISTS, tables)
    cfg.write_text(cfg.read_text() + "policies:\n  - {name: bobs, recipients: [bob@dest.test], "
                                     "plugins: {lists: {settings: {allow: bobs_allow}}}}\n")
    result = run(cfg, "quarantine", "release", held[0], "--allow-sender")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "bobs_allow").read_text() == "bob@dest.test  a@sender.test\n"
    assert (tmp_path / "allow").read_text() == "carol@dest.test  a@sender.test\n"  # carol: the default group
    assert f"{held[0]}: a@sender.test added to bob@dest.test ({tmp_path / 'bobs_allow'} rewritten" \
        in result.stdout
    assert len(maildir(tmp_path)) == 1  # one Maildir file for both


def test_allow_sender_with_a_down_selector_table_allows_nothing(tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    (tmp_path / "allow").write_text("")
    down = free_port()
    tables = (f"tables:\n  allow: {{type: file, file: allow}}\n"
              f"  staff: {{type: redis, url: 'redis://127.0.0.1:{down}/0', timeout: 0.5}}\n")
    cfg = config(tmp_path, LISTS, tables)
    cfg.write_text(cfg.read_text() + "policies:\n  - {name: staff, recipients: ['table:staff'], "
                                     "plugins: {lists: {enabled: false}}}\n")
    result = run(cfg, "quarantine", "release", held[0], "--allow-sender")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED to allow a@sender.test: the policy group of bob@dest.test is unknown" in result.stdout
    assert "nothing was released" in result.stdout
    assert (tmp_path / "allow").read_text() == ""
    assert maildir(tmp_path) == []  # refused before the release


@pytest.mark.parametrize(("group", "expected"), [(None, "allow"), ("bobs", "bobs_allow"), ("off", None)])
def test_lists_plugin_as_a_group_has_it(tmp_path: Path, group: str | None, expected: str | None) -> None:
    from smtpproxy.allowsender import allow_table
    from tests.conftest import make_config

    (tmp_path / "allow").write_text("")
    (tmp_path / "b").write_text("")
    config = make_config(tmp_path, tables={"allow": {"type": "file", "file": str(tmp_path / "allow")},
                                           "bobs_allow": {"type": "file", "file": str(tmp_path / "b")}},
                         plugins=[{"name": "lists", "settings": {"allow": "allow"}}],
                         policies=[{"name": "bobs", "recipients": ["bob@dest.test"],
                                    "plugins": {"lists": {"settings": {"allow": "bobs_allow"}}}},
                                   {"name": "off", "recipients": ["x.test"],
                                    "plugins": {"lists": {"enabled": False}}}])
    table = allow_table(config, group)
    assert table.name == expected
    if expected is None:
        assert table.problem == "no lists plugin is configured for policy group off: there is no allow list"


def test_allow_sender_when_the_release_takes_every_recipient(tmp_path: Path, held: list[str]) -> None:  # noqa: F811
    # Once every recipient is released the store drops the content: the From: address is read before.
    (tmp_path / "allow").write_text("")
    cfg = config(tmp_path, LISTS, "tables:\n  allow: {type: file, file: allow}\n")
    result = run(cfg, "quarantine", "release", held[1], "--allow-sender")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "allow").read_text() == "bob@dest.test  a@sender.test\ncarol@dest.test  a@sender.test\n"
