"""Reloading policy groups: all groups swap at once, sessions in flight finish on the set they
started with, group-only plugin instances start and shut down with their set, and under load a
reload that changes a group loses and duplicates no message."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.config import load_config
from smtpproxy.server import ProxyServer
from tests.conftest import Talk, port_of
from tests.reload_plugin import recorded


def write_config(path: Path, threshold: float | None, *, tagged: str = "grp") -> None:
    quarantine = "" if threshold is None else f", quarantine: {threshold}"
    path.write_text(f"""\
listeners: [{{address: 127.0.0.1, port: 0}}]
hostname: reload.test
relay: {{domains: [one.test, two.test]}}
delivery: {{type: maildir, path: {path.parent / 'mail'}}}
quarantine: {{path: {path.parent / 'quarantine'}}}
received_header: never
plugins:
  - name: score
    settings:
      tag: 100
      rules: [{{name: OFFER, score: 6, match: {{header: {{name: Subject, regex: offer}}}}}}]
  - name: tagged
    use: tests.reload_plugin:Tagged
    enabled: false
    settings: {{tag: global, record: {path.parent / 'record.txt'}}}
policies:
  - name: tenant
    recipients: [two.test]
    plugins:
      score: {{settings: {{tag: 5{quarantine}}}}}
  - name: lab
    recipients: [lab.one.test]
    plugins:
      tagged: {{enabled: true, settings: {{tag: {tagged}}}}}
""")


async def started(path: Path) -> ProxyServer:
    config, source = load_config(path)
    server = ProxyServer(config, source)
    await server.start()
    return server


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "smtpproxy.session" and r.msg == name]


async def send(port: int, number: int, rcpt: str = "x@two.test") -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello()
    body = (f"Subject: offer {number}\r\nMessage-ID: <m{number}@load.test>\r\n\r\nhi\r\n").encode()
    reply = await client.send_message("a@src.test", [rcpt], body)
    await client.cmd("QUIT")
    await client.close()
    return reply


def kept(tmp_path: Path) -> list[bytes]:
    mail = tmp_path / "mail" / "new"
    files = list(mail.iterdir()) if mail.exists() else []
    files += list((tmp_path / "quarantine").glob("*.eml"))
    return [f.read_bytes() for f in files]


async def test_a_session_in_flight_finishes_on_the_groups_it_started_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    path = tmp_path / "smtpproxy.yaml"
    write_config(path, None, tagged="first")
    server = await started(path)
    record = tmp_path / "record.txt"
    try:
        # Only the lab group has the tagged plugin: its instance starts with the set.
        assert recorded(record) == ["first startup-begin", "first startup-end"]
        in_flight = await Talk.open(port_of(server))
        await in_flight.hello()
        write_config(path, 5.0, tagged="second")
        assert await server.reload() is True
        assert recorded(record)[2:] == ["second startup-begin", "second startup-end"]
        # A new session: the new tenant group quarantines; the one in flight still delivers.
        assert (await send(port_of(server), 1))[0] == 250
        assert (await in_flight.send_message("a@src.test", ["x@two.test"],
                                             b"Subject: offer 2\r\n\r\nhi\r\n"))[0] == 250
        assert "first shutdown" not in recorded(record)  # its session is still open
        await in_flight.cmd("QUIT")
        await in_flight.close()
        for _ in range(200):
            if "first shutdown" in recorded(record):
                break
            await asyncio.sleep(0.02)
        assert "first shutdown" in recorded(record) and "second shutdown" not in recorded(record)
    finally:
        await server.stop(grace=1)
    assert recorded(record).count("second shutdown") == 1
    (reload,) = events(caplog, "reload")
    assert reload["groups"] == ["tenant", "lab"]
    decisions = [(m["group"], m["decision"]) for m in events(caplog, "message")]
    assert decisions == [("tenant", "quarantined"), ("tenant", "delivered")]


async def test_reloads_under_load_lose_and_duplicate_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    path = tmp_path / "smtpproxy.yaml"
    write_config(path, None)
    server = await started(path)
    count = 60
    try:
        sending = asyncio.Event()

        async def reloads() -> int:
            done = 0
            while not sending.is_set() or done < 2:
                write_config(path, 5.0 if done % 2 == 0 else None)
                assert await server.reload() is True
                done += 1
                await asyncio.sleep(0.01)
            return done

        gate = asyncio.Semaphore(8)

        async def one(number: int) -> tuple[int, str]:
            async with gate:
                return await send(port_of(server), number)

        async def load() -> list[tuple[int, str]]:
            try:
                return await asyncio.gather(*(one(n) for n in range(count)))
            finally:
                sending.set()

        replies, reloaded = await asyncio.gather(load(), reloads())
    finally:
        await server.stop(grace=1)
    assert reloaded >= 2
    # Reloads happened while sessions were open on the replaced sets.
    assert any(e["previous_chain_sessions"] for e in events(caplog, "reload"))
    assert [code for code, _ in replies] == [250] * count
    ids = sorted(int(m.split(b"<m")[1].split(b"@")[0]) for m in kept(tmp_path))
    assert ids == list(range(count))  # every message exactly once: delivered or quarantined
    lines = events(caplog, "message")
    assert len(lines) == count and {m["group"] for m in lines} == {"tenant"}
    assert {m["decision"] for m in lines} <= {"delivered", "quarantined"}
