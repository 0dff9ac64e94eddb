"""plugins/_redis.py's RedisScript against a real Redis: what redis-py's client pool did for
ratelimit and greylist, kept now that the script goes over bare connections (issue 31).

- an idle connection Redis closed meanwhile (a restart, ``timeout``, ``CLIENT KILL``) is not a
  failure: the call goes again on a new connection, as the pool's health check did;
- a Redis that lost the script (``SCRIPT FLUSH``, a new server) gets it loaded again;
- a Lua error, and Redis gone, are RedisUnavailable (the plugins' ``redis_failure`` policy).
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from smtpproxy_plugins._redis import RedisScript, RedisUnavailable

from tests.redis_server import RedisServer

COUNTER = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


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
