"""``smtpproxy tables list|query|add|remove`` (smtpproxy/tables_cli.py) on file tables and a
real Redis: what the proxy then reads, comments kept, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from smtpproxy.cli import main
from smtpproxy.config import load_config
from smtpproxy.tables import build_tables
from smtpproxy.tables.memory import read_entries
from tests.redis_server import RedisServer

ALLOW = """# allow lists
bob@example.com  partner.test,
# a comment inside bob's entry
   friend@other.test

carol@example.com x.test
"""


def config(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0") -> str:
    (tmp_path / "allow").write_text(ALLOW)
    os.chmod(tmp_path / "allow", 0o640)
    path = tmp_path / "c.yaml"
    path.write_text(f"""
tables:
  allow: {{type: file, file: allow}}
  inline: {{type: inline, entries: {{a@b.test: [one, two]}}}}
  rset: {{type: redis, url: '{redis_url}', prefix: 'allow:', structure: set}}
  rstr: {{type: redis, url: '{redis_url}', prefix: 'str:'}}
""")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["tables", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_file_tables_are_edited_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = config(tmp_path)
    assert run(capsys, "add", "-c", c, "allow", "Bob@Example.com", "new.test")[0] == 0
    assert run(capsys, "remove", "-c", c, "allow", "bob@example.com", "partner.test")[0] == 0
    assert run(capsys, "add", "-c", c, "allow", "dave@example.com", "d.test")[0] == 0
    assert run(capsys, "remove", "-c", c, "allow", "carol@example.com")[0] == 0
    text = (tmp_path / "allow").read_text()
    assert text == ("# allow lists\nbob@example.com  friend@other.test, new.test\n"
                    "# a comment inside bob's entry\n\ndave@example.com  d.test\n")
    assert oct((tmp_path / "allow").stat().st_mode & 0o777) == "0o640"
    assert [(k, v) for k, v, _ in read_entries(tmp_path / "allow")] == [
        ("bob@example.com", "friend@other.test, new.test"), ("dave@example.com", "d.test")]
    code, out, _ = run(capsys, "add", "-c", c, "allow", "dave@example.com", "D.test")
    assert code == 0 and "already there" in out
    assert run(capsys, "remove", "-c", c, "allow", "dave@example.com", "nothing.test")[0] == 3
    code, out, _ = run(capsys, "list", "-c", c, "allow")
    assert out == "bob@example.com   friend@other.test, new.test\ndave@example.com  d.test\n"
    assert run(capsys, "query", "-c", c, "allow", "DAVE@example.com")[1:] == ("d.test\n", "")
    assert run(capsys, "query", "-c", c, "allow", "eve@example.com")[0] == 3
    assert run(capsys, "list", "-c", c, "inline")[1] == "a@b.test  one, two\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "allow", "k", "two words"], "a value is one entry"),
        (["add", "allow", "k", "a,b"], "a value is one entry"),
        (["add", "inline", "k", "v"], "table inline (inline) is not writable here"),
        (["add", "nosuch", "k", "v"], "no table named 'nosuch' in tables (allow, inline, rset, rstr)"),
    ],
)
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    c = config(tmp_path)
    code, _, err = run(capsys, argv[0], "-c", c, *argv[1:])
    assert code == 2 and message in err, err
    assert (tmp_path / "allow").read_text() == ALLOW
    with pytest.raises(SystemExit) as info:  # argparse: the key is required
        main(["tables", "query", "-c", c, "allow"])
    assert info.value.code == 2


def test_redis_tables_are_edited_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server: RedisServer,
) -> None:
    c = config(tmp_path, redis_server.url)
    assert run(capsys, "add", "-c", c, "rset", "bob@example.com", "partner.test")[0] == 0
    assert run(capsys, "add", "-c", c, "rset", "bob@example.com", "other.test")[0] == 0
    assert run(capsys, "add", "-c", c, "rstr", "bob@example.com", "a.test")[0] == 0
    assert run(capsys, "add", "-c", c, "rstr", "bob@example.com", "b.test")[0] == 0
    assert run(capsys, "remove", "-c", c, "rstr", "bob@example.com", "a.test")[0] == 0
    assert run(capsys, "list", "-c", c, "rset")[1] == "bob@example.com  other.test, partner.test\n"
    assert run(capsys, "list", "-c", c, "rstr")[1] == "bob@example.com  b.test\n"
    loaded, _ = load_config(c)
    tables = build_tables(loaded.tables)

    async def look() -> tuple[object, object]:
        try:
            return await tables["rset"].lookup("bob@example.com"), await tables["rstr"].lookup("bob@example.com")
        finally:
            await tables.close()

    assert asyncio.run(look()) == (("other.test", "partner.test"), ("b.test",))
    assert run(capsys, "remove", "-c", c, "rset", "bob@example.com")[0] == 0
    assert run(capsys, "list", "-c", c, "rset")[1] == "table rset has no entries\n"
    redis_server.stop()
    code, _, err = run(capsys, "add", "-c", c, "rset", "bob@example.com", "x.test")
    assert code == 1 and "ConnectionError" in err
    code, _, err = run(capsys, "query", "-c", c, "rstr", "bob@example.com")
    assert code == 1 and "table rstr:" in err


@pytest.mark.parametrize("value", ["x,gmail.com", "a b", "tab\there", "nl\n"])
def test_a_write_of_more_than_one_entry_is_refused_underneath(tmp_path: Path, value: str) -> None:
    # Every writer (the CLI, the console's lists, "release and allow sender") goes through
    # edit_file/edit_redis: a value the table would read back as several entries never lands.
    from smtpproxy.tables.edit import edit_file

    config(tmp_path)
    with pytest.raises(ValueError, match="not one entry"):
        edit_file(tmp_path / "allow", "bob@example.com", value, add=True)
    assert (tmp_path / "allow").read_text() == ALLOW


def test_two_edits_of_one_file_at_once_both_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The console edits file tables in worker threads: "release and allow sender" for two
    # messages, or a list page's edit beside it. Each edit reads the file, changes its key and
    # replaces the file; two that overlap must not lose one of them.
    import threading

    from smtpproxy.tables import edit

    config(tmp_path)
    meet = threading.Barrier(2)
    write = edit._write_atomically

    def slow_write(path: Path, text: str) -> None:
        # Both edits have read the file by now unless one waits for the other: then this
        # wait gives up, and the edit goes on alone.
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait(timeout=1)
        write(path, text)

    monkeypatch.setattr(edit, "_write_atomically", slow_write)
    threads = [threading.Thread(target=edit.edit_file, args=(tmp_path / "allow", key, "new.test"),
                                kwargs={"add": True}) for key in ("dave@example.com", "erin@example.com")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = {key for key, _, _ in read_entries(tmp_path / "allow")}
    assert {"dave@example.com", "erin@example.com"} <= rows


async def test_concurrent_edits_of_a_redis_string_entry_lose_nothing(redis_server: RedisServer) -> None:
    """A string table keeps a key's entries as one value: each edit reads, changes and writes
    it. Twenty writers at once (the console, allow sender, the CLI, on several nodes) each add
    their own entry; every one must be there afterwards."""
    from smtpproxy.tables.edit import Edit, edit_redis
    from smtpproxy.tables.redis import RedisBackend

    backends = [RedisBackend(redis_server.url, prefix="race:") for _ in range(20)]
    try:
        results = await asyncio.gather(*(edit_redis(b, "bob@dest.test", f"s{n}@src.test", add=True)
                                         for n, b in enumerate(backends)))
        assert results == [Edit.DONE] * 20
        values = await backends[0].lookup("bob@dest.test")
        assert values is not None
        assert sorted(values[0].split(", ")) == sorted(f"s{n}@src.test" for n in range(20))
    finally:
        for b in backends:
            await b.close()


def _add_many(path: str, worker: int) -> None:
    from smtpproxy.tables.edit import edit_file

    for i in range(25):
        edit_file(Path(path), "bob@example.com", f"w{worker}n{i}@src.test", add=True)


def test_edits_of_one_file_from_several_processes_all_land(tmp_path: Path) -> None:
    """The console (`smtpproxy web`), `smtpproxy tables add` and `quarantine release
    --allow-sender` are separate processes editing the same file: each edit reads the file and
    replaces it, so the lock must hold across processes, not only threads (six processes of 25
    adds each kept 26 of 150 entries with a per-process lock)."""
    import multiprocessing

    from smtpproxy.tables.edit import file_rows

    config(tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(str(tmp_path / "allow"), n)) for n in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    [entries] = [e for key, e in file_rows(tmp_path / "allow") if key == "bob@example.com"]
    assert {f"w{w}n{i}@src.test" for w in range(6) for i in range(25)} <= set(entries)
