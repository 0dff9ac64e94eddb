"""Events written without a LogRecord (eventlog._sole_handler, BatchingHandler.write_event):
only where configure_logging's handler is all that would see the record, and then the very
line the record would have made; caplog, other handlers and filters still get records."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy import eventlog
from smtpproxy.eventlog import BatchingHandler, EventLog, JsonFormatter, KeyValueFormatter, event

NOW = 1_765_000_000.25


@pytest.fixture
def configured() -> Iterator[tuple[BatchingHandler, io.StringIO]]:
    """One BatchingHandler, as configure_logging sets it on the root, here on the loggers of
    the events (not propagating: pytest keeps its own handlers on the root while a test runs)."""
    out = io.StringIO()
    handler = BatchingHandler(out)
    handler.setFormatter(KeyValueFormatter())
    loggers = [logging.getLogger("smtpproxy.session"), logging.getLogger("plugins.example")]
    saved = [(log.level, log.propagate) for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        yield handler, out
    finally:
        for log, (level, propagate) in zip(loggers, saved, strict=True):
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate


@contextlib.contextmanager
def alone(handler: logging.Handler) -> Iterator[None]:
    """Only *handler* on the events' loggers: while a test runs, pytest attaches its capturing
    handlers to the root and to every logger that does not propagate."""
    with (mock.patch.object(logging.getLogger("smtpproxy.session"), "handlers", [handler]),
          mock.patch.object(logging.getLogger("plugins.example"), "handlers", [handler])):
        yield


values = st.one_of(st.none(), st.text(max_size=8), st.integers(), st.floats(allow_nan=False),
                   st.lists(st.text(max_size=4), max_size=3), st.booleans())


@given(st.dictionaries(st.text(max_size=8), values, max_size=6), st.sampled_from([None, "", "abc123"]),
       st.text(min_size=1, max_size=8), st.sampled_from([logging.INFO, 5, logging.WARNING, logging.ERROR]),
       st.sampled_from([KeyValueFormatter, JsonFormatter]))
def test_the_line_without_a_record_is_the_records_line(fields: dict[str, Any], sid: str | None, name: str,
                                                       level: int, formatter: type[logging.Formatter]) -> None:
    record = eventlog._EventRecord("smtpproxy.session", level, name, None, fields)
    record.created = NOW
    token = eventlog.current_session.set(sid)
    try:
        with mock.patch("time.time", return_value=NOW):
            direct = formatter().event_line(level, name, fields)  # type: ignore[attr-defined]
        assert direct == formatter().format(record)
    finally:
        eventlog.current_session.reset(token)


def test_only_the_configured_handler_alone_takes_the_short_way(configured: tuple[BatchingHandler, io.StringIO]) -> None:
    handler, _ = configured
    log = logging.getLogger("smtpproxy.session")
    foreign = logging.StreamHandler(io.StringIO())  # pytest's capture (9.2 adds it), an application's
    with mock.patch.object(log, "handlers", [handler, foreign]):
        assert eventlog._sole_handler(log, logging.INFO) is None
    with alone(handler):
        _only_ours_alone(handler, log)


def _only_ours_alone(handler: BatchingHandler, log: logging.Logger) -> None:
    assert eventlog._sole_handler(log, logging.INFO) is handler
    other = logging.StreamHandler(io.StringIO())
    log.addHandler(other)  # a second handler on the way (as pytest's caplog adds one to the root)
    try:
        assert eventlog._sole_handler(log, logging.INFO) is None
        other.setLevel(logging.ERROR)  # one that this level does not reach does not count
        assert eventlog._sole_handler(log, logging.INFO) is handler
        assert eventlog._sole_handler(log, logging.ERROR) is None
    finally:
        log.removeHandler(other)
    handler.addFilter(lambda record: True)
    assert eventlog._sole_handler(log, logging.INFO) is None
    handler.filters.clear()
    log.addFilter(lambda record: True)
    try:
        assert eventlog._sole_handler(log, logging.INFO) is None
    finally:
        log.filters.clear()
    handler.setFormatter(logging.Formatter())  # not one of ours: it gets the record
    assert eventlog._sole_handler(log, logging.INFO) is None


async def test_filters_still_see_every_event(configured: tuple[BatchingHandler, io.StringIO]) -> None:
    handler, out = configured
    seen: list[logging.LogRecord] = []

    def keep_all_but_helo(record: logging.LogRecord) -> bool:
        seen.append(record)
        return record.getMessage() != "helo"

    handler.addFilter(keep_all_but_helo)
    with alone(handler):
        event("connect", client="192.0.2.7")
        event("helo", hostname="client.test")
        EventLog("plugins.example").info("spf", result="pass")
    handler.flush()
    assert [r.msg for r in seen] == ["connect", "helo", "spf"]
    assert seen[0].smtpproxy_fields == {"client": "192.0.2.7"}  # type: ignore[attr-defined]
    assert [line.split(" event=")[1].split(" ")[0] for line in out.getvalue().splitlines()] == ["connect", "spf"]


async def test_caplog_beside_the_configured_handler_gets_the_records(
    configured: tuple[BatchingHandler, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    handler, out = configured
    log = logging.getLogger("smtpproxy.session")
    log.propagate = True  # up to the root, where caplog's handler is
    log.handlers[:] = [handler]
    with caplog.at_level(logging.INFO, logger="smtpproxy.session"):
        assert eventlog._sole_handler(log, logging.INFO) is None
        event("rcpt_to", tx="abc.1", recipient="bob@dest.test")
    assert [(r.msg, r.smtpproxy_fields) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("rcpt_to", {"tx": "abc.1", "recipient": "bob@dest.test"})]
    handler.flush()
    assert "event=rcpt_to" in out.getvalue()


async def test_the_short_way_writes_the_same_batched_lines(configured: tuple[BatchingHandler, io.StringIO]) -> None:
    handler, out = configured
    token = eventlog.current_session.set("abc123")
    try:
        with alone(handler), mock.patch("time.time", return_value=NOW), \
                mock.patch.object(handler, "format", side_effect=AssertionError("a record was made")):
            event("rcpt_to", tx="abc123.1", recipient="bob@dest.test", by=None)
            EventLog("plugins.example").info("spf", result="pass", ip="192.0.2.7")
            assert out.getvalue() == ""  # held for the loop's next turn, as BatchingHandler.emit does
            event("milter_refusal_deferred", level=logging.WARNING, phase="rcpt_to")  # a warning: at once
    finally:
        eventlog.current_session.reset(token)
    lines = out.getvalue().splitlines()
    assert lines[:2] == [
        "ts=2025-12-06T05:46:40.250Z level=info event=rcpt_to sid=abc123 tx=abc123.1 recipient=bob@dest.test by=-",
        "ts=2025-12-06T05:46:40.250Z level=info event=spf sid=abc123 result=pass ip=192.0.2.7",
    ]
    assert lines[2] == "ts=2025-12-06T05:46:40.250Z level=warning event=milter_refusal_deferred sid=abc123 phase=rcpt_to"


async def test_a_value_that_cannot_be_written_is_reported_as_logging_reports_it(
    configured: tuple[BatchingHandler, io.StringIO]
) -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    handler, out = configured
    with alone(handler), mock.patch.object(handler, "handleError") as handle_error:
        event("connect", client=Broken())
    (record,) = handle_error.call_args.args
    assert record.msg == "connect"  # the record, made the ordinary way once the short way failed
    handler.flush()
    assert out.getvalue() == ""
