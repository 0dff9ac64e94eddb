"""A table in Redis: ``GET prefix+key`` (one value) or ``SMEMBERS prefix+key`` (a set).

The client is made at the first lookup (it needs the running loop) and answers within the
table's timeout; a Redis that is down or slow raises TableUnavailable through :class:`Table`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from smtpproxy.tables.base import Backend, Values

__all__ = ["RedisBackend"]


class RedisBackend(Backend):
    kind = "redis"
    remote = True

    def __init__(self, url: str, *, prefix: str = "", structure: Literal["string", "set"] = "string",
                 timeout: float = 2.0):
        self.url = url
        self.prefix = prefix
        self.structure = structure
        self.timeout = timeout
        self._client: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                decode_responses=True, retry_on_timeout=False,
            )
        return self._client

    async def lookup(self, key: str) -> Values | None:
        client = self._connect()
        if self.structure == "set":
            members = await client.smembers(self.prefix + key)
            return tuple(sorted(members)) if members else None
        value = await client.get(self.prefix + key)
        return None if value is None else (value,)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # Writes, for `smtpproxy tables add|remove`: the one writable remote table type.
    async def add(self, key: str, value: str) -> None:
        client = self._connect()
        if self.structure == "set":
            await client.sadd(self.prefix + key, value)
        else:
            await client.set(self.prefix + key, value)

    async def remove(self, key: str, value: str | None = None) -> bool:
        client = self._connect()
        if self.structure == "set" and value is not None:
            return bool(await client.srem(self.prefix + key, value))
        return bool(await client.delete(self.prefix + key))

    async def update(self, key: str, change: Callable[[str | None], str | None]) -> str | None:
        """Replace a string key's value with ``change(value)`` as one step against every other
        writer (WATCH, then MULTI/EXEC, again while another wrote in between): a read, change
        and write of its own would lose an edit made at the same time. None from *change*
        deletes the key; returns the value written."""
        from redis.exceptions import WatchError

        client = self._connect()
        name = self.prefix + key
        async with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(name)
                    after = change(await pipe.get(name))
                    pipe.multi()
                    if after is None:
                        pipe.delete(name)
                    else:
                        pipe.set(name, after)
                    await pipe.execute()
                    return after
                except WatchError:
                    continue

    async def keys(self) -> list[str]:
        client = self._connect()
        return sorted([k[len(self.prefix):] async for k in client.scan_iter(match=_glob(self.prefix) + "*")])


def _glob(text: str) -> str:
    """*text* with Redis glob characters escaped, so a prefix matches literally."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
