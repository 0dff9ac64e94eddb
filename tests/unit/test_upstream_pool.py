"""Which idle upstream connection a message takes, which one makes room, and the sweeper.

A connection's XCLIENT identity decides who may use it: one that named the client's port is
held for that client session; one without (XFORWARD, or XCLIENT without PORT) waits in the
shared pool for any message it can speak for. These run the Connector's bookkeeping on
connections that never touch a socket (``tests/wire/test_upstream.py`` has the real ones).
"""

from __future__ import annotations

import asyncio

import aiosmtplib

from smtpproxy.delivery.upstream import Connection, Connector, ConnectorSettings, UpstreamServer
from smtpproxy.session import Client, Session


class _Connected:
    is_connected = True


def _session(ip: str, port: int) -> Session:
    session = Session(Client(ip, port), local_ip="127.0.0.1", local_port=25)
    session.helo = "client.test"
    return session


def _pool(**settings: object) -> tuple[Connector, UpstreamServer, list[Connection]]:
    """A connector whose retirements are recorded instead of said QUIT to."""
    connector = Connector(ConnectorSettings(tls="none", **settings))  # type: ignore[arg-type]
    retired: list[Connection] = []
    connector.retire = retired.append  # type: ignore[method-assign]
    return connector, UpstreamServer("upstream.test", 25), retired


def _connection(connector: Connector, server: UpstreamServer, offered: str | None,
                session: Session | None = None) -> Connection:
    client = aiosmtplib.SMTP(hostname=server.host)
    client.protocol = _Connected()  # type: ignore[assignment]  # nothing is ever sent
    conn = Connection(client, server, None,
                      xclient_offered=frozenset(offered.split()) if offered is not None else None)
    if session is not None:
        identity = connector._xclient_identity(conn, session)
        assert identity is not None
        connector._speaks_for(conn, identity)
        conn.holder = session.id  # as acquire() leaves it
    return conn


def test_a_shared_connection_that_speaks_for_another_client_is_left_for_it() -> None:
    """Without PORT (smtp-sink, an older Postfix) an identity is the client's address and
    HELO: a message from another address passes such a connection by, and does not close it."""
    connector, server, retired = _pool()
    here, there = _session("192.0.2.1", 40001), _session("198.51.100.2", 40002)
    theirs = _connection(connector, server, "NAME ADDR HELO", there)
    ours = _connection(connector, server, "NAME ADDR HELO", here)
    assert not theirs.pinned and not ours.pinned  # no port: shareable
    for conn in (theirs, ours):
        connector.release(conn)
        connector.end_session(there if conn is theirs else here, [server])
    assert list(server.idle) == [theirs, ours]
    assert connector._take_idle(server, _session("192.0.2.1", 40003)) is ours  # same address, new port
    assert connector._take_idle(server, here) is None
    assert list(server.idle) == [theirs] and retired == []


def test_a_connection_that_named_the_port_is_held_for_its_session_alone() -> None:
    connector, server, retired = _pool(max_idle=1)
    one, two = _session("192.0.2.1", 40001), _session("192.0.2.1", 40002)
    first, second = (_connection(connector, server, "NAME ADDR PORT HELO", s) for s in (one, two))
    spare = _connection(connector, server, None)  # no identity: anyone's
    for conn in (first, second, spare):
        connector.release(conn)
    assert server.held == {one.id: [first], two.id: [second]}  # not counted in max_idle
    assert list(server.idle) == [spare]
    assert connector._take_idle(server, two) is second
    assert connector._take_idle(server, two) is spare  # its own taken: any shared one
    assert connector._take_idle(server, two) is None  # first is pinned to one: never lent
    connector.release(second)
    connector.end_session(two, [server])
    assert retired == [second] and server.held == {one.id: [first]}
    connector.release(spare)
    late = _connection(connector, server, "NAME ADDR PORT HELO", two)  # an abort's, given back late
    connector.release(late)
    assert retired == [second, late]
    assert server.held == {one.id: [first]} and list(server.idle) == [spare]


def test_a_shareable_connection_is_lent_while_held_and_shared_when_its_session_ends() -> None:
    """XFORWARD (or XCLIENT without PORT): held for its session's next message, lent to
    another session's message when nothing else is idle (rather than one opened), and any
    client's once its session ended; a full shared pool closes its oldest to make room."""
    connector, server, retired = _pool(max_idle=1)
    one, two, three = (_session(f"192.0.2.{n}", 40000 + n) for n in (1, 2, 3))
    first, second = (_connection(connector, server, None) for _ in range(2))
    first.holder, second.holder = one.id, two.id
    connector.release(first)
    connector.release(second)
    assert server.held == {one.id: [first], two.id: [second]} and not server.idle
    assert list(server.lendable) == [first, second]
    assert connector._take_idle(server, three) is first  # lent: the oldest held
    assert server.held == {two.id: [second]} and list(server.lendable) == [second]
    first.holder = three.id  # as acquire() leaves it
    connector.release(first)
    assert connector._take_idle(server, one) is second  # its own went to three: lent another
    second.holder = one.id
    connector.release(second)
    connector.end_session(one, [server])
    assert list(server.idle) == [second] and retired == [] and list(server.lendable) == [first]
    connector.end_session(three, [server])
    assert list(server.idle) == [first] and retired == [second]
    assert server.held == {} and server.lendable == {}


def test_a_full_shared_pool_makes_room_by_closing_its_oldest() -> None:
    connector, server, retired = _pool(max_idle=2)
    conns = [_connection(connector, server, None) for _ in range(3)]
    for conn in conns:
        connector.release(conn)
    assert retired == [conns[0]] and list(server.idle) == conns[1:]


async def test_the_sweeper_outlives_a_message_taking_a_stale_connection_meanwhile() -> None:
    """While the sweeper closes one stale connection, a message may take another stale one
    (and retire it itself): so it was when each QUIT was awaited. Before, the sweeper then
    removed a connection that was no longer listed: ValueError, and no idle connection was
    ever swept again. (Closing no longer awaits anything; the order still holds.)"""
    connector, server, _ = _pool(idle_timeout=0.05)
    a, b, c = (_connection(connector, server, None) for _ in range(3))
    for conn in (a, b):
        server.idle.append(conn)  # idle since 0: long stale
    closed: list[Connection] = []

    def retire(conn: Connection) -> None:
        closed.append(conn)
        if conn is a and b in server.idle:
            server.idle.remove(b)  # what a message's _take_idle does meanwhile

    connector.retire = retire  # type: ignore[method-assign]
    sweeper = asyncio.get_running_loop().create_task(connector.sweep([server]))
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if closed:
                break
        server.idle.append(c)  # idle since 0 as well: the next sweep closes it
        for _ in range(100):
            await asyncio.sleep(0.01)
            if c in closed:
                break
        assert not sweeper.done(), sweeper.exception()
        assert closed == [a, b, c], closed  # b left the list with a, before any QUIT
        assert not server.idle
    finally:
        sweeper.cancel()
