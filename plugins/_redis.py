"""What ratelimit and greylist share about keeping their state in Redis.

Both run one Lua script per check (atomic across proxies), both must turn any Redis trouble
into one exception their ``redis_failure`` policy handles, and both build their backend at
startup and close a Redis one at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["RedisScript", "RedisUnavailable", "StateStore"]

B = TypeVar("B")


class RedisUnavailable(Exception):
    """Redis did not answer (down, timed out, refused)."""


class RedisScript:
    """One Lua script run on Redis, each call within ``timeout``.

    The calls go over redis-py's own connections (``redis.asyncio.Connection``: its URL
    parsing, TLS, AUTH and reply parser), kept idle in a list here instead of its client's
    pool: the client's machinery per command (pool lock, connection health read, retry and
    observability wrappers, the ``Script`` object) cost ~40 µs of CPU a call over the bare
    connection's ~80 (bench/README.md, issue 31), and every message makes one or two calls.
    What the pool's health read gave is kept: a call on an idle connection that turns out
    closed (Redis restarted) is tried once more on a new one.
    """

    def __init__(self, url: str, timeout: float, prefix: str, lua: str):
        import redis.asyncio

        self.timeout = timeout
        self.prefix = prefix
        self._lua = lua
        self._sha = hashlib.sha1(lua.encode()).hexdigest()  # Redis names scripts by SHA-1
        self._pool = redis.asyncio.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._idle: list[Any] = []

    async def run(self, key: str, args: list[Any]) -> Any:
        """The script's answer for ``prefix + key``; RedisUnavailable for any Redis failure."""
        import redis.exceptions

        reused = bool(self._idle)
        connection = self._idle.pop() if reused else self._new()
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    answer = await self._call(connection, key, args)
                except (redis.exceptions.ConnectionError, ConnectionError):
                    if not reused:
                        raise
                    await _disconnect(connection)  # it died while idle: once more, anew
                    connection = self._new()
                    answer = await self._call(connection, key, args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            await _disconnect(connection)
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled mid-call: the connection's state is unknown
            await _disconnect(connection)
            raise
        self._idle.append(connection)
        return answer

    def _new(self) -> Any:
        return self._pool.make_connection()  # type: ignore[no-untyped-call]

    async def _call(self, connection: Any, key: str, args: list[Any]) -> Any:
        import redis.exceptions

        await connection.connect()  # nothing to do when connected
        await connection.send_command("EVALSHA", self._sha, 1, self.prefix + key, *args)
        try:
            return await connection.read_response()
        except redis.exceptions.NoScriptError:  # a new or flushed Redis: load it, once
            await connection.send_command("SCRIPT", "LOAD", self._lua)
            await connection.read_response()
            await connection.send_command("EVALSHA", self._sha, 1, self.prefix + key, *args)
            return await connection.read_response()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await _disconnect(connection)
        await self._pool.aclose()


async def _disconnect(connection: Any) -> None:
    with contextlib.suppress(Exception):
        await connection.disconnect()


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
