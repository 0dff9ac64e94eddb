"""Lookup tables (smtpproxy.tables): the search order, RFC 4515 escaping, the cache and its
failure mode, the in-memory and SQLite backends, and the configuration's errors.

The network backends (Redis, PostgreSQL, LDAP) are in tests/store/test_tables_backends.py.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smtpproxy
from smtpproxy.config import ConfigError, load_config
from smtpproxy.server import ProxyServer
from smtpproxy.tables import (
    Backend,
    Table,
    TableError,
    TableUnavailable,
    address_keys,
    build_tables,
    domain_keys,
    escape_filter_value,
    get_table,
)
from smtpproxy.tables import base as table_base
from smtpproxy.tables.ldap import check_filter, expand_filter
from smtpproxy.tables.memory import read_entries
from smtpproxy.tables.sql import pyformat
from tests.conftest import ProxyFactory, Talk, chain_of, port_of

# -- the search order ----------------------------------------------------------------------


def test_address_keys_in_postfix_order() -> None:
    assert address_keys("User+Tag@Sub.Example.TEST") == [
        "User+Tag@sub.example.test", "User@sub.example.test", "@sub.example.test",
        "sub.example.test", ".example.test", ".test",
    ]
    assert address_keys("user@example.test", at_domain=False, parents=False) == [
        "user@example.test", "example.test"]
    assert address_keys("a+b@x.test", domain=False) == ["a+b@x.test", "a@x.test", "@x.test"]
    assert address_keys("a-b+c@x.test", "-+", domain=False) == ["a-b+c@x.test", "a@x.test", "@x.test"]
    assert address_keys("+a@x.test", domain=False) == ["+a@x.test", "@x.test"]  # leading '+': no extension
    assert address_keys("a+b@x.test", "", domain=False) == ["a+b@x.test", "@x.test"]
    assert address_keys("postmaster") == ["postmaster"]
    assert domain_keys("Mail.Example.Test.") == ["mail.example.test", ".example.test", ".test"]
    assert domain_keys("example.test", parents=False) == ["example.test"]


def _model_keys(address: str, delimiter: str) -> list[str]:
    """An independent statement of docs/tables.md's order."""
    local, domain = address.rsplit("@", 1)
    domain = domain.lower()
    out = [f"{local}@{domain}"]
    first = re.search(f"[{re.escape(delimiter)}]", local) if delimiter else None
    if first is not None and first.start() > 0:
        out.append(f"{local[:first.start()]}@{domain}")
    out.append(f"@{domain}")
    labels = domain.split(".")
    out.append(domain)
    out += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
    seen: list[str] = []
    for key in out:
        if key not in seen:
            seen.append(key)
    return seen


_label = st.text(alphabet="abcXYZ09-", min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(local=st.text(alphabet="ab+-._X", min_size=1, max_size=8), labels=st.lists(_label, min_size=1, max_size=4),
       delimiter=st.sampled_from(["+", "-", "+-", ""]))
def test_address_keys_equal_an_independent_model(local: str, labels: list[str], delimiter: str) -> None:
    address = f"{local}@{'.'.join(labels)}"
    keys = address_keys(address, delimiter)
    assert keys == _model_keys(address, delimiter)
    assert len(keys) == len(set(keys))
    assert keys[0] == f"{local}@{'.'.join(labels).lower()}"  # the most specific first


# -- RFC 4515 ------------------------------------------------------------------------------


def _unescape(value: str) -> str:
    return re.sub(r"\\([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_escaped_values_hold_no_filter_syntax_and_round_trip(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not set(escaped) & {"(", ")", "*", "\0"}
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", escaped, re.DOTALL)  # every \ starts an escape
    assert _unescape(escaped) == value


def test_filter_expansion() -> None:
    assert expand_filter("(mail=%s)", "a*)(uid=*@x.test") == r"(mail=a\2a\29\28uid=\2a@x.test)"
    assert expand_filter("(&(uid=%u)(dc=%d)(x=100%%))", "bob@x.test") == "(&(uid=bob)(dc=x.test)(x=100%))"
    assert expand_filter("(&(uid=%u)(dc=%d))", "postmaster") is None  # no domain: no search
    for bad in ["(mail=%x)", "(mail=x)", "mail=%s", "(mail=%s"]:
        with pytest.raises(TableError):
            check_filter(bad)


def test_sql_placeholder_is_bound_not_pasted() -> None:
    assert pyformat("SELECT v FROM t WHERE k = :key AND n LIKE '10%' AND c = x::key") == (
        "SELECT v FROM t WHERE k = %(key)s AND n LIKE '10%%' AND c = x::key")


# -- the cache, the timeout, the failure mode -----------------------------------------------


class Counting(Backend):
    kind = "counting"
    remote = True

    def __init__(self, data: dict[str, tuple[str, ...]]):
        self.data = data
        self.asked: list[str] = []
        self.fail = False
        self.hang = False

    async def lookup(self, key: str) -> tuple[str, ...] | None:
        self.asked.append(key)
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise ConnectionRefusedError("backend down")
        return self.data.get(key)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(table_base.time, "monotonic", clock)
    return clock


async def test_cache_ttls_negative_answers_and_bound(clock: Clock) -> None:
    backend = Counting({"a@x.test": ("alice",)})
    table = Table("t", backend, cache_size=2, cache_ttl=60, negative_ttl=10)
    assert await table.lookup("A@X.test") == ("alice",)  # folded to lower case
    assert await table.lookup("a@x.test") == ("alice",)
    assert await table.lookup("nobody@x.test") is None
    assert await table.lookup("nobody@x.test") is None
    assert backend.asked == ["a@x.test", "nobody@x.test"]
    clock.now += 11  # the negative answer expires, the positive one not
    assert await table.lookup("nobody@x.test") is None
    assert await table.lookup("a@x.test") == ("alice",)
    assert backend.asked == ["a@x.test", "nobody@x.test", "nobody@x.test"]
    clock.now += 50
    assert await table.lookup("a@x.test") == ("alice",)
    assert backend.asked[-1] == "a@x.test"
    await table.lookup("k1")
    await table.lookup("k2")  # a third key: the least recently used one goes
    assert len(table._cache) == 2 and "a@x.test" not in table._cache


async def test_a_failing_backend_raises_and_is_never_cached(caplog: pytest.LogCaptureFixture) -> None:
    backend = Counting({"a@x.test": ("alice",)})
    table = Table("logins", backend, cache_size=10, cache_ttl=60, negative_ttl=60)
    backend.fail = True
    with pytest.raises(TableUnavailable) as info:
        await table.lookup("a@x.test")
    assert str(info.value) == "table logins: ConnectionRefusedError: backend down"
    [logged] = [r.smtpproxy_fields for r in caplog.records if r.getMessage() == "table_unavailable"]  # type: ignore[attr-defined]
    assert logged == {"table": "logins", "type": "counting", "error": "ConnectionRefusedError: backend down"}
    backend.fail = False
    assert await table.lookup("a@x.test") == ("alice",)  # the failure was not cached


async def test_a_backend_that_does_not_answer_times_out() -> None:
    backend = Counting({})
    backend.hang = True
    table = Table("slow", backend, timeout=0.05, cache_size=10, cache_ttl=60, negative_ttl=60)
    with pytest.raises(TableUnavailable, match=r"table slow: no answer within 0\.05 s"):
        await table.lookup("x")


# -- in-memory tables, SQLite, and the configuration -----------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(text)
    return path


async def test_inline_file_and_regexp_tables(tmp_path: Path) -> None:
    (tmp_path / "domains").write_text("# domain  action\nexample.test  OK\nspam.test\tREJECT go away\n"
                                      "   (continued)\n")
    (tmp_path / "patterns").write_text("/^postmaster@/ role\n/^(.+)@(.+)$/I $2:$1\n")
    config, _ = load_config(write_config(tmp_path, """
tables:
  roles: {type: inline, entries: {alice@example.test: [alice, admin], "@example.test": staff}}
  domains: {type: file, file: domains}
  patterns:
    type: regexp
    patterns: [{'/^(bob)@/': 'is $1'}]
    file: patterns
"""))
    tables = build_tables(config.tables)
    assert await tables["roles"].lookup("ALICE@example.test") == ("alice", "admin")
    assert await tables["roles"].lookup("@example.test") == ("staff",)
    assert await tables["roles"].lookup("carol@example.test") is None
    assert await tables["domains"].lookup("Spam.Test") == ("REJECT go away (continued)",)
    assert await tables["patterns"].lookup("bob@x.test") == ("is bob",)
    assert await tables["patterns"].lookup("POSTMASTER@x.test") == ("role",)
    assert await tables["patterns"].lookup("carol@x.test") == ("x.test:carol",)
    nofold = build_tables(load_config(write_config(tmp_path, """
tables:
  exact: {type: inline, fold_case: false, entries: {Alice: one}}
"""))[0].tables)
    assert await nofold["exact"].lookup("Alice") == ("one",)
    assert await nofold["exact"].lookup("alice") is None


async def test_sqlite_table_binds_the_key(tmp_path: Path) -> None:
    db = tmp_path / "users db?#1.db"  # characters a file: URI would take for its own
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE owners (address TEXT, login TEXT)")
        conn.executemany("INSERT INTO owners VALUES (?, ?)", [
            ("sales@example.test", "alice"), ("sales@example.test", "bob"), ("x@example.test", None),
            ("it's@example.test", "quote")])
    conn.close()
    config, _ = load_config(write_config(tmp_path, """
tables:
  owners:
    type: sqlite
    path: "users db?#1.db"
    query: "SELECT login FROM owners WHERE address = :key ORDER BY login"
"""))
    table = build_tables(config.tables)["owners"]
    assert await table.lookup("Sales@Example.test") == ("alice", "bob")
    assert await table.lookup("x@example.test") is None  # only NULLs: not there
    assert await table.lookup("it's@example.test") == ("quote",)
    assert await table.lookup("' OR '1'='1") is None  # a bound parameter: no injection
    db.unlink()  # the database goes away: a failure, not "not there"
    table.forget()
    with pytest.raises(TableUnavailable, match="table owners: OperationalError"):
        await table.lookup("sales@example.test")


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("tables: {t: {type: nosuch}}", "tables.t.type: must be one of 'inline', 'file', 'regexp', 'redis', 'sqlite', 'postgresql', 'ldap' (got 'nosuch')"),
        ("tables: {t: {type: sqlite, path: db, query: 'SELECT 1'}}",
         "tables.t.query: the query must name the key as :key"),
        ("tables: {t: {type: postgresql, url: 'postgresql://x', query: \"SELECT v WHERE k = '%s'\"}}",
         "tables.t.query: the query must name the key as :key"),
        ("tables: {t: {type: ldap, url: 'ldap://x', base: 'dc=x', filter: '(mail=x)', attributes: [uid]}}",
         "tables.t.filter: the filter must hold the key"),
        ("tables: {t: {type: ldap, url: 'http://x', base: 'dc=x', filter: '(mail=%s)', attributes: [uid]}}",
         "tables.t.url: must be an ldap:// or ldaps:// URL"),
        ("tables: {t: {type: redis, url: 'http://x'}}", "tables.t.url: must be a redis://"),
        ("tables: {t: {type: regexp, patterns: [{'/(a/': x}]}}", "bad pattern /(a/"),
        ("tables: {t: {type: regexp, patterns: [{'/a/': $1}]}}", "$1 but the pattern has 0 groups"),
        ("tables: {t: {type: regexp}}", "tables.t.patterns: needs 'patterns' or 'file'"),
        ("tables: {t: {type: inline, entries: {a: {b: c}}}}", "tables.t.entries.a.str: Input should be a valid string"),
        ("tables: {t: {type: file, file: bad}}", "bad:2: 'K' is already on line 1"),
        ("tables: {t: {type: file, file: novalue}}", "novalue:1: 'lonely' has no value"),
        ("tables: {t: {type: redis, url: 'redis://x', timeout: 0}}", "tables.t.timeout: Input should be greater than 0"),
        ("tables: {Bad Name: {type: inline}}", "table name 'Bad Name'"),
        ("sender_login: {table: nosuch}\ntables: {t: {type: inline}}",
         "sender_login.table: no table named 'nosuch' in tables (t)"),
        ("sender_login: {table: t, map: {'a@b.test': a}}\ntables: {t: {type: inline}}",
         "'table' replaces 'map' and 'file'"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path: Path, section: str, expected: str) -> None:
    (tmp_path / "db").write_text("")
    (tmp_path / "bad").write_text("k v\nK w\n")
    (tmp_path / "novalue").write_text("lonely\n")
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, section + "\n"))
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith(str(tmp_path / "smtpproxy.yaml") + ":")  # file:line first


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_table_file_loads_or_names_its_line(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("t") / "table"
    path.write_text(text, encoding="utf-8")
    try:
        read_entries(path)
    except TableError as exc:
        assert re.match(re.escape(str(path)) + r"(:\d+)?: ", str(exc)), str(exc)


async def test_file_table_is_read_again_at_reload_and_plugins_find_tables_by_name(tmp_path: Path) -> None:
    (tmp_path / "allow").write_text("friend@example.test  yes\n")
    path = write_config(tmp_path, f"""
listeners: [{{address: 127.0.0.1, port: 0}}]
quarantine: {{path: {tmp_path / 'q'}}}
tables:
  allow: {{type: file, file: allow}}
""")
    config, source = load_config(path)
    server = ProxyServer(config, source, chain=chain_of())
    await server.start()
    try:
        assert smtpproxy.get_table is get_table  # public for plugins
        assert await get_table("allow").lookup("friend@example.test") == ("yes",)
        (tmp_path / "allow").write_text("friend@example.test  no\nother@example.test yes\n")
        assert await server.reload()
        assert await get_table("allow").lookup("friend@example.test") == ("no",)
        assert await get_table("allow").lookup("other@example.test") == ("yes",)
        (tmp_path / "allow").write_text("broken-line-without-value\n")
        assert not await server.reload()  # a broken file changes nothing
        assert await get_table("allow").lookup("other@example.test") == ("yes",)
        with pytest.raises(KeyError, match="no lookup table named 'nosuch' \\(tables: allow\\)"):
            get_table("nosuch")
    finally:
        await server.stop(grace=1)


# -- the sender/login map from a table in the other front ends (the listener's test is in
# -- tests/store/test_tables_backends.py, with LDAP) ----------------------------------------------


def _owners_db(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE owners (address TEXT, logins TEXT)")
        conn.executemany("INSERT INTO owners VALUES (?, ?)",
                         [("alice@example.com", "alice"), ("sales@example.com", "alice, bob")])
    conn.close()
    return path


async def test_the_tracer_and_the_milter_use_the_sender_login_table(tmp_path: Path) -> None:
    import bcrypt
    import trustme

    from smtpproxy.milter import codec
    from smtpproxy.milter.server import MilterServer
    from smtpproxy.tracer import Tracer
    from tests.conftest import make_config
    from tests.wire.test_milter import FakeMTA

    db = _owners_db(tmp_path / "owners.db")
    pem = tmp_path / "proxy.pem"
    trustme.CA().issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    (tmp_path / "users").write_text(f"alice:{bcrypt.hashpw(b'x', bcrypt.gensalt(rounds=4)).decode()}\n")
    tables = {"owners": {"type": "sqlite", "path": str(db), "cache_size": 0,
                         "query": "SELECT logins FROM owners WHERE address = :key"}}
    config = make_config(
        tmp_path, sender_login={"table": "owners"}, tables=tables,
        milter={"listen": "inet:127.0.0.1:0", "check_sender_login": True},
        listeners=[{"address": "127.0.0.1", "port": 0, "tls": {"cert": str(pem), "key": str(pem)},
                    "auth": {"users_file": str(tmp_path / "users")}}],
    )
    body = b"From: alice@example.com\r\nSubject: s\r\n\r\nx\r\n"
    async with Tracer.from_config(config) as tracer:
        forged = await tracer.trace(body, sender="bob@example.com", recipients=["carol@dest.test"],
                                    auth_user="alice")
        assert forged.reply == "553 5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice"
        shared = await tracer.trace(body, sender="sales+x@example.com", recipients=["carol@dest.test"],
                                    auth_user="alice")
        assert shared.decision == "delivered"
    server = MilterServer(config, chain=chain_of())
    await server.start()
    try:
        mta = await FakeMTA.open(server)
        assert await mta.start() == mta.passed(codec.Connect("", "U"))
        alice = {"{auth_authen}": "alice", "i": "4ABC"}
        assert await mta.event(codec.Mail(("<bob@example.com>",)), **alice) == [codec.ReplyCode(
            "553 5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice")]
        await mta.passes(codec.Mail(("<sales@example.com>",)), **alice)
        db.unlink()  # the table cannot answer: try again later, never a pass
        assert await mta.event(codec.Mail(("<sales@example.com>",)), **alice) == [codec.ReplyCode(
            "451 4.3.0 <sales@example.com>: Sender address rejected: temporary lookup failure")]
        await mta.close()
    finally:
        await server.stop(grace=1)


# -- a plugin uses a table by name, through the public API (docs/tables.md's example) --------


class RecipientBlocks:
    """docs/tables.md's example plugin, as a third party writes it."""

    def __init__(self, table: str):
        self.table = table

    @smtpproxy.hookimpl
    async def rcpt_to(self, session: smtpproxy.Session, transaction: smtpproxy.Transaction,
                      recipient: smtpproxy.Recipient) -> smtpproxy.Verdict | None:
        table = smtpproxy.get_table(self.table)
        for key in smtpproxy.address_keys(recipient.address.text):
            found = await table.lookup(key)
            if found is not None:
                return smtpproxy.Verdict.reject("Recipient blocked") if found[0] == "REJECT" else None
        return None


async def test_a_plugin_uses_a_table_by_name_and_a_table_down_tempfails(
    tmp_path: Path, proxy_factory: ProxyFactory,
) -> None:
    db = tmp_path / "blocks.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE blocks (k TEXT, action TEXT)")
        conn.executemany("INSERT INTO blocks VALUES (?, ?)",
                         [(".spam.test", "REJECT"), ("boss@spam.test", "OK")])
    conn.close()
    tables = {"blocks": {"type": "sqlite", "path": str(db), "cache_size": 0,
                         "query": "SELECT action FROM blocks WHERE k = :key"}}
    proxy = await proxy_factory(RecipientBlocks("blocks"), tables=tables,
                                relay={"domains": ["spam.test", "sub.spam.test", "ok.test"]})
    client = await Talk.open(port_of(proxy))
    await client.hello()
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<x@sub.spam.test>") == (550, "5.7.1 Recipient blocked")  # .parent
    assert (await client.cmd("RCPT TO:<Boss+tag@SPAM.test>"))[0] == 250  # the address wins
    assert (await client.cmd("RCPT TO:<y@ok.test>"))[0] == 250  # not there
    db.unlink()
    assert await client.cmd("RCPT TO:<z@ok.test>") == (451, "4.3.0 Temporary local problem, please try again later")
    await client.close()


async def test_sender_login_from_a_table_that_fails_never_passes() -> None:
    """Envelope and From: checks alike: a temporary failure, not "unknown sender, allowed"."""
    from smtpproxy import Message
    from smtpproxy.senderlogin import SenderLoginPolicy
    from smtpproxy.tables import Tables

    backend = Counting({"alice@example.com": ("alice",)})
    tables = Tables([Table("owners", backend)])
    policy = SenderLoginPolicy.load({}, table="owners", tables=tables, headers=True,
                                    unknown_senders="allow")
    message = Message(b"From: alice@example.com\r\n\r\nx\r\n")
    assert await policy.envelope_refusal("alice@example.com", "alice") is None
    assert await policy.header_refusal(message, "alice") is None
    backend.fail = True
    refusal = await policy.envelope_refusal("alice@example.com", "alice")
    assert refusal is not None and str(refusal) == (
        "451 4.3.0 <alice@example.com>: Sender address rejected: temporary lookup failure")
    found = await policy.header_refusal(message, "alice")
    assert found is not None and str(found[0]) == "451 4.3.0 From:/Sender: check failed: temporary lookup failure"
    assert await policy.envelope_refusal("", "alice") is None  # the null sender is not looked up
