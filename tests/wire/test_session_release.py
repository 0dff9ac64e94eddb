"""A finished session's objects are freed as it ends, not left to the cyclic garbage collector.

The inbound protocol was part of reference cycles (its StreamWriter, the bound method
asyncio keeps for the connection callback, its command table): every session's objects,
about 35 of them, stayed until a collection found them, and under load the collector's
passes over the live sessions cost more CPU than the sessions' own work of several
commands. This checks the protocol object is gone once its session ended, with the
collector off, whether the session ends with QUIT or the client drops the connection (then
aiosmtpd cancels the session's task, whose cancellation keeps the frames in its traceback).
"""

from __future__ import annotations

import asyncio
import gc
import weakref

from tests.conftest import ProxyFactory, Sink, Talk, port_of

RELAY = {"domains": ["dest.test"], "networks": []}


async def _ended(ref: weakref.ref[object]) -> bool:
    for _ in range(200):
        if ref() is None:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_finished_session_is_freed_without_the_garbage_collector(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        client = await Talk.open(port_of(proxy))
        assert (await client.hello())[0] == 250
        [session] = proxy.services.sessions
        ref = weakref.ref(session)
        del session
        code, _ = await client.send_message("a@client.test", ["b@dest.test"], b"Subject: x\r\n\r\nhi\r\n")
        assert code == 250
        assert (await client.cmd("QUIT"))[0] == 221
        assert await client.closed()
        await client.close()
        assert await _ended(ref), "the session's protocol is still alive: a reference cycle"
    finally:
        if was_enabled:
            gc.enable()


async def test_a_session_the_client_drops_is_freed_too(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """No QUIT: the connection is lost while the proxy waits for a command."""
    proxy = await proxy_factory(upstream=sink.port, relay=RELAY)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        client = await Talk.open(port_of(proxy))
        assert (await client.hello())[0] == 250
        [session] = proxy.services.sessions
        ref = weakref.ref(session)
        del session
        await client.close()
        assert await _ended(ref), "the session's protocol is still alive: a reference cycle"
    finally:
        if was_enabled:
            gc.enable()


async def test_a_refused_connection_is_freed_too(proxy_factory: ProxyFactory, sink: Sink) -> None:
    """Over the per-IP cap the proxy answers 421 and closes before any session starts."""
    from smtpproxy.inbound import InboundSMTP

    proxy = await proxy_factory(upstream=sink.port, relay=RELAY, limits={"max_sessions_per_ip": 1})
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        first = await Talk.open(port_of(proxy))
        assert (await first.greeting())[0] == 220
        alive = sum(isinstance(o, InboundSMTP) for o in gc.get_objects())
        second = await Talk.open(port_of(proxy))
        assert (await second.greeting())[0] == 421
        assert await second.closed()
        await second.close()
        for _ in range(200):
            if sum(isinstance(o, InboundSMTP) for o in gc.get_objects()) == alive:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the refused connection's protocol is still alive: a reference cycle")
        await first.close()
    finally:
        if was_enabled:
            gc.enable()
