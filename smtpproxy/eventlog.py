"""Structured logging: one line per session event, always carrying the session id.

``event("mail_from", sender=..., verdict=...)`` writes ``event=mail_from sid=... sender=...``
(key=value) or one JSON object per line. The session id comes from a context variable set
by the front end, so lines that plugins log through the standard ``logging`` module in a
session's task carry it too. Values are escaped, so a hostile HELO name cannot forge a
log line. Plugins emit their events the same way through :class:`EventLog`; a field may
not overwrite ``ts``, ``level``, ``event``, ``sid`` and the other fields of the line itself
(such a field is written with a trailing ``_``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import json.encoder
import logging
import os
import re
import sys
import time
from typing import Any

__all__ = ["BatchingHandler", "EventLog", "configure_logging", "current_session", "event", "flush_logs"]

current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "smtpproxy_session", default=None
)

_log = logging.getLogger("smtpproxy.session")

ACCEPTED_COMMANDS = frozenset({
    "connect", "helo", "starttls", "mail_from", "rcpt_to", "upstream_rcpt", "delivered", "disconnect",
})
"""The session events ``logging.accepted_commands`` moves: each one's line for a step that
passed (no verdict, ``continue`` or ``accept``; no reply, or a 2xx one). The ``message`` line
repeats what a message's lines say, so an admin may keep it alone at info."""


class _Accepted:
    """Where :func:`configure_logging` puts ``logging.accepted_commands``."""

    level = logging.INFO


def accepted_level(name: str, level: int, fields: dict[str, Any]) -> int:
    """The level *name*'s line is logged at: ``logging.accepted_commands`` for a step that
    passed, else *level*. Refusals, deferrals and problems keep theirs, so what fail2ban and
    alerts read never moves."""
    if level != logging.INFO or name not in ACCEPTED_COMMANDS:
        return level
    if fields.get("verdict", "continue") not in ("continue", "accept"):
        return level
    reply = fields.get("reply")
    if reply is not None and not str(reply).startswith("2"):
        return level
    return _Accepted.level


def event(name: str, /, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any) -> None:
    """Log one structured session event (*exc_info*: with the exception being handled).

    The record goes to the logger's handlers as ``Logger.log`` would send it (level, the
    loggers' filters and handlers, propagation), built as an :class:`_EventRecord` where
    :func:`configure_logging`'s switches are in force: seven of these a milter message, and
    ``Logger.log`` with ``LogRecord`` cost about half of each (issue 31's profile). Where the
    line would reach only :func:`configure_logging`'s handler, unfiltered, it is written
    without a record at all (:func:`_sole_handler`).
    """
    if _Accepted.level != logging.INFO:
        level = accepted_level(name, level, fields)
    if _log.isEnabledFor(level):
        if not exc_info:
            handler = _sole_handler(_log, level)
            if handler is not None and handler.write_event(level, name, fields):
                return
        if _plain_records():
            _log.handle(_EventRecord(_log.name, level, name, sys.exc_info() if exc_info else None, fields))
        else:
            _log.log(level, name, exc_info=exc_info, extra={"smtpproxy_fields": fields})


def _sole_handler(logger: logging.Logger, level: int) -> BatchingHandler | None:
    """The handler a record of *logger* at *level* reaches when nothing else sees it: the
    only handler on the way up (per ``propagate``, past those whose level is higher), one
    of ours with one of our formatters, and no filter on the logger or the handler. Then
    the line is the same without a ``LogRecord`` and ``Logger.handle``/``callHandlers``/
    ``Handler.handle``; anything else (pytest's caplog, an application's handler, a filter)
    gets the record as ``logging`` makes it. Walked for every line: handlers and filters
    may change at any time, and nothing tells."""
    if logger.filters or logger.disabled:
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level >= handler.level:
                if found is not None:
                    return None
                found = handler
        if not current.propagate:
            break
        current = current.parent
    if (type(found) is BatchingHandler and not found.filters
            and type(found.formatter) in _OUR_FORMATTERS):
        return found
    return None


def _plain_records() -> bool:
    """Whether a record needs no more than :class:`_EventRecord` has: ``logging``'s own
    record factory, and no source file, thread or process looked up (as
    :func:`configure_logging` sets it; an embedding application may want them)."""
    return (logging._srcfile is None
            and not (logging.logThreads or logging.logProcesses or logging.logMultiprocessing)
            and logging.getLogRecordFactory() is logging.LogRecord)


class _EventRecord(logging.LogRecord):
    """A :class:`logging.LogRecord` with every attribute ``LogRecord`` has, made in one
    dictionary update: the source-file fields are those of ``logging._srcfile = None``,
    the thread and process ones those of ``logThreads``/``logProcesses`` being off
    (:func:`_plain_records`)."""

    def __init__(self, logger: str, level: int, msg: str, exc_info: Any, fields: dict[str, Any]) -> None:
        created = time.time()
        self.__dict__.update(
            _RECORD_CONSTANTS, name=logger, msg=msg, levelname=logging.getLevelName(level),
            levelno=level, exc_info=exc_info, created=created,
            msecs=int((created - int(created)) * 1000) + 0.0,
            relativeCreated=(created - _START_TIME) * 1000, smtpproxy_fields=fields,
        )


_RECORD_CONSTANTS: dict[str, Any] = {
    "args": (), "pathname": "(unknown file)", "filename": "(unknown file)",
    "module": "(unknown file)", "exc_text": None, "stack_info": None, "lineno": 0,
    "funcName": "(unknown function)", "thread": None, "threadName": None, "processName": None,
    "process": None,
}
if sys.version_info >= (3, 12):
    _RECORD_CONSTANTS["taskName"] = None
_START_TIME: float = logging._startTime  # type: ignore[attr-defined]


class EventLog:
    """A plugin's structured events, in the same line format as the proxy's own.

    ``log = EventLog(__name__)`` then ``log.info("spf", result="fail", ip=ip)`` writes
    ``ts=... level=info event=spf sid=... result=fail ip=...`` (or the JSON equivalent).
    The logger is ``logging.getLogger(name)``, so its level can be set per plugin.
    """

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def event(self, name: str, /, level: int = logging.INFO, **fields: Any) -> None:
        """Log event ``name`` with ``fields`` (values are escaped; None is written as -)."""
        self._emit(name, level, fields)

    def debug(self, name: str, /, **fields: Any) -> None:
        self._emit(name, logging.DEBUG, fields)

    def info(self, name: str, /, **fields: Any) -> None:
        self._emit(name, logging.INFO, fields)

    def warning(self, name: str, /, **fields: Any) -> None:
        self._emit(name, logging.WARNING, fields)

    def error(self, name: str, /, **fields: Any) -> None:
        self._emit(name, logging.ERROR, fields)

    def _emit(self, name: str, level: int, fields: dict[str, Any]) -> None:
        logger = self.logger
        if logger.isEnabledFor(level):
            handler = _sole_handler(logger, level)
            if handler is not None and handler.write_event(level, name, fields):
                return
            if _plain_records():  # no source file to name: the record as event() makes it
                logger.handle(_EventRecord(logger.name, level, _EventName(name, fields), None, fields))
                return
            # stacklevel: the record names the plugin's line, not this one.
            logger.log(level, _EventName(name, fields), stacklevel=3, extra={"smtpproxy_fields": fields})


class _EventName(str):
    """The event name as a record's ``msg``; printed by a foreign formatter (``caplog``, a
    handler the embedding application installed) it is the whole ``event=... key=...`` line."""

    fields: dict[str, Any]

    def __new__(cls, name: str, fields: dict[str, Any]) -> _EventName:
        self = super().__new__(cls, name)
        self.fields = fields
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle keep the fields
        return _EventName, (str.__str__(self), self.fields)

    def __str__(self) -> str:
        pairs = {"event": str.__str__(self), **_own_fields(self.fields)}
        return " ".join(f"{k}={_kv_value(v)}" for k, v in pairs.items())


# The fields every line has; an event's own field of the same name gets a trailing "_".
_RESERVED = frozenset({"ts", "level", "event", "sid", "logger", "msg", "exc"})
_BAD_KEY_CHAR = re.compile(r"[^A-Za-z0-9_.:-]")


def _own_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {_key(key): value for key, value in fields.items()}


_PLAIN_KEYS: set[Any] = set()
"""Field names seen that are written unchanged (most of them: ``tx``, ``sender``, ...); a
line of only these needs no renaming, hence no check for two names becoming one."""


def _learn_plain(fields: dict[str, Any]) -> None:
    if len(_PLAIN_KEYS) < 4096:
        _PLAIN_KEYS.update(k for k in fields if type(k) is str and _key(k) == k)


@functools.lru_cache(maxsize=1024)
def _key(key: Any) -> str:
    """A field name as written: unsafe characters replaced, reserved names suffixed.
    Cached: the same few dozen names come with every line (issue 31's profile)."""
    name = _BAD_KEY_CHAR.sub("_", str(key)) or "_"
    return name + "_" if name in _RESERVED else name


_json_string = json.encoder.encode_basestring_ascii
"""``json.dumps(text, ensure_ascii=True)`` of a str: the function it ends in, without its
encoder's set-up (``reply="250 2.0.0"``, ``reason=""``: three a message)."""


def _kv_value(value: Any) -> str:
    # Strings and integers first: nearly every value of a line (issue 31's profile).
    if type(value) is str:
        text = value
    elif type(value) is int:
        return str(value)  # digits and a sign: always bare
    elif value is None:
        return "-"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(map(str, value))
    else:
        text = str(value)
    # Plain when every character is printable and none is a space, quote, = or backslash.
    if (text and text.isprintable() and " " not in text and '"' not in text and "=" not in text
            and "\\" not in text):
        return text
    return _json_string(text)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info event=... sid=... key=value ...``; every value escaped."""

    def format(self, record: logging.LogRecord) -> str:
        # Parts joined once, no intermediate dict: a line is formatted for every event
        # (tests/unit/test_eventlog_fastpath.py holds it to the plain definition).
        structured = getattr(record, "smtpproxy_fields", None)
        if structured is not None:
            line = _kv_event_line(record.created, record.levelname, _name(record), structured)
        else:
            head = f"ts={_timestamp(record.created)} level={_level(record.levelname)}"
            parts = [head, "logger=" + _kv_value(record.name)]
            sid = current_session.get()
            if sid:
                parts.append("sid=" + _kv_value(sid))
            parts.append("msg=" + _kv_value(record.getMessage()))
            line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + _kv_value(self.formatException(record.exc_info))
        return line

    def event_line(self, level: int, name: str, fields: dict[str, Any]) -> str:
        """The line of an event logged now, without a record (:meth:`BatchingHandler.write_event`)."""
        return _kv_event_line(time.time(), _level_name(level), name, fields)


def _level_name(level: int) -> str:
    """``logging.getLevelName`` of a number, as a record's ``levelname`` is."""
    return logging._levelToName.get(level) or logging.getLevelName(level)


def _kv_event_line(created: float, levelname: str, name: str, fields: dict[str, Any]) -> str:
    parts = ["ts=" + _timestamp(created) + _head(levelname, name)]
    sid = current_session.get()
    if sid:
        parts.append("sid=" + _kv_value(sid))
    if _PLAIN_KEYS.issuperset(fields):  # written as they are: no two can collide
        parts += [f"{k}={_kv_value(v)}" for k, v in fields.items()]
    else:
        parts += [f"{k}={_kv_value(v)}" for k, v in _own_fields(fields).items()]
        _learn_plain(fields)
    return " ".join(parts)


@functools.lru_cache(maxsize=256)
def _head(levelname: str, name: str) -> str:
    """`` level=info event=connect`` (after the time): the same few dozen pairs every line."""
    return f" level={_level(levelname)} event={_kv_value(name)}"


@functools.lru_cache(maxsize=64)
def _level(levelname: str) -> str:
    return _kv_value(levelname.lower())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, same fields as the key=value format."""

    def format(self, record: logging.LogRecord) -> str:
        structured = getattr(record, "smtpproxy_fields", None)
        if structured is not None:
            out = _json_event(record.created, record.levelname, _name(record), structured)
        else:
            out = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
                   "logger": record.name, "msg": record.getMessage()}
            sid = current_session.get()
            if sid:
                out["sid"] = sid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json_line(out)

    def event_line(self, level: int, name: str, fields: dict[str, Any]) -> str:
        """The line of an event logged now, without a record (:meth:`BatchingHandler.write_event`)."""
        return _json_line(_json_event(time.time(), _level_name(level), name, fields))


def _json_event(created: float, levelname: str, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": _timestamp(created), "level": levelname.lower(), "event": name}
    sid = current_session.get()
    if sid:
        out["sid"] = sid
    out.update(_own_fields(fields))
    return out


_json_line = json.JSONEncoder(ensure_ascii=False, default=str).encode
"""``json.dumps(out, default=str, ensure_ascii=False)`` with one encoder for every line
(``json.dumps`` makes a new one per call when given any option)."""

_OUR_FORMATTERS = (KeyValueFormatter, JsonFormatter)


def _name(record: logging.LogRecord) -> str:
    return str.__str__(record.msg) if isinstance(record.msg, str) else str(record.msg)


def _timestamp(created: float) -> str:
    whole = int(created)
    last_whole, last_text = _last_second[0]
    second = last_text if last_whole == whole else _second(whole)
    return second + _MILLISECONDS[int(created % 1 * 1000)]


_MILLISECONDS = tuple(f".{n:03d}Z" for n in range(1000))
_last_second: list[tuple[int, str]] = [(-1, "")]
"""The last second formatted, and its text (one tuple, replaced whole: threads log too)."""


def _second(whole: int) -> str:
    """The date and time to the second, formatted once per second rather than per line."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    _last_second[0] = (whole, text)
    return text


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write the lines of one event-loop iteration together, at its end: one ``write(2)``
    for the several lines a message makes (``connect`` ... ``message``) and for those of
    other sessions handled in the same iteration, instead of one per line.

    Each line is formatted when it is logged (its ``ts`` is that moment); only the write
    waits, for the loop's next turn. A line at level warning or above is written at once,
    with the lines before it, and so is every line logged outside a running event loop
    (start-up, a worker thread) and whatever is pending when the handler is flushed or
    closed (``logging.shutdown`` at exit, a new :func:`configure_logging`).

    With *level_prefix* each line starts with its syslog priority, ``<6>`` for info, ``<4>``
    for a warning (sd-daemon(3)): journald takes it off the line and files the line under
    that priority (:func:`writes_to_journal`).
    """

    def __init__(self, stream: Any = None, *, level_prefix: bool = False) -> None:
        super().__init__(stream)
        self.level_prefix = level_prefix
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        """The loop whose next turn writes the pending lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue(line, record.levelno)

    def write_event(self, level: int, name: str, fields: dict[str, Any]) -> bool:
        """Write an event's line as :meth:`emit` would write its record's, with no record
        (:func:`_sole_handler` found this handler, with one of our formatters, to be all
        that sees it). False when the line cannot be made (a value's ``str`` raised): the
        caller logs it the ordinary way, which reports the error as ``logging`` does."""
        try:
            line = self.formatter.event_line(level, name, fields)  # type: ignore[union-attr]
        except Exception:
            return False
        with self.lock:  # type: ignore[union-attr]
            self._queue(line, level)
        return True

    def _queue(self, line: str, levelno: int) -> None:
        self._pending.append(syslog_prefix(levelno) + line if self.level_prefix else line)
        if levelno >= logging.WARNING:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: nothing would come back to write it
            self.flush()
            return
        if self._scheduled is not loop:  # (a loop closed before its turn came: schedule anew)
            self._scheduled = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._scheduled = None
            if self._pending:
                text = "\n".join(self._pending) + self.terminator
                self._pending.clear()
                # A closed or broken stderr loses the lines; logging itself never raises.
                with contextlib.suppress(Exception):
                    self.stream.write(text)
            if hasattr(self.stream, "flush"):
                with contextlib.suppress(Exception):
                    self.stream.flush()


def flush_logs() -> None:
    """Write the lines the handlers still hold, before telling another process something
    that they should come before (a worker's ``listening`` before its supervisor's
    ``workers_ready``)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def syslog_prefix(levelno: int) -> str:
    """The ``<N>`` that gives a line of *levelno* its syslog priority in the journal: 2
    (critical), 3 (error), 4 (warning), 6 (info), 7 (debug); a level between two takes the
    lower one's."""
    if levelno >= logging.WARNING:
        return "<2>" if levelno >= logging.CRITICAL else "<3>" if levelno >= logging.ERROR else "<4>"
    return "<6>" if levelno >= logging.INFO else "<7>"


def writes_to_journal(stream: Any) -> bool:
    """Whether *stream* is systemd's journal: ``$JOURNAL_STREAM`` names the device and inode
    of a service's stderr (systemd.exec(5)). Compared, not only present: a process a service
    starts inherits the variable with another stderr.

    Without the prefix journald files every line of the service at priority info, its
    warnings and errors too (``journalctl -p warning`` shows none of them), and counts them
    against the same rate limit as the info lines: past roughly 100-170 messages a second
    that limit drops lines, an ``upstream_down`` as readily as a ``connect`` (docs/operations.md).
    """
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (pytest's capture, a StringIO)
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def configure_logging(level: str = "info", fmt: str = "kv", accepted_commands: str = "info") -> None:
    """Send smtpproxy's (and its plugins') logs to stderr in the chosen format, one write
    per event-loop iteration (:class:`BatchingHandler`), each line with its priority when
    stderr is the journal; the lines of steps that passed at *accepted_commands*
    (:data:`ACCEPTED_COMMANDS`)."""
    _Accepted.level = logging.getLevelNamesMapping()[accepted_commands.upper()]
    handler = BatchingHandler(sys.stderr, level_prefix=writes_to_journal(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        old.flush()
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither format writes the process, thread or task of a record: don't look them up for
    # every line (os.getpid() and friends, a measurable share of each line's cost).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    # Nor the file and line that logged it: no stack walk per line (the logging HOWTO's
    # "Optimization" section names this switch).
    logging._srcfile = None
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    # aiosmtpd logs every command at INFO under its own names; our events replace those.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
