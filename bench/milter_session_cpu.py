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
    python bench/milter_session_cpu.py --chain          # spf + dkim_verify + dmarc + auth_results

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
import traceback
from collections.abc import Sequence
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
LAST_WRITTEN: list[bytes] = []
"""What the session wrote for the last message (``--chain`` checks its Authentication-Results)."""
BODY = b"Line of text that is about sixty characters long, more or le\r\n" * 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--edit", action="store_true", help="a data plugin that adds a header field")
    parser.add_argument("--chain", action="store_true",
                        help="spf + dkim_verify + dmarc + auth_results on a DKIM-signed message, real DNS")
    parser.add_argument("--level", default="info", help="log level (the lines go to /dev/null)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose smtpproxy is measured (default: this one)")
    parser.add_argument("--profile", type=int, nargs="?", const=40, default=0, metavar="ROWS",
                        help="print the cProfile (process time) of the runs, this many rows by own time")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the log's stream, for the run
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)  # failures show
    from smtpproxy.eventlog import configure_logging

    configure_logging(args.level)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    if args.chain:
        _run_chain(args, profiler)
        return
    result = asyncio.run(_measure(args.messages, args.edit, profiler))
    _print_profile(profiler, args)
    print(f"{result:.1f} us CPU per message "
          f"({'a data plugin adding a field' if args.edit else 'no plugins'}, log at {args.level}, "
          f"median of 3 x {args.messages})", file=sys.__stdout__)


async def _measure(messages: int, edit: bool, profiler: cProfile.Profile | None = None,
                   chain: Any = None, commands: list[Any] | None = None) -> float:
    from smtpproxy import Message, hookimpl
    from smtpproxy.milter import codec
    from smtpproxy.milter.session import MilterPolicy, MilterSession
    from smtpproxy.pytest_plugin import chain_of

    class AddsField:
        name = "adds_field"

        @hookimpl
        async def data(self, message: Message) -> None:
            message.add_header("X-Checked", "yes")

    if chain is None:
        chain = chain_of([AddsField()] if edit else [])
    policy = MilterPolicy()
    stream = b"".join(_packet(c) for c in (commands or _commands()))
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
        LAST_WRITTEN[:] = written
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


CHAIN = [{"name": "spf"}, {"name": "dkim_verify"}, {"name": "dmarc"},
         {"name": "auth_results", "settings": {"authserv_id": "filter.bench"}}]
"""postfix_rows.py's milter-chain row: the plugins as the configuration names them."""


def _print_profile(profiler: cProfile.Profile | None, args: argparse.Namespace) -> None:
    """``--profile``: the profiled rounds' top functions by own time, and calls per message."""
    if profiler is None:
        return
    stats = pstats.Stats(profiler, stream=sys.__stdout__)
    stats.sort_stats("tottime").print_stats(args.profile)
    # Steadier than CPU time on a shared machine: Python calls per message (the profiled rounds).
    calls = stats.total_calls / (3 * args.messages)  # type: ignore[attr-defined]
    print(f"{calls:.0f} function calls per message", file=sys.__stdout__)


def _run_chain(args: argparse.Namespace, profiler: cProfile.Profile | None) -> None:
    """``--chain``: postfix_rows.py's milter-chain row in one process. The chain is built from
    the configuration as ``smtpproxy milter`` builds it, its DNS answered by the tests'
    loopback zone (bench/run.py's: SPF, DKIM and DMARC pass for 127.0.0.1) through the
    shared resolver and its caches, the message bench/run.py's DKIM-signed 1 KB one. Checks
    that every message got its Authentication-Results field with three passes."""
    root = args.root.resolve()
    plugins = root / "smtpproxy_plugins"
    if root != Path(__file__).resolve().parent.parent and not plugins.exists():
        plugins.symlink_to("plugins")  # its plugins win over the installed (editable) ones
    from bench.run import Signed
    from tests.dns_server import running_zone_server

    signed = Signed.create()
    raw = signed.message(1024)
    with running_zone_server() as zone:
        for line in signed.zone:
            zone.add(line)
        micros, written = asyncio.run(_measure_chain(args.messages, zone.port, raw, profiler))
    _print_profile(profiler, args)
    print(f"{micros:.1f} us CPU per message (spf + dkim_verify + dmarc + auth_results, {len(raw)}-byte "
          f"DKIM-signed message, DNS cached, log at {args.level}, median of 3 x {args.messages})",
          file=sys.__stdout__)
    print(f"  its Authentication-Results: {written}", file=sys.__stdout__)


async def _measure_chain(messages: int, zone_port: int, raw: bytes,
                         profiler: cProfile.Profile | None) -> tuple[float, str]:
    from smtpproxy.config import Config
    from smtpproxy.registry import build_chain
    from smtpproxy.startup import start_chain

    config = Config.model_validate({"plugins": CHAIN, "milter": {"listen": "inet:127.0.0.1:1"},
                                    "dns": {"nameservers": ["127.0.0.1"], "port": zone_port,
                                            "timeout": 5}})
    chain = build_chain(config.plugins, None)
    await start_chain(chain, config.dns)
    head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[Any] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1][1] += "\n" + line.decode()
        else:
            name, _, value = line.decode().partition(":")
            fields.append([name, value])
    commands = _commands([(name, value) for name, value in fields], body, domain="bench",
                         sender="bench@sender.test", recipient="rcpt@bench.test", mail_params=())
    micros = await _measure(messages, False, profiler, chain, commands)
    found = [w for w in LAST_WRITTEN if b"Authentication-Results" in w]
    if len(found) != 1 or found[0].count(b"=pass") != 3:
        raise SystemExit(f"the chain did not pass SPF, DKIM and DMARC: {LAST_WRITTEN!r}")
    return micros, found[0][found[0].index(b"Authentication-Results"):].decode(errors="replace")


def _commands(headers: Sequence[tuple[str, str]] = HEADERS, body: bytes = BODY, *, domain: str = "test",
              sender: str = "alice@sender.test", recipient: str = "bob@dest.test",
              mail_params: tuple[str, ...] = ("SIZE=1000",)) -> list[Any]:
    """One message's packets as Postfix writes them, with its default milter_*_macros (a
    macro packet before each event and header field); the MTA is mx.DOMAIN, the client
    client.DOMAIN."""
    from smtpproxy.milter import codec

    queue_id = (("i", "4ABC"),)  # milter_end_of_header_macros, milter_end_of_data_macros
    return [
        codec.Macro("C", (("j", f"mx.{domain}"), ("{daemon_name}", "smtpd"), ("{daemon_addr}", "127.0.0.1"),
                          ("v", "Postfix 3.7.11"), ("_", "localhost [127.0.0.1]"))),
        codec.Connect("localhost", "4", 40000, "127.0.0.1"),
        codec.Macro("H", ()), codec.Helo(f"client.{domain}"),
        codec.Macro("M", (("i", "4ABC"), ("{mail_addr}", sender),
                          ("{mail_host}", sender.partition("@")[2]), ("{mail_mailer}", "smtp"))),
        codec.Mail((f"<{sender}>", *mail_params)),
        codec.Macro("R", (("i", "4ABC"), ("{rcpt_addr}", recipient),
                          ("{rcpt_host}", recipient.partition("@")[2]), ("{rcpt_mailer}", "smtp"))),
        codec.Rcpt((f"<{recipient}>",)),
        codec.Macro("T", queue_id),
        *(packet for name, value in headers
          for packet in (codec.Macro("L", queue_id), codec.Header(name, value))),
        codec.Macro("N", queue_id), codec.EndOfHeaders(), codec.Macro("B", queue_id), codec.Body(body),
        codec.Macro("E", queue_id), codec.EndOfBody(b""), codec.Quit(),
    ]


def _packet(command: Any) -> bytes:
    """A command as the MTA writes it (the encoder of tests/milter_mta.py, the fake MTA of the tests)."""
    from tests import milter_mta

    return milter_mta.encode_command(command)


if __name__ == "__main__":
    main()
