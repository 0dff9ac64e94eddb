"""``smtpproxy web`` as an attacker meets it: a real process on loopback, SQLite store.
The end-to-end release through Postfix and PostgreSQL is in tests/postfix/test_digest.py."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeSerializer

from smtpproxy.config import Config
from smtpproxy.links import Link, LinkError, LinkSigner
from smtpproxy.store import Held, open_store
from tests.console_server import web_process
from tests.daemons import free_port

EXE = [sys.executable, "-m", "smtpproxy"]
KEY = b"k" * 64


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "link.key").write_bytes(KEY)
    port = free_port()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "delivery:\n  type: maildir\n  path: mail\nstore:\n  sqlite: store.db\n"
        f"digest:\n  domains: [dest.test]\n  base_url: https://q.example.com\n  keys: [link.key]\n  port: {port}\n")

    async def fill() -> None:
        store = open_store(sqlite=tmp_path / "store.db")
        await store.hold(Held(id="q1", node="n", time=time.time(), expires=2e9, sender="s@x.test", size=3,
                              record={"id": "q1", "sender": "s@x.test", "recipients": ["bob@dest.test"]},
                              recipients={"bob@dest.test": "held"}, subject="<script>alert(1)</script>"),
                         [b"x\r\n"])
        await store.close()

    asyncio.run(fill())
    log = tmp_path / "web.log"
    with web_process(cfg, port, log) as base:
        yield base
    assert "event=web_listening address=127.0.0.1" in log.read_text()


def token(action: str = "release", recipient: str = "bob@dest.test", expires: float | None = None) -> str:
    return LinkSigner([KEY]).sign(Link(recipient, "q1", action, expires or time.time() + 600))


def test_the_pages_escape_and_refuse_what_is_not_a_valid_link(web: str) -> None:
    shown = httpx.get(f"{web}/link/{token()}")
    assert shown.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown.text
    assert "<script>" not in shown.text
    assert "script-src" not in shown.headers["content-security-policy"]  # default-src 'none' forbids them
    assert httpx.get(f"{web}/link").status_code == 405  # acting needs a POST
    assert httpx.post(f"{web}/link/{token()}").status_code == 405  # and the token in the body
    assert httpx.post(f"{web}/link", data={}).status_code == 400
    assert httpx.post(f"{web}/link", data={"token": "x" * 5000}).status_code == 400
    forged_action = URLSafeSerializer([KEY], salt="smtpproxy.release-link.v1").dumps(
        ["bob@dest.test", "q1", "release_all", time.time() + 60])
    assert httpx.post(f"{web}/link", data={"token": forged_action}).status_code == 400
    other_recipient = httpx.post(f"{web}/link", data={"token": token(recipient="mallory@dest.test")})
    assert other_recipient.status_code == 410  # not a recipient of that message
    assert httpx.get(f"{web}/link/{token()}").status_code == 200  # nothing of that changed anything
    done = httpx.post(f"{web}/link", data={"token": token()}, headers={"Origin": "https://q.example.com"})
    assert done.status_code == 200, done.text


def test_defaults_bind_to_localhost() -> None:
    assert Config().digest.address == "127.0.0.1"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_link_error_never_a_crash(text: str) -> None:
    with pytest.raises(LinkError):
        LinkSigner([KEY]).verify(text)


@settings(max_examples=50, deadline=None)
@given(st.emails(), st.sampled_from(["release", "delete"]), st.integers(0, 60))
def test_any_change_to_a_signed_link_breaks_it(recipient: str, action: str, where: int) -> None:
    signer = LinkSigner([KEY])
    signed = signer.sign(Link(recipient, "q1", action, time.time() + 60))
    assert signer.verify(signed).recipient == recipient
    position = where % len(signed)
    changed = signed[:position] + ("A" if signed[position] != "A" else "B") + signed[position + 1:]
    try:
        link = signer.verify(changed)
    except LinkError:
        return
    # base64 padding bits: a different string can decode to the same bytes; it must mean the same
    assert (link.recipient, link.action) == (recipient, action)
