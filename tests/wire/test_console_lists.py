"""The console's allow and block list pages over HTTP, as an attacker meets them: each role's
scope, forms edited by hand (another domain's key, a bad entry, no CSRF token), GETs that
change nothing, read-only tables, a Redis table edited live and one that is down, the audit
log. The browser's view (and the screenshot in docs/) is in tests/postfix/test_console_browser.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.store import open_store
from smtpproxy.web.accounts import Viewer
from smtpproxy.web.listtables import check_entry, check_key, may_manage
from tests.console_server import console_at, console_files
from tests.daemons import free_port
from tests.redis_server import RedisServer

BLOCKLIST = (
    "# recipient          blocked senders\n"
    "bob@a.test           spammer@bad.test, *.evil.test\n"
    "a.test               @worse.test\n"
    "eve@b.test           pest@bad.test\n"
    "b.test               @b-worse.test\n"
)

Start = Callable[..., "asyncio.Future[str]"]


async def _serve(tmp_path: Path, tables: str) -> AsyncIterator[str]:
    port = free_port()
    console_files(tmp_path, port, f"login_throttle:\n  initial_delay: 0\ntables:\n{tables}"
                  "plugins:\n  - name: lists\n    settings: {allow: allow, block: block}\n")
    async with console_at(tmp_path / "cfg.yaml", port) as base:
        yield base


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[str]:
    (tmp_path / "blocklists").write_text(BLOCKLIST)
    tables = ("  block: {type: file, file: blocklists}\n"
              "  allow: {type: inline, entries: {\"@a.test\": \"friend@partner.test\"}}\n")
    async for base in _serve(tmp_path, tables):
        yield base


async def _signed_in(base: str, name: str) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(base_url=base)
    reply = await client.post("/console/login", data={"name": name, "password": "pw"})
    assert reply.status_code == 303
    page = (await client.get("/console/lists")).text
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match is not None
    return client, match.group(1)


async def _audit(tmp_path: Path) -> str:
    store = open_store(sqlite=tmp_path / "store.db")
    try:
        return "\n".join(f"{a.actor} {a.action} {' '.join(a.recipients)} {a.detail}" for a in await store.audit_log())
    finally:
        await store.close()


async def test_a_domain_admin_manages_their_domain_only_whatever_the_form_says(console: str, tmp_path: Path) -> None:
    client, csrf = await _signed_in(console, "host-a")
    try:
        page = (await client.get("/console/lists")).text
        assert "spammer@bad.test" in page and "@worse.test" in page
        assert "pest@bad.test" not in page and "b-worse" not in page  # another domain's lists are not shown
        assert 'href="/console/lists"' in page  # the console's menu leads here
        reply = await client.post("/console/lists/block/add",
                                  data={"csrf": csrf, "key": "@a.test", "entry": "Junk@Spam.TEST"})
        assert reply.status_code == 200 and "junk@spam.test added to the block list of @a.test" in reply.text
        assert "next reload" in reply.text  # a file table: when the proxy sees it
        assert "@a.test  junk@spam.test\n" in (tmp_path / "blocklists").read_text()
        before = (tmp_path / "blocklists").read_text()
        # Another domain's lists, however the key is written: refused, the file untouched.
        for key in ("eve@b.test", "b.test", "@B.TEST", " b.test ", ".test", "x@a.test.b.test"):
            for action in ("add", "remove"):
                reply = await client.post(f"/console/lists/block/{action}",
                                          data={"csrf": csrf, "key": key, "entry": "pest@bad.test"})
                assert reply.status_code == 403, (key, action)
        assert (tmp_path / "blocklists").read_text() == before
        # Bad input: a clear error, the form refilled, nothing written.
        for entry, error in (("nobody@", "is not a domain name"), ("a, b", "no spaces, commas"),
                             ("", "enter an address"), ("x@-bad-.test", "is not a domain name")):
            reply = await client.post("/console/lists/block/add", data={"csrf": csrf, "key": "a.test", "entry": entry})
            assert reply.status_code == 400 and error in reply.text, (entry, reply.text)
        assert (tmp_path / "blocklists").read_text() == before
        # No CSRF token, another site's Origin, a GET: nothing happens.
        assert (await client.post("/console/lists/block/remove",
                                  data={"key": "bob@a.test", "entry": "spammer@bad.test"})).status_code == 403
        reply = await client.post("/console/lists/block/remove", headers={"origin": "https://evil.example"},
                                  data={"csrf": csrf, "key": "bob@a.test", "entry": "spammer@bad.test"})
        assert reply.status_code == 403
        assert (await client.get("/console/lists/block/remove?key=bob@a.test&entry=spammer@bad.test")).status_code == 405
        assert (tmp_path / "blocklists").read_text() == before
        reply = await client.post("/console/lists/block/remove",
                                  data={"csrf": csrf, "key": "bob@a.test", "entry": "spammer@bad.test"})
        assert reply.status_code == 200 and "removed from the block list of bob@a.test" in reply.text
        assert "bob@a.test  *.evil.test\n" in (tmp_path / "blocklists").read_text()
        assert "# recipient" in (tmp_path / "blocklists").read_text()  # the file's comments stay
        # The allow table is inline: shown, read-only, with the reason; a hand-made POST changes nothing.
        page = (await client.get("/console/lists")).text
        assert "friend@partner.test" in page and "read-only here, because its entries are written in" in page
        reply = await client.post("/console/lists/allow/add", data={"csrf": csrf, "key": "a.test", "entry": "x.test"})
        assert reply.status_code == 409 and "read-only" in reply.text
        assert (await client.post("/console/lists/nosuch/add", data={"csrf": csrf, "key": "a.test",
                                                                     "entry": "x.test"})).status_code == 404
    finally:
        await client.aclose()
    audit = await _audit(tmp_path)
    assert "domain:host-a list_add @a.test block list: junk@spam.test (table block)" in audit
    assert "domain:host-a list_remove bob@a.test block list: spammer@bad.test (table block)" in audit
    assert audit.count("list_") == 2  # refused and invalid attempts changed nothing and logged no change


async def test_a_recipient_edits_their_own_list_and_sees_the_domains(console: str, tmp_path: Path) -> None:
    client, csrf = await _signed_in(console, "bob@a.test")
    admin, admin_csrf = await _signed_in(console, "root")
    try:
        page = (await client.get("/console/lists")).text
        assert "spammer@bad.test" in page and "@worse.test" in page  # their own list and the domain's
        assert "pest@bad.test" not in page
        assert page.count(">Remove</button>") == 2  # only their own entries have a Remove button
        reply = await client.post("/console/lists/block/add",
                                  data={"csrf": csrf, "key": "bob@a.test", "entry": "ex@old.test"})
        assert reply.status_code == 200 and "ex@old.test added" in reply.text
        for key in ("a.test", "@a.test", "alice@a.test", "eve@b.test"):
            reply = await client.post("/console/lists/block/remove",
                                      data={"csrf": csrf, "key": key, "entry": "@worse.test"})
            assert reply.status_code == 403
        assert "a.test               @worse.test" in (tmp_path / "blocklists").read_text()
        everything = (await admin.get("/console/lists")).text
        assert "pest@bad.test" in everything and "ex@old.test" in everything
        assert "pest" not in (await admin.get("/console/lists?key=a.test")).text  # narrowed
        reply = await admin.post("/console/lists/block/remove",
                                 data={"csrf": admin_csrf, "key": "eve@b.test", "entry": "pest@bad.test"})
        assert reply.status_code == 200
        assert "eve@b.test" not in (tmp_path / "blocklists").read_text()  # the last entry: the key goes
    finally:
        await client.aclose()
        await admin.aclose()


async def test_a_redis_list_changes_live_and_a_redis_that_is_down_changes_nothing(
        redis_server: RedisServer, tmp_path: Path) -> None:
    tables = (f"  block: {{type: redis, url: \"{redis_server.url}\", prefix: \"block:\", structure: set}}\n"
              f"  allow: {{type: redis, url: \"{redis_server.url}\", prefix: \"allow:\"}}\n")
    async for base in _serve(tmp_path, tables):
        client, csrf = await _signed_in(base, "host-a")
        try:
            for kind, entry in (("block", "spam@bad.test"), ("allow", "friend@partner.test"),
                                ("allow", "*.partner.test")):
                reply = await client.post(f"/console/lists/{kind}/add",
                                          data={"csrf": csrf, "key": "a.test", "entry": entry})
                assert reply.status_code == 200 and "live" in reply.text
            import redis

            direct = redis.Redis(port=redis_server.port, decode_responses=True)
            assert direct.smembers("block:a.test") == {"spam@bad.test"}
            assert direct.get("allow:a.test") == "friend@partner.test, *.partner.test"
            direct.sadd("block:b.test", "other@bad.test")
            page = (await client.get("/console/lists")).text
            assert "spam@bad.test" in page and "other@bad.test" not in page
            redis_server.stop()
            reply = await client.post("/console/lists/block/add", data={"csrf": csrf, "key": "a.test",
                                                                        "entry": "more@bad.test"})
            assert reply.status_code == 503 and "try again later" in reply.text.lower()
            assert (await client.get("/console/lists")).status_code == 503
        finally:
            await client.aclose()


@given(st.text(max_size=40))
def test_entries_are_checked_as_the_plugin_reads_them(text: str) -> None:
    try:
        entry = check_entry(text)
    except ValueError:
        return
    # What is stored is one entry the lists plugin splits back out unchanged.
    assert entry == entry.lower() and entry.strip() == entry
    assert not any(c.isspace() or c == "," for c in entry)
    assert check_entry(entry) == entry


@pytest.mark.parametrize(("key", "domain_admin", "recipient"), [
    ("a.test", True, False), ("@a.test", True, False), ("bob@a.test", True, True),
    ("alice@a.test", True, False), ("b.test", False, False), ("bob@b.test", False, False),
    (".a.test", False, False), ("sub.a.test", False, False),
])
def test_who_manages_which_key(key: str, domain_admin: bool, recipient: bool) -> None:
    key = check_key(key)
    assert may_manage(Viewer("root", "admin"), key)
    assert may_manage(Viewer("host-a", "domain", ("a.test",)), key) is domain_admin
    assert may_manage(Viewer("bob@a.test", "recipient"), key) is recipient
