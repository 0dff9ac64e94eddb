"""A lookup table, and the layer every table is used through: case folding, a timeout, a cache.

A backend answers ``values for this key`` (a tuple of strings) or None (not there). Callers
never see a backend directly: :class:`Table` bounds every lookup by ``timeout``, caches answers
(bounded LRU, ``cache_ttl`` for values, ``negative_ttl`` for "not there") and turns every
failure into :class:`TableUnavailable`. A failure is never cached and never becomes a default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict

from smtpproxy.eventlog import event
from smtpproxy.tables.errors import TableUnavailable

__all__ = ["Backend", "Table"]

Values = tuple[str, ...]


class Backend(ABC):
    """Where a table's data lives. ``lookup`` may raise anything: :class:`Table` wraps it."""

    kind: str = "?"
    remote: bool = False
    """True for backends behind a network or a file lock (cached, timed out); False in memory."""

    @abstractmethod
    async def lookup(self, key: str) -> Values | None: ...

    async def close(self) -> None:  # noqa: B027 - most backends hold nothing to close
        """Release connections (the table is no longer used)."""


class Table:
    """A named table as features and plugins use it: ``await table.lookup(key)``."""

    def __init__(self, name: str, backend: Backend, *, timeout: float = 2.0, cache_size: int = 0,
                 cache_ttl: float = 0.0, negative_ttl: float = 0.0, fold_case: bool = True):
        self.name = name
        self.backend = backend
        self.timeout = timeout
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.fold_case = fold_case
        self._cache: OrderedDict[str, tuple[float, Values | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def kind(self) -> str:
        return self.backend.kind

    def __repr__(self) -> str:
        return f"<Table {self.name} ({self.kind})>"

    async def lookup(self, key: str) -> Values | None:
        """The values stored under *key*, or None when it is not there.

        Raises :class:`TableUnavailable` when the backend cannot answer within ``timeout``.
        """
        if self.fold_case:
            key = key.lower()
        if self.cache_size:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > time.monotonic():
                self._cache.move_to_end(key)
                self.hits += 1
                return cached[1]
            self.misses += 1
        try:
            if not self.backend.remote:  # in memory: nothing to wait for (and a timeout costs ~9 µs)
                found = await self.backend.lookup(key)
            else:
                async with asyncio.timeout(self.timeout):
                    found = await self.backend.lookup(key)
        except TableUnavailable as exc:
            self._failed(exc.reason)
            raise TableUnavailable(self.name, exc.reason) from None
        except TimeoutError:
            self._failed(f"no answer within {self.timeout:g} s")
            raise TableUnavailable(self.name, f"no answer within {self.timeout:g} s") from None
        except Exception as exc:  # a backend's library raises its own errors: all mean "unanswered"
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            self._failed(reason)
            raise TableUnavailable(self.name, reason) from exc
        if found is not None:
            found = tuple(found)
        if self.cache_size:
            ttl = self.cache_ttl if found is not None else self.negative_ttl
            if ttl > 0:
                self._cache[key] = (time.monotonic() + ttl, found)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return found

    def _failed(self, reason: str) -> None:
        event("table_unavailable", level=logging.WARNING, table=self.name, type=self.kind, error=reason)

    def forget(self) -> None:
        """Empty the cache (after a change the table's owner made, e.g. ``smtpproxy tables add``)."""
        self._cache.clear()

    async def close(self) -> None:
        self._cache.clear()
        await self.backend.close()
