"""A finished session leaves nothing of ours for the garbage collector, in every front end.

Why: objects in a reference cycle are freed only by the cyclic collector. It then runs more
often, and each run walks the objects of every session still open (issue 31: behind Postfix
at concurrency 100 the proxy spent ~35 µs a message in the collector, for the ~35 objects
each session left in a cycle; the milter's progress timer left ~22 a message with the chain
on). Each test runs whole sessions with the collector off and looks at what one collection
then finds: nothing from smtpproxy's modules (the test's own clients and the sink upstream,
aiosmtpd's, are not ours to judge); for the proxy, also that the session's protocol object
is gone as the session ends (sessions that end with QUIT, that the client drops, and
connections refused with 421 before a session starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import types
import weakref
from collections.abc import Iterator
from typing import Any

from smtpproxy import hookimpl
from smtpproxy.milter import codec
from smtpproxy.web.accounts import Viewer
from smtpproxy.web.sessions import LiveSession
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.wire.test_listeners import (  # noqa: F401 (fixtures)
    ALICE_PASSWORD,
    client_tls,
    plain,
    starttls,
    submission,
    tls_ca,
    tls_files,
    users_file,
    users_text,
)
from tests.wire.test_milter import BODY, HEADERS, Factory, FakeMTA, milter  # noqa: F401 (fixture)
from tests.wire.test_policy import Start, policy, request  # noqa: F401 (fixture)

RELAY = {"domains": ["dest.test"], "networks": []}
MESSAGE = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nHello.\r\n"


class SlowEverywhere:
    """A plugin on every envelope step and the message: the milter then runs each step with
    its SMFIR_PROGRESS timer (the steps a plugin can keep waiting)."""

    name = "slow_everywhere"

    @hookimpl
    async def connect(self) -> None:
        await asyncio.sleep(0)

    @hookimpl
    async def helo(self) -> None:
        await asyncio.sleep(0)

    @hookimpl
    async def mail_from(self) -> None:
        await asyncio.sleep(0)

    @hookimpl
    async def rcpt_to(self) -> None:
        await asyncio.sleep(0)

    @hookimpl
    async def data(self) -> None:
        await asyncio.sleep(0)


def _ours(obj: object) -> bool:
    if isinstance(obj, types.FunctionType):
        return obj.__module__.startswith("smtpproxy")
    return type(obj).__module__.startswith("smtpproxy")


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[Any]]:
    """What the code in the block left in reference cycles (collector off meanwhile).

    The objects alive before the block are held until its end: one that a bounded cache drops
    meanwhile (the milter's per-chain lru_caches evict a chain an earlier test made) is not
    garbage the block made."""
    gc.collect()
    earlier = gc.get_objects()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[Any] = []
    try:
        yield found
    finally:
        gc.collect()
        found += [obj for obj in gc.garbage if _ours(obj)]
        gc.garbage.clear()
        del earlier
        gc.set_debug(0)
        if enabled:
            gc.enable()


def _names(objects: list[Any]) -> list[str]:
    return sorted({type(obj).__qualname__ if not isinstance(obj, types.FunctionType) else obj.__qualname__
                   for obj in objects})


async def _settled() -> None:
    """Let connection_lost and the sessions' last callbacks run."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def _gone(ref: weakref.ref[object]) -> bool:
    """Whether the object is freed (by reference counting: the collector is off) within ~2 s."""
    for _ in range(200):
        if ref() is None:
            return True
        await asyncio.sleep(0.01)
    return False


def test_the_check_counts_cycles_made_in_the_block_not_ones_dropped_there() -> None:
    """A cycle made before the block and dropped in it (as a bounded cache drops an entry)
    is not the block's; one made in the block is."""
    before = LiveSession(Viewer("a@x.test", "recipient"), "link", "made before", 0.0, 0.0)
    before.via = before  # type: ignore[assignment] - a cycle
    kept = [before]
    del before
    with cyclic_garbage() as garbage:
        kept.clear()
        made = LiveSession(Viewer("b@x.test", "recipient"), "link", "made in the block", 0.0, 0.0)
        made.via = made  # type: ignore[assignment]
        del made
    assert [g.client for g in garbage if isinstance(g, LiveSession)] == ["made in the block"]


async def test_proxy_sessions_leave_no_cycles(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(SlowEverywhere(), upstream=sink.port, relay=RELAY)
    with cyclic_garbage() as garbage:
        for _ in range(3):
            client = await Talk.open(port_of(proxy))
            await client.hello()
            [session] = proxy.services.sessions
            ended = weakref.ref(session)
            del session
            code, text = await client.send_message("a@sender.test", ["b@dest.test"], MESSAGE)
            assert code == 250, text
            assert await client.cmd("QUIT") == (221, "2.0.0 Bye")
            assert await client.closed()
            await client.close()
            assert await _gone(ended), "the session's protocol is still alive"
        await _settled()
        assert len(sink.messages) == 3
    assert _names(garbage) == []


async def test_a_session_the_client_drops_leaves_no_cycles(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """No QUIT: the connection is lost while the proxy waits for a command (aiosmtpd then
    cancels the session's task, whose cancellation keeps the frames in its traceback)."""
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    with cyclic_garbage() as garbage:
        client = await Talk.open(port_of(proxy))
        assert (await client.hello())[0] == 250
        [session] = proxy.services.sessions
        ended = weakref.ref(session)
        del session
        await client.close()
        assert await _gone(ended), "the session's protocol is still alive"
        await _settled()
    assert _names(garbage) == []


async def test_a_refused_connection_leaves_no_cycles(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """Over the per-IP cap the proxy answers 421 and closes before any session starts."""
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, limits={"max_sessions_per_ip": 1})
    first = await Talk.open(port_of(proxy))
    assert (await first.greeting())[0] == 220
    with cyclic_garbage() as garbage:
        second = await Talk.open(port_of(proxy))
        assert (await second.greeting())[0] == 421
        assert await second.closed()
        await second.close()
        await _settled()
    await first.close()
    assert _names(garbage) == []


async def test_submission_sessions_with_starttls_and_auth_leave_no_cycles(
    proxy_factory: ProxyFactory, sink: Sink, submission: dict[str, Any],  # noqa: F811
    client_tls: ssl.SSLContext,  # noqa: F811
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, listeners=[submission])
    with cyclic_garbage() as garbage:
        for _ in range(2):
            client = await Talk.open(port_of(proxy))
            await client.hello()
            await starttls(client, client_tls)
            assert (await client.cmd(f"AUTH PLAIN {plain('alice', ALICE_PASSWORD)}"))[0] == 235
            code, text = await client.send_message("alice@sender.test", ["b@dest.test"], MESSAGE)
            assert code == 250, text
            assert await client.cmd("QUIT") == (221, "2.0.0 Bye")
            await client.close()
        await _settled()
        assert len(sink.messages) == 2
    assert _names(garbage) == []


async def test_milter_sessions_leave_no_cycles(milter: Factory) -> None:  # noqa: F811
    server = await milter(SlowEverywhere())
    with cyclic_garbage() as garbage:
        for _ in range(3):
            mta = await FakeMTA.open(server)
            await mta.start()
            await mta.envelope()
            responses = await mta.content(HEADERS, BODY)
            assert isinstance(responses[-1], codec.Accept | codec.Continue), responses
            mta.send(codec.Quit())
            assert await mta.closed()
            await mta.close()
        await _settled()
    assert _names(garbage) == []


async def test_policy_sessions_leave_no_cycles(policy: Start) -> None:  # noqa: F811
    _, connect = await policy(SlowEverywhere())
    with cyclic_garbage() as garbage:
        for _ in range(3):
            client = await connect()
            assert await client.ask(request()) == "DUNNO"
            assert await client.ask(request("END-OF-MESSAGE", recipient="", recipient_count="1",
                                            size="1234")) == "DUNNO"
            client.close()
        await _settled()
    assert _names(garbage) == []
