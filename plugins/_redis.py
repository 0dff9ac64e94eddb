"""What ratelimit and greylist share about keeping their state in Redis.

Both run one Lua script per check (atomic across proxies), both must turn any Redis trouble
into one exception their ``redis_failure`` policy handles, and both build their backend at
startup and close a Redis one at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["RedisScript", "RedisUnavailable", "StateStore"]

B = TypeVar("B")


class RedisUnavailable(Exception):
    """Redis did not answer (down, timed out, refused)."""


class RedisScript:
    """One Redis client running one registered Lua script, each call within ``timeout``."""

    def __init__(self, url: str, timeout: float, prefix: str, lua: str):
        import redis.asyncio

        self.timeout = timeout
        self.prefix = prefix
        self.client: redis.asyncio.Redis = redis.asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script: Any = self.client.register_script(lua)

    async def run(self, key: str, args: list[Any]) -> Any:
        """The script's answer for ``prefix + key``; RedisUnavailable for any Redis failure."""
        import redis.exceptions

        try:
            async with asyncio.timeout(self.timeout):
                return await self._script(keys=[self.prefix + key], args=args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.client.aclose()


class StateStore(Generic[B]):
    """A plugin's state backend: the one it was given (tests), else made on first use.

    ``close`` (the shutdown hook) closes a backend that has ``close`` (Redis) and forgets
    it; an in-memory one has nothing to release and is kept.
    """

    def __init__(self, given: B | None, make: Callable[[], B]):
        self._backend = given
        self._make = make
        self._owned = given is None

    def get(self) -> B:
        if self._backend is None:
            self._backend = self._make()
        return self._backend

    async def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if self._owned and close is not None:
            await close()
            self._backend = None
