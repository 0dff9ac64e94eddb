"""Throughput benchmark: the same SMTP workload sent straight to a sink, then through smtpproxy.

Usage::

    python bench/throughput.py [--messages N] [--concurrency C] [--size BYTES] [--json [PATH]]

Everything runs in one process and one asyncio event loop, on 127.0.0.1 only:

* a sink (aiosmtpd) that counts and checks every message it receives;
* ``direct``: C client sessions send N messages straight to the sink (the ceiling);
* ``proxy``: the same C sessions send the same N messages to smtpproxy (no plugins),
  which forwards each one to the sink.

The client is a minimal stop-and-wait SMTP client on ``asyncio.open_connection`` so that
it costs the same for both targets. Each session does EHLO once, then MAIL/RCPT/DATA for
each of its messages, then QUIT. Latency is measured per message from sending MAIL FROM
to reading the 250 after the final dot.

See bench/README.md for what each column means and the caveats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope, Session

from smtpproxy.config import Config
from smtpproxy.server import ProxyServer

HOST = "127.0.0.1"
SENDER = "bench@sender.test"
RECIPIENT = "rcpt@bench.test"
MAX_LINE = 78  # characters per message line, excluding CRLF
RUN_TIMEOUT = 300.0  # seconds; a hung target fails the run instead of hanging it
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BenchError(Exception):
    """The benchmark could not produce a trustworthy result."""


# --------------------------------------------------------------------------- the message


def build_message(size: int) -> bytes:
    """A plain-text message of exactly *size* bytes (unstuffed), CRLF line endings.

    Every line is at most MAX_LINE characters; every tenth body line starts with a dot,
    so the client's dot-stuffing and the receivers' unstuffing are exercised.
    """
    headers = (
        f"From: Bench Sender <{SENDER}>\r\n"
        f"To: Bench Recipient <{RECIPIENT}>\r\n"
        "Subject: smtpproxy throughput benchmark\r\n"
        "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        "Message-ID: <bench-0001@sender.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    budget = size - len(headers)
    if budget < 2:
        raise BenchError(f"--size must be at least {len(headers) + 2} bytes (the headers alone are "
                         f"{len(headers)})")
    filler = "The quick brown fox jumps over the lazy dog while the proxy forwards mail. "
    filler = (filler * (MAX_LINE // len(filler) + 2))
    lines: list[str] = []
    while budget > 0:
        # A line costs its text plus CRLF; never leave exactly 1 byte, which no line can fill.
        width = min(MAX_LINE - 2, budget - 2)
        if budget - (width + 2) == 1:
            width -= 1
        start = (len(lines) * 7) % (len(filler) - MAX_LINE)
        text = filler[start:start + width]
        if len(lines) % 10 == 9 and width > 0:
            text = "." + text[1:]
        lines.append(text)
        budget -= width + 2
    message = (headers + "".join(line + "\r\n" for line in lines)).encode("ascii")
    assert len(message) == size
    return message


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for *message*: dot-stuffed (RFC 5321 4.5.2) and ended with ``.``."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


# --------------------------------------------------------------------------- the sink


class SinkHandler:
    """aiosmtpd handler that accepts everything and checks each message is the one sent."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.count = 0
        self.bad: list[str] = []

    async def handle_DATA(self, server: AiosmtpdSMTP, session: Session, envelope: Envelope) -> str:
        """Count the message; remember (a few) that differ from what the client sent."""
        self.count += 1
        if (envelope.original_content != self.expected or envelope.mail_from != SENDER
                or envelope.rcpt_tos != [RECIPIENT]) and len(self.bad) < 5:
            self.bad.append(
                f"from={envelope.mail_from!r} to={envelope.rcpt_tos!r} "
                f"size={len(envelope.original_content or b'')} (expected {len(self.expected)})"
            )
        return "250 2.0.0 Ok"


# --------------------------------------------------------------------------- the client


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One SMTP reply (multi-line ``250-...`` included): its code and last line."""
    while True:
        line = await reader.readuntil(b"\r\n")
        if len(line) < 5 or not line[:3].isdigit():
            raise BenchError(f"malformed reply line {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def expect(reader: asyncio.StreamReader, code: int, after: str) -> None:
    """Read a reply and fail unless it has *code*."""
    got, line = await read_reply(reader)
    if got != code:
        raise BenchError(f"expected {code} after {after}, got {line.decode('utf-8', 'replace').strip()!r}")


async def client_session(port: int, payload: bytes, count: int, latencies: list[float]) -> None:
    """One connection: EHLO, then *count* messages (MAIL/RCPT/DATA), then QUIT."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await expect(reader, 220, "connect")
        writer.write(b"EHLO client.bench\r\n")
        await expect(reader, 250, "EHLO")
        mail = f"MAIL FROM:<{SENDER}>\r\n".encode("ascii")
        rcpt = f"RCPT TO:<{RECIPIENT}>\r\n".encode("ascii")
        clock = time.perf_counter
        for _ in range(count):
            started = clock()
            writer.write(mail)
            await expect(reader, 250, "MAIL FROM")
            writer.write(rcpt)
            await expect(reader, 250, "RCPT TO")
            writer.write(b"DATA\r\n")
            await expect(reader, 354, "DATA")
            writer.write(payload)
            await writer.drain()
            await expect(reader, 250, "end of data")
            latencies.append(clock() - started)
        writer.write(b"QUIT\r\n")
        await expect(reader, 221, "QUIT")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def split_evenly(total: int, parts: int) -> list[int]:
    """*total* messages over *parts* sessions, differing by at most one; empty sessions dropped."""
    base, extra = divmod(total, parts)
    return [n for n in (base + (i < extra) for i in range(parts)) if n > 0]


async def run_load(port: int, payload: bytes, messages: int, concurrency: int) -> tuple[float, list[float]]:
    """Send *messages* over *concurrency* parallel sessions; (wall seconds, latencies)."""
    latencies: list[float] = []
    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for count in split_evenly(messages, concurrency):
                group.create_task(client_session(port, payload, count, latencies))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        raise BenchError(f"a client session failed: {type(first).__name__}: {first}") from first
    return time.perf_counter() - started, latencies


# --------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """The figures for one target."""

    target: str
    messages: int
    seconds: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float
    peak_rss_mb: float


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def peak_rss_mb() -> float:
    """Peak resident set size of the whole process so far, in MiB (Linux reports KiB)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


async def measure(target: str, port: int, payload: bytes, args: argparse.Namespace,
                  sink: SinkHandler) -> Row:
    """Warm up, then run the measured load against *port*, checking the sink's count."""
    before = sink.count
    warmup = 2 * args.concurrency
    try:
        await run_load(port, payload, warmup, args.concurrency)
        gc.collect()
        cpu0 = time.process_time()
        seconds, latencies = await run_load(port, payload, args.messages, args.concurrency)
        cpu = time.process_time() - cpu0
    except BenchError as exc:
        raise BenchError(f"{target}: {exc}") from exc
    received = sink.count - before
    if received != warmup + args.messages:
        raise BenchError(f"{target}: the sink received {received} messages, expected "
                         f"{warmup + args.messages} ({warmup} warm-up + {args.messages})")
    if len(latencies) != args.messages:
        raise BenchError(f"{target}: {len(latencies)} messages completed, expected {args.messages}")
    latencies.sort()
    return Row(
        target=target,
        messages=args.messages,
        seconds=seconds,
        msgs_per_s=args.messages / seconds,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        cpu_s_per_1k=cpu / args.messages * 1000,
        peak_rss_mb=peak_rss_mb(),
    )


def proxy_config(sink_port: int, workdir: str) -> Config:
    """smtpproxy without plugins, forwarding to the sink, limits opened up for the load."""
    return Config.model_validate({
        "listeners": [{"address": HOST, "port": 0}],
        "delivery": {"type": "smtp", "host": HOST, "port": sink_port, "tls": "none"},
        "relay": {"domains": ["bench.test"], "networks": []},
        "limits": {"max_sessions_per_ip": 1000, "max_sessions": 1000},
        "hostname": "proxy.bench",
        "quarantine": {"path": workdir + "/q"},
    })


async def run(args: argparse.Namespace) -> tuple[Row, Row]:
    """Start the sink, measure direct, start the proxy, measure proxy; stop everything."""
    message = build_message(args.size)
    payload = dot_stuff(message)
    sink = SinkHandler(message)
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(
        lambda: AiosmtpdSMTP(sink, hostname="sink.bench", enable_SMTPUTF8=True), HOST, 0
    )
    try:
        sink_port: int = sink_server.sockets[0].getsockname()[1]
        direct = await measure("direct", sink_port, payload, args, sink)
        with tempfile.TemporaryDirectory(prefix="smtpproxy-bench-") as workdir:
            proxy = ProxyServer(proxy_config(sink_port, workdir))
            await proxy.start()
            try:
                proxy_port = proxy.addresses[0][1]
                proxied = await measure("proxy", proxy_port, payload, args, sink)
            finally:
                await proxy.stop(grace=1)
    finally:
        sink_server.close()
        await sink_server.wait_closed()
    if sink.bad:
        raise BenchError("the sink received messages that differ from what was sent: " + "; ".join(sink.bad))
    return direct, proxied


# --------------------------------------------------------------------------- reporting


def loop_description() -> str:
    """Which event loop implementation is running (this script never installs uvloop)."""
    loop = asyncio.get_running_loop()
    module = type(loop).__module__
    kind = "uvloop" if module.startswith("uvloop") else "asyncio"
    return f"{kind} ({type(loop).__name__})"


def report(args: argparse.Namespace, rows: tuple[Row, Row], loop_kind: str) -> dict[str, Any]:
    """Print the table and ratios; return the same figures for --json."""
    direct, proxy = rows
    ratios = {
        "throughput_proxy_over_direct": proxy.msgs_per_s / direct.msgs_per_s,
        "added_p50_ms": proxy.p50_ms - direct.p50_ms,
        "added_p99_ms": proxy.p99_ms - direct.p99_ms,
        "cpu_proxy_over_direct": proxy.cpu_s_per_1k / direct.cpu_s_per_1k,
    }
    print(f"smtpproxy throughput benchmark  python {platform.python_version()}  loop: {loop_kind}  "
          f"cpus: {os.cpu_count()}")
    print(f"workload: {args.messages} messages of {args.size} bytes, {args.concurrency} concurrent "
          f"session(s), one connection each; {2 * args.concurrency} warm-up messages per target")
    print("client, proxy and sink share one process and event loop; logging at WARNING")
    print()
    header = (f"{'target':<8} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'CPU s/1k msgs':>14} {'peak RSS MiB':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.target:<8} {row.msgs_per_s:>9.0f} {row.p50_ms:>8.2f} {row.p99_ms:>8.2f} "
              f"{row.cpu_s_per_1k:>14.3f} {row.peak_rss_mb:>13.1f}")
    print()
    print(f"proxy/direct throughput: {ratios['throughput_proxy_over_direct']:.2f}x   "
          f"added p50 latency: {ratios['added_p50_ms']:+.2f} ms   "
          f"(p99 {ratios['added_p99_ms']:+.2f} ms, CPU per message {ratios['cpu_proxy_over_direct']:.2f}x)")
    print("CPU = process_time() of the whole process (client + proxy + sink); peak RSS = ru_maxrss,")
    print("process-wide and monotonic (the proxy row includes everything since start).")
    return {
        "benchmark": "throughput",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "event_loop": loop_kind,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "logging": "WARNING",
            "single_process": True,
        },
        "parameters": {
            "messages": args.messages,
            "concurrency": args.concurrency,
            "size": args.size,
            "warmup_messages": 2 * args.concurrency,
        },
        "results": [asdict(row) for row in rows],
        "ratios": ratios,
    }


def write_json(figures: dict[str, Any], path: Path) -> None:
    """Write *figures* to *path*, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=positive_int, default=2000,
                        help="messages measured per target (default 2000)")
    parser.add_argument("--concurrency", type=positive_int, default=10,
                        help="parallel client sessions, messages split evenly (default 10, max 500)")
    parser.add_argument("--size", type=positive_int, default=1024,
                        help="message size in bytes, headers included (default 1024)")
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                        help="also write the figures as JSON "
                             "(default path bench/results/throughput-<timestamp>.json)")
    args = parser.parse_args(argv)
    if args.concurrency > 500:
        parser.error("--concurrency must be at most 500 (the proxy allows 1000 sessions)")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Run both measurements under an overall time limit and print the report."""
    async with asyncio.timeout(RUN_TIMEOUT):
        rows = await run(args)
    return report(args, rows, loop_description())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        build_message(args.size)
        figures = asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: the benchmark did not finish within {RUN_TIMEOUT:.0f} s", file=sys.stderr)
        return 1
    if args.json is not None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(args.json) if args.json else RESULTS_DIR / f"throughput-{stamp}.json"
        write_json(figures, path)
        print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
