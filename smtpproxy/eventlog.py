"""Structured logging: one line per session event, always carrying the session id.

``event("mail_from", sender=..., verdict=...)`` writes ``event=mail_from sid=... sender=...``
(key=value) or one JSON object per line. The session id comes from a context variable set
by the front end, so lines that plugins log through the standard ``logging`` module in a
session's task carry it too. Values are escaped, so a hostile HELO name cannot forge a
log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["configure_logging", "current_session", "event"]

current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "smtpproxy_session", default=None
)

_log = logging.getLogger("smtpproxy.session")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured session event."""
    if _log.isEnabledFor(level):
        _log.log(level, name, extra={"smtpproxy_fields": fields})


def _kv_value(value: Any) -> str:
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


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info event=... sid=... key=value ...``; every value escaped."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
        }
        structured = getattr(record, "smtpproxy_fields", None)
        sid = current_session.get()
        if structured is not None:
            fields["event"] = record.msg
            if sid:
                fields["sid"] = sid
            fields.update(structured)
        else:
            fields["logger"] = record.name
            if sid:
                fields["sid"] = sid
            fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, same fields as the key=value format."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname.lower()}
        structured = getattr(record, "smtpproxy_fields", None)
        sid = current_session.get()
        if structured is not None:
            out["event"] = record.msg
        else:
            out["logger"] = record.name
            out["msg"] = record.getMessage()
        if sid:
            out["sid"] = sid
        if structured is not None:
            out.update(structured)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str = "info", fmt: str = "kv") -> None:
    """Send smtpproxy's (and its plugins') logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO under its own names; our events replace those.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
