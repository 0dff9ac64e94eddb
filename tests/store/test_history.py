"""The message history and the store's quarantine through a running proxy (SQLite and a
private PostgreSQL): every decision recorded, the mail never held up by the store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtpproxy import Verdict, hookimpl
from smtpproxy.history import HistoryRecorder, decoded_header
from smtpproxy.metrics import PrometheusRecorder
from smtpproxy.store import HistoryEntry, Search, open_store
from smtpproxy.store.quarantine import DatabaseQuarantine
from tests.conftest import ProxyFactory, Talk, closed_port, maildir_messages, port_of
from tests.postgres_server import PostgresServer

BODY = (b"From: a@sender.test\r\nTo: b@dest.test\r\nMessage-ID: <m1@sender.test>\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and\r\n more\r\n\r\nHello.\r\n")
RELAY = {"domains": ["dest.test"], "networks": []}


class ByRecipient:
    """Quarantines mail for q@dest.test, rejects mail for r@dest.test, else lets it pass."""

    name = "judge"

    @hookimpl
    def data(self, transaction: Any) -> Verdict | None:
        rcpts = [r.address.text for r in transaction.envelope.recipients]
        if "q@dest.test" in rcpts:
            return Verdict.quarantine("score 12.0: PILLS")
        if "r@dest.test" in rcpts:
            return Verdict.reject("no thanks")
        return None


async def wait_for(condition: Callable[[], Any], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [(str(r.msg), r.levelno) for r in caplog.records if hasattr(r, "smtpproxy_fields")]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"sqlite": str(tmp_path / "store.db"), "node": "mx1"}
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return {"postgresql": server.url(server.create_database()), "node": "mx1"}


async def test_every_decision_is_recorded_and_searchable(
        proxy_factory: ProxyFactory, store_section: dict[str, Any], tmp_path: Path) -> None:
    proxy = await proxy_factory(ByRecipient(), relay=RELAY, store=store_section,
                                history={"flush_interval": 0.05})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@sender.test", ["b@dest.test", "c@dest.test"], BODY))[0] == 250
    assert (await client.send_message("a@sender.test", ["q@dest.test"], BODY))[0] == 250
    assert (await client.send_message("a@sender.test", ["b@dest.test", "r@dest.test"], BODY))[0] == 550
    await client.close()
    assert proxy.store is not None
    store = proxy.store

    async def three() -> bool:
        return len(await store.search_history(Search())) == 3

    await wait_for(three)
    delivered = await store.search_history(Search(recipient="c@dest.test"))
    assert len(delivered) == 1
    e = delivered[0]
    assert (e.node, e.sender, e.recipients, e.decision, e.client) == (
        "mx1", "a@sender.test", ["b@dest.test", "c@dest.test"], "delivered", "127.0.0.1")
    assert (e.message_id, e.subject, e.size) == ("<m1@sender.test>", "Grüße and more", len(BODY))
    assert e.reply is not None and e.reply.startswith("250")
    [kept] = await store.search_history(Search(decision="quarantined"))
    assert kept.decided_by == "judge" and kept.quarantine_id and kept.reason == "score 12.0: PILLS"
    assert (await store.get(kept.quarantine_id)) is not None
    assert len(await store.search_history(Search(recipient="b@dest.test"))) == 2
    [refused] = await store.search_history(Search(subject="grüße", decision="rejected"))
    assert (refused.decided_by, refused.reason, refused.reply) == ("judge", "no thanks", "550 5.7.1")
    assert len(await store.search_history(Search(since=time.time() - 60, sender="a@sender.test"))) == 3
    assert len(maildir_messages(tmp_path / "mail")) == 1


async def test_a_store_that_is_down_drops_history_and_never_the_mail(
        proxy_factory: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    dead = f"postgresql://postgres@127.0.0.1:{closed_port()}/none"
    proxy = await proxy_factory(relay=RELAY, store={"postgresql": dead, "timeout": 1},
                                history={"flush_interval": 0.05})
    assert ("store_unavailable", logging.WARNING) in events(caplog)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    for _ in range(3):
        assert (await client.send_message("a@sender.test", ["b@dest.test"], BODY))[0] == 250
    await client.close()
    assert len(maildir_messages(tmp_path / "mail")) == 3
    history = proxy.services.history
    assert history is not None
    deadline = time.monotonic() + 15
    while history.dropped < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert ("history_dropped", logging.WARNING) in events(caplog)


async def test_a_quarantine_the_store_cannot_keep_is_tempfailed_never_250(
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{closed_port()}/none"
    proxy = await proxy_factory(ByRecipient(), relay=RELAY, store={"postgresql": dead, "timeout": 1})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("a@sender.test", ["q@dest.test"], BODY)
    assert code == 451 and text.startswith("4.3.0")
    await client.close()
    assert maildir_messages(tmp_path / "mail") == []


async def test_the_queue_is_bounded_and_counts_what_it_drops(tmp_path: Path) -> None:
    store = open_store(postgresql=f"postgresql://postgres@127.0.0.1:{closed_port()}/none", timeout=1)
    metrics = PrometheusRecorder(lambda: 0, lambda: 0)
    recorder = HistoryRecorder(store, queue_limit=5, batch_size=100, flush_interval=3600, metrics=metrics)
    entry = HistoryEntry(id="x", time=1.0, node="n", sender="a@a.test", recipients=[], decision="delivered")
    for _ in range(8):
        recorder.record(entry)  # never waits
    assert (recorder.pending, recorder.dropped) == (5, 3)
    await recorder.close(grace=1)
    assert (recorder.pending, recorder.dropped) == (0, 8)
    text = metrics.exposition()[0].decode()
    assert 'smtpproxy_history_entries_total{result="dropped"} 8.0' in text
    await store.close()


async def test_history_waits_for_nobody_while_the_writer_flushes_in_batches(tmp_path: Path) -> None:
    store = open_store(sqlite=tmp_path / "s.db")
    recorder = HistoryRecorder(store, batch_size=10, flush_interval=0.05)
    recorder.start()
    for n in range(25):
        recorder.record(HistoryEntry(id=f"e{n}", time=float(n), node="n", sender="a@a.test",
                                     recipients=["b@b.test"], decision="delivered"))

    async def all_written() -> bool:
        return recorder.written == 25

    await wait_for(all_written)
    await recorder.close()
    assert len(await store.search_history(Search(recipient="b@b.test"))) == 25
    await store.close()


def test_headers_are_decoded_unfolded_and_bounded() -> None:
    assert decoded_header("=?utf-8?b?w6TDtsO8?=  x\r\n\ty") == "äöü x y"
    assert decoded_header("=?bogus?q?x?=") == "=?bogus?q?x?="
    assert len(decoded_header("x" * 5000) or "") == 998
    assert decoded_header(None) is None


async def test_a_retention_run_purges_expired_messages(tmp_path: Path) -> None:
    store = open_store(sqlite=tmp_path / "s.db")
    quarantine = DatabaseQuarantine(store, node="n", retention_days=1)
    assert await quarantine.purge() == 0
    await store.close()


async def test_the_milter_records_its_decisions_too(tmp_path: Path) -> None:
    from smtpproxy.milter import codec
    from smtpproxy.milter.server import MilterServer
    from tests.conftest import chain_of, make_config
    from tests.wire.test_milter import BODY as MILTER_BODY
    from tests.wire.test_milter import HEADERS, FakeMTA, Refuse

    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"},
                         store={"sqlite": str(tmp_path / "s.db"), "node": "mta1"},
                         history={"flush_interval": 0.05})
    server = MilterServer(config, chain=chain_of(Refuse("data", Verdict.quarantine("looks phishy"))))
    await server.start()
    try:
        mta = await FakeMTA.open(server)
        await mta.start()
        await mta.envelope()
        assert await mta.content(HEADERS, MILTER_BODY) == [codec.Quarantine("looks phishy"), codec.Accept()]
        await mta.close()
        assert server.store is not None
        store = server.store

        async def recorded() -> bool:
            return bool(await store.search_history(Search(node="mta1")))

        await wait_for(recorded)
        [entry] = await store.search_history(Search(decision="quarantined"))
        assert (entry.reason, entry.subject, entry.quarantine_id) == ("looks phishy", "hello folded", None)
    finally:
        await server.stop(grace=1)


async def test_each_recipients_policy_group_is_recorded_and_searchable(tmp_path: Path) -> None:
    from smtpproxy.server import ProxyServer
    from tests.conftest import make_config

    # No plugin differs between the groups, so they share a group key: one transaction, three groups.
    config = make_config(tmp_path, relay={"domains": ["one.test", "sales.test"], "networks": []},
                         store={"sqlite": str(tmp_path / "s.db"), "node": "mx1"},
                         history={"flush_interval": 0.05},
                         policies=[{"name": "sales", "recipients": ["sales.test"]},
                                   {"name": "legal", "recipients": ["legal@one.test"]}])
    server = ProxyServer(config)
    await server.start()
    try:
        client = await Talk.open(port_of(server))
        await client.hello()
        recipients = ["ann@sales.test", "legal@one.test", "bob@one.test"]
        assert (await client.send_message("a@sender.test", recipients, BODY))[0] == 250
        await client.close()
        assert server.store is not None
        store = server.store

        async def recorded() -> bool:
            return bool(await store.search_history(Search()))

        await wait_for(recorded)
        [entry] = await store.search_history(Search(policy_group="legal"))
        assert entry.recipients == recipients
        assert entry.groups == {"ann@sales.test": "sales", "legal@one.test": "legal", "bob@one.test": "default"}
        assert entry.policy_group == "default,legal,sales"  # as the message line's group=
        assert [e.id for e in await store.search_history(Search(policy_group="default"))] == [entry.id]
        assert await store.search_history(Search(policy_group="sales", recipient="bob@one.test")) == []
    finally:
        await server.stop(grace=1)
