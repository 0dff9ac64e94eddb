"""The web console over HTTP as an attacker meets it (the browser tests are in
tests/postfix/test_console_browser.py): roles and scopes, CSRF, no state change on GET, no open
redirect, the accounts file's errors, the audit log and the store's domain scope."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.auth import PasswordFileError
from smtpproxy.store import Held, HistoryEntry, Search, open_store
from smtpproxy.web.accounts import Accounts, Viewer
from smtpproxy.web.preview import preview, sanitise
from tests.console_server import HASH, console_at, console_files
from tests.daemons import free_port


async def _fill(path: Path) -> None:
    store = open_store(sqlite=path)
    now = time.time()
    for qid, recipients in (("q-a", ["bob@a.test"]), ("q-b", ["eve@b.test"]), ("q-ab", ["bob@a.test", "eve@b.test"])):
        await store.hold(Held(id=qid, node="n", time=now, expires=now + 600, sender="s@x.test", size=3,
                              record={"id": qid, "sender": "s@x.test", "recipients": recipients},
                              recipients=dict.fromkeys(recipients, "held"), subject=f"subject {qid}"), [b"x\r\n"])
    await store.add_history([
        HistoryEntry(id=f"h-{qid}", time=now, node="n", sender="s@x.test", recipients=recipients,
                     decision="quarantined", subject=f"subject {qid}", quarantine_id=qid)
        for qid, recipients in (("q-a", ["bob@a.test"]), ("q-b", ["eve@b.test"]))])
    await store.close()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    console_files(tmp_path, port, "login_throttle:\n  initial_delay: 0\n")
    await _fill(tmp_path / "store.db")
    async with console_at(tmp_path / "cfg.yaml", port) as base:
        yield base


async def _signed_in(base: str, name: str) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(base_url=base)
    reply = await client.post("/console/login", data={"name": name, "password": "pw"})
    assert reply.status_code == 303 and reply.headers["location"] == "/console"
    page = (await client.get("/console/quarantine")).text
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match is not None
    return client, match.group(1)


async def test_each_role_sees_its_own_scope_and_other_ids_are_404(console: str) -> None:
    admin, _ = await _signed_in(console, "root")
    domain, csrf = await _signed_in(console, "host-a")
    bob, bob_csrf = await _signed_in(console, "bob@a.test")
    try:
        everything = (await admin.get("/console/quarantine")).text
        assert all(f"subject {q}" in everything for q in ("q-a", "q-b", "q-ab"))
        listed = (await domain.get("/console/quarantine")).text
        assert "subject q-a" in listed and "subject q-ab" in listed and "subject q-b" not in listed
        assert "eve@b.test" not in listed  # the other domain's recipient of a shared message is not shown
        assert (await domain.get("/console/quarantine/q-b")).status_code == 404
        assert (await domain.get("/console/audit")).status_code == 404
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert "subject q-b" in (await admin.get(f"/console/history?since={today}&until={today}")).text
        assert "Nothing found" in (await admin.get("/console/history?until=2000-01-01")).text
        history = (await domain.get("/console/history")).text
        assert "subject q-a" in history and "subject q-b" not in history
        # A domain admin acts for their domain's recipients only: asking for another is a 404.
        reply = await domain.post("/console/quarantine/q-ab/delete", data={"csrf": csrf, "recipient": "eve@b.test"})
        assert reply.status_code == 404
        reply = await domain.post("/console/quarantine/q-ab/delete", data={"csrf": csrf, "recipient": "bob@a.test"})
        assert reply.status_code == 200 and "deleted for bob@a.test" in reply.text
        assert (await bob.get("/console/quarantine/q-b")).status_code == 404
        reply = await bob.post("/console/bulk", data={"csrf": bob_csrf, "action": "delete", "qid": ["q-b", "q-a"]})
        assert "q-b: not found" in reply.text and "q-a: deleted for bob@a.test" in reply.text
        audit = (await admin.get("/console/audit")).text
        assert "domain:host-a" in audit and "recipient:bob@a.test" in audit
    finally:
        for client in (admin, domain, bob):
            await client.aclose()


async def test_the_overview_counts_the_decisions_the_proxy_records(console: str) -> None:
    """Its columns are the dispositions a Decision has (what the history keeps), not verdict names."""
    admin, _ = await _signed_in(console, "root")
    try:
        page = (await admin.get("/console")).text
    finally:
        await admin.aclose()
    head = re.findall(r"<th>([^<]*)</th>", page.split("</thead>")[0])
    assert head == ["Day (UTC)", "delivered", "quarantined", "discarded", "rejected", "tempfailed"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    row = re.search(rf"<tr><td>{today}</td>(.*?)</tr>", page)
    assert row is not None
    counts = [int(n) for n in re.findall(r"<td>(\d+) <span", row.group(1))]
    assert counts == [0, 2, 0, 0, 0]  # _fill's two quarantined messages


async def test_history_is_searched_by_policy_group_within_the_viewers_scope(
        console: str, tmp_path: Path) -> None:
    store = open_store(sqlite=tmp_path / "store.db")
    await store.add_history([HistoryEntry(
        id="h-g", time=time.time(), node="n", sender="s@x.test", recipients=["bob@a.test", "eve@b.test"],
        decision="delivered", subject="grouped", policy_group="tenant-a,tenant-b",
        groups={"bob@a.test": "tenant-a", "eve@b.test": "tenant-b"})])
    await store.close()
    admin, _ = await _signed_in(console, "root")
    domain, _ = await _signed_in(console, "host-a")
    try:
        page = (await admin.get("/console/history?policy_group=tenant-b")).text
        assert "<th>Group</th>" in page and 'name="policy_group"' in page
        assert "grouped" in page and "subject q-a" not in page and "<td>tenant-a, tenant-b</td>" in page
        assert "Nothing found" in (await admin.get("/console/history?policy_group=tenant-c")).text
        assert "<td></td>" in (await admin.get("/console/history")).text  # entries recorded without groups
        mine = (await domain.get("/console/history?policy_group=tenant-a")).text
        assert "grouped" in mine and "<td>tenant-a</td>" in mine and "tenant-b" not in mine
        # Another tenant's group finds nothing for a domain admin, though eve's message is bob's too.
        assert "Nothing found" in (await domain.get("/console/history?policy_group=tenant-b")).text
    finally:
        for client in (admin, domain):
            await client.aclose()


async def test_no_state_change_without_csrf_or_session_and_no_open_redirect(console: str) -> None:
    client, csrf = await _signed_in(console, "root")
    try:
        assert (await client.get("/console/quarantine/q-a/delete")).status_code == 405  # GET changes nothing
        assert (await client.post("/console/quarantine/q-a/delete", data={"recipient": "bob@a.test"})).status_code == 403
        wrong = {"csrf": csrf + "x", "recipient": "bob@a.test"}
        assert (await client.post("/console/quarantine/q-a/delete", data=wrong)).status_code == 403
        other_site = {"origin": "https://evil.example"}
        reply = await client.post("/console/quarantine/q-a/delete", data={"csrf": csrf, "recipient": "bob@a.test"},
                                  headers=other_site)
        assert reply.status_code == 403
        assert (await client.post("/console/login", data={"name": "root", "password": "pw"},
                                  headers=other_site)).status_code == 403  # login CSRF too
        assert "subject q-a" in (await client.get("/console/quarantine")).text  # still held
        for path in ("/console/login?next=https://evil.example", "/console?next=//evil.example"):
            reply = await client.get(path)
            assert reply.headers.get("location", "/console").startswith("/console")
        reply = await client.get("/console/quarantine")
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["x-content-type-options"] == "nosniff"
    finally:
        await client.aclose()
    anonymous = httpx.AsyncClient(base_url=console)
    try:
        reply = await anonymous.get("/console/quarantine/q-a")
        assert reply.status_code == 303 and reply.headers["location"] == "/console/login"
        assert (await anonymous.post("/console/bulk", data={"action": "delete", "qid": "q-a"})).status_code == 403
        wrong = await anonymous.post("/console/login", data={"name": "root", "password": "nope"})
        unknown = await anonymous.post("/console/login", data={"name": "nobody", "password": "nope"})
        assert wrong.status_code == unknown.status_code == 401 and "set-cookie" not in wrong.headers
    finally:
        await anonymous.aclose()


def test_accounts_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts"
    for text, problem in ((f"root:{HASH}\n", "expected 'name:hash:role[:domains]'"),
                          (f"root:{HASH}:boss\n", "role must be admin, domain or recipient"),
                          (f"d:{HASH}:domain\n", "a domain admin needs domains"),
                          (f"bob:{HASH}:recipient\n", "a recipient's name is their address"),
                          ("root:plain:admin\n", "unsupported hash"),
                          (f"root:{HASH}:admin\nroot:{HASH}:admin\n", "defined twice")):
        path.write_text("# accounts\n" + text)
        with pytest.raises(PasswordFileError) as caught:
            Accounts.load(path)
        assert problem in str(caught.value) and str(caught.value).startswith(f"{path}:")
    path.write_text(f"h:{HASH}:domain:A.test, b.test\n")
    assert Accounts.load(path).viewers["h"] == Viewer("h", "domain", ("a.test", "b.test"))


async def test_the_store_scopes_by_domain_and_keeps_the_audit_log(tmp_path: Path) -> None:
    await _fill(tmp_path / "s.db")
    store = open_store(sqlite=tmp_path / "s.db")
    try:
        found = {h.id for h in await store.held(Search(domains=("a.test",)))}
        assert found == {"q-a", "q-ab"}
        assert await store.held(Search(domains=())) == []
        assert {h.id for h in await store.held(Search(domains=("_.test",)))} == set()  # LIKE wildcards are literal
        summary = await store.summarize_history(Search(domains=("b.test",)))
        assert summary.senders == [("s@x.test", 1)]
    finally:
        await store.close()


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_sanitised_html_has_nothing_active(markup: str) -> None:
    clean = sanitise(markup + "<script>x</script><img src=http://x/><a href='javascript:x' onclick=y>z</a>")
    lowered = clean.lower()
    assert "<script" not in lowered and "<img" not in lowered and "javascript:" not in lowered
    assert "onclick" not in lowered


def test_preview_lists_attachments_without_opening_them() -> None:
    shown = preview(b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                    b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/zip\r\n"
                    b"Content-Disposition: attachment; filename=\"a.zip\"\r\n\r\nPK\r\n--b--\r\n")
    assert shown.texts == ["hi"] and shown.attachments == [("a.zip", "application/zip", 2)]
    assert preview(b"\xff\xfe garbage without headers").headers == []
