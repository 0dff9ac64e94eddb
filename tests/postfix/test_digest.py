"""Digests and release links end to end: a proxy quarantines into a private PostgreSQL,
``smtpproxy digest`` mails the recipient through the tests' real Postfix, and the link in
the Maildir releases the message exactly once through ``smtpproxy web`` (served by uvicorn
on a loopback port). A second click, an expired, a tampered and a foreign link are refused;
a GET never acts."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from smtpproxy import Verdict, hookimpl
from smtpproxy.config import load_config
from smtpproxy.digest import printable
from smtpproxy.links import Link, LinkError, LinkSigner
from smtpproxy.web.serve import make_server
from tests.conftest import ProxyFactory, Talk, port_of
from tests.daemons import free_port
from tests.postfix_instance import PostfixFactory, PostfixInstance
from tests.postgres_server import PostgresServer

EXE = [sys.executable, "-m", "smtpproxy"]
KEY = "a" * 64
BODY = b"From: s@bad.example\r\nTo: bob@dest.test\r\nSubject: %s\r\n\r\nHeld text.\r\n"


class Hold:
    """Quarantines every message; as 'clamav' (admin only) when the subject says virus."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def data(self, message: Any) -> Verdict | None:
        is_virus = "virus" in (message.get("Subject") or "")
        if (self.name == "clamav") == is_virus:
            return Verdict.quarantine("Eicar-Test-Signature" if is_virus else "score 9.5: PILLS")
        return None


def write_config(tmp_path: Path, postfix: PostfixInstance, url: str, web_port: int) -> Path:
    (tmp_path / "link.key").write_text(KEY)
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "hostname: proxy.test\n"
        f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {postfix.port}\n  tls: none\n"
        "quarantine:\n  admin_only: [clamav]\n"
        f"store:\n  postgresql: '{url}'\n  node: mx1\n"
        f"digest:\n  domains: [dest.test]\n  base_url: http://127.0.0.1:{web_port}\n"
        f"  keys: [link.key]\n  port: {web_port}\n"
    )
    return path


@pytest.fixture
async def web(tmp_path: Path, postfix_factory: PostfixFactory, postgres_server: PostgresServer,
              proxy_factory: ProxyFactory) -> AsyncIterator[tuple[Path, PostfixInstance, str]]:
    """Two messages quarantined for bob and alice (one held by clamav), the web app running."""
    postfix = postfix_factory()
    url = postgres_server.url(postgres_server.create_database())
    port = free_port()
    cfg = write_config(tmp_path, postfix, url, port)
    config, _ = load_config(str(cfg))
    proxy = await proxy_factory(Hold("score"), Hold("clamav"), relay={"domains": ["dest.test"]},
                                upstream=postfix.port, store=config.store.model_dump(),
                                quarantine={"admin_only": ["clamav"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    for subject in (b"Cheap <b>pills</b>\x1b[31m", b"a virus"):
        assert (await client.send_message("s@bad.example", ["bob@dest.test", "alice@dest.test"],
                                          BODY % subject))[0] == 250
    await client.close()
    server = make_server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the web app did not start"
        await asyncio.sleep(0.02)
    yield cfg, postfix, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


def links_in(message: bytes) -> dict[str, list[str]]:
    body = email.message_from_bytes(message, policy=email.policy.default).get_content()
    found: dict[str, list[str]] = {}
    for action, link in re.findall(r"^(Release|Delete): +(\S+)$", body, re.M):
        found.setdefault(action.lower(), []).append(link)
    return found


async def test_a_digest_arrives_and_its_link_releases_exactly_once(
        web: tuple[Path, PostfixInstance, str]) -> None:
    cfg, postfix, base = web
    sent = await asyncio.to_thread(subprocess.run, [*EXE, "digest", "-c", str(cfg)], capture_output=True,
                                   text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "2 digest(s) sent, 0 failed" in sent.stdout
    [digest] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    parsed = email.message_from_bytes(digest, policy=email.policy.default)
    assert parsed["Subject"] == "2 message(s) held for you in quarantine"
    assert parsed["Auto-Submitted"] == "auto-generated"
    text = parsed.get_content()
    assert "Subject: Cheap <b>pills</b> [31m" in text  # the escape character is gone
    assert "Held by a security check: only an administrator can release it." in text
    links = links_in(digest)
    assert len(links["release"]) == 1 and len(links["delete"]) == 1  # none for the virus
    release = links["release"][0]
    assert release.startswith(f"{base}/link/")
    async with httpx.AsyncClient(timeout=30) as http:
        shown = await http.get(release)  # what a URL scanner does: nothing happens
        assert shown.status_code == 200
        assert "Release this message?" in shown.text and "Cheap &lt;b&gt;pills&lt;/b&gt;" in shown.text
        assert shown.headers["cache-control"] == "no-store" and shown.headers["x-frame-options"] == "DENY"
        assert "form-action 'self'" in shown.headers["content-security-policy"]
        assert len(postfix.messages("bob")) == 1  # still only the digest
        token = unquote(release.rsplit("/", 1)[1])
        assert f'name="token" value="{token}"' in shown.text
        foreign = await http.post(f"{base}/link", data={"token": token}, headers={"Origin": "https://evil.test"})
        assert foreign.status_code == 403
        done = await http.post(f"{base}/link", data={"token": token}, headers={"Origin": base})
        assert done.status_code == 200 and "The message was released" in done.text, done.text
        released = await asyncio.to_thread(postfix.wait_for_messages, "bob", 2)
        assert b"Held text." in released[1] and b"Subject: Cheap" in released[1]
        again = await http.post(f"{base}/link", data={"token": token})
        assert again.status_code == 410 and "already released" in again.text
        assert (await http.get(release)).status_code == 410
        tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        assert (await http.post(f"{base}/link", data={"token": tampered})).status_code == 400
        signer = LinkSigner([KEY.encode()])
        link = signer.verify(token)
        expired = signer.sign(Link(link.recipient, link.qid, "release", time.time() - 1))
        refused = await http.post(f"{base}/link", data={"token": expired})
        assert refused.status_code == 400 and "expired" in refused.text
        other_key = LinkSigner([b"b" * 64]).sign(Link("alice@dest.test", link.qid, "release", time.time() + 99))
        assert (await http.post(f"{base}/link", data={"token": other_key})).status_code == 400
    await asyncio.sleep(0.5)
    assert len(postfix.messages("bob")) == 2  # exactly one release
    assert postfix.messages("alice")[1:] == []  # alice got her digest only: her copy stays held
    listing = await asyncio.to_thread(subprocess.run, [*EXE, "quarantine", "list", "--recipient",
                                                       "alice@dest.test", "-c", str(cfg)],
                                      capture_output=True, text=True, timeout=60)
    assert listing.stdout.endswith("2 message(s)\n"), listing.stdout


async def test_only_an_admin_releases_what_a_virus_check_held(web: tuple[Path, PostfixInstance, str]) -> None:
    cfg, postfix, base = web
    config, _ = load_config(str(cfg))
    from smtpproxy.store import Search, store_from_config

    store = store_from_config(config)
    assert store is not None
    [virus] = await store.held(Search(decided_by="clamav"))
    await store.close()
    assert virus.admin_only
    token = LinkSigner([KEY.encode()]).sign(Link("bob@dest.test", virus.id, "release", time.time() + 60))
    async with httpx.AsyncClient(timeout=30) as http:
        refused = await http.post(f"{base}/link", data={"token": token})
    assert refused.status_code == 403 and "only an administrator" in refused.text
    admin = await asyncio.to_thread(subprocess.run, [*EXE, "quarantine", "release", virus.id, "--recipient",
                                                     "bob@dest.test", "-c", str(cfg)],
                                    capture_output=True, text=True, timeout=60)
    assert admin.returncode == 0, admin.stdout
    await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)


async def test_delete_link_and_digest_dry_run(web: tuple[Path, PostfixInstance, str]) -> None:
    cfg, postfix, base = web
    dry = await asyncio.to_thread(subprocess.run, [*EXE, "digest", "--dry-run", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "--- alice@dest.test (2 message(s)): 2 message(s) held" in dry.stdout
    assert postfix.messages("alice") == []
    [delete] = re.findall(r"^--- alice@dest.test.*?^Delete: +(\S+)$", dry.stdout, re.M | re.S)
    async with httpx.AsyncClient(timeout=30) as http:
        token = unquote(delete.rsplit("/", 1)[1])
        assert "Delete this message?" in (await http.get(delete)).text
        done = await http.post(f"{base}/link", data={"token": token})
        assert done.status_code == 200 and "The message was deleted" in done.text
        assert (await http.post(f"{base}/link", data={"token": token})).status_code == 410
        assert (await http.get(f"{base}/healthz")).text == "ok\n"


def test_links_unit() -> None:
    signer = LinkSigner([b"new" * 11, b"old" * 11])
    old = LinkSigner([b"old" * 11])
    link = Link("bob@dest.test", "q1", "release", time.time() + 60)
    assert signer.verify(old.sign(link)) == link  # rotation: links of the old key still work
    with pytest.raises(LinkError):
        old.verify(signer.sign(link))  # new links are signed with the new key
    with pytest.raises(LinkError):
        signer.verify("garbage")
    assert printable("a\r\nb\x00c" + "x" * 300, 20) == "a b c" + "x" * 12 + "..."
