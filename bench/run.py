"""The benchmark of issue 7: smtp-source -> system under test -> smtp-sink, one command.

    python bench/run.py [--quick] [--scenario NAME ...] [--systems NAME ...] [--repeat N]
    python bench/run.py --profile            # py-spy on smtpproxy (no plugins) under load
    python bench/run.py --scenario overload slow --systems smtpproxy --upstream postfix

Each system under test is a separate process tree forwarding to the same Postfix smtp-sink on
loopback. Throughput comes from Postfix's smtp-source (a new connection per message, and with
``-d`` one reused connection per session); per-message latency, idle sessions and the huge
message come from bench/loadgen.py, and so do the two scenarios not run by default:
``overload`` (open-loop bursts of new connections past capacity against a given
``--max-sessions``: where 421s start, and the recovery) and ``slow`` (``--slow-clients``
sessions trickling DATA while normal traffic is measured). CPU seconds and peak RSS are
those of the system's whole process tree (psutil). In a throughput scenario every system is
started first and their repeats are taken in turns (round 1 in the order given, round 2 in
reverse, ...), so the ratios under a table compare the same minutes. Tables are printed as Markdown and
written to bench/results/latest.json and latest.png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen, systems
from bench.systems import DnsZone, Redis, Services, Sink, System
from bench.throughput import build_message

RESULTS = systems.BENCH / "results"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SELECTOR, DOMAIN = "bench", "sender.test"


# --------------------------------------------------------------------------- measuring a process tree


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Meter:
    """CPU seconds and resident memory of one process tree, sampled every 10 ms in a thread."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cpu(self) -> float:
        total = 0.0
        for proc in _tree(self.pid) if self.pid else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        total = 0
        for proc in _tree(self.pid) if self.pid else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def hwm(self) -> int:
        """Sum of each process's own high-water mark (VmHWM): exact for a one-process system."""
        total = 0
        for proc in _tree(self.pid) if self.pid else []:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, psutil.NoSuchProcess):
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> Meter:
        self.peak = self.rss()
        if self.pid:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self.rss())


MiB = 1024 * 1024


# --------------------------------------------------------------------------- the message and DNS


@dataclass
class Signed:
    """A DKIM key and the zone that publishes it, SPF and DMARC for the sender domain."""

    private_pem: bytes
    zone: list[str]

    @classmethod
    def create(cls) -> Signed:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        import base64

        value = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
        chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        zone = [
            f'{DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
            f"{DOMAIN}. 3600 IN A 127.0.0.1",
            f"{DOMAIN}. 3600 IN MX 10 mx.{DOMAIN}.",
            f"mx.{DOMAIN}. 3600 IN A 127.0.0.1",
            f"{SELECTOR}._domainkey.{DOMAIN}. 3600 IN TXT {chunks}",
            f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=reject"',
            "bench.test. 3600 IN MX 10 mx.sender.test.",
        ]
        return cls(pem, zone)

    def huge(self, size: int) -> bytes:
        """loadgen's huge message, DKIM-signed like the others, so the chain verifies it whole."""
        import dkim

        body = loadgen.huge_content(size)
        signature = dkim.sign(body, SELECTOR.encode(), DOMAIN.encode(), self.private_pem,
                              canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=[b"From", b"To", b"Subject", b"Message-ID"])
        return bytes(signature) + body

    def message(self, size: int) -> bytes:
        """A DKIM-signed (relaxed/relaxed, rsa-sha256) message of about *size* bytes."""
        import dkim

        body = build_message(max(size - 520, 400))
        signature = dkim.sign(body, SELECTOR.encode(), DOMAIN.encode(), self.private_pem,
                              canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"])
        return bytes(signature) + body


# --------------------------------------------------------------------------- the loads


def smtp_source(port: int, sessions: int, messages: int, msgfile: Path, reuse: bool) -> float:
    """Run Postfix's smtp-source; wall seconds. It exits non-zero on any refused message."""
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-F", str(msgfile),
            "-f", loadgen.SENDER, "-t", loadgen.RECIPIENT, "-M", "client.bench"]
    if reuse:
        argv.append("-d")
    started = time.perf_counter()
    done = subprocess.run([*argv, f"{loadgen.HOST}:{port}"], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-500:]
        raise RuntimeError(f"smtp-source failed ({done.returncode}): {said}")
    return seconds


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    kind: str  # throughput | idle | huge | overload | slow
    size: int = 0
    concurrency: int = 0
    messages: int = 0
    latency_messages: int = 0
    sessions: int = 0


def scenarios(quick: bool) -> dict[str, Scenario]:
    out: dict[str, Scenario] = {}
    for size, label in ((1024, "1k"), (100 * 1024, "100k")):
        for conc in (1, 10, 100):
            if quick:
                messages, lat = 200, 100
            elif size == 1024:
                messages, lat = (300, 200) if conc == 1 else (1000, 500)
            else:
                messages, lat = (100, 50) if conc == 1 else (200, 100)
            out[f"{label}-c{conc}"] = Scenario(f"{label}-c{conc}", "throughput", size, conc,
                                               max(messages, conc), max(lat, conc))
    out["idle"] = Scenario("idle", "idle", sessions=1000 if quick else 10_000)
    out["huge"] = Scenario("huge", "huge", size=(5 if quick else 50) * MiB)
    # Not in the default run (minutes each, and meaningful only with their options):
    out["overload"] = Scenario("overload", "overload", size=1024, concurrency=10,
                               messages=200 if quick else 600)
    out["slow"] = Scenario("slow", "slow", size=1024, concurrency=10,
                           latency_messages=200 if quick else 1000, sessions=200)
    return out


OPT_IN = ("overload", "slow")
"""Scenarios run only when named with --scenario."""

OVERLOAD_STEPS = (0.5, 1.0, 1.5, 2.0, 3.0)
"""Offered rates of the overload scenario, as multiples of the measured capacity."""


def median(values: list[float]) -> float:
    return statistics.median(values)


def failed(system: System, exc: Exception) -> dict[str, Any]:
    """A system's figures when it failed: the error, printed with the tail of its log, so that
    one failing system does not lose the others' figures."""
    figures = {"error": f"{type(exc).__name__}: {exc}"}
    tail = system.log_tail().strip()
    print(f"    {system.name} FAILED: {figures['error']}\n    log tail: {tail[-800:]}", flush=True)
    return figures


class ThroughputRuns:
    """One system's runs of a throughput scenario. Each round is an ``smtp-source`` run with
    a new connection per message, one with reused sessions (``-d``) and a latency run;
    :func:`throughput` takes the rounds of all the systems in turns."""

    def __init__(self, system: System, sc: Scenario, msgfile: Path, message: bytes) -> None:
        self.system, self.sc, self.msgfile, self.message = system, sc, msgfile, message
        self.new_rates: list[float] = []
        self.reuse_rates: list[float] = []
        self.cpu_new: list[float] = []
        self.cpu_reuse: list[float] = []
        self.p50s: list[float] = []
        self.p99s: list[float] = []
        self.lat_rates: list[float] = []
        self.peak = 0

    def warm_up(self) -> None:
        """A round's load, not measured: it fills the DNS caches and warms up a JIT (Haraka's
        first rounds after 200 messages went at 75-90 % of its later rate, 2026-12-07)."""
        sc = self.sc
        for reuse in (False, True):
            smtp_source(self.system.port, sc.concurrency, max(sc.messages, 20), self.msgfile, reuse=reuse)

    def round(self) -> None:
        sc, port = self.sc, self.system.port
        with Meter(self.system.pid) as meter:  # sampling only while this system is loaded
            for reuse, rates, cpus in ((False, self.new_rates, self.cpu_new),
                                       (True, self.reuse_rates, self.cpu_reuse)):
                cpu0 = meter.cpu()
                seconds = smtp_source(port, sc.concurrency, sc.messages, self.msgfile, reuse)
                rates.append(sc.messages / seconds)
                cpus.append((meter.cpu() - cpu0) / sc.messages * 1000)
            lat = run_async(loadgen.latency(port, self.message, sc.latency_messages, sc.concurrency))
        self.peak = max(self.peak, meter.peak)
        self.p50s.append(lat.p50_ms)
        self.p99s.append(lat.p99_ms)
        self.lat_rates.append(lat.msgs_per_s)

    def figures(self) -> dict[str, Any]:
        measured = self.system.pid is not None
        return {
            "msgs_per_s_new_conn": median(self.new_rates),
            "msgs_per_s_reused": median(self.reuse_rates),
            "p50_ms": median(self.p50s),
            "p99_ms": median(self.p99s),
            "loadgen_msgs_per_s": median(self.lat_rates),
            "cpu_s_per_1k_new_conn": median(self.cpu_new) if measured else None,
            "cpu_s_per_1k_reused": median(self.cpu_reuse) if measured else None,
            "peak_rss_mib": self.peak / MiB if measured else None,
            "runs": {"new_conn": self.new_rates, "reused": self.reuse_rates, "p50": self.p50s,
                     "p99": self.p99s},
        }


def throughput(runs: list[ThroughputRuns], repeat: int) -> dict[str, dict[str, Any]]:
    """The systems' figures, their rounds taken in turns: every system's round 1, then every
    system's round 2 in the reverse order, and so on. All of them are started first and
    wait idle while another is loaded, so a change in the machine's speed during the run
    (seen here: a fifth within two hours) falls on every system alike instead of on the
    ones measured later; the ratios under the table are then same-minutes ratios. A system
    that fails is reported with its error and the others go on."""
    errors: dict[str, dict[str, Any]] = {}

    def attempt(run: ThroughputRuns, step: Any) -> None:
        name = run.system.name
        if name in errors:
            return
        try:
            step()
        except Exception as exc:
            errors[name] = failed(run.system, exc)

    for run in runs:
        attempt(run, run.warm_up)
    for number in range(repeat):
        order = runs if number % 2 == 0 else runs[::-1]
        print(f"[{time.strftime('%H:%M:%S')}] round {number + 1}/{repeat}: "
              + " ".join(r.system.name for r in order), flush=True)
        for run in order:
            attempt(run, run.round)
    return {run.system.name: errors.get(run.system.name) or run.figures() for run in runs}


def idle(system: System, sc: Scenario) -> dict[str, Any]:
    meter = Meter(system.pid)
    # One real message first, so that lazily built state (pools, plugins) is in the baseline.
    run_async(loadgen.latency(system.port, build_message(1024), 5, 1))
    before = meter.rss()

    async def hold() -> tuple[int, float]:
        started = time.perf_counter()
        async with loadgen.IdleSessions(system.port, sc.sessions):
            seconds = time.perf_counter() - started
            await asyncio.sleep(0.5)  # let the server finish settling each session before sampling
            return meter.rss(), seconds

    with meter:
        after, seconds = run_async(hold())
    grown = after - before
    return {
        "sessions": sc.sessions,
        "open_seconds": seconds,
        "rss_before_mib": before / MiB,
        "rss_with_sessions_mib": after / MiB,
        "peak_rss_mib": meter.peak / MiB,
        "kib_per_session": grown / sc.sessions / 1024,
    }


def huge(system: System, sc: Scenario, content: bytes) -> dict[str, Any]:
    meter = Meter(system.pid)
    run_async(loadgen.latency(system.port, build_message(1024), 5, 1))
    before = meter.rss()
    with meter:
        seconds = run_async(loadgen.huge_message(system.port, sc.size, content))
    hwm = meter.hwm()
    peak = max(meter.peak, hwm) if system.pid and len(_tree(system.pid)) == 1 else meter.peak
    return {
        "message_mib": sc.size / MiB,
        "seconds": seconds,
        "rss_idle_mib": before / MiB,
        "peak_rss_mib": peak / MiB,
        "peak_above_idle_mib": (peak - before) / MiB,
        "peak_above_idle_over_size": (peak - before) / sc.size,
    }


def overload(system: System, sc: Scenario, msgfile: Path, message: bytes, *, phase_seconds: float,
             max_sessions: int | None) -> dict[str, Any]:
    """Capacity first (smtp-source, new connections, closed loop), then open-loop Poisson
    arrivals of new connections at OVERLOAD_STEPS x capacity, then half capacity again
    (recovery): per phase what the clients were told, 250 / 421 / anything else."""
    meter = Meter(system.pid)
    smtp_source(system.port, sc.concurrency, max(2 * sc.concurrency, 20), msgfile, reuse=False)
    capacity = sc.messages / smtp_source(system.port, sc.concurrency, sc.messages, msgfile, reuse=False)
    phases: list[dict[str, Any]] = []
    with meter:
        for step in (*OVERLOAD_STEPS, 0.5):
            label = "recovery" if phases and step == 0.5 else f"{step:g}x"
            result = run_async(loadgen.arrivals(system.port, message, capacity * step, phase_seconds))
            figures = result.figures()
            shed_at = result.shed_at or []
            figures |= {"phase": label, "first_421_s": round(min(shed_at), 2) if shed_at else None,
                        "last_421_s": round(max(shed_at), 2) if shed_at else None}
            phases.append(figures)
            print(f"    {label:>8}: {figures}", flush=True)
    return {"capacity_per_s": capacity, "max_sessions": max_sessions, "phase_seconds": phase_seconds,
            "peak_rss_mib": meter.peak / MiB if system.pid else None, "phases": phases}


def slow(system: System, sc: Scenario, message: bytes) -> dict[str, Any]:
    """Normal traffic (loadgen.latency) alone, then again while *sc.sessions* clients trickle
    DATA at 5 bytes/s; and alone once more, after they went."""

    async def with_slow() -> tuple[loadgen.LatencyResult, int, int]:
        async with loadgen.SlowClients(system.port, sc.sessions) as trickling:
            lat = await loadgen.latency(system.port, message, sc.latency_messages, sc.concurrency)
            return lat, trickling.open, trickling.dropped

    meter = Meter(system.pid)
    run_async(loadgen.latency(system.port, message, 2 * sc.concurrency, sc.concurrency))  # warm-up
    with meter:
        alone = run_async(loadgen.latency(system.port, message, sc.latency_messages, sc.concurrency))
        during, still_open, dropped = run_async(with_slow())
        after = run_async(loadgen.latency(system.port, message, sc.latency_messages, sc.concurrency))

    def row(r: loadgen.LatencyResult) -> dict[str, float]:
        return {"msgs_per_s": r.msgs_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}

    return {"slow_clients": sc.sessions, "slow_still_open": still_open, "slow_dropped": dropped,
            "alone": row(alone), "with_slow": row(during), "after": row(after),
            "peak_rss_mib": meter.peak / MiB if system.pid else None}


# --------------------------------------------------------------------------- orchestration


@contextmanager
def services(workdir: Path, need_redis: bool, signed: Signed, upstream: str = "sink", *,
             dns_delay: str | None = None,
             proxy_settings: dict[str, dict[str, Any]] | None = None) -> Iterator[Services]:
    sink: Sink | systems.PostfixUpstream = systems.PostfixUpstream(workdir) if upstream == "postfix" \
        else Sink(workdir)
    dns = DnsZone(workdir, signed.zone, delay=dns_delay)
    redis = Redis(workdir) if need_redis else None
    started: list[Any] = []
    try:
        for service in (sink, dns, redis):
            if service is not None:
                service.start()
                started.append(service)
        yield Services(sink, dns, redis, workdir, proxy_settings or {})
    finally:
        for service in reversed(started):
            service.stop()


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else wanted
    target = max(soft, min(target, max(wanted, soft)))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def throughput_scenario(args: argparse.Namespace, svc: Services, sc: Scenario, msgfile: Path,
                        message: bytes, *, descriptions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every system of the run started at once, their rounds in turns (:func:`throughput`)."""
    started: list[System] = []
    runs: list[ThroughputRuns] = []
    figures: dict[str, dict[str, Any]] = {}
    try:
        for name in args.systems:
            system = systems.make_system(name, svc, haraka_nodes=args.haraka_nodes, before=args.before)
            descriptions[name] = system.description
            print(f"[{time.strftime('%H:%M:%S')}] {sc.name:<9} {name} starting", flush=True)
            try:
                system.start()
            except Exception as exc:
                figures[name] = failed(system, exc)
                system.stop()
                continue
            started.append(system)
            runs.append(ThroughputRuns(system, sc, msgfile, message))
        figures.update(throughput(runs, args.repeat))
    finally:
        for system in started:
            system.stop()
    return {name: figures[name] for name in args.systems if name in figures}


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    all_scenarios = scenarios(args.quick)
    if args.huge_mib is not None:
        all_scenarios["huge"].size = args.huge_mib * MiB
    if args.slow_clients is not None:
        all_scenarios["slow"].sessions = args.slow_clients
    chosen = [all_scenarios[name] for name in args.scenario]
    proxy_settings: dict[str, dict[str, Any]] = {}
    if args.max_sessions is not None:
        proxy_settings["limits"] = {"max_sessions": args.max_sessions,
                                    "max_sessions_per_ip": args.max_sessions}
    if args.dns_cache_size is not None:
        proxy_settings["dns"] = {"cache_size": args.dns_cache_size}
    for setting in args.set:
        section, key, value = setting
        proxy_settings.setdefault(section, {})[key] = value
    signed = Signed.create()
    fd_limit = raise_fd_limit(max(s.sessions for s in chosen) * 2 + 1024)
    results: dict[str, dict[str, Any]] = {s.name: {} for s in chosen}
    descriptions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="smtpproxy-bench-") as tmp:
        workdir = Path(tmp)
        need_redis = any("chain" in name for name in args.systems)
        with services(workdir, need_redis, signed, args.upstream, dns_delay=args.dns_delay,
                      proxy_settings=proxy_settings) as svc:
            files: dict[int, tuple[Path, bytes]] = {}
            huge_messages: dict[int, bytes] = {}
            for sc in chosen:
                if sc.kind in ("throughput", "overload", "slow") and sc.size not in files:
                    message = signed.message(sc.size)
                    path = workdir / f"message-{sc.size}.eml"
                    # smtp-source -F appends CRLF to each line itself: give it LF lines.
                    path.write_bytes(message.replace(b"\r\n", b"\n"))
                    files[sc.size] = (path, message)
            for sc in chosen:
                if sc.kind == "throughput":
                    path, message = files[sc.size]
                    results[sc.name] = throughput_scenario(args, svc, sc, path, message,
                                                           descriptions=descriptions)
                    continue
                for name in args.systems:
                    if name == "direct":  # no process of its own: throughput only
                        continue
                    if sc.kind == "overload" and not name.startswith("smtpproxy"):
                        continue  # --max-sessions is smtpproxy's setting
                    system = systems.make_system(name, svc, haraka_nodes=args.haraka_nodes,
                                                 before=args.before)
                    descriptions[name] = system.description
                    print(f"[{time.strftime('%H:%M:%S')}] {sc.name:<9} {name} ...", flush=True)
                    try:
                        system.start()
                        if sc.kind == "idle":
                            figures = idle(system, sc)
                        elif sc.kind == "overload":
                            path, message = files[sc.size]
                            figures = overload(system, sc, path, message, phase_seconds=args.phase_seconds,
                                               max_sessions=args.max_sessions)
                        elif sc.kind == "slow":
                            figures = slow(system, sc, files[sc.size][1])
                        else:
                            if sc.size not in huge_messages:  # signed once, outside any measurement
                                huge_messages[sc.size] = signed.huge(sc.size)
                            figures = huge(system, sc, huge_messages[sc.size])
                    except Exception as exc:
                        figures = failed(system, exc)
                    finally:
                        system.stop()
                    results[sc.name][name] = figures
    return {
        "benchmark": "bench/run.py",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeat": args.repeat,
        "environment": environment(fd_limit, args.upstream) | {
            "dns_delay_ms": args.dns_delay, "proxy_settings": proxy_settings},
        "systems": descriptions,
        "scenarios": {sc.name: sc.__dict__ for sc in chosen},
        "results": results,
    }


def environment(fd_limit: int, upstream: str = "sink") -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "n/a"

    return {
        "python": platform.python_version(),
        "node": version(["node", "--version"]),
        "haraka": systems.HARAKA_VERSION,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "fd_limit": fd_limit,
        "sink": "Postfix smtp-sink" if upstream == "sink" else "a private Postfix, queueing to discard:",
        "load": "Postfix smtp-source (throughput), bench/loadgen.py (latency, idle, huge)",
    }


# --------------------------------------------------------------------------- reporting


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, rows in report["results"].items():
        sc = report["scenarios"][name]
        lines.append("")
        if sc["kind"] == "throughput":
            lines.append(f"### {name}: {sc['size'] // 1024} KB messages, concurrency {sc['concurrency']}")
            lines.append("")
            lines.append("| system | msg/s new conn | msg/s reused | p50 ms | p99 ms | CPU s/1k (new) "
                         "| CPU s/1k (reused) | peak RSS MiB |")
            lines.append("|---|--:|--:|--:|--:|--:|--:|--:|")
            for system, r in rows.items():
                if "error" in r:
                    lines.append(f"| {system} | failed: {r['error'][:80]} |||||||")
                    continue
                lines.append(f"| {system} | {fmt(r['msgs_per_s_new_conn'])} | {fmt(r['msgs_per_s_reused'])} "
                             f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
                             f"| {fmt(r['cpu_s_per_1k_new_conn'], 2)} | {fmt(r['cpu_s_per_1k_reused'], 2)} "
                             f"| {fmt(r['peak_rss_mib'], 1)} |")
            lines.extend(ratios(rows))
        elif sc["kind"] == "idle":
            lines.append(f"### idle: {sc['sessions']:,} concurrent idle sessions (after EHLO)")
            lines.append("")
            lines.append("| system | RSS before MiB | RSS with sessions MiB | KiB per session "
                         "| open time s |")
            lines.append("|---|--:|--:|--:|--:|")
            for system, r in rows.items():
                if "error" in r:
                    lines.append(f"| {system} | failed: {r['error'][:80]} ||||")
                    continue
                lines.append(f"| {system} | {fmt(r['rss_before_mib'], 1)} "
                             f"| {fmt(r['rss_with_sessions_mib'], 1)} "
                             f"| {fmt(r['kib_per_session'], 1)} | {fmt(r['open_seconds'], 1)} |")
        elif sc["kind"] == "overload":
            lines.extend(_overload_markdown(rows))
        elif sc["kind"] == "slow":
            lines.append(f"### slow: normal traffic (1 KB, concurrency {sc['concurrency']}, reused "
                         f"sessions) alone, while {sc['sessions']} clients trickle DATA at 5 bytes/s, after")
            lines.append("")
            lines.append("| system | phase | msg/s | p50 ms | p99 ms |")
            lines.append("|---|---|--:|--:|--:|")
            for system, r in rows.items():
                if "error" in r:
                    lines.append(f"| {system} | failed: {r['error'][:80]} ||||")
                    continue
                for phase in ("alone", "with_slow", "after"):
                    f = r[phase]
                    lines.append(f"| {system} | {phase.replace('_', ' ')} | {fmt(f['msgs_per_s'])} "
                                 f"| {fmt(f['p50_ms'], 1)} | {fmt(f['p99_ms'], 1)} |")
                lines.append(f"| {system} | slow clients still open at the end / dropped "
                             f"| {r['slow_still_open']} / {r['slow_dropped']} |||")
        else:
            lines.append(f"### huge: one {sc['size'] // MiB} MB message")
            lines.append("")
            lines.append("| system | seconds | idle RSS MiB | peak RSS MiB | peak above idle MiB "
                         "| above idle / size |")
            lines.append("|---|--:|--:|--:|--:|--:|")
            for system, r in rows.items():
                if "error" in r:
                    lines.append(f"| {system} | failed: {r['error'][:80]} |||||")
                    continue
                lines.append(f"| {system} | {fmt(r['seconds'], 2)} | {fmt(r['rss_idle_mib'], 1)} "
                             f"| {fmt(r['peak_rss_mib'], 1)} | {fmt(r['peak_above_idle_mib'], 1)} "
                             f"| {fmt(r['peak_above_idle_over_size'], 2)} |")
    return "\n".join(lines)


def _overload_markdown(rows: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for system, r in rows.items():
        if "error" in r:
            lines += [f"### overload: {system} failed: {r['error'][:200]}"]
            continue
        lines += [f"### overload: {system}, max_sessions {r['max_sessions']}, capacity "
                  f"{fmt(r['capacity_per_s'])} msg/s (new connections, closed loop), "
                  f"{fmt(r['phase_seconds'])} s per phase", "",
                  "| offered | offered msg/s | arrived /s | delivered msg/s | 421 | other failures "
                  "| 421 % | p50 ms | p99 ms | first / last 421 s |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for f in r["phases"]:
            when = f"{f['first_421_s']} / {f['last_421_s']}" if f["first_421_s"] is not None else "-"
            lines.append(f"| {f['phase']} | {fmt(f['offered_per_s'])} | {fmt(f['arrived_per_s'])} "
                         f"| {fmt(f['delivered_per_s'])} "
                         f"| {f['shed_421']} | {f['failed']} | {f['shed_pct']} | {fmt(f['p50_ms'], 1)} "
                         f"| {fmt(f['p99_ms'], 1)} | {when} |")
    return lines


def ratios(rows: dict[str, Any]) -> list[str]:
    """The ratios the targets are stated in, for the systems that ran."""

    def get(system: str, key: str) -> float | None:
        r = rows.get(system)
        return None if r is None or "error" in r else r.get(key)

    def both(ours: str, theirs: str, stem: str) -> str:
        return (f"{ratio(get(ours, stem + '_new_conn'), get(theirs, stem + '_new_conn'))} new conn, "
                f"{ratio(get(ours, stem + '_reused'), get(theirs, stem + '_reused'))} reused")

    parts = []
    for ours, theirs in (("smtpproxy", "haraka"), ("smtpproxy-chain", "haraka-chain"),
                         ("smtpproxy", "direct")):
        if get(ours, "msgs_per_s_reused") and get(theirs, "msgs_per_s_reused"):
            parts.append(f"{ours}/{theirs} msg/s: {both(ours, theirs, 'msgs_per_s')}")
    for ours, theirs in (("smtpproxy", "haraka"), ("smtpproxy-chain", "haraka-chain")):
        if get(ours, "cpu_s_per_1k_reused") and get(theirs, "cpu_s_per_1k_reused"):
            parts.append(f"{ours}/{theirs} CPU per message: {both(ours, theirs, 'cpu_s_per_1k')}")
    for name in [n for n in rows if n.endswith("@before")]:
        now = name.removesuffix("@before")
        if get(now, "cpu_s_per_1k_reused") and get(name, "cpu_s_per_1k_reused"):
            parts.append(f"{now} now/before: msg/s {both(now, name, 'msgs_per_s')}; "
                         f"CPU per message {both(now, name, 'cpu_s_per_1k')}")
    if get("smtpproxy", "cpu_s_per_1k_reused") and get("baseline", "cpu_s_per_1k_reused"):
        parts.append(f"smtpproxy/baseline CPU per message: {both('smtpproxy', 'baseline', 'cpu_s_per_1k')}")
    ours_p50, direct_p50 = get("smtpproxy", "p50_ms"), get("direct", "p50_ms")
    if ours_p50 is not None and direct_p50 is not None:
        parts.append(f"smtpproxy added p50: {ours_p50 - direct_p50:+.2f} ms")
    if get("smtpproxy", "peak_rss_mib") and get("haraka", "peak_rss_mib"):
        parts.append(f"smtpproxy/haraka peak RSS: "
                     f"{ratio(get('smtpproxy', 'peak_rss_mib'), get('haraka', 'peak_rss_mib'))}")
    return ["", "; ".join(parts)] if parts else []


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tput = [n for n, sc in report["scenarios"].items() if sc["kind"] == "throughput"]
    names = list(report["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    width = 0.8 / max(len(names), 1)
    for i, system in enumerate(names):
        values = [report["results"][sc].get(system, {}).get("msgs_per_s_reused") or 0 for sc in tput]
        ax.bar([x + i * width for x in range(len(tput))], values, width, label=system)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(tput))], tput)
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (smtp-source -d, log scale)")
    ax.set_title("Throughput, reused sessions")
    ax.legend(fontsize=8)
    ax = axes[1]
    idle_rows = report["results"].get("idle", {})
    huge_rows = report["results"].get("huge", {})
    shown = [s for s in names if s != "direct"]
    ax.barh([f"{s} idle" for s in shown],
            [idle_rows.get(s, {}).get("rss_with_sessions_mib") or 0 for s in shown])
    ax.barh([f"{s} huge" for s in shown], [huge_rows.get(s, {}).get("peak_rss_mib") or 0 for s in shown])
    ax.set_xlabel("MiB (idle: RSS with all idle sessions; huge: peak RSS)")
    ax.set_title("Memory")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"smtpproxy benchmark {report['timestamp']} ({report['environment']['cpus']} CPUs"
                 f"{', quick' if report['quick'] else ''})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


# --------------------------------------------------------------------------- profiling


def profile(args: argparse.Namespace) -> int:
    """py-spy on smtpproxy (no plugins) while smtp-source (-d) loads it; top frames by own time."""
    # The bench extra installs py-spy next to this interpreter, which need not be on PATH.
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1
    signed = Signed.create()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smtpproxy-bench-") as tmp, \
            services(Path(tmp), "chain" in (args.profile_system or ""), signed) as svc:
        msgfile = Path(tmp) / "message.eml"
        msgfile.write_bytes(signed.message(args.profile_size).replace(b"\r\n", b"\n"))
        name = args.profile_system or ("smtpproxy-uvloop" if args.uvloop else "smtpproxy")
        # bench/results/profile.* is the no-plugin row's; the chain's is profile-chain.*.
        stem = "profile" if name in ("smtpproxy", "smtpproxy-uvloop") else \
            "profile-" + name.removeprefix("smtpproxy-")
        system = systems.make_system(name, svc, before=args.before)
        system.start()
        try:
            smtp_source(system.port, 10, 200, msgfile, reuse=True)
            outputs = []
            for fmt_, out in (("raw", RESULTS / f"{stem}.txt"), ("flamegraph", RESULTS / f"{stem}.svg")):
                spy = subprocess.Popen([pyspy, "record", "--pid", str(system.pid), "--format", fmt_,
                                        "--rate", "200", "--output", str(out), "--nonblocking"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(1.0)  # py-spy attaches
                seconds = smtp_source(system.port, args.profile_concurrency, args.profile_messages, msgfile,
                                      reuse=not args.new_connections)
                spy.send_signal(2)
                log = spy.communicate(timeout=60)[0]
                if not out.exists():
                    print(f"error: py-spy wrote nothing: {log[-800:]}", file=sys.stderr)
                    return 1
                outputs.append(out)
                print(f"{fmt_}: {args.profile_messages / seconds:.0f} msg/s while profiled -> {out}")
        finally:
            system.stop()
    top = top_frames(RESULTS / f"{stem}.txt", 25)
    (RESULTS / f"{stem}-top.txt").write_text(top + "\n")
    print(top)
    return 0


def top_frames(raw: Path, n: int) -> str:
    """Own ("self") and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        # Per function, not per line: "name (path:line)" -> "name (path)".
        frames = [re.sub(r":\d+\)$", ")", f.replace(str(systems.ROOT) + "/", "").replace(sys.prefix, "~"))
                  for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count
    out = [f"{total} samples", "", "own%   frame"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    out += ["", "incl%  frame (smtpproxy code only)"]
    ours = [(f, c) for f, c in incl.items() if "smtpproxy/" in f]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(ours, key=lambda kv: -kv[1])[:n]]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _setting(text: str) -> tuple[str, str, Any]:
    """``SECTION.KEY=VALUE`` (VALUE in YAML) for smtpproxy's configuration."""
    import yaml

    name, sep, value = text.partition("=")
    section, dot, key = name.partition(".")
    if not (sep and dot and section and key):
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    return section, key, yaml.safe_load(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = list(scenarios(False))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="small counts (200 messages, 1,000 idle sessions, 5 MB), one repeat")
    parser.add_argument("--scenario", nargs="+", choices=names, default=None,
                        help=f"scenarios to run (default all: {' '.join(names)})")
    parser.add_argument("--systems", nargs="+", default=None, metavar="SYSTEM",
                        help=f"systems (default: {' '.join(systems.DEFAULT_SYSTEMS)}; all: "
                             f"{' '.join(systems.SYSTEM_NAMES)}; smtpproxy ones also NAME@before)")
    parser.add_argument("--upstream", choices=["sink", "postfix"], default="sink",
                        help="what every system forwards to: smtp-sink (default) or a private "
                             "Postfix queueing to discard: (then 'direct' is Postfix alone)")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="another checkout (e.g. git archive of an older commit) for the "
                             "NAME@before rows, measured in the same run")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per throughput figure, the median is shown (default 3; 1 with --quick)")
    parser.add_argument("--haraka-nodes", default="",
                        help="Haraka smtp.ini nodes= (default unset: one process)")
    parser.add_argument("--output", default=str(RESULTS / "latest"),
                        help="path prefix for .json, .png and .md (default bench/results/latest)")
    parser.add_argument("--profile", action="store_true",
                        help="profile smtpproxy (no plugins) with py-spy instead")
    parser.add_argument("--profile-messages", type=int, default=6000)
    parser.add_argument("--profile-size", type=int, default=1024,
                        help="with --profile: message size in bytes (default 1024)")
    parser.add_argument("--profile-concurrency", type=int, default=10,
                        help="with --profile: parallel smtp-source sessions (default 10)")
    parser.add_argument("--uvloop", action="store_true", help="with --profile: profile the uvloop variant")
    parser.add_argument("--profile-system",
                        help="with --profile: which smtpproxy row to profile (default smtpproxy)")
    parser.add_argument("--dns-delay", default=None, metavar="MIN-MAX",
                        help="the loopback DNS answers after MIN to MAX ms (e.g. 20-80: a real network)")
    parser.add_argument("--dns-cache-size", type=int, default=None, metavar="N",
                        help="smtpproxy's dns.cache_size (0: every lookup goes to the DNS server)")
    parser.add_argument("--max-sessions", type=int, default=None, metavar="N",
                        help="smtpproxy's limits.max_sessions (and per IP); the overload scenario's subject")
    parser.add_argument("--phase-seconds", type=float, default=10.0,
                        help="overload: seconds of arrivals per offered rate (default 10)")
    parser.add_argument("--huge-mib", type=int, default=None, metavar="MIB",
                        help="the huge scenario's message size (default 50, --quick 5)")
    parser.add_argument("--slow-clients", type=int, default=None, metavar="N",
                        help="the slow scenario's trickling clients (default 200)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="one more smtpproxy setting (YAML value), e.g. delivery.rcpt_mode=at_data")
    parser.add_argument("--new-connections", action="store_true",
                        help="with --profile: a new client connection per message (smtp-source without -d)")
    args = parser.parse_args(argv)
    args.scenario = args.scenario or [n for n in names if n not in OPT_IN]
    if args.dns_delay is not None:
        from bench.dnszone import delay_range

        try:
            delay_range(args.dns_delay)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--dns-delay: {exc}")
    args.systems = args.systems or list(systems.DEFAULT_SYSTEMS)
    for name in [*args.systems, *([args.profile_system] if args.profile_system else [])]:
        base, at, tag = name.partition("@")
        if base not in systems.SYSTEM_NAMES:
            parser.error(f"unknown system {name!r}; choose from {', '.join(systems.SYSTEM_NAMES)}")
        if at and (tag != "before" or not base.startswith("smtpproxy") or args.before is None):
            parser.error(f"{name!r}: only smtpproxy rows take @before, and only with --before DIR")
    if args.before is not None and not (args.before / "bench" / "_smtpproxy.py").exists():
        parser.error(f"--before {args.before}: no bench/_smtpproxy.py there")
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(SMTP_SOURCE).exists():
        print("error: smtp-source not found (apt-get install postfix)", file=sys.stderr)
        return 1
    if args.profile:
        return profile(args)
    started = time.perf_counter()
    report = run_matrix(args)
    report["wall_seconds"] = time.perf_counter() - started
    text = markdown(report)
    print(text)
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(text.lstrip() + "\n")
    charted = any(sc["kind"] in ("throughput", "idle", "huge") for sc in report["scenarios"].values())
    if charted:  # overload and slow are tables only
        chart(report, prefix.with_suffix(".png"))
    print(f"\nwritten: {prefix}.json, {prefix}.md{f', {prefix}.png' if charted else ''} "
          f"({report['wall_seconds']:.0f} s)")
    failed = [f"{sc}/{s}" for sc, rows in report["results"].items() for s, r in rows.items() if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
