"""The message history: every decision recorded in the store, off the SMTP path.

A front end calls :meth:`HistoryRecorder.record` after each message (the same facts as its
``message`` log line). That only appends to a bounded queue; a background task writes the
queue to the store in batches (``history.batch_size``, at least every
``history.flush_interval`` seconds), each batch one transaction with a deadline
(``store.timeout``). When the store is slow or down the queue fills and further decisions
are dropped, counted (``smtpproxy_history_entries_total{result="dropped"}``) and warned
about (``event=history_dropped``, at most once a minute): the mail never waits for history.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.header
import logging
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from smtpproxy.eventlog import event
from smtpproxy.metrics import NullRecorder
from smtpproxy.store import HistoryEntry, Store, StoreError

if TYPE_CHECKING:
    from smtpproxy.config import Config
    from smtpproxy.session import Decision, Session, Transaction

__all__ = ["HistoryRecorder", "decoded_header", "entry_for", "node_name"]

_MAX_TEXT = 998
_WARN_EVERY = 60.0


def node_name(config: Config) -> str:
    """This proxy's name in the store's records."""
    return config.store.node or socket.gethostname()


def decoded_header(value: str | None) -> str | None:
    """A header value for display and search: RFC 2047 words decoded, one line, bounded."""
    if value is None:
        return None
    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        text = value
    return " ".join(text.split())[:_MAX_TEXT]


def entry_for(session: Session, transaction: Transaction, decision: Decision, *, node: str,
              quarantine_id: str | None = None, groups: Mapping[str, str] | None = None) -> HistoryEntry:
    """The history entry for one message's decision.

    *groups* maps each recipient to its policy group (the conversation's ``GROUPS_NOTE``;
    None without ``policies:``). The recipients of one transaction share a group key but may
    be in different groups, so each recipient keeps its own, and ``policy_group`` has them all.
    """
    message = transaction.message
    reason = decision.reason
    if quarantine_id is not None:  # the front end appends it for the log line; here it has a column
        reason = reason.removesuffix(f" (id {quarantine_id})")
    recipients = [r.address.text for r in transaction.envelope.recipients]
    chosen = {r: groups[r] for r in recipients if groups is not None and r in groups}
    return HistoryEntry(
        id=f"{node}.{transaction.id}.{time.time_ns()}",
        time=time.time(), node=node, session=session.id, client=session.client.ip, helo=session.helo,
        sender=transaction.envelope.sender.text,
        recipients=recipients,
        message_id=decoded_header(message.get("Message-ID")) if message is not None else None,
        subject=decoded_header(message.get("Subject")) if message is not None else None,
        size=message.size if message is not None else None,
        decision=decision.disposition, decided_by=decision.decided_by, score=decision.score,
        reason=reason[:_MAX_TEXT] or None,
        reply=f"{decision.reply.code} {decision.reply.enhanced or ''}".strip(),
        quarantine_id=quarantine_id,
        policy_group=",".join(sorted(set(chosen.values()))) or None, groups=chosen,
    )


class HistoryRecorder:
    """Decisions queued in memory (bounded) and written to the store in batches."""

    def __init__(self, store: Store, *, batch_size: int = 200, queue_limit: int = 10000,
                 flush_interval: float = 1.0, timeout: float = 10.0,
                 metrics: NullRecorder | None = None) -> None:
        self.store = store
        self.batch_size = batch_size
        self.queue_limit = queue_limit
        self.flush_interval = flush_interval
        self.timeout = timeout
        self.metrics = metrics or NullRecorder()
        self.written = 0
        self.dropped = 0
        self._queue: collections.deque[HistoryEntry] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_warning = float("-inf")
        self._unwarned = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, entry: HistoryEntry) -> None:
        """Queue a decision; never waits. A full queue drops it (counted, warned about)."""
        if len(self._queue) >= self.queue_limit:
            self._drop(1, "queue full (store slow or down)")
            return
        self._queue.append(entry)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="smtpproxy-history")

    async def close(self, grace: float = 5.0) -> None:
        """Write what is queued (within *grace* seconds), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + grace
        while self._queue and time.monotonic() < deadline:
            if not await self._flush(min(self.timeout, max(0.1, deadline - time.monotonic()))):
                break
        if self._queue:
            self._drop(len(self._queue), "shutting down with the store unavailable")
            self._queue.clear()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            while self._queue:
                if not await self._flush(self.timeout):
                    break  # the store failed: the queue holds (bounded) until the next round
                if len(self._queue) < self.batch_size:
                    break

    async def _flush(self, seconds: float) -> bool:
        batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
        try:
            await asyncio.wait_for(self.store.add_history(batch), seconds)
        except (StoreError, TimeoutError) as exc:
            self._drop(len(batch), f"store failed: {exc or type(exc).__name__}")
            return False
        self.written += len(batch)
        self.metrics.history("written", len(batch))
        return True

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        self._unwarned += count
        self.metrics.history("dropped", count)
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            event("history_dropped", level=logging.WARNING, entries=self._unwarned, reason=why,
                  queued=len(self._queue))
            self._unwarned = 0
