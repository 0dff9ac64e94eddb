"""The benchmark's own asyncio SMTP client: per-message latency, idle sessions, one huge message.

``smtp-source`` measures throughput but reports no per-message latency, cannot hold thousands
of idle sessions open, and cannot stream a 50 MB message without building it in memory first.
This client does those three things. It is stop-and-wait (no pipelining), like smtp-source,
and costs the same whichever server it talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

HOST = "127.0.0.1"
SENDER = "bench@sender.test"
RECIPIENT = "rcpt@bench.test"


class LoadError(Exception):
    """The server did not behave like an SMTP server that accepts the load."""


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One SMTP reply (multi-line included): its code and last line."""
    while True:
        line = await reader.readuntil(b"\r\n")
        if len(line) < 5 or not line[:3].isdigit():
            raise LoadError(f"malformed reply line {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def expect(reader: asyncio.StreamReader, code: int, after: str) -> None:
    """Read a reply and fail unless it has *code*."""
    got, line = await read_reply(reader)
    if got != code:
        raise LoadError(f"expected {code} after {after}, got {line.decode('utf-8', 'replace').strip()!r}")


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for *message*: dot-stuffed (RFC 5321 4.5.2) and ended with ``.``."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def split_evenly(total: int, parts: int) -> list[int]:
    """*total* messages over *parts* sessions, differing by at most one; empty sessions dropped."""
    base, extra = divmod(total, parts)
    return [n for n in (base + (i < extra) for i in range(parts)) if n > 0]


# --------------------------------------------------------------------------- latency


@dataclass
class LatencyResult:
    messages: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds


async def _session(port: int, payload: bytes, count: int, latencies: list[float]) -> None:
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


async def latency(port: int, message: bytes, messages: int, concurrency: int) -> LatencyResult:
    """Send *messages* over *concurrency* reused sessions; per-message latency MAIL → final 250."""
    payload = dot_stuff(message)
    latencies: list[float] = []
    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for count in split_evenly(messages, concurrency):
                group.create_task(_session(port, payload, count, latencies))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        raise LoadError(f"a client session failed: {type(first).__name__}: {first}") from first
    seconds = time.perf_counter() - started
    if len(latencies) != messages:
        raise LoadError(f"{len(latencies)} messages completed, expected {messages}")
    latencies.sort()
    return LatencyResult(messages, seconds, percentile(latencies, 50) * 1000,
                         percentile(latencies, 99) * 1000)


# --------------------------------------------------------------------------- idle sessions


class IdleSessions:
    """Hold *count* sessions open after EHLO; ``async with`` closes them all."""

    def __init__(self, port: int, count: int, parallel: int = 200) -> None:
        self.port = port
        self.count = count
        self.parallel = parallel
        self.writers: list[asyncio.StreamWriter] = []

    async def _open(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.writers.append(writer)
            await expect(reader, 220, "connect")
            writer.write(b"EHLO idle.bench\r\n")
            await expect(reader, 250, "EHLO")

    async def __aenter__(self) -> IdleSessions:
        gate = asyncio.Semaphore(self.parallel)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.count):
                    group.create_task(self._open(gate))
        except ExceptionGroup as failed:
            await self.close()
            first = failed.exceptions[0]
            raise LoadError(f"opening {self.count} idle sessions failed after {len(self.writers)}: "
                            f"{type(first).__name__}: {first}") from first
        return self

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------- one huge message


def _huge_chunks(size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A dot-stuffed text message of about *size* bytes, produced 1 MiB at a time."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: huge\r\n"
            "Message-ID: <huge@sender.test>\r\n\r\n").encode("ascii")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    block = line * (chunk // len(line))
    yield head
    sent = len(head)
    while sent < size:
        piece = block[: min(len(block), ((size - sent) // len(line) + 1) * len(line))]
        yield piece
        sent += len(piece)
    yield b".\r\n"


def huge_content(size: int) -> bytes:
    """The text of _huge_chunks as one bytes object (CRLF lines, no dot-stuffing needed)."""
    return b"".join(_huge_chunks(size))[: -len(b".\r\n")]


async def huge_message(port: int, size: int, content: bytes | None = None) -> float:
    """Send one message of about *size* bytes (or *content*, e.g. a DKIM-signed huge_content)
    over a new session; seconds until the final 250."""
    reader, writer = await asyncio.open_connection(HOST, port)
    started = time.perf_counter()
    try:
        await expect(reader, 220, "connect")
        writer.write(b"EHLO huge.bench\r\n")
        await expect(reader, 250, "EHLO")
        writer.write(f"MAIL FROM:<{SENDER}> SIZE={size + 1024}\r\n".encode("ascii"))
        await expect(reader, 250, "MAIL FROM")
        writer.write(f"RCPT TO:<{RECIPIENT}>\r\n".encode("ascii"))
        await expect(reader, 250, "RCPT TO")
        writer.write(b"DATA\r\n")
        await expect(reader, 354, "DATA")
        chunks = _huge_chunks(size) if content is None else (
            *(content[i:i + (1 << 20)] for i in range(0, len(content), 1 << 20)), b".\r\n")
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        await expect(reader, 250, "end of data")
        seconds = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await expect(reader, 221, "QUIT")
        return seconds
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- overload


@dataclass
class ArrivalResult:
    """Open-loop arrivals at one offered rate: what each new connection was told."""

    offered_per_s: float
    seconds: float
    delivered: int = 0
    shed: int = 0
    """Told 421 (at the greeting or later): the server shedding load."""
    failed: int = 0
    """Anything else: refused or reset connections, timeouts, other replies."""
    latencies: list[float] | None = None
    shed_at: list[float] | None = None
    """Seconds from the phase start of each 421."""

    def figures(self) -> dict[str, float | int]:
        lat = sorted(self.latencies or [])
        return {
            "offered_per_s": round(self.offered_per_s, 1),
            "arrived_per_s": round((self.delivered + self.shed + self.failed) / self.seconds, 1),
            "delivered_per_s": round(self.delivered / self.seconds, 1),
            "delivered": self.delivered, "shed_421": self.shed, "failed": self.failed,
            "shed_pct": round(100 * self.shed / max(1, self.delivered + self.shed + self.failed), 1),
            "p50_ms": round(percentile(lat, 50) * 1000, 1) if lat else 0.0,
            "p99_ms": round(percentile(lat, 99) * 1000, 1) if lat else 0.0,
        }


async def _one_message(port: int, payload: bytes, give_up_after: float) -> tuple[str, float]:
    """One new connection, one message: ("delivered" | "shed" | "failed", seconds)."""
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(give_up_after):
            reader, writer = await asyncio.open_connection(HOST, port)
            steps: list[tuple[bytes | None, int]] = [
                (None, 220), (b"EHLO burst.bench\r\n", 250), (f"MAIL FROM:<{SENDER}>\r\n".encode(), 250),
                (f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250), (b"DATA\r\n", 354), (payload, 250)]
            for command, code in steps:
                if command is not None:
                    writer.write(command)
                got, _ = await read_reply(reader)
                if got == 421:
                    return "shed", time.perf_counter() - started
                if got != code:
                    return "failed", time.perf_counter() - started
            seconds = time.perf_counter() - started
            writer.write(b"QUIT\r\n")
            await read_reply(reader)
            return "delivered", seconds
    except (OSError, TimeoutError, LoadError, asyncio.IncompleteReadError):
        return "failed", time.perf_counter() - started
    finally:
        if writer is not None:
            writer.transport.abort()


async def arrivals(port: int, message: bytes, rate: float, seconds: float, *,
                   give_up_after: float = 60.0, max_open: int = 3000) -> ArrivalResult:
    """New connections arriving as a Poisson process at *rate* per second for *seconds*, one
    message each, whatever the server's pace (open loop: what an MX sees in a burst). At most
    *max_open* at once on the client side (descriptors); arrivals beyond it count as failed."""
    payload = dot_stuff(message)
    result = ArrivalResult(rate, seconds, latencies=[], shed_at=[])
    assert result.latencies is not None and result.shed_at is not None
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(at: float) -> None:
        outcome, took = await _one_message(port, payload, give_up_after)
        if outcome == "delivered":
            result.delivered += 1
            result.latencies.append(took)  # type: ignore[union-attr]
        elif outcome == "shed":
            result.shed += 1
            result.shed_at.append(at)  # type: ignore[union-attr]
        else:
            result.failed += 1

    at = 0.0
    while True:
        at += random.expovariate(rate)
        if at >= seconds:
            break
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_open:
            result.failed += 1
            continue
        task = asyncio.get_running_loop().create_task(one(at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    return result


# --------------------------------------------------------------------------- slow clients


class SlowClients:
    """*count* sessions that reach DATA and then trickle the message, *step* bytes every
    *interval* seconds (a slow or hostile sender); ``async with`` aborts them all."""

    def __init__(self, port: int, count: int, step: int = 10, interval: float = 2.0) -> None:
        self.port = port
        self.count = count
        self.step = step
        self.interval = interval
        self.open = 0
        self.dropped = 0
        """Sessions the server ended while they trickled."""
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = 0

    async def _one(self, gate: asyncio.Semaphore, ready: asyncio.Event) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with gate:
                reader, writer = await asyncio.open_connection(HOST, self.port)
                await expect(reader, 220, "connect")
                for command, code in ((b"EHLO slow.bench\r\n", 250),
                                      (f"MAIL FROM:<{SENDER}>\r\n".encode(), 250),
                                      (f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250), (b"DATA\r\n", 354)):
                    writer.write(command)
                    await expect(reader, code, command.decode().split()[0])
            self.open += 1
            self._ready += 1
            if self._ready == self.count:
                ready.set()
            line = b"x" * (self.step - 2) + b"\r\n"
            while True:
                await asyncio.sleep(self.interval)
                writer.write(line)
                await writer.drain()
                if reader.at_eof():
                    raise ConnectionResetError
        except (OSError, LoadError, asyncio.IncompleteReadError):
            self.open -= 1
            self.dropped += 1
            self._ready += 1
            if self._ready == self.count:
                ready.set()
        finally:
            if writer is not None:
                writer.transport.abort()

    async def __aenter__(self) -> SlowClients:
        gate, ready = asyncio.Semaphore(100), asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._one(gate, ready)) for _ in range(self.count)]
        await asyncio.wait_for(ready.wait(), 120)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
