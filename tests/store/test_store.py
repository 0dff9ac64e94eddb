"""The store (smtpproxy.store) on both back ends: SQLite in a file and a private PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpproxy.store import CHUNK, Held, HistoryEntry, Search, Store, StoreError, open_store
from smtpproxy.store.backends import PostgresBackend, SQLiteBackend
from smtpproxy.store.migrations import MIGRATIONS, VERSION
from tests.daemons import free_port
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SQLiteBackend | PostgresBackend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "store.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return PostgresBackend(server.url(server.create_database()))


@pytest.fixture
async def store(backend: SQLiteBackend | PostgresBackend) -> AsyncIterator[Store]:
    store = Store(backend)
    yield store
    await store.close()


def entry(n: int, *, sender: str = "alice@a.test", rcpts: tuple[str, ...] = ("bob@b.test",),
          when: float | None = None, decision: str = "delivered") -> HistoryEntry:
    return HistoryEntry(
        id=f"e{n}", time=when if when is not None else 1_800_000_000 + n, node="mx1", sender=sender,
        recipients=list(rcpts), decision=decision, client="192.0.2.1", message_id=f"<m{n}@a.test>",
        subject=f"Hello {n} 100%_off", size=100 + n, decided_by="score", score=1.5, reason="fine",
    )


def held(qid: str, *, rcpts: tuple[str, ...] = ("bob@b.test", "carol@b.test"), expires: float = 2e9,
         sender: str = "spam@x.test") -> Held:
    return Held(id=qid, node="mx1", time=1_800_000_000, expires=expires, sender=sender, size=10,
                record={"id": qid, "recipients": list(rcpts)}, recipients=dict.fromkeys(rcpts, "held"),
                subject="Pills", reason="score 12", decided_by="score", score=12.0)


async def test_a_new_store_is_at_the_current_version(store: Store) -> None:
    assert await store.migrate() == (0, VERSION)
    assert await store.migrate() == (VERSION, VERSION)
    assert await store.version() == VERSION


async def test_history_is_searchable_by_each_field_and_time(store: Store) -> None:
    await store.add_history([
        entry(1), entry(2, sender="mallory@m.test", decision="rejected"),
        entry(3, rcpts=("bob@b.test", "dave@d.test")),
    ])
    ids = lambda found: sorted(e.id for e in found)  # noqa: E731
    assert ids(await store.search_history(Search())) == ["e1", "e2", "e3"]
    assert ids(await store.search_history(Search(sender="mallory@m.test"))) == ["e2"]
    assert ids(await store.search_history(Search(recipient="dave@d.test"))) == ["e3"]
    assert ids(await store.search_history(Search(decision="rejected"))) == ["e2"]
    assert ids(await store.search_history(Search(message_id="<m3@a.test>"))) == ["e3"]
    assert ids(await store.search_history(Search(subject="hello 2"))) == ["e2"]
    assert ids(await store.search_history(Search(subject="0%_o"))) == ["e1", "e2", "e3"]
    assert ids(await store.search_history(Search(subject="x%"))) == []  # % is not a wildcard
    assert ids(await store.search_history(Search(since=1_800_000_002, until=1_800_000_003))) == ["e2"]
    assert ids(await store.search_history(Search(client="192.0.2.1", limit=2))) == ["e2", "e3"]  # newest
    got = (await store.search_history(Search(message_id="<m3@a.test>")))[0]
    assert got == entry(3, rcpts=("bob@b.test", "dave@d.test"))


async def test_retention_and_erasing_one_person(store: Store) -> None:
    await store.add_history([entry(1, when=100), entry(2), entry(3, rcpts=("erin@e.test", "bob@b.test")),
                             entry(4, sender="erin@e.test")])
    await store.hold(held("q1", rcpts=("erin@e.test",)), [b"x"])
    await store.hold(held("q2"), [b"y"])
    assert await store.expire_history(before=1000) == 1
    assert await store.erase_address("erin@e.test") == (2, 1)
    assert sorted(e.id for e in await store.search_history(Search())) == ["e2"]
    assert await store.search_history(Search(recipient="erin@e.test")) == []
    assert [h.id for h in await store.held(Search())] == ["q2"]
    assert await store.content("q1") == b""


async def test_a_quarantined_message_of_50_mb_round_trips_in_chunks(store: Store) -> None:
    body = bytes(range(256)) * (50 * 1024 * 1024 // 256) + b"tail"
    parts = [memoryview(body)[:12345], memoryview(body)[12345:]]
    await store.hold(held("big"), parts)
    rows = await store.backend.query("SELECT count(*), max(length(data)) FROM quarantine_chunk WHERE qid = ?",
                                     ("big",))
    assert rows[0] == (51, CHUNK)
    assert await store.content("big") == body


async def test_release_per_recipient_claims_each_once(store: Store) -> None:
    await store.hold(held("q1"), [b"message"])
    assert await store.claim("q1", ["bob@b.test"], "admin") == ["bob@b.test"]
    assert await store.claim("q1", ["bob@b.test", "carol@b.test"], "other") == ["carol@b.test"]
    await store.settle("q1", ["carol@b.test"], "held", actor="other")  # its delivery failed
    await store.settle("q1", ["bob@b.test"], "released", actor="admin", destination="mx", reply="250 ok")
    got = await store.get("q1")
    assert got is not None and got.recipients == {"bob@b.test": "released", "carol@b.test": "held"}
    assert got.held == ["carol@b.test"]
    assert await store.content("q1") == b"message"  # carol's copy is still kept
    assert [h.id for h in await store.held(Search(recipient="carol@b.test"))] == ["q1"]
    await store.claim("q1", ["carol@b.test"], "admin")
    await store.settle("q1", ["carol@b.test"], "released", actor="admin")
    assert await store.held(Search()) == []
    assert [h.id for h in await store.held(Search(), include_done=True)] == ["q1"]
    assert await store.content("q1") == b""  # nobody left to release it to


async def test_concurrent_claims_never_hand_out_a_recipient_twice(store: Store) -> None:
    await store.hold(held("q1"), [b"m"])
    results = await asyncio.gather(*(store.claim("q1", ["bob@b.test", "carol@b.test"], f"n{i}") for i in range(6)))
    claimed = [a for r in results for a in r]
    assert sorted(claimed) == ["bob@b.test", "carol@b.test"]


async def test_expiry_removes_expired_messages_only(store: Store) -> None:
    now = time.time()
    await store.hold(held("old", expires=now - 1), [b"a"])
    await store.hold(held("new", expires=now + 3600), [b"b"])
    assert await store.expire_quarantine(now) == 1
    assert await store.get("old") is None and await store.content("old") == b""
    assert [h.id for h in await store.held(Search())] == ["new"]


async def test_a_link_is_used_once(store: Store) -> None:
    assert await store.use_link("L1", time.time() + 60) is True
    assert await store.use_link("L1", time.time() + 60) is False


async def test_an_upgrade_from_the_previous_schema_keeps_every_record(
        backend: SQLiteBackend | PostgresBackend) -> None:
    assert await backend.migrate(MIGRATIONS[:VERSION - 1]) == (0, VERSION - 1)
    old = Store(backend)
    old._ready = True  # the previous release's code: it knows nothing newer
    await backend.execute([
        ("INSERT INTO history (id, time, node, sender, recipients, decision) VALUES (?, ?, ?, ?, ?, ?)",
         ("h1", 5.0, "mx1", "a@a.test", "b@b.test", "delivered")),
        ("INSERT INTO history_recipient (entry, address) VALUES (?, ?)", ("h1", "b@b.test")),
    ])
    await old.hold(held("q1"), [b"kept across the upgrade"])
    upgraded = Store(backend)
    assert await upgraded.migrate() == (VERSION - 1, VERSION)
    [h1] = await upgraded.search_history(Search(recipient="b@b.test"))
    assert (h1.id, h1.sender, h1.policy_group) == ("h1", "a@a.test", None)
    assert [h.id for h in await upgraded.held(Search())] == ["q1"]
    assert await upgraded.content("q1") == b"kept across the upgrade"
    await upgraded.close()


async def test_an_upgrade_to_policy_groups_keeps_old_rows_and_records_groups_per_recipient(
        backend: SQLiteBackend | PostgresBackend) -> None:
    assert await backend.migrate(MIGRATIONS[:3]) == (0, 3)  # the schema before groups were kept
    await backend.execute([
        ("INSERT INTO history (id, time, node, sender, recipients, decision) VALUES (?, ?, ?, ?, ?, ?)",
         ("old", 5.0, "mx1", "a@a.test", "b@b.test\nc@c.test", "delivered")),
        ("INSERT INTO history_recipient (entry, address) VALUES (?, ?)", ("old", "b@b.test")),
        ("INSERT INTO history_recipient (entry, address) VALUES (?, ?)", ("old", "c@c.test")),
    ])
    upgraded = Store(backend)
    assert await upgraded.migrate() == (3, VERSION)
    new = entry(1, rcpts=("b@b.test", "c@c.test", "d@d.test"))
    new.groups = {"b@b.test": "sales", "c@c.test": "legal", "d@d.test": "sales"}
    new.policy_group = "legal,sales"
    await upgraded.add_history([new])
    found = {e.id: e for e in await upgraded.search_history(Search(recipient="b@b.test"))}
    assert (found["old"].recipients, found["old"].policy_group, found["old"].groups) == (
        ["b@b.test", "c@c.test"], None, {})
    assert (found["e1"].policy_group, found["e1"].groups) == ("legal,sales", new.groups)
    assert [e.id for e in await upgraded.search_history(Search(policy_group="legal"))] == ["e1"]
    assert [e.id for e in await upgraded.search_history(Search(policy_group="sales",
                                                                   recipient="d@d.test"))] == ["e1"]
    assert await upgraded.search_history(Search(policy_group="legal,sales")) == []  # a group, not the list
    # With a recipient or a domain scope, it is that recipient whose group counts.
    assert await upgraded.search_history(Search(policy_group="legal", recipient="b@b.test")) == []
    assert await upgraded.search_history(Search(policy_group="legal", domains=("b.test", "d.test"))) == []
    assert [e.id for e in await upgraded.search_history(Search(policy_group="sales", domains=("b.test",)))] == ["e1"]
    assert await upgraded.search_history(Search(policy_group="default")) == []
    assert found["e1"].as_dict()["groups"] == new.groups  # what history export writes
    await upgraded.close()


async def test_an_unreachable_postgresql_is_a_store_error() -> None:
    store = open_store(postgresql=f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=1)
    with pytest.raises(StoreError):
        await store.add_history([entry(1)])
    await store.close()


async def test_an_unwritable_sqlite_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    store = open_store(sqlite=tmp_path / "dir", timeout=1)
    with pytest.raises(StoreError):
        await store.migrate()
    await store.close()
