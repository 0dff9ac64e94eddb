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
    """One Lua script run on Redis, each call within ``timeout``, the calls pipelined.

    The calls go over one of redis-py's own connections (``redis.asyncio.Connection``: its URL
    parsing, TLS, AUTH and reply parser) instead of its client's pool: the client's machinery per
    command (pool lock, health read, retry and observability wrappers, the ``Script`` object)
    cost ~40 µs of CPU a call (bench/README.md, issue 31), and every message makes one or two.

    Calls made while a batch is out are queued; the next batch sends them all in one write and
    reads their replies back in order (what ioredis's auto-pipelining does): under load one
    write, one read wake-up and one task step serve dozens of calls, not one each. One
    connection is enough: Redis runs commands one at a time, so a second connection would not
    overtake a slow script, and with one batch out at a time a batch is either unsent (safe
    to send on a new connection) or sent (its scripts may have run). Waiting for the batch out
    costs a call less than the write and wake-ups it saves (bench/README.md: 100 sessions,
    median 5.5 ms a call before, 2.7 now).

    - An idle connection found closed or dirty before a batch (Redis restarted, ``CLIENT
      KILL``) is replaced before anything is sent on it: those calls are not failures.
    - A batch whose connection fails, or that outlives ``timeout``, fails its unanswered calls
      with RedisUnavailable and the connection is dropped: their scripts may have run, and
      running ratelimit's again would count a message twice, greylist's would turn ``new``
      into ``early``. Queued calls go out on a new connection.
    - A call that times out stops the batch it waits for or behind (Redis is stuck or slower
      than ``timeout``); a cancelled caller's reply is still read, and dropped.
    - ``NOSCRIPT`` (a new or flushed Redis): the next batch loads the script first and runs
      those calls again, once.
    """

    def __init__(self, url: str, timeout: float, prefix: str, lua: str):
        import redis.asyncio

        self.timeout = timeout
        self.prefix = prefix
        self._lua = lua
        self._sha = hashlib.sha1(lua.encode()).hexdigest()  # Redis names scripts by SHA-1
        # No socket_timeout: each batch and each call is bounded here, and redis-py would
        # spend a task (asyncio.wait_for) on every write to bound it again.
        self._pool = redis.asyncio.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout
        )
        self._connection: Any = None  # idle between batches
        self._queue: list[_Call] = []  # not sent yet
        self._sender: asyncio.Task[None] | None = None  # sends batches while calls are queued
        self._load_first = False  # a NOSCRIPT was seen: load the script before the next batch
        self._closed = False

    async def run(self, key: str, args: list[Any]) -> Any:
        """The script's answer for ``prefix + key``; RedisUnavailable for any Redis failure."""
        if self._closed:
            raise RedisUnavailable("RedisScript closed")
        call = _Call(self.prefix + key, args)
        self._queue.append(call)
        if self._sender is None:  # starts next loop iteration: calls made meanwhile join
            self._sender = asyncio.create_task(self._send_batches())
        try:
            async with asyncio.timeout(self.timeout):
                return await call.future
        except TimeoutError as exc:
            if call.future.done() and not call.future.cancelled():  # answered as time ran out
                return call.future.result()
            if self._sender is not None:  # what it awaits is ours or older: stuck or too slow
                self._sender.cancel(f"TimeoutError: a call had no answer within {self.timeout}s")
            raise RedisUnavailable(f"TimeoutError: no answer within {self.timeout}s") from exc

    async def _send_batches(self) -> None:
        """One batch after another while calls are queued; then the task ends."""
        try:
            while self._queue:
                batch = [call for call in self._queue if not call.future.done()]
                self._queue = []
                if batch:
                    await self._exchange(batch)
        finally:
            self._sender = None
            if self._queue and not self._closed:  # stopped by a timed-out call: go on anew
                self._sender = asyncio.create_task(self._send_batches())

    async def _exchange(self, batch: list[_Call]) -> None:
        """Send ``batch`` in one write, then give each call its reply, in order."""
        import redis.exceptions

        again: list[_Call] = []  # NOSCRIPT: not run, safe to send again
        commands = [("EVALSHA", self._sha, 1, call.key, *call.args) for call in batch]
        load, self._load_first = self._load_first, False
        if load:
            commands.insert(0, ("SCRIPT", "LOAD", self._lua))
        try:
            async with asyncio.timeout(self.timeout):
                connection = await self._ready()
                await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
                if load:
                    with contextlib.suppress(redis.exceptions.ResponseError):  # the calls will say
                        await connection.read_response()
                for call in batch:
                    try:
                        answer = await connection.read_response()
                    except redis.exceptions.NoScriptError as exc:
                        if call.future.done():
                            continue
                        if call.loaded:
                            call.fail(exc)
                        else:
                            call.loaded = self._load_first = True
                            again.append(call)
                    except redis.exceptions.ResponseError as exc:  # the script's own error
                        call.fail(exc)
                    else:
                        if not call.future.done():  # else its caller went away: dropped
                            call.future.set_result(answer)
        except BaseException as exc:  # the connection's state is unknown: drop it
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no answer within {self.timeout}s")
            for call in batch:  # first: a second cancel may interrupt the disconnect
                if call not in again:
                    call.fail(exc)
            connection, self._connection = self._connection, None
            if connection is not None:
                await _disconnect(connection)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._queue[:0] = again

    async def _ready(self) -> Any:
        """The idle connection if it is still open and quiet, else a new one."""
        import redis.exceptions

        connection = self._connection
        if connection is not None:
            # can_read (redis-py 8; can_read_destructive before) raises on EOF or a reset.
            check = getattr(connection, "can_read", None) or connection.can_read_destructive
            try:
                if not await check():
                    return connection
            except (redis.exceptions.ConnectionError, OSError):
                pass
            await _disconnect(connection)  # closed while idle, or bytes nobody asked for
        self._connection = connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        await connection.connect()
        return connection

    async def close(self) -> None:
        """Fail what is queued, stop the batch in flight, close the connection."""
        self._closed = True
        if self._sender is not None:
            self._sender.cancel("RedisScript closed")
            await asyncio.wait([self._sender])
        queued, self._queue = self._queue, []
        for call in queued:
            call.fail(asyncio.CancelledError("RedisScript closed"))
        connection, self._connection = self._connection, None
        if connection is not None:
            await _disconnect(connection)
        await self._pool.aclose()


class _Call:
    """One ``run``: its key and arguments, the future its caller awaits."""

    __slots__ = ("args", "future", "key", "loaded")

    def __init__(self, key: str, args: list[Any]):
        self.key = key
        self.args = args
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.loaded = False  # sent again after NOSCRIPT

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            reason = str(exc) if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
            self.future.set_exception(RedisUnavailable(reason))


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
