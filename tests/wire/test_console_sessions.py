"""The console's sessions kept on the server (smtpproxy/web/sessions.py), as an attacker
meets them: a cookie copied before its owner signed out, or before a new sign-in in the same
browser, opens nothing; an admin sees who is signed in and ends sessions (others get 404);
a restart ends them all. The table's own bounds: tests/unit/test_session_table.py."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.console_server import console_at, console_files
from tests.daemons import free_port
from tests.wire.test_console import _signed_in

COOKIE = "smtpproxy_console"


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()
    return console_files(tmp_path, port, "login_throttle:\n  initial_delay: 0\n"), port


@pytest.fixture
async def console(config: tuple[Path, int]) -> AsyncIterator[str]:
    async with console_at(*config) as base:
        yield base


async def _opens(base: str, cookie: str, path: str = "/console/quarantine") -> bool:
    """Whether a browser holding only *cookie* gets the page (not the sign-in)."""
    async with httpx.AsyncClient(base_url=base, cookies={COOKIE: cookie}) as thief:
        reply = await thief.get(path)
    assert reply.status_code in (200, 303), reply.status_code
    return reply.status_code == 200


def _session_id(cookie: str) -> str:
    """The id inside the signed cookie (itsdangerous: base64 JSON, timestamp, signature)."""
    payload = cookie.partition(".")[0]
    data = json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))
    return str(data["sid"])


async def test_a_cookie_kept_from_before_sign_out_opens_nothing(console: str) -> None:
    admin, csrf = await _signed_in(console, "root")
    kept = admin.cookies[COOKIE]
    assert await _opens(console, kept, "/console/audit")
    reply = await admin.post("/console/logout", data={"csrf": csrf})
    assert reply.status_code == 303 and reply.headers["location"] == "/console/login"
    await admin.aclose()
    assert not await _opens(console, kept, "/console/audit")
    assert not await _opens(console, kept)


async def test_a_new_sign_in_ends_the_browsers_old_session(console: str) -> None:
    """No fixation: the cookie the browser had before signing in again is worth nothing."""
    client, _ = await _signed_in(console, "root")
    before = client.cookies[COOKIE]
    reply = await client.post("/console/login", data={"name": "bob@a.test", "password": "pw"})
    assert reply.status_code == 303
    after = client.cookies[COOKIE]
    await client.aclose()
    assert not await _opens(console, before)
    assert await _opens(console, after)
    assert _session_id(after) != _session_id(before)


async def test_an_admin_sees_who_is_signed_in_and_ends_one_session(console: str) -> None:
    admin, csrf = await _signed_in(console, "root")
    bob, _ = await _signed_in(console, "bob@a.test")
    try:
        page = (await admin.get("/console/sessions")).text
        assert '<a href="/console/sessions">Sessions</a>' in page
        rows = re.findall(r"<tr><td>(.*?)</tr>", page)
        assert len(rows) == 2
        assert rows[0].startswith("root <em>(this session)</em>")  # the most recently seen first
        assert rows[1].startswith("bob@a.test</td><td>recipient</td><td>password</td><td>127.0.0.1</td>")
        # The page names sessions by handle; the cookie's secret id is nowhere on it.
        assert _session_id(bob.cookies[COOKIE]) not in page
        assert _session_id(admin.cookies[COOKIE]) not in page
        [handle] = re.findall(r'name="handle" value="([0-9a-f]+)">', rows[1])
        reply = await admin.post("/console/sessions/end", data={"csrf": csrf, "handle": handle})
        assert reply.status_code == 200 and "Ended 1 session of bob@a.test." in reply.text
        [left] = re.findall(r"<tr><td>(.*?)</tr>", reply.text)
        assert left.startswith("root <em>(this session)</em>")
        assert (await bob.get("/console/quarantine")).status_code == 303
        again = await admin.post("/console/sessions/end", data={"csrf": csrf, "handle": handle})
        assert "No such session (it has ended already)." in again.text
        audit = (await admin.get("/console/audit")).text
        assert "end_session" in audit and "recipient:bob@a.test by password from 127.0.0.1" in audit
    finally:
        await admin.aclose()
        await bob.aclose()


async def test_an_admin_ends_every_session_of_a_name(console: str) -> None:
    admin, csrf = await _signed_in(console, "root")
    first, _ = await _signed_in(console, "host-a")
    second, _ = await _signed_in(console, "host-a")
    bob, _ = await _signed_in(console, "bob@a.test")
    try:
        reply = await admin.post("/console/sessions/end", data={"csrf": csrf, "name": "host-a"})
        assert "Ended 2 sessions of host-a." in reply.text
        assert (await first.get("/console")).status_code == 303
        assert (await second.get("/console")).status_code == 303
        assert (await bob.get("/console")).status_code == 200  # nobody else's
        reply = await admin.post("/console/sessions/end", data={"csrf": csrf, "name": "host-a"})
        assert "host-a has no session." in reply.text
        # Their own: the admin is signed out at once.
        reply = await admin.post("/console/sessions/end", data={"csrf": csrf, "name": "root"})
        assert reply.status_code == 303 and reply.headers["location"] == "/console/login"
        assert (await admin.get("/console/sessions")).status_code == 303
    finally:
        for client in (admin, first, second, bob):
            await client.aclose()


async def test_only_an_admin_sees_or_ends_sessions(console: str) -> None:
    admin, admin_csrf = await _signed_in(console, "root")
    domain, csrf = await _signed_in(console, "host-a")
    bob, bob_csrf = await _signed_in(console, "bob@a.test")
    try:
        for client, token in ((domain, csrf), (bob, bob_csrf)):
            assert (await client.get("/console/sessions")).status_code == 404
            assert "/console/sessions" not in (await client.get("/console")).text
            reply = await client.post("/console/sessions/end", data={"csrf": token, "name": "root"})
            assert reply.status_code == 404
        # An admin's form without the session's CSRF token ends nothing either.
        reply = await admin.post("/console/sessions/end", data={"name": "host-a"})
        assert reply.status_code == 403
        reply = await admin.post("/console/sessions/end", data={"csrf": csrf, "name": "host-a"})
        assert reply.status_code == 403  # another session's token
        assert (await admin.get("/console")).status_code == 200
        assert (await domain.get("/console")).status_code == 200
        assert admin_csrf != csrf
    finally:
        for client in (admin, domain, bob):
            await client.aclose()


async def test_a_restart_ends_every_session(config: tuple[Path, int]) -> None:
    async with console_at(*config) as base:
        admin, _ = await _signed_in(base, "root")
        kept = admin.cookies[COOKIE]
        await admin.aclose()
        assert await _opens(base, kept)
    async with console_at(*config) as base:
        assert not await _opens(base, kept)
