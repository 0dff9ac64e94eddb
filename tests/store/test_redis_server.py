"""The Redis fixture itself: a real server, reachable, and gone after stop()."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.redis_server import RedisServer


async def test_redis_fixture_round_trip_and_stop(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url)
    await client.set("k", "v")
    assert await client.get("k") == b"v"
    await client.aclose()
    redis_server.stop()
    assert not redis_server.ping()
