"""Console accounts from a lookup table (``console.accounts: table:NAME``) and from LDAP
(``accounts: ldap``, a bind as the person against the tests' private slapd): who signs in with
which role, what is refused, the login throttle, a source that is down ("try again later",
never a sign-in), and the sessions of an account removed or changed there ending at its next
lookup."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import httpx
import pytest

from smtpproxy.config import ConfigError, load_config
from smtpproxy.web import sessions
from tests.console_server import console_at
from tests.daemons import free_port
from tests.slapd_server import BASE, SlapdServer
from tests.slapd_server import slapd_server as slapd_server  # noqa: PLC0414 - re-exported fixture

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"


async def _serve(tmp_path: Path, console: str, extra: str = "", lockout: int = 50) -> AsyncIterator[str]:
    port = free_port()
    (tmp_path / "link.key").write_text("k" * 64)
    (tmp_path / "cfg.yaml").write_text(
        "delivery:\n  type: maildir\n  path: mail\nstore:\n  sqlite: store.db\n"
        f"digest:\n  keys: [link.key]\n  port: {port}\nconsole:\n  secure_cookie: false\n{console}"
        f"login_throttle:\n  initial_delay: 0\n  lockout_after: {lockout}\n  lockout_seconds: 60\n{extra}")
    async with console_at(tmp_path / "cfg.yaml", port) as base:
        yield base


async def _sign_in(base: str, name: str, password: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    client = httpx.AsyncClient(base_url=base)
    return client, await client.post("/console/login", data={"name": name, "password": password})


async def _role(client: httpx.AsyncClient) -> str:
    page = (await client.get("/console")).text
    start = page.index("<span>") + len("<span>")
    return page[start:page.index("</span>", start)]


async def test_accounts_from_a_lookup_table(tmp_path: Path) -> None:
    (tmp_path / "people").write_text(
        f"root {HASH}:admin\nhost-a {HASH}:domain:a.test,b.test\nbob@a.test {HASH}:recipient\n"
        f"broken {HASH}:boss\n")
    tables = "tables:\n  people: {type: file, file: people}\n"
    async for base in _serve(tmp_path, "  accounts: table:people\n", tables):
        clients = []
        try:
            for name, role in (("root", "root (admin)"), ("HOST-A", "host-a (domain)"),
                               ("bob@a.test", "bob@a.test (recipient)")):
                client, reply = await _sign_in(base, name, "pw")
                clients.append(client)
                assert reply.status_code == 303, name
                assert await _role(client) == role
            for name, password in (("root", "wrong"), ("nobody", "pw"), ("broken", "pw")):
                client, reply = await _sign_in(base, name, password)
                clients.append(client)
                assert reply.status_code == 401 and "Name or password is wrong." in reply.text
        finally:
            for client in clients:
                await client.aclose()


async def _opens(client: httpx.AsyncClient) -> bool:
    reply = await client.get("/console")
    assert reply.status_code in (200, 303)
    return reply.status_code == 200


async def test_an_account_removed_or_changed_in_the_table_ends_its_sessions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each session's account is looked up again (every request here; every RECHECK seconds
    in use): removed, another role's domains, another password: signed out; unchanged, or the
    table down: kept."""
    monkeypatch.setattr(sessions, "RECHECK", 0.0)
    db = tmp_path / "people.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE people (login TEXT PRIMARY KEY, value TEXT)")
        conn.executemany("INSERT INTO people VALUES (?, ?)", [
            ("root", f"{HASH}:admin"), ("host-a", f"{HASH}:domain:a.test"),
            ("bob@a.test", f"{HASH}:recipient"), ("carol@a.test", f"{HASH}:recipient")])
    conn.close()
    tables = ("tables:\n  people:\n    type: sqlite\n    path: people.db\n"
              "    query: \"SELECT value FROM people WHERE login = :key\"\n    cache_size: 0\n")
    async for base in _serve(tmp_path, "  accounts: table:people\n", tables):
        clients = {}
        try:
            for name in ("root", "host-a", "bob@a.test", "carol@a.test"):
                clients[name], reply = await _sign_in(base, name, "pw")
                assert reply.status_code == 303 and await _opens(clients[name])
            new_hash = bcrypt.hashpw(b"new", bcrypt.gensalt(4)).decode()
            with sqlite3.connect(db) as conn:
                conn.execute("DELETE FROM people WHERE login = 'bob@a.test'")
                conn.execute("UPDATE people SET value = ? WHERE login = 'host-a'", (f"{HASH}:domain:b.test",))
                conn.execute("UPDATE people SET value = ? WHERE login = 'carol@a.test'", (f"{new_hash}:recipient",))
            conn.close()
            assert await _opens(clients["root"])
            for name in ("host-a", "bob@a.test", "carol@a.test"):
                assert not await _opens(clients[name]), name
            # The table cannot answer: sessions are kept (and sign-ins wait for it).
            db.rename(tmp_path / "gone.db")
            assert await _opens(clients["root"])
        finally:
            for client in clients.values():
                await client.aclose()


def test_a_console_table_must_exist(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("console:\n  accounts: table:people\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2:\d+: console\.accounts: no table named 'people'"):
        load_config(str(tmp_path / "cfg.yaml"))
    (tmp_path / "cfg.yaml").write_text("console:\n  accounts: ldap\n")
    with pytest.raises(ConfigError, match=r"accounts: ldap needs a console\.ldap section"):
        load_config(str(tmp_path / "cfg.yaml"))
    (tmp_path / "cfg.yaml").write_text("console:\n  accounts: ldap\n  ldap:\n    url: ldap://x\n    base: dc=x\n"
                                       "    groups: {\"cn=a\": \"domain:\"}\n")
    with pytest.raises(ConfigError, match="a domain admin needs domains"):
        load_config(str(tmp_path / "cfg.yaml"))


def _directory(slapd: SlapdServer) -> None:
    def person(uid: str, mail: str | None) -> str:
        return (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
                + (f"mail: {mail}\n" if mail else "") + f"userPassword: {uid}-secret\n\n")

    slapd.add(
        person("ann", "Ann@Example.test") + person("hal", "hal@a.test") + person("bob", "bob@a.test")
        + person("nomail", None) + person("twin", "twin1@a.test") + person("twin2", "twin")
        + f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n\n"
        f"dn: cn=mailadmins,{GROUPS}\nobjectClass: groupOfNames\ncn: mailadmins\nmember: uid=ann,{PEOPLE}\n\n"
        f"dn: cn=hostmasters-a,{GROUPS}\nobjectClass: groupOfNames\ncn: hostmasters-a\n"
        f"member: uid=hal,{PEOPLE}\n\n"
        # An admin with a service account to search: the root DN here.
        f"dn: uid=svc,{BASE}\nobjectClass: account\nobjectClass: simpleSecurityObject\nuid: svc\n"
        "userPassword: svc-secret\n\n")


def _ldap_console(slapd: SlapdServer) -> str:
    return (
        "  accounts: ldap\n  ldap:\n"
        f"    url: {slapd.url}\n    base: {PEOPLE}\n"
        "    filter: \"(|(uid=%s)(mail=%s))\"\n"
        f"    bind_dn: uid=svc,{BASE}\n    bind_password: svc-secret\n"
        f"    groups:\n      \"cn=mailadmins,{GROUPS}\": admin\n"
        f"      \"cn=hostmasters-a,{GROUPS}\": \"domain:a.test\"\n    timeout: 2\n")


async def test_ldap_sign_in_binds_as_the_person_and_takes_the_role_from_groups(
        slapd_server: SlapdServer, tmp_path: Path) -> None:
    _directory(slapd_server)
    async for base in _serve(tmp_path, _ldap_console(slapd_server)):
        clients = []
        try:
            for name, password, role in (("ann", "ann-secret", "ann@example.test (admin)"),
                                         ("hal@a.test", "hal-secret", "hal@a.test (domain)"),
                                         ("bob", "bob-secret", "bob@a.test (recipient)")):
                client, reply = await _sign_in(base, name, password)
                clients.append(client)
                assert reply.status_code == 303, (name, reply.text)
                assert await _role(client) == role
            # Wrong password, empty password (an anonymous bind would succeed), no such person,
            # a filter injection, no address (nothing to be a recipient of), a name two entries
            # answer to: no sign-in.
            for name, password in (("ann", "wrong"), ("ann", ""), ("nobody", "x"), ("*", "ann-secret"),
                                   ("ann)(uid=*", "ann-secret"), ("nomail", "nomail-secret"),
                                   ("twin", "twin-secret")):
                client, reply = await _sign_in(base, name, password)
                clients.append(client)
                assert reply.status_code == 401, (name, password)
            # The directory goes down: "try again later", never a sign-in, even with the right password.
            slapd_server.stop()
            client, reply = await _sign_in(base, "ann", "ann-secret")
            clients.append(client)
            assert reply.status_code == 503 and "try again later" in reply.text
            assert "set-cookie" not in reply.headers
        finally:
            for client in clients:
                await client.aclose()


async def test_ldap_sign_in_is_throttled_like_the_others(slapd_server: SlapdServer, tmp_path: Path) -> None:
    _directory(slapd_server)
    async for base in _serve(tmp_path, _ldap_console(slapd_server), lockout=3):
        async with httpx.AsyncClient(base_url=base) as client:
            for attempt in range(3):  # distinct guesses: a repeated one is not counted again
                reply = await client.post("/console/login", data={"name": "ann", "password": f"guess-{attempt}"})
                assert reply.status_code == 401
            reply = await client.post("/console/login", data={"name": "ann", "password": "ann-secret"})
            assert reply.status_code == 429 and "Too many failed sign-ins" in reply.text


async def test_a_person_removed_from_the_directory_or_their_group_is_signed_out(
        slapd_server: SlapdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "RECHECK", 0.0)
    _directory(slapd_server)
    async for base in _serve(tmp_path, _ldap_console(slapd_server)):
        clients = {}
        try:
            for name in ("ann", "hal", "bob"):
                clients[name], reply = await _sign_in(base, name, f"{name}-secret")
                assert reply.status_code == 303 and await _opens(clients[name])
            slapd_server.modify(f"dn: cn=hostmasters-a,{GROUPS}\nchangetype: modify\nreplace: member\n"
                                f"member: uid=someone-else,{PEOPLE}\n\n"
                                f"dn: uid=bob,{PEOPLE}\nchangetype: delete\n")
            assert await _opens(clients["ann"])
            assert not await _opens(clients["hal"])  # a recipient now, no longer a domain admin
            assert not await _opens(clients["bob"])
            client, reply = await _sign_in(base, "hal", "hal-secret")  # as what the directory says now
            clients["hal again"] = client
            assert reply.status_code == 303 and await _role(client) == "hal@a.test (recipient)"
            slapd_server.stop()  # the directory down: ann's session is kept
            assert await _opens(clients["ann"])
        finally:
            for client in clients.values():
                await client.aclose()


def test_ldapsearch_sees_the_groups(slapd_server: SlapdServer) -> None:
    """The fixture's directory is what the tests above think it is (groupOfNames members)."""
    _directory(slapd_server)
    found = subprocess.run(["ldapsearch", "-x", "-LLL", "-H", slapd_server.url, "-b", GROUPS,
                            f"(member=uid=ann,{PEOPLE})", "cn"], capture_output=True, text=True, check=True)
    assert "cn: mailadmins" in found.stdout
