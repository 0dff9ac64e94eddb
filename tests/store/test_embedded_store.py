"""The embedded default (``smtpproxy run`` without -c, the README's quick start) keeps its
history and quarantine in ./smtpproxy.db: a quarantined message is in SQLite, its decision in
the history, and ``smtpproxy quarantine list`` / ``history search`` without -c show them. A
directory it cannot write stops it at once with the reason; a configuration file without a
``store:`` section keeps its quarantine directory, as before."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Verdict, hookimpl
from smtpproxy.config import load_config
from smtpproxy.quarantine import QuarantineStore
from smtpproxy.server import ProxyServer
from smtpproxy.store.quarantine import DatabaseQuarantine
from tests.conftest import Talk, chain_of, port_of

EXE = [sys.executable, "-m", "smtpproxy"]
BODY = b"From: a@sender.test\r\nTo: bob@localhost\r\nSubject: cheap pills\r\n\r\nBuy now.\r\n"


class Judge:
    name = "judge"

    @hookimpl
    def data(self, transaction: Any) -> Verdict | None:
        return Verdict.quarantine("score 12.0: PILLS")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


async def test_the_embedded_default_quarantines_into_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config, _ = load_config(None)
    assert config.store.sqlite == tmp_path / "smtpproxy.db"
    # The embedded default as it is, on a free port instead of 2525 (which may be taken here).
    listeners = [config.listeners[0].model_copy(update={"port": 0})]
    proxy = ProxyServer(config.model_copy(update={"listeners": listeners}), chain=chain_of(Judge()))
    assert isinstance(proxy.services.quarantine, DatabaseQuarantine)
    await proxy.start()
    try:
        client = await Talk.open(port_of(proxy))
        await client.hello()
        code, _ = await client.send_message("a@sender.test", ["bob@localhost"], BODY)
        assert code == 250
        await client.close()
    finally:
        await proxy.stop(grace=1)  # the history writer flushes on the way out
    assert not (tmp_path / "quarantine").exists()  # not the directory quarantine
    listed = await asyncio.to_thread(cli, tmp_path, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    assert "a@sender.test" in listed.stdout and "bob@localhost" in listed.stdout and "cheap pills" in listed.stdout
    history = await asyncio.to_thread(cli, tmp_path, "history", "search", "--subject", "pills")
    assert history.returncode == 0, history.stderr
    assert "quarantine" in history.stdout and "judge" in history.stdout


def test_a_directory_it_cannot_write_stops_it_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "smtpproxy.db").mkdir()  # as good as a file it may not write (the tests run as root)
    result = cli(tmp_path, "run")
    assert result.returncode == 1
    assert "cannot start: the embedded default keeps its store in" in result.stderr
    assert "run smtpproxy from a directory you can write to" in result.stderr and "-c" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_configuration_without_a_store_keeps_its_quarantine_directory(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("quarantine:\n  path: q\n")
    config, _ = load_config(str(tmp_path / "cfg.yaml"))
    assert not config.store.configured
    proxy = ProxyServer(config, chain=chain_of())
    assert isinstance(proxy.services.quarantine, QuarantineStore)
    assert proxy.services.quarantine.path == tmp_path / "q"


@pytest.mark.parametrize("argv", [("quarantine", "list"), ("history", "search"), ("quarantine", "show", "x")])
def test_reading_the_embedded_store_where_there_is_none_says_so_and_creates_nothing(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """Without -c the commands read ./smtpproxy.db; run elsewhere they must not leave an empty
    store behind and report 'nothing quarantined' as if it were the real one."""
    result = cli(tmp_path, *argv)
    assert result.returncode == 1, result.stdout
    assert "no store here" in result.stderr and "smtpproxy.db" in result.stderr and "-c" in result.stderr
    assert not (tmp_path / "smtpproxy.db").exists()
    assert "Traceback" not in result.stderr
