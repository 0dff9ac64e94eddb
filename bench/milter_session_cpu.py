"""The milter's own work per message, in one process: no sockets, no MTA, no kernel.

`postfix_rows.py` measures what users run, and there the kernel's share (the replies'
`send`s on loopback TCP do the receiving side's work too) and the machine's neighbours weigh
as much as our code. This drives :class:`smtpproxy.milter.session.MilterSession` with the
packets Postfix sends for one 1 KB message (negotiation, CONNECT to RCPT with the macros of
Postfix's default ``milter_*_macros``, the DATA macros, eight header fields each after its
macro packet as milter8.c sends them, the body, end of message, QUIT), decoded from bytes
as the server decodes them, with the log at info going to /dev/null: the CPU of the
session logic, the codec and the log lines per message, steady enough to compare two
commits on a shared machine. It is a micro-benchmark, not a test (issue 31)::

    python bench/milter_session_cpu.py                  # no plugins, 5,000 messages
    python bench/milter_session_cpu.py --edit           # a data plugin adding a header field
    python bench/milter_session_cpu.py --root /tmp/before   # another checkout's smtpproxy
    python bench/milter_session_cpu.py --profile        # and the cProfile of one run (CPU time)

Prints the median of three runs in microseconds of CPU per message.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HEADERS = [
    ("Received", " from client.test (client.test [127.0.0.1])\n\tby mx.test (Postfix) with ESMTP id"
                 " 4ABC\n\tfor <bob@dest.test>; Mon,  7 Dec 2026 04:00:00 +0000 (UTC)"),
    ("DKIM-Signature", " v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test; s=sel;\n\t"
                       "h=from:to:subject:date:message-id; bh=abc=; b=" + "x" * 300),
    ("From", " Alice <alice@sender.test>"), ("To", " bob@dest.test"), ("Subject", " hello"),
    ("Date", " Mon, 7 Dec 2026 04:00:00 +0000"), ("Message-ID", " <abc@sender.test>"),
    ("MIME-Version", " 1.0"),
]
BODY = b"Line of text that is about sixty characters long, more or le\r\n" * 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--edit", action="store_true", help="a data plugin that adds a header field")
    parser.add_argument("--level", default="info", help="log level (the lines go to /dev/null)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose smtpproxy is measured (default: this one)")
    parser.add_argument("--profile", type=int, nargs="?", const=40, default=0, metavar="ROWS",
                        help="print the cProfile (process time) of the runs, this many rows by own time")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the log's stream, for the run
    from smtpproxy.eventlog import configure_logging

    configure_logging(args.level)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    result = asyncio.run(_measure(args.messages, args.edit, profiler))
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.__stdout__)
        stats.sort_stats("tottime").print_stats(args.profile)
        # Steadier than CPU time on a shared machine: Python calls per message (the profiled rounds).
        calls = stats.total_calls / (3 * args.messages)  # type: ignore[attr-defined]
        print(f"{calls:.0f} function calls per message", file=sys.__stdout__)
    print(f"{result:.1f} us CPU per message "
          f"({'a data plugin adding a field' if args.edit else 'no plugins'}, log at {args.level}, "
          f"median of 3 x {args.messages})", file=sys.__stdout__)


async def _measure(messages: int, edit: bool, profiler: cProfile.Profile | None = None) -> float:
    from smtpproxy import Message, hookimpl
    from smtpproxy.milter import codec
    from smtpproxy.milter.session import MilterPolicy, MilterSession
    from smtpproxy.pytest_plugin import chain_of

    class AddsField:
        name = "adds_field"

        @hookimpl
        async def data(self, message: Message) -> None:
            message.add_header("X-Checked", "yes")

    chain = chain_of([AddsField()] if edit else [])
    policy = MilterPolicy()
    stream = b"".join(_packet(c) for c in _commands())
    offer = _packet(codec.OptNeg(6, 0x1FF, 0x1FFFFF))
    written: list[bytes] = []

    async def send(response: Any) -> None:
        written.append(codec.encode_response(response))

    progress = "progress" in inspect.signature(MilterSession).parameters

    async def one() -> None:
        extra = {"progress": lambda: None} if progress else {}
        session = MilterSession(chain, policy, send, "127.0.0.1:40000", **extra)
        take = getattr(session, "take", None)
        for data in (offer, stream):
            for code, payload in codec.FrameDecoder(1 << 20).feed(data):
                command = codec.decode_command(code, payload)
                if take is not None and take(command):
                    continue
                await session.handle(command)
        await session.finish()
        written.clear()
        await asyncio.sleep(0)  # the loop's turn: the log lines are written, as in the server

    for _ in range(200):
        await one()
    results = []
    for _ in range(3):
        if profiler is not None:
            profiler.enable()
        started = time.process_time()
        for _ in range(messages):
            await one()
        results.append((time.process_time() - started) / messages * 1e6)
        if profiler is not None:
            profiler.disable()
    return statistics.median(results)


def _commands() -> list[Any]:
    from smtpproxy.milter import codec

    queue_id = (("i", "4ABC"),)  # milter_end_of_header_macros, milter_end_of_data_macros
    return [
        codec.Macro("C", (("j", "mx.test"), ("{daemon_name}", "smtpd"), ("{daemon_addr}", "127.0.0.1"),
                          ("v", "Postfix 3.7.11"), ("_", "localhost [127.0.0.1]"))),
        codec.Connect("localhost", "4", 40000, "127.0.0.1"),
        codec.Macro("H", ()), codec.Helo("client.test"),
        codec.Macro("M", (("i", "4ABC"), ("{mail_addr}", "alice@sender.test"),
                          ("{mail_host}", "sender.test"), ("{mail_mailer}", "smtp"))),
        codec.Mail(("<alice@sender.test>", "SIZE=1000")),
        codec.Macro("R", (("i", "4ABC"), ("{rcpt_addr}", "bob@dest.test"), ("{rcpt_host}", "dest.test"),
                          ("{rcpt_mailer}", "smtp"))),
        codec.Rcpt(("<bob@dest.test>",)),
        codec.Macro("T", queue_id),
        *(packet for name, value in HEADERS
          for packet in (codec.Macro("L", queue_id), codec.Header(name, value))),
        codec.Macro("N", queue_id), codec.EndOfHeaders(), codec.Macro("B", queue_id), codec.Body(BODY),
        codec.Macro("E", queue_id), codec.EndOfBody(b""), codec.Quit(),
    ]


def _packet(command: Any) -> bytes:
    """A command as the MTA writes it (the encoder of tests/milter_mta.py, the fake MTA of the tests)."""
    from tests import milter_mta

    return milter_mta.encode_command(command)


if __name__ == "__main__":
    main()
