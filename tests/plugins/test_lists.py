"""The lists plugin (plugins/lists.py): per-recipient block lists at RCPT, and allow lists that
count only for an authenticated sender, from lookup tables, through the real listener."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtpproxy_plugins.lists import Lists, ListsSettings, entry_matches

from smtpproxy import AuthCheck, Message, Session, Transaction, Verdict, hookimpl, record_auth_check
from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain
from smtpproxy.server import ProxyServer
from smtpproxy.startup import StartupError
from tests.conftest import ProxyFactory, Talk, chain_of, maildir_messages, make_config, port_of


def test_entries() -> None:
    assert entry_matches("friend@partner.test", "Friend@Partner.TEST")
    assert not entry_matches("friend@partner.test", "other@partner.test")
    assert entry_matches("partner.test", "x@partner.test") and entry_matches("@partner.test", "x@PARTNER.test")
    assert not entry_matches("partner.test", "x@sub.partner.test")
    assert entry_matches("*.partner.test", "x@sub.partner.test")
    assert not entry_matches("*.partner.test", "x@partner.test")
    assert not entry_matches("*.partner.test", "x@notpartner.test")


@given(st.emails())
def test_a_domain_entry_matches_exactly_its_addresses(address: str) -> None:
    domain = address.rpartition("@")[2]
    assert entry_matches(domain, address) and entry_matches("@" + domain, address)
    assert entry_matches(address, address)
    assert not entry_matches("x" + domain, address) or ("x" + domain).lower() == domain.lower()


class Authenticate:
    """Stands in for spf/dkim/dmarc: records what an X-Test-Auth header says (method result domain)."""

    name = "auth"

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> None:
        for value in message.get_all("X-Test-Auth"):
            method, result, domain = value.split()
            key = {"dmarc": "header.from", "dkim": "header.d", "spf": "smtp.mailfrom"}[method]
            record_auth_check(transaction, AuthCheck(method, result, "", {key: domain}))


class Spammy:
    """A content check after lists: quarantines unless the score is below 0 (lists' allow)."""

    name = "spammy"

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        if transaction.results.score < 0 and "lists:allow" in transaction.results.tags:
            return None
        return Verdict.reject("Looks like spam", reason="spammy")


def lists(**settings: Any) -> Lists:
    return Lists(ListsSettings(**settings))


TABLES = {
    "block": {"type": "inline", "entries": {
        "bob@dest.test": "spammer@bad.test, *.evil.test",
        "dest.test": "@worse.test",
    }},
    "allow": {"type": "inline", "entries": {
        "bob@dest.test": ["partner.test", "friend@other.test"],
        ".dest.test": "sub-partner.test",
    }},
}


async def rcpt_replies(proxy: ProxyServer, sender: str, *recipients: str) -> list[int]:
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
    codes = [(await client.cmd(f"RCPT TO:<{r}>"))[0] for r in recipients]
    await client.close()
    return codes


async def test_block_entries_refuse_that_recipient_only(proxy_factory: ProxyFactory) -> None:
    proxy = await proxy_factory(lists(block="block"), tables=TABLES,
                                relay={"domains": ["dest.test", "sub.dest.test"]})
    assert await rcpt_replies(proxy, "spammer@bad.test", "bob@dest.test", "carol@dest.test") == [550, 250]
    assert await rcpt_replies(proxy, "Spammer@BAD.test", "bob+tag@dest.test") == [550]  # bob's list
    assert await rcpt_replies(proxy, "x@mx.evil.test", "bob@dest.test", "carol@dest.test") == [550, 250]
    assert await rcpt_replies(proxy, "y@worse.test", "bob@dest.test", "carol@dest.test") == [550, 550]
    assert await rcpt_replies(proxy, "y@worse.test", "dave@sub.dest.test") == [250]  # 'dest.test' only
    assert await rcpt_replies(proxy, "", "bob@dest.test") == [250]  # the null sender: never blocked
    client = await Talk.open(port_of(proxy))
    await client.hello()
    await client.cmd("MAIL FROM:<spammer@bad.test>")
    assert await client.cmd("RCPT TO:<bob@dest.test>") == (
        550, "5.7.1 Sender blocked by the recipient's block list")
    await client.close()


@pytest.mark.parametrize(
    ("auth", "frm", "recipients", "delivered"),
    [
        ("dmarc pass partner.test", "Partner <news@partner.test>", ["bob@dest.test"], True),
        ("dkim pass partner.test", "news@partner.test", ["bob@dest.test"], True),
        ("spf pass bounce@partner.test", "news@partner.test", ["bob@dest.test"], True),
        ("dmarc pass other.test", "friend@other.test", ["bob@dest.test"], True),
        ("dmarc pass sub-partner.test", "a@sub-partner.test", ["x@sub.dest.test"], True),  # .parent key
        # Forged: the allow entry matches but nothing authenticates the author's domain.
        (None, "news@partner.test", ["bob@dest.test"], False),
        ("dmarc fail partner.test", "news@partner.test", ["bob@dest.test"], False),
        ("dkim pass elsewhere.test", "news@partner.test", ["bob@dest.test"], False),
        ("dkim pass sub.partner.test", "news@partner.test", ["bob@dest.test"], False),  # strict
        ("dmarc pass other.test", "someone@other.test", ["bob@dest.test"], False),  # not the entry
        # One recipient without the entry: one verdict serves both, so no allow.
        ("dmarc pass partner.test", "news@partner.test", ["bob@dest.test", "carol@dest.test"], False),
    ],
)
async def test_an_allow_entry_counts_only_for_an_authenticated_author(
    proxy_factory: ProxyFactory, tmp_path: Path, *, auth: str | None, frm: str, recipients: list[str],
    delivered: bool,
) -> None:
    proxy = await proxy_factory(Authenticate(), lists(allow="allow"), Spammy(), tables=TABLES,
                                relay={"domains": ["dest.test", "sub.dest.test"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    headers = f"From: {frm}\r\n" + (f"X-Test-Auth: {auth}\r\n" if auth else "")
    code, _ = await client.send_message("bounce@partner.test", recipients,
                                        f"{headers}Subject: s\r\n\r\nbody\r\n".encode())
    await client.close()
    assert (code == 250) is delivered
    assert len(maildir_messages(tmp_path / "mail")) == (1 if delivered else 0)


async def test_allow_never_overrides_a_verdict_unless_accept_is_configured(proxy_factory: ProxyFactory) -> None:
    """The default (score) leaves a later refusal standing; allow_action: accept ends the DATA
    chain, so only what comes before it in the chain still decides."""

    class Virus:
        name = "virus"

        @hookimpl
        def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict:
            return Verdict.reject("Virus found", reason="eicar")

    body = b"From: news@partner.test\r\nX-Test-Auth: dmarc pass partner.test\r\n\r\nx\r\n"
    for action, expected in (("score", 550), ("accept", 250)):
        proxy = await proxy_factory(Authenticate(), lists(allow="allow", allow_action=action), Virus(),
                                    tables=TABLES, relay={"domains": ["dest.test"]})
        client = await Talk.open(port_of(proxy))
        await client.hello()
        assert (await client.send_message("a@partner.test", ["bob@dest.test"], body))[0] == expected
        await client.close()
    proxy = await proxy_factory(Authenticate(), Virus(), lists(allow="allow", allow_action="accept"),
                                tables=TABLES, relay={"domains": ["dest.test"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.send_message("a@partner.test", ["bob@dest.test"], body))[0] == 550
    await client.close()


async def test_a_table_that_cannot_answer_tempfails(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    db = tmp_path / "block.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE block (k TEXT, v TEXT)")
    conn.close()
    tables = {"block": {"type": "sqlite", "path": str(db), "cache_size": 0,
                        "query": "SELECT v FROM block WHERE k = :key"}}
    proxy = await proxy_factory(lists(block="block"), tables=tables, relay={"domains": ["dest.test"]})
    assert await rcpt_replies(proxy, "a@b.test", "bob@dest.test") == [250]
    db.unlink()
    assert await rcpt_replies(proxy, "a@b.test", "bob@dest.test") == [451]


async def test_an_unknown_table_is_a_configuration_error_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from smtpproxy.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"""
listeners: [{{address: 127.0.0.1, port: 0}}]
quarantine: {{path: {tmp_path / 'q'}}}
tables: {{allow: {{type: inline}}}}
plugins:
  - name: lists
    settings: {{allow: allow, block: nosuch}}
""")
    expected = f"{path}:7:30: plugins[0].settings.block: no table named 'nosuch' in tables (allow)"
    assert main(["check-config", "-c", str(path)]) == 2  # before anything runs
    assert expected in capsys.readouterr().err
    config, source = load_config(path)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ProxyServer(config, source)
    path.write_text("plugins:\n  - name: lists\n    settings: {}\n")
    with pytest.raises(ConfigError, match="needs 'allow' or 'block'"):
        config, source = load_config(path)
        build_chain(config.plugins, source, table_names=config.tables)


async def test_built_outside_a_configuration_the_start_still_checks_the_table(tmp_path: Path) -> None:
    """chain_of (a plugin built by hand) knows no table names; the startup hook catches it."""
    server = ProxyServer(make_config(tmp_path, tables=TABLES), chain=chain_of(lists(block="nosuch")))
    with pytest.raises(StartupError, match="no lookup table named 'nosuch' \\(tables: allow, block\\)"):
        await server.start()
    await server.stop(grace=0)


def test_chain_of_accepts_the_plugin() -> None:
    assert chain_of(lists(block="block")).steps[0].name


async def test_the_tracer_loads_the_tables_and_explains_a_block(tmp_path: Path) -> None:
    """`smtpproxy test-message` runs the same plugin on the same tables (the tracer installs them)."""
    from smtpproxy.tracer import Tracer

    config = make_config(tmp_path, tables=TABLES, relay={"domains": ["dest.test"]},
                         plugins=[{"name": "lists", "settings": {"block": "block"}}])
    async with Tracer.from_config(config) as tracer:
        blocked = await tracer.trace(b"From: s@bad.test\r\n\r\nx\r\n", sender="spammer@bad.test",
                                     recipients=["bob@dest.test"])
        assert (blocked.decision, blocked.reply) == (
            "rejected", "550 5.7.1 Sender blocked by the recipient's block list")
        fine = await tracer.trace(b"From: s@bad.test\r\n\r\nx\r\n", sender="spammer@bad.test",
                                  recipients=["carol@dest.test"])
        assert fine.decision == "delivered"
