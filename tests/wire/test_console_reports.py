"""The console's "Report as spam" / "Not spam" and "Release and allow sender" over HTTP, as an
attacker meets them: each role within its scope, another recipient's message by changing the id
or the recipient, a GET, a missing CSRF token, a virus hold, a domain-wide entry only for domain
admins, and no button where the allow table cannot be written. The learning plugin is a small
module next to the configuration (tests/store/test_report_cli.py); the allow table a real file."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from smtpproxy.store import Held, open_store
from tests.console_server import console_at, console_files
from tests.daemons import free_port
from tests.store.test_report_cli import LEARNERS, notebook
from tests.store.test_store_cli import maildir
from tests.wire.test_console import _signed_in

CONTENT = b"From: Sam <s@x.test>\r\nTo: bob@a.test\r\nSubject: %s\r\n\r\nHello.\r\n"
ALLOW_LIST = "# allow lists\n"

Start = Callable[..., Awaitable[str]]


async def _fill(path: Path) -> None:
    store = open_store(sqlite=path)
    now = time.time()
    for qid, recipients, admin_only in (("q-a", ["bob@a.test"], False), ("q-b", ["eve@b.test"], False),
                                        ("q-ab", ["bob@a.test", "eve@b.test", "ann@a.test"], False),
                                        ("q-virus", ["bob@a.test"], True)):
        await store.hold(Held(id=qid, node="n", time=now, expires=now + 600, sender="s@x.test", size=3,
                              record={"id": qid, "sender": "s@x.test", "recipients": recipients},
                              recipients=dict.fromkeys(recipients, "held"), subject=f"subject {qid}",
                              decided_by="clamav" if admin_only else "score", admin_only=admin_only),
                         [CONTENT % qid.encode()])
    await store.close()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start the console with a learning plugin and the lists plugin on the allow table given."""
    async def start(allow_table: str = "{type: file, file: allow}", more: str = "") -> str:
        port = free_port()
        (tmp_path / "learners.py").write_text(LEARNERS)
        sys.modules.pop("learners", None)  # this test's module (it writes next to itself), not an earlier one
        if not (tmp_path / "allow").exists():
            (tmp_path / "allow").write_text(ALLOW_LIST)
        console_files(
            tmp_path, port,
            f"quarantine:\n  path: q\nlogin_throttle:\n  initial_delay: 0\nplugin_paths: [{tmp_path}]\n"
            f"tables:\n  allow: {allow_table}\n"
            "plugins:\n  - {name: notebook, use: 'learners:Notebook'}\n  - {name: lists, settings: {allow: allow}}\n"
            + more)
        if not (tmp_path / "store.db").exists():
            await _fill(tmp_path / "store.db")
        return await servers.enter_async_context(console_at(tmp_path / "cfg.yaml", port))

    async with contextlib.AsyncExitStack() as servers:
        yield start


async def test_a_recipient_reports_and_allows_only_their_own_mail(start: Start, tmp_path: Path) -> None:
    bob, csrf = await _signed_in(await start(), "bob@a.test")
    try:
        page = (await bob.get("/console/quarantine/q-a")).text
        assert "Report as spam" in page and "Not spam: release" in page and "Release and allow sender" in page
        assert 'name="scope"' not in page  # a recipient allows for themselves only
        # Another recipient's message, by changing the id; another recipient of a shared one.
        for qid, extra in (("q-b", {}), ("q-ab", {"recipient": "eve@b.test"}), ("nosuch", {})):
            for action, form in (("report", {"verdict": "spam"}), ("allow", {})):
                reply = await bob.post(f"/console/quarantine/{qid}/{action}", data={"csrf": csrf, **form, **extra})
                assert reply.status_code == 404, (qid, action)
        reply = await bob.post("/console/quarantine/q-a/allow", data={"csrf": csrf, "scope": "domain"})
        assert reply.status_code == 404  # a domain-wide entry is not a recipient's to make
        assert notebook(tmp_path) == [] and maildir(tmp_path) == []
        assert (tmp_path / "allow").read_text() == ALLOW_LIST

        reply = await bob.post("/console/quarantine/q-a/report", data={"csrf": csrf, "verdict": "spam"})
        assert reply.status_code == 200 and "notebook: noted as spam" in reply.text
        assert notebook(tmp_path) == [{"verdict": "spam", "subject": "q-a",
                                       "reporter": "recipient:bob@a.test", "recipients": ["bob@a.test"]}]
        reply = await bob.post("/console/quarantine/q-ab/allow", data={"csrf": csrf, "recipient": "bob@a.test"})
        assert reply.status_code == 200, reply.text
        assert "s@x.test is now on the allow list of bob@a.test" in reply.text
        assert (tmp_path / "allow").read_text() == ALLOW_LIST + "bob@a.test  s@x.test\n"
        [delivered] = maildir(tmp_path)
        assert b"Subject: q-ab" in delivered
        reply = await bob.post("/console/quarantine/q-a/report", data={"csrf": csrf, "verdict": "ham-release"})
        assert reply.status_code == 200 and "q-a: released for bob@a.test" in reply.text
        assert len(maildir(tmp_path)) == 2 and notebook(tmp_path)[-1]["verdict"] == "ham"
        # Released, the message (kept by the store) can still be reported, not released again.
        page = (await bob.get("/console/quarantine/q-a")).text
        assert "Report as spam" in page and "Not spam: release" not in page
        assert "Release and allow sender" not in page
    finally:
        await bob.aclose()
    admin, _ = await _signed_in(await start(), "root")  # the same store: the audit log has it all
    try:
        audit = (await admin.get("/console/audit")).text
        for action in ("report_spam", "report_ham", "allow_sender", "release"):
            assert f"<td>{action}</td>" in audit, action
    finally:
        await admin.aclose()


async def test_no_learning_or_allowing_by_get_or_without_csrf(start: Start, tmp_path: Path) -> None:
    base = await start()
    client, csrf = await _signed_in(base, "root")
    try:
        for action in ("report", "allow"):
            assert (await client.get(f"/console/quarantine/q-a/{action}?verdict=spam")).status_code == 405
            assert (await client.post(f"/console/quarantine/q-a/{action}", data={"verdict": "spam"})).status_code == 403
            wrong = {"csrf": csrf + "x", "verdict": "spam"}
            assert (await client.post(f"/console/quarantine/q-a/{action}", data=wrong)).status_code == 403
            reply = await client.post(f"/console/quarantine/q-a/{action}", data={"csrf": csrf, "verdict": "spam"},
                                      headers={"origin": "https://evil.example"})
            assert reply.status_code == 403
        reply = await client.post("/console/quarantine/q-a/report", data={"csrf": csrf, "verdict": "maybe"})
        assert reply.status_code == 400
    finally:
        await client.aclose()
    anonymous = httpx.AsyncClient(base_url=base)
    try:
        assert (await anonymous.post("/console/quarantine/q-a/report", data={"verdict": "spam"})).status_code == 403
    finally:
        await anonymous.aclose()
    assert notebook(tmp_path) == [] and maildir(tmp_path) == []
    assert (tmp_path / "allow").read_text() == ALLOW_LIST


async def test_a_virus_hold_is_reported_as_spam_only_by_a_recipient(start: Start, tmp_path: Path) -> None:
    base = await start()
    bob, csrf = await _signed_in(base, "bob@a.test")
    try:
        page = (await bob.get("/console/quarantine/q-virus")).text
        assert "Report as spam" in page and "Not spam" not in page and "Release and allow sender" not in page
        for action, form in (("report", {"verdict": "ham"}), ("report", {"verdict": "ham-release"}),
                             ("allow", {})):
            reply = await bob.post(f"/console/quarantine/q-virus/{action}", data={"csrf": csrf, **form})
            assert reply.status_code == 403 and "only an administrator" in reply.text, (action, form)
        assert maildir(tmp_path) == [] and notebook(tmp_path) == []
        assert (tmp_path / "allow").read_text() == ALLOW_LIST
        reply = await bob.post("/console/quarantine/q-virus/report", data={"csrf": csrf, "verdict": "spam"})
        assert reply.status_code == 200 and [n["verdict"] for n in notebook(tmp_path)] == ["spam"]
    finally:
        await bob.aclose()


async def test_a_domain_admin_allows_for_their_domain_only(start: Start, tmp_path: Path) -> None:
    host, csrf = await _signed_in(await start(), "host-a")
    try:
        page = (await host.get("/console/quarantine/q-ab")).text
        assert 'name="scope"' in page and "eve@b.test" not in page
        reply = await host.post("/console/quarantine/q-ab/allow", data={"csrf": csrf, "scope": "domain"})
        assert reply.status_code == 200, reply.text
        assert "s@x.test is now on the allow list of @a.test" in reply.text
        # bob and ann (a.test) released, one entry for their domain; eve (b.test) untouched.
        assert (tmp_path / "allow").read_text() == ALLOW_LIST + "@a.test  s@x.test\n"
        assert len(maildir(tmp_path)) == 1
        reply = await host.post("/console/quarantine/q-ab/allow", data={"csrf": csrf, "scope": "galaxy"})
        assert reply.status_code == 404
    finally:
        await host.aclose()


async def test_reports_and_allow_entries_follow_each_recipients_policy_group(start: Start, tmp_path: Path) -> None:
    # b.test's group has no learner and its own allow table (b_allow, next to allow in tables:).
    (tmp_path / "b_allow").write_text("")
    more = ("policies:\n  - {name: b, recipients: [b.test], plugins: {notebook: {enabled: false}, "
            "lists: {settings: {allow: b_allow}}}}\n")
    admin, csrf = await _signed_in(await start("{type: file, file: allow}\n  b_allow: {type: file, file: b_allow}",
                                               more), "root")
    try:
        reply = await admin.post("/console/quarantine/q-ab/report", data={"csrf": csrf, "verdict": "spam"})
        assert reply.status_code == 200, reply.text
        assert [sorted(n["recipients"]) for n in notebook(tmp_path)] == [["ann@a.test", "bob@a.test"]]  # not eve's
        reply = await admin.post("/console/quarantine/q-ab/allow", data={"csrf": csrf})
        assert reply.status_code == 200, reply.text
        assert (tmp_path / "allow").read_text() == ALLOW_LIST + "ann@a.test  s@x.test\nbob@a.test  s@x.test\n"
        assert (tmp_path / "b_allow").read_text() == "eve@b.test  s@x.test\n"
    finally:
        await admin.aclose()


async def test_a_selector_table_that_is_down_teaches_and_allows_nothing(start: Start, tmp_path: Path) -> None:
    down = free_port()  # nothing listens there: the Redis is down
    more = "policies:\n  - {name: staff, recipients: ['table:staff'], plugins: {notebook: {enabled: false}}}\n"
    admin, csrf = await _signed_in(await start(
        f"{{type: file, file: allow}}\n  staff: {{type: redis, url: 'redis://127.0.0.1:{down}/0', timeout: 0.5}}",
        more), "root")
    try:
        reply = await admin.post("/console/quarantine/q-a/report", data={"csrf": csrf, "verdict": "spam"})
        assert reply.status_code == 502 and "the policy group of bob@a.test is unknown" in reply.text
        reply = await admin.post("/console/quarantine/q-a/allow", data={"csrf": csrf})
        assert reply.status_code == 503 and "nothing was released" in reply.text, reply.text
        assert notebook(tmp_path) == [] and maildir(tmp_path) == []  # never the default group's
        assert (tmp_path / "allow").read_text() == ALLOW_LIST
    finally:
        await admin.aclose()


async def test_no_allow_button_where_the_table_cannot_be_written(start: Start, tmp_path: Path) -> None:
    admin, csrf = await _signed_in(await start("{type: inline, entries: {x: y}}"), "root")
    try:
        page = (await admin.get("/console/quarantine/q-a")).text
        assert "Release and allow sender" not in page and "Report as spam" in page
        reply = await admin.post("/console/quarantine/q-a/allow", data={"csrf": csrf})
        assert reply.status_code == 409 and "(inline) is not writable here" in reply.text
        assert maildir(tmp_path) == []  # nothing released either
    finally:
        await admin.aclose()


@pytest.mark.parametrize("sender", ['"x,gmail.com,y"@attacker.test', '"x gmail.com"@attacker.test'])
async def test_a_from_address_the_allow_table_would_split_is_not_allowed(
    start: Start, tmp_path: Path, sender: str
) -> None:
    # The table's entries are split at commas and white space (as the lists plugin reads them):
    # such a From: would put "gmail.com" itself on the recipient's allow list.
    await _fill(tmp_path / "store.db")
    store = open_store(sqlite=tmp_path / "store.db")
    now = time.time()
    await store.hold(Held(id="q-split", node="n", time=now, expires=now + 600, sender="s@x.test", size=3,
                          record={"id": "q-split", "sender": "s@x.test", "recipients": ["bob@a.test"]},
                          recipients={"bob@a.test": "held"}, subject="split", decided_by="score"),
                     [f"From: <{sender}>\r\nTo: bob@a.test\r\nSubject: split\r\n\r\nHi.\r\n".encode()])
    await store.close()
    bob, csrf = await _signed_in(await start(), "bob@a.test")
    try:
        page = (await bob.get("/console/quarantine/q-split")).text
        assert "Report as spam" in page and "Release and allow sender" not in page
        reply = await bob.post("/console/quarantine/q-split/allow", data={"csrf": csrf})
        assert reply.status_code == 409, reply.text
        assert (tmp_path / "allow").read_text() == ALLOW_LIST
        assert maildir(tmp_path) == []  # nothing released either
    finally:
        await bob.aclose()
