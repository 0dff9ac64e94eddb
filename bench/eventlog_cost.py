"""What one log line costs: smtpproxy's event log against structlog doing the same job.

Issue 30 asked whether smtpproxy/eventlog.py (stdlib ``logging`` plus two formatters) should
move to structlog. This measures the cost per line of each way to write the proxy's two
most common lines (an ``rcpt_to`` phase line, and the ``message`` summary with a dozen
fields) to /dev/null, with the session id in a context variable, and the cost of a line
whose level is off. It is a micro-benchmark, not a test: run it by hand (a few seconds)::

    pip install structlog            # the [bench] extra has it
    python bench/eventlog_cost.py    # --lines N per case (default 50000)
    python bench/eventlog_cost.py --smtpproxy-only --root /tmp/before   # another checkout's eventlog

The ``smtpproxy kv`` and ``json`` rows are a plain ``StreamHandler`` with the formatter (as
this file measured first); the ``configured`` rows are what the proxy runs:
``configure_logging()`` (its :class:`BatchingHandler`, the switches it sets) inside a running
event loop, the lines of a round written together.

The structlog rows are configured as smtpproxy would need them: ``stdlib`` is structlog in
front of ``logging`` with ``ProcessorFormatter`` (what keeps plugins' plain ``logging``
lines, per-logger levels and pytest's caplog working, as they do now); ``native`` is
structlog's fastest set-up (``make_filtering_bound_logger`` writing straight to the file,
no ``logging`` at all), which would lose those. Both render with structlog's own
``LogfmtRenderer`` and ``JSONRenderer``; note that these do not write smtpproxy's
documented format (None is ``n=`` not ``n=-``, a list is ``"[1, 2]"`` not ``1,2``), so a
real migration would add processors that do what ``_kv_value`` does now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import io
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = (Path(sys.argv[sys.argv.index("--root") + 1]) if "--root" in sys.argv
         else Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(_ROOT.resolve()))

from smtpproxy import eventlog  # noqa: E402 - after the path of the checkout measured
from smtpproxy.eventlog import JsonFormatter, KeyValueFormatter, current_session, event  # noqa: E402

RCPT = {"tx": "9f2c4e1ab003.1", "recipient": "x@example.com", "verdict": "continue"}
SUMMARY = {
    "tx": "9f2c4e1ab003.1", "sender": "a@example.org", "recipients": ["bob@example.com"], "size": 2048,
    "decision": "delivered", "reply": "250 2.0.0", "by": "delivery", "reason": "127.0.0.1:10025",
    "score": 1.5, "ms": 38.2, "client": "192.0.2.7", "helo": "mail.example.org",
}


def _measure(emit: Callable[[], None], lines: int) -> float:
    """Nanoseconds of this process's CPU per call, the best of three rounds (the least
    disturbed by other load; CPU time, not wall time: neighbours' turns are not counted)."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time_ns()
        for _ in range(lines):
            emit()
        best = min(best, (time.process_time_ns() - started) / lines)
    return best


def _stdlib_handler(sink: io.TextIOBase, formatter: logging.Formatter) -> None:
    handler = logging.StreamHandler(sink)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def smtpproxy_cases(sink: io.TextIOBase) -> dict[str, Callable[[], None]]:
    def kv_rcpt() -> None:
        event("rcpt_to", **RCPT)

    def kv_summary() -> None:
        event("message", **SUMMARY)

    def debug_off() -> None:
        event("proxy_header", level=logging.DEBUG, **RCPT)

    return {"rcpt_to": kv_rcpt, "message": kv_summary, "level off": debug_off}


def structlog_cases(sink: io.TextIOBase, mode: str, renderer: str) -> dict[str, Callable[[], None]]:
    import structlog

    render = (structlog.processors.LogfmtRenderer() if renderer == "kv"
              else structlog.processors.JSONRenderer())
    shared = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if mode == "stdlib":
        handler = logging.StreamHandler(sink)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, render], foreign_pre_chain=shared))
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        structlog.configure(
            processors=[structlog.stdlib.filter_by_level, *shared,
                        structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger, cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[*shared, render],
            logger_factory=structlog.WriteLoggerFactory(file=sink),
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            cache_logger_on_first_use=True,
        )
    log = structlog.get_logger("smtpproxy.session")

    def rcpt() -> None:
        log.info("rcpt_to", **RCPT)

    def summary() -> None:
        log.info("message", **SUMMARY)

    def debug_off() -> None:
        log.debug("proxy_header", **RCPT)

    return {"rcpt_to": rcpt, "message": summary, "level off": debug_off}


NEGOTIATED: dict[str, Any] = {"version": 6, "actions": "0xff", "protocol": "0x1c7380",
              "granted": ["ADDHDRS", "CHGBODY", "ADDRCPT", "DELRCPT", "CHGHDRS", "QUARANTINE", "CHGFROM",
                          "ADDRCPT_PAR"], "not_granted": []}


async def _milter_message(messages: int) -> float:
    """Microseconds of CPU for the seven lines of a milter message at info (their fields as
    ``smtpproxy milter`` logs them with no plugins), the loop turning once per message as the
    server's does: the best of five rounds."""
    async def one(n: int) -> None:
        sid = f"{n:012x}"
        event("milter_negotiated", peer="127.0.0.1:40000", **NEGOTIATED)
        current_session.set(sid)
        event("connect", client="127.0.0.1", port=40000, transport="milter", mta="mx.test")
        event("helo", hostname="client.test", verdict="continue")
        event("mail_from", tx=sid + ".1", sender="alice@sender.test", verdict="continue", queue_id="4ABC")
        event("rcpt_to", tx=sid + ".1", recipient="bob@dest.test", verdict="continue")
        event("message", tx=sid + ".1", sender="alice@sender.test", recipients=["bob@dest.test"], size=1361,
              decision="delivered", reply="250 2.0.0", by="delivery", reason="", score=0, ms=0.4,
              queue_id="4ABC", edits=0)
        event("disconnect", transactions=1, seconds=0.001)
        await asyncio.sleep(0)

    best = float("inf")
    for _ in range(5):
        started = time.process_time_ns()
        for n in range(messages):
            await one(n)
        best = min(best, (time.process_time_ns() - started) / messages / 1000)
    return best


def _configured(sink: io.TextIOBase, fmt: str) -> None:
    """The proxy's own set-up (configure_logging), its handler writing to *sink*."""
    saved = sys.stderr
    sys.stderr = sink  # type: ignore[assignment,unused-ignore]
    try:
        eventlog.configure_logging("info", fmt)
    finally:
        sys.stderr = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50000, help="lines per case and round")
    parser.add_argument("--smtpproxy-only", action="store_true", help="no structlog rows")
    parser.add_argument("--root", type=Path, help="the checkout whose smtpproxy is measured (default: this)")
    args = parser.parse_args()
    sid = "9f2c4e1ab003"
    rows: list[tuple[str, dict[str, float]]] = []
    milter: dict[str, float] = {}
    with open(os.devnull, "w") as sink:
        def run(label: str, cases: dict[str, Callable[[], None]], bind: Callable[[], None]) -> None:
            def measured() -> dict[str, float]:
                bind()
                return {case: _measure(emit, args.lines) for case, emit in cases.items()}
            rows.append((label, contextvars.copy_context().run(measured)))

        _stdlib_handler(sink, KeyValueFormatter())
        run("smtpproxy kv", smtpproxy_cases(sink), lambda: current_session.set(sid) and None)
        _stdlib_handler(sink, JsonFormatter())
        run("smtpproxy json", smtpproxy_cases(sink), lambda: current_session.set(sid) and None)
        for fmt in ("kv", "json"):
            _configured(sink, fmt)

            async def in_a_loop(label: str) -> None:  # a round's lines leave in one write, as in the proxy
                run(label, smtpproxy_cases(sink), lambda: current_session.set(sid) and None)

            asyncio.run(in_a_loop(f"smtpproxy {fmt} configured"))
            milter[fmt] = asyncio.run(_milter_message(args.lines // 10))
            eventlog.flush_logs()
        _stdlib_handler(sink, KeyValueFormatter())
        try:
            if args.smtpproxy_only:
                raise ImportError

            import structlog
        except ImportError:
            if not args.smtpproxy_only:
                print("structlog is not installed (pip install structlog): smtpproxy rows only")
        else:
            for mode in ("stdlib", "native"):
                for renderer in ("kv", "json"):
                    cases = structlog_cases(sink, mode, renderer)
                    run(f"structlog {mode} {renderer}", cases,
                        lambda: structlog.contextvars.bind_contextvars(sid=sid) and None)
                    structlog.reset_defaults()
    print(f"ns of CPU per line, best of 3 x {args.lines} ({platform.python_implementation()} "
          f"{platform.python_version()}, {platform.machine()})\n")
    print("| writer | rcpt_to | message (12 fields) | level off |")
    print("| --- | ---: | ---: | ---: |")
    for label, figures in rows:
        cells = " | ".join(f"{figures[c]:,.0f}" for c in ("rcpt_to", "message", "level off"))
        print(f"| {label} | {cells} |")
    if milter:
        print("\nA milter message's seven info lines, configured, one write per message: "
              + ", ".join(f"{fmt} {us:.1f} us" for fmt, us in milter.items()))


if __name__ == "__main__":
    main()
