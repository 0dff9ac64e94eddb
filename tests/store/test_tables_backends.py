"""Lookup tables against real backends started privately on free loopback ports: Redis,
PostgreSQL and OpenLDAP (slapd). A backend that is down gives TableUnavailable (callers: a
temporary failure), never "not there"; and the sender/login map from an LDAP table, through
the real submission listener into the tests' Postfix."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.config import load_config
from smtpproxy.tables import Table, TableUnavailable, build_tables
from tests.daemons import free_port
from tests.plugins.test_sender_login import Start, session, submit
from tests.plugins.test_sender_login import client_tls as client_tls  # noqa: PLC0414 - fixture
from tests.plugins.test_sender_login import start_proxy as start_proxy  # noqa: PLC0414 - fixture
from tests.plugins.test_sender_login import tls_ca as tls_ca  # noqa: PLC0414 - fixture
from tests.postfix_instance import PostfixFactory
from tests.redis_server import RedisServer
from tests.slapd_server import BASE, ROOT_DN, ROOT_PASSWORD, SlapdServer, start_slapd


def tables_from(tmp_path: Path, yaml_text: str) -> dict[str, Table]:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(yaml_text)
    config, _ = load_config(path)
    return dict(build_tables(config.tables))


# -- Redis -----------------------------------------------------------------------------------


async def test_redis_strings_and_sets_and_redis_down(tmp_path: Path, redis_server: RedisServer) -> None:
    import redis.asyncio

    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    await client.set("allow:friend@example.test", "OK")
    await client.sadd("owners:sales@example.test", "alice", "bob")
    await client.aclose()
    tables = tables_from(tmp_path, f"""
tables:
  allow: {{type: redis, url: '{redis_server.url}', prefix: 'allow:', timeout: 1}}
  owners: {{type: redis, url: '{redis_server.url}', prefix: 'owners:', structure: set, cache_size: 0}}
""")
    try:
        assert await tables["allow"].lookup("Friend@Example.test") == ("OK",)
        assert await tables["allow"].lookup("stranger@example.test") is None
        assert await tables["owners"].lookup("sales@example.test") == ("alice", "bob")
        assert await tables["owners"].lookup("*") is None  # a key, not a pattern
        redis_server.stop()
        with pytest.raises(TableUnavailable, match="table owners: ConnectionError"):
            await tables["owners"].lookup("sales@example.test")
        # The cache still answers what it had; what it had not is a failure, not "not there".
        assert await tables["allow"].lookup("friend@example.test") == ("OK",)
        with pytest.raises(TableUnavailable, match="table allow"):
            await tables["allow"].lookup("other@example.test")
    finally:
        for table in tables.values():
            await table.close()


# -- PostgreSQL ------------------------------------------------------------------------------


async def test_postgresql_query_binds_the_key_and_a_server_down_is_a_failure(
    tmp_path: Path, postgres_url: str,
) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE owners (address text, login text)")
        await conn.execute("INSERT INTO owners VALUES ('sales@example.test', 'alice'), "
                           "('sales@example.test', 'bob'), ('o''brien@example.test', 'ob')")
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    tables = tables_from(tmp_path, f"""
tables:
  owners:
    type: postgresql
    url: '{postgres_url}'
    query: "SELECT login FROM owners WHERE address = :key AND login NOT LIKE '%zz%' ORDER BY login"
  gone: {{type: postgresql, url: '{down}', query: "SELECT 1 WHERE :key = ''", timeout: 1}}
""")
    try:
        owners = tables["owners"]
        assert await owners.lookup("SALES@example.test") == ("alice", "bob")
        assert await owners.lookup("o'brien@example.test") == ("ob",)
        assert await owners.lookup("x' OR '1'='1") is None  # bound, never pasted
        assert await asyncio.gather(*(owners.lookup(f"k{i}") for i in range(20))) == [None] * 20
        with pytest.raises(TableUnavailable, match="table gone"):
            await tables["gone"].lookup("x")
    finally:
        for table in tables.values():
            await table.close()


async def test_a_postgresql_that_goes_down_mid_way_is_a_failure_not_a_default(tmp_path: Path) -> None:
    """Its own server (the session's one must stay up): found, then stopped, then asked again."""
    import psycopg

    from tests.postgres_server import start_postgres

    server = start_postgres()
    try:
        url = server.url()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("CREATE TABLE owners (address text, login text)")
            await conn.execute("INSERT INTO owners VALUES ('alice@example.test', 'alice')")
        tables = tables_from(tmp_path, f"""
tables:
  owners: {{type: postgresql, url: '{url}', query: "SELECT login FROM owners WHERE address = :key",
           timeout: 1, cache_size: 0}}
""")
        owners = tables["owners"]
        assert await owners.lookup("alice@example.test") == ("alice",)  # a pooled connection now
        server.stop()
        with pytest.raises(TableUnavailable, match="table owners"):
            await owners.lookup("alice@example.test")
        with pytest.raises(TableUnavailable, match="table owners"):
            await owners.lookup("bob@example.test")
        await owners.close()
    finally:
        server.stop()  # idempotent; removes the data directory


# -- LDAP ------------------------------------------------------------------------------------

PEOPLE = "".join(
    f"dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
    + "".join(f"mail: {m}\n" for m in mails) + "\n"
    for uid, mails in [("alice", ["alice@example.com", "sales@example.com"]),
                       ("bob", ["bob@example.com", "sales@example.com"]),
                       ("star", ["*@example.com"])]
)


@pytest.fixture
def slapd() -> Iterator[SlapdServer]:
    server = start_slapd(PEOPLE)
    yield server
    server.remove()


def ldap_yaml(server: SlapdServer, name: str = "owners", **extra: str) -> str:
    import yaml

    settings = {"type": "ldap", "url": server.url, "base": f"ou=people,{BASE}", "filter": "(mail=%s)",
                "attributes": ["uid"], "timeout": 1, **extra}
    return f"  {name}: " + yaml.safe_dump(settings, default_flow_style=True, width=1000)


async def test_ldap_search_escapes_the_key_and_a_server_down_is_a_failure(
    tmp_path: Path, slapd: SlapdServer,
) -> None:
    tables = tables_from(tmp_path, "tables:\n" + ldap_yaml(slapd)
                         + ldap_yaml(slapd, "bound", bind_dn=ROOT_DN, bind_password=ROOT_PASSWORD,
                                     filter="(&(objectClass=inetOrgPerson)(uid=%u))")
                         + ldap_yaml(slapd, "badbind", bind_dn=ROOT_DN, bind_password="wrong"))
    try:
        owners = tables["owners"]
        assert await owners.lookup("Alice@Example.com") == ("alice",)
        found = await owners.lookup("sales@example.com")  # several entries, in the server's order
        assert found is not None and sorted(found) == ["alice", "bob"]
        assert await owners.lookup("nobody@example.com") is None
        # '*' in a key is a character, not a wildcard: only the entry that has it literally.
        assert await owners.lookup("*@example.com") == ("star",)
        assert await owners.lookup("*") is None
        assert await owners.lookup("a*)(uid=*") is None
        assert await tables["bound"].lookup("bob@anything.test") == ("bob",)
        with pytest.raises(TableUnavailable, match="table badbind: bind failed: invalidCredentials"):
            await tables["badbind"].lookup("alice@example.com")
        slapd.stop()
        with pytest.raises(TableUnavailable, match="table owners"):
            await owners.lookup("bob@example.com")
    finally:
        for table in tables.values():
            await table.close()


async def test_sender_login_from_an_ldap_table_through_the_listener(
    start_proxy: Start, postfix_factory: PostfixFactory, client_tls: ssl.SSLContext, tmp_path: Path,
    slapd: SlapdServer,
) -> None:
    """Issue 23's map from the directory: alice may use her address and the shared mailbox,
    not bob's; with slapd down MAIL FROM gets 451 4.3.0 and nothing reaches Postfix."""
    postfix = postfix_factory()
    ldap = {"type": "ldap", "url": slapd.url, "base": f"ou=people,{BASE}", "filter": "(mail=%s)",
            "attributes": ["uid"], "timeout": 1, "cache_size": 0}
    proxy = await start_proxy(postfix, {"table": "owners", "headers": True}, tables={"owners": ldap})
    alice = await session(proxy, client_tls, "alice")
    assert await alice.cmd("MAIL FROM:<bob@example.com>") == (
        553, "5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice")
    assert await submit(alice, "alice@example.com", "CEO <bob@example.com>") == (
        550, "5.7.1 From: <bob@example.com> rejected: not owned by user alice")
    assert (await submit(alice, "alice+tag@example.com", "alice@example.com"))[0] == 250
    assert (await submit(alice, "sales@example.com", "Sales <sales@example.com>"))[0] == 250
    slapd.stop()
    assert await alice.cmd("MAIL FROM:<alice@example.com>") == (
        451, "4.3.0 <alice@example.com>: Sender address rejected: temporary lookup failure")
    await alice.close()
    stored = await asyncio.to_thread(postfix.wait_for_messages, "carol", 2)
    assert len(stored) == 2
    assert not any(b"bob@example.com" in m for m in stored)
