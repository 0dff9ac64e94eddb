"""The key=value line format after issue 31's cheaper formatting (eventlog.py): the same text as the
straightforward definition (every character printable and none of ``' "=\\'``: written
bare, else JSON-quoted), for any value and any field name."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from smtpproxy import eventlog


def reference_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def reference_key(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", key) or "_"
    return name + "_" if name in {"ts", "level", "event", "sid", "logger", "msg", "exc"} else name


@given(st.text())
def test_values_are_written_as_the_reference_says(text: str) -> None:
    assert eventlog._kv_value(text) == reference_value(text)


@given(st.one_of(st.none(), st.integers(), st.booleans(), st.floats(allow_nan=True), st.lists(st.text(max_size=5))))
def test_other_values_too(value: Any) -> None:
    assert eventlog._kv_value(value) == reference_value(value)


@given(st.text(max_size=12))
def test_field_names_as_the_reference_says(key: str) -> None:
    assert eventlog._own_fields({key: 1}) == {reference_key(key): 1}


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_timestamps_as_strftime_writes_them(created: float) -> None:
    import time

    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
    assert eventlog._timestamp(created) == expected


def test_a_line_is_unchanged() -> None:
    record = logging.LogRecord("smtpproxy.session", logging.INFO, __file__, 1, "rcpt_to", None, None)
    record.created = 1_765_000_000.25
    record.smtpproxy_fields = {"recipient": "rcpt@bench.test", "by": None, "event": "x y", "n": 1.5}
    token = eventlog.current_session.set("abc123")
    try:
        line = eventlog.KeyValueFormatter().format(record)
    finally:
        eventlog.current_session.reset(token)
    assert line == ('ts=2025-12-06T05:46:40.250Z level=info event=rcpt_to sid=abc123 '
                    'recipient=rcpt@bench.test by=- event_="x y" n=1.5')


def reference_line(record: logging.LogRecord, sid: str | None) -> str:
    """The key=value line as it was defined before the formatter built it part by part."""
    fields: dict[str, Any] = {"ts": eventlog._timestamp(record.created), "level": record.levelname.lower()}
    structured = getattr(record, "smtpproxy_fields", None)
    if structured is not None:
        fields["event"] = str(record.msg)
        if sid:
            fields["sid"] = sid
        fields.update({reference_key(str(k)): v for k, v in structured.items()})
    else:
        fields["logger"] = record.name
        if sid:
            fields["sid"] = sid
        fields["msg"] = record.getMessage()
    return " ".join(f"{k}={reference_value(v)}" for k, v in fields.items())


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=6),
       st.sampled_from([None, "", "abc123"]), st.text(max_size=8), st.sampled_from([logging.INFO, 5, logging.WARNING]),
       st.booleans())
def test_whole_lines_as_the_reference_says(fields: dict[str, Any], sid: str | None, name: str, level: int,
                                           structured: bool) -> None:
    record = logging.LogRecord("smtpproxy.session", level, __file__, 1, name or "ev", None, None)
    if structured:
        record.smtpproxy_fields = fields
    token = eventlog.current_session.set(sid)
    try:
        line = eventlog.KeyValueFormatter().format(record)
    finally:
        eventlog.current_session.reset(token)
    assert line == reference_line(record, sid)
