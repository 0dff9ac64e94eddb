"""The event log's handler (eventlog.BatchingHandler): the lines of one event-loop iteration
leave in one write at its end, in order; warnings, lines outside a loop and whatever is
pending at a flush leave at once (docs/operations.md, Logs)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.eventlog import BatchingHandler, KeyValueFormatter, event, flush_logs, writes_to_journal


class Stream:
    def __init__(self) -> None:
        self.writes: list[str] = []
        self.handler: logging.Handler | None = None

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def stream() -> Iterator[Stream]:
    out = Stream()
    handler = out.handler = BatchingHandler(out)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("smtpproxy.session")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _events(text: str) -> list[str]:
    return [line.split(" event=")[1].split(" ")[0] for line in text.splitlines()]


async def test_the_lines_of_one_iteration_leave_in_one_write_at_its_end(stream: Stream) -> None:
    event("connect", client="192.0.2.7")
    event("helo", hostname="client.test", verdict="continue")
    event("message", decision="delivered")
    assert stream.writes == []  # not yet: the loop has not turned
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert _events(stream.writes[0]) == ["connect", "helo", "message"]
    assert stream.writes[0].endswith("\n")
    event("disconnect")
    await asyncio.sleep(0)
    assert [_events(w) for w in stream.writes] == [["connect", "helo", "message"], ["disconnect"]]


async def test_a_warning_leaves_at_once_after_the_lines_before_it(stream: Stream) -> None:
    event("connect", client="192.0.2.7")
    event("milter_refusal_deferred", level=logging.WARNING, phase="rcpt_to")
    assert len(stream.writes) == 1
    assert _events(stream.writes[0]) == ["connect", "milter_refusal_deferred"]
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # nothing left to write


def test_outside_an_event_loop_each_line_leaves_at_once(stream: Stream) -> None:
    event("listening", address="127.0.0.1")
    assert [_events(w) for w in stream.writes] == [["listening"]]


async def test_a_thread_without_a_loop_writes_at_once_with_what_was_pending(stream: Stream) -> None:
    event("connect", client="192.0.2.7")
    thread = threading.Thread(target=lambda: event("from_a_thread"))
    thread.start()
    thread.join()
    assert [_events(w) for w in stream.writes] == [["connect", "from_a_thread"]]


async def test_a_flush_writes_what_is_pending(stream: Stream) -> None:
    event("connect", client="192.0.2.7")
    for handler in logging.getLogger("smtpproxy.session").handlers:
        handler.flush()  # what logging.shutdown() does at exit
    assert [_events(w) for w in stream.writes] == [["connect"]]


def test_a_loop_closed_before_its_turn_loses_nothing(stream: Stream) -> None:
    async def log(name: str) -> None:
        event(name)

    first = asyncio.new_event_loop()
    first.call_soon(event, "in_the_first_loop")
    first.call_soon(first.stop)  # the loop ends with this turn: the write was due at the next
    first.run_forever()
    first.close()
    assert stream.writes == []
    second = asyncio.new_event_loop()
    try:
        second.run_until_complete(log("in_the_second_loop"))
        second.run_until_complete(asyncio.sleep(0))
    finally:
        second.close()
    assert _events("".join(stream.writes)) == ["in_the_first_loop", "in_the_second_loop"]


async def test_flush_logs_writes_what_the_handlers_hold(stream: Stream) -> None:
    root = logging.getLogger()
    handler = stream.handler
    assert handler is not None
    root.addHandler(handler)  # flush_logs() flushes the root's handlers, as configure_logging sets them
    try:
        event("listening", address="127.0.0.1")
        assert stream.writes == []
        flush_logs()
        assert [_events(w) for w in stream.writes] == [["listening"]]
    finally:
        root.removeHandler(handler)


# -- the journal's priorities (level_prefix) --------------------------------------------------


async def test_with_level_prefix_each_line_starts_with_its_syslog_priority(stream: Stream) -> None:
    assert stream.handler is not None
    stream.handler.level_prefix = True  # type: ignore[attr-defined]
    logger = logging.getLogger("smtpproxy.session")
    logger.setLevel(logging.DEBUG)
    event("connect", client="192.0.2.7")
    event("proxy_header", level=logging.DEBUG)
    event("between", level=25)  # a level of someone's own: the lower neighbour's priority
    event("upstream_down", level=logging.WARNING)
    event("internal_error", level=logging.ERROR)
    event("crashed", level=logging.CRITICAL)
    logging.getLogger("smtpproxy.session.plugin").warning("a plugin's own line")  # a record, not an event
    lines = "".join(stream.writes).splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    assert all(line[3:].startswith("ts=") for line in lines)


def test_writes_to_journal_compares_the_stream_with_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd.exec(5): a process a service starts inherits $JOURNAL_STREAM with another stderr,
    so the variable alone does not say where the lines go."""
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "elsewhere").open("w") as elsewhere:
        status = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        assert writes_to_journal(journal)
        assert not writes_to_journal(elsewhere)
        assert not writes_to_journal(io.StringIO())  # no file descriptor at all
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not writes_to_journal(journal)
