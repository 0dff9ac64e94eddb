"""The line format the event log keeps, as docs/operations.md says ("Why the event log is not
structlog"): the reasons given there for keeping it must stay true of the code."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from smtpproxy.eventlog import KeyValueFormatter, current_session

ROOT = Path(__file__).resolve().parents[2]


def _line(**fields: object) -> str:
    record = logging.LogRecord("smtpproxy.session", logging.INFO, __file__, 1, "ev", None, None)
    record.smtpproxy_fields = fields
    token = current_session.set("9f2c4e1ab003")
    try:
        return KeyValueFormatter().format(record)
    finally:
        current_session.reset(token)


def test_the_values_the_decision_names_render_as_documented() -> None:
    line = _line(n=None, l=[1, 2], f=0.123456, helo='x\r\nts=1 event=fake "q"')
    assert re.fullmatch(r'ts=\S+Z level=info event=ev sid=9f2c4e1ab003 n=- l=1,2 f=0\.1235 '
                        r'helo="x\\r\\nts=1 event=fake \\"q\\""', line), line
    docs = (ROOT / "docs" / "operations.md").read_text()
    section = docs[docs.index("### Why the event log is not structlog"):docs.index("## Metrics, health")]
    assert "(here\n  `n=-`)" in section and "(here `1,2`)" in section and "4 significant digits" in section
    assert "bench/eventlog_cost.py" in section and (ROOT / "bench" / "eventlog_cost.py").exists()
    assert (ROOT / "bench" / "results" / "eventlog-cost.md").exists()
