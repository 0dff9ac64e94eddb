"""plugins/_redis.py's RedisScript against a real Redis: what redis-py's client pool did for
ratelimit and greylist, kept now that the script goes over bare connections (issue 31).

- an idle connection Redis closed meanwhile (a restart, ``timeout``, ``CLIENT KILL``) is not a
  failure: the call goes again on a new connection, as the pool's health check did;
- a Redis that lost the script (``SCRIPT FLUSH``, a new server) gets it loaded again;
- a Lua error, and Redis gone, are RedisUnavailable (the plugins' ``redis_failure`` policy).

Calls made together are pipelined on one connection, replies matched in order; the tests below
hold them in flight with ``CLIENT PAUSE ... WRITE`` (Redis postpones the scripts, not the admin's
CLIENT KILL or SCRIPT FLUSH): each caller still gets its own answer, a connection killed or
stuck fails what was sent on it and the next calls go on a new one, a cancelled caller's reply
is read and dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio
from smtpproxy_plugins._redis import RedisScript, RedisUnavailable

from tests.redis_server import RedisServer

COUNTER = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
ECHO = "return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[1])}"  # whose answer it is


async def _clients(server: RedisServer) -> list[dict[str, str]]:
    admin = redis.asyncio.Redis(port=server.port)
    try:
        return [c for c in await admin.client_list() if c.get("cmd") != "client|list"]
    finally:
        await admin.aclose()


async def test_calls_reuse_one_connection_and_survive_it_being_closed(redis_server: RedisServer) -> None:
    script = RedisScript(redis_server.url, 2.0, "t:", COUNTER)
    try:
        assert await script.run("a", [1]) == 1
        assert await script.run("a", [2]) == 3
        assert len(await _clients(redis_server)) == 1  # the one idle connection, reused
        admin = redis.asyncio.Redis(port=redis_server.port)
        await admin.client_kill_filter(_type="normal", skipme=True)  # Redis drops the idle one
        await admin.aclose()
        await asyncio.sleep(0.05)
        assert await script.run("a", [4]) == 7  # tried again on a new connection, not a failure
        assert await script.run("a", [1]) == 8
    finally:
        await script.close()


async def test_a_flushed_script_is_loaded_again(redis_server: RedisServer) -> None:
    script = RedisScript(redis_server.url, 2.0, "t:", COUNTER)
    try:
        assert await script.run("b", [5]) == 5
        admin = redis.asyncio.Redis(port=redis_server.port)
        await admin.script_flush()
        await admin.aclose()
        assert await script.run("b", [1]) == 6
    finally:
        await script.close()


async def test_a_script_error_and_a_redis_that_is_gone_are_unavailable(redis_server: RedisServer) -> None:
    broken = RedisScript(redis_server.url, 2.0, "t:", "return redis.call('NOSUCHCOMMAND')")
    script = RedisScript(redis_server.url, 0.5, "t:", COUNTER)
    try:
        with pytest.raises(RedisUnavailable, match="ResponseError"):
            await broken.run("c", [])
        assert await script.run("c", [1]) == 1
        redis_server.stop()
        with pytest.raises(RedisUnavailable, match="ConnectionError"):
            await script.run("c", [1])
    finally:
        await broken.close()
        await script.close()


async def _pause(server: RedisServer) -> redis.asyncio.Redis:
    """An admin client, having made Redis postpone scripts (not CLIENT KILL, SCRIPT FLUSH)."""
    admin = redis.asyncio.Redis(port=server.port)
    await admin.client_pause(10_000, all=False)  # WRITE: scripts wait
    return admin


async def _until(server: RedisServer, seen: Callable[[list[dict[str, str]]], bool]) -> None:
    """Polls CLIENT LIST (Redis tells no one) until ``seen``; 5 s at most."""
    async with asyncio.timeout(5):
        while True:
            if seen(await _clients(server)):
                return
            await asyncio.sleep(0.01)


async def _held(server: RedisServer) -> None:
    """Once Redis holds a script (flag b: blocked): the calls started before are in flight."""
    await _until(server, lambda clients: any("b" in c.get("flags", "") for c in clients))


async def _in_flight(script: RedisScript, server: RedisServer, prefix: str, count: int,
                     arg: Callable[[int], int]) -> tuple[redis.asyncio.Redis, list[asyncio.Task[object]]]:
    """*count* calls (keys ``prefix0``..., ``arg(n)`` each) sent on the script's warm
    connection and held there by Redis; with the admin client that paused it."""
    assert await script.run("warm", [1]) == [b"t:warm", 1]
    admin = await _pause(server)
    calls = [asyncio.create_task(script.run(f"{prefix}{n}", [arg(n)])) for n in range(count)]
    await _held(server)
    return admin, calls


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_answer(
    redis_server: RedisServer,
) -> None:
    script = RedisScript(redis_server.url, 2.0, "t:", ECHO)
    try:
        answers = await asyncio.gather(*(script.run(f"k{n}", [n]) for n in range(200)))
        assert answers == [[f"t:k{n}".encode(), n] for n in range(200)]
        assert len(await _clients(redis_server)) == 1  # pipelined, not 200 connections
        answers = await asyncio.gather(*(script.run(f"k{n}", [1]) for n in range(200)))
        assert answers == [[f"t:k{n}".encode(), n + 1] for n in range(200)]
    finally:
        await script.close()


async def test_a_connection_killed_with_calls_in_flight_fails_them_and_the_next_calls_work(
    redis_server: RedisServer,
) -> None:
    script = RedisScript(redis_server.url, 5.0, "t:", ECHO)
    try:
        admin, calls = await _in_flight(script, redis_server, "d", 20, lambda n: 1)
        await admin.client_kill_filter(_type="normal", skipme=True)
        await admin.client_unpause()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert await admin.exists(*(f"t:d{n}" for n in range(20))) == 0  # not run again
        await admin.aclose()
        answers = await asyncio.gather(*(script.run(f"d{n}", [n]) for n in range(20)))
        assert answers == [[f"t:d{n}".encode(), n] for n in range(20)]
    finally:
        await script.close()


async def test_a_script_flushed_under_many_calls_is_loaded_once_and_all_succeed(
    redis_server: RedisServer,
) -> None:
    script = RedisScript(redis_server.url, 5.0, "t:", ECHO)
    try:
        admin, calls = await _in_flight(script, redis_server, "f", 50, lambda n: n)
        await admin.script_flush()  # the held EVALSHAs will find no script
        await admin.client_unpause()
        assert await asyncio.gather(*calls) == [[f"t:f{n}".encode(), n] for n in range(50)]
        await admin.script_flush()
        await admin.aclose()
        answers = await asyncio.gather(*(script.run(f"f{n}", [1]) for n in range(50)))
        assert answers == [[f"t:f{n}".encode(), n + 1] for n in range(50)]  # each ran once
    finally:
        await script.close()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(redis_server: RedisServer) -> None:
    script = RedisScript(redis_server.url, 5.0, "t:", ECHO)
    try:
        admin, calls = await _in_flight(script, redis_server, "c", 30, lambda n: n)
        for call in calls[::3]:
            call.cancel()  # its session ended: the script was sent, its reply will come
        await admin.client_unpause()
        await admin.aclose()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for n, result in enumerate(results):
            if n % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == [f"t:c{n}".encode(), n]
        assert await script.run("c1", [1]) == [b"t:c1", 2]
        assert len(await _clients(redis_server)) == 1
    finally:
        await script.close()


async def test_a_timeout_fails_the_calls_on_the_stuck_connection_and_the_next_calls_work(
    redis_server: RedisServer,
) -> None:
    script = RedisScript(redis_server.url, 0.3, "t:", ECHO)
    try:
        assert await script.run("warm", [1]) == [b"t:warm", 1]
        admin = redis.asyncio.Redis(port=redis_server.port)
        await admin.client_pause(10_000, all=False)  # WRITE: scripts wait
        results = await asyncio.gather(*(script.run(f"s{n}", [1]) for n in range(10)), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) and "TimeoutError" in str(r) for r in results), results
        await admin.client_unpause()
        await admin.aclose()
        answers = await asyncio.gather(*(script.run(f"t{n}", [n]) for n in range(10)))
        assert answers == [[f"t:t{n}".encode(), n] for n in range(10)]  # no late reply taken for theirs
        assert len(await _clients(redis_server)) == 1  # the stuck one was closed
    finally:
        await script.close()


async def test_close_fails_the_calls_in_flight_and_leaves_nothing_behind(redis_server: RedisServer) -> None:
    script = RedisScript(redis_server.url, 5.0, "t:", ECHO)
    admin, calls = await _in_flight(script, redis_server, "x", 10, lambda n: 1)
    queued = asyncio.create_task(script.run("queued", [1]))  # behind the held batch
    await asyncio.sleep(0)
    await script.close()
    results = await asyncio.gather(*calls, queued, return_exceptions=True)
    assert all(isinstance(r, RedisUnavailable) for r in results), results
    with pytest.raises(RedisUnavailable, match="closed"):
        await script.run("after", [1])
    await admin.client_unpause()
    me = str(await admin.client_id())
    await _until(redis_server, lambda clients: all(c["id"] == me for c in clients))  # ours closed
    await admin.aclose()
