"""What Python's cyclic garbage collector costs the milter or the proxy behind a real Postfix.

    python bench/gc_cost.py                                  # milter, milter-chain, proxy, proxy-chain
    python bench/gc_cost.py --systems proxy --messages 5000 --concurrency 10 100

Each row is ``postfix_rows.py``'s (a private Postfix, smtp-source with a new connection per
message, the same configuration), with smtpproxy started through this file: it times every
collection with ``gc.callbacks`` (process time) and counts what each found. Per message, for
each generation: the runs, the CPU they took and the objects they freed. Objects freed by a
collection were in reference cycles: a session that leaves none is freed by reference
counting as it ends, and the collector's runs then only walk what is alive
(tests/wire/test_reference_cycles.py holds each front end to that). How the figures of issue 31's
"reference cycles" section in bench/README.md were made; a micro-benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_STATS_ENV = "SMTPPROXY_BENCH_GC_STATS"


def _serve(argv: list[str]) -> int:
    """``--serve ARGS``: smtpproxy's CLI with the collector timed; SIGUSR2 writes the figures
    since the last SIGUSR2 to $SMTPPROXY_BENCH_GC_STATS and starts counting anew."""
    sys.path.insert(0, str(ROOT))
    from bench import _smtpproxy

    _smtpproxy._use_this_checkout()
    stats = {generation: [0, 0.0, 0] for generation in range(3)}  # runs, seconds, collected
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
            return
        entry = stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.process_time() - started[0]
        entry[2] += info["collected"]

    def dump(*_: object) -> None:
        Path(os.environ[_STATS_ENV]).write_text(json.dumps(stats), encoding="utf-8")
        for entry in stats.values():
            entry[:] = [0, 0.0, 0]

    gc.callbacks.append(timed)
    signal.signal(signal.SIGUSR2, dump)
    from smtpproxy.cli import main

    return main(argv)


def _measure(name: str, concurrency: int, messages: int) -> str:
    sys.path.insert(0, str(ROOT))
    import psutil

    from bench import postfix_rows as rows
    from bench.run import Signed, smtp_source
    from bench.systems import DnsZone

    base = Path(tempfile.mkdtemp(prefix="gc-cost-"))
    base.chmod(0o755)
    stats_file = base / "gc.json"
    os.environ[_STATS_ENV] = str(stats_file)
    rows.smtpproxy_argv = lambda root: [sys.executable, str(Path(__file__).resolve()), "--serve"]
    signed = Signed.create()
    message = base / "message.eml"
    message.write_bytes(signed.message(1024).replace(b"\r\n", b"\n"))
    dns = DnsZone(base, signed.zone)
    dns.start()
    workdir = base / name
    workdir.mkdir()
    filt = None
    try:
        milter = rows.smtpproxy_milter(name, workdir, dns.port) if name.startswith("milter") else None
        filt = milter
        with rows.postfix(milter) as mta:
            if filt is None:
                filt = rows.smtpproxy_proxy(name, workdir, dns.port, mta.port)
            assert filt.pid is not None
            target = filt.port if filt.kind == "proxy" else mta.port
            smtp_source(target, concurrency, max(2 * concurrency, 300), message, reuse=False)  # warm-up
            os.kill(filt.pid, signal.SIGUSR2)
            time.sleep(0.3)
            process = psutil.Process(filt.pid)
            before = sum(process.cpu_times()[:2])
            seconds = smtp_source(target, concurrency, messages, message, reuse=False)
            cpu = sum(process.cpu_times()[:2]) - before
            os.kill(filt.pid, signal.SIGUSR2)
            time.sleep(0.5)
            stats: dict[str, Any] = json.loads(stats_file.read_text(encoding="utf-8"))
    finally:
        if filt is not None:
            filt.stop()
        dns.stop()
        shutil.rmtree(base, ignore_errors=True)
    cells = [f"{runs} runs, {secs / messages * 1e6:.1f} µs, {found / messages:.1f} freed"
             for runs, secs, found in stats.values()]
    total = sum(secs for _, secs, _ in stats.values()) / messages * 1e6
    return (f"| {name} | c{concurrency} | {messages / seconds:,.0f} | {cpu / messages * 1000:.2f} | "
            + " | ".join(cells) + f" | {total:.1f} |")


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(_serve(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["milter", "milter-chain", "proxy", "proxy-chain"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC, load average {os.getloadavg()[0]:.1f}; "
          "per message, a new connection each, 1 KB\n")
    print("| row | concurrency | msg/s | filter CPU ms/msg | gen 0 | gen 1 | gen 2 | collector µs/msg |")
    print("|---|---|--:|--:|---|---|---|--:|")
    for name in args.systems:
        for concurrency in args.concurrency:
            print(_measure(name, concurrency, args.messages), flush=True)


if __name__ == "__main__":
    main()
