"""Paired A/B of two smtpproxy checkouts in run.py's setup: smtp-sink upstream, warning logs.

The setup of the Haraka comparison (bench/run.py 1k-c100, a new connection per message), with
both checkouts running at once in front of one smtp-sink and taking turns, as
postfix_pairs.py does in front of Postfix: every round sends the same number of messages
through A and then B (B then A in the next round); the figure is the mean of the per-round
differences B - A of the proxy's CPU per message, with its standard error.

    git archive <commit> | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/sink_pairs.py --before /tmp/before                  # c100, 8 rounds of 3,000
    python bench/sink_pairs.py --before /tmp/before --reuse          # many messages per connection
    python bench/sink_pairs.py --before /tmp/before --chain --reuse  # the smtpproxy-chain row's plugins

With ``--chain`` both run the ``smtpproxy-chain`` row's plugins (spf, dkim_verify, dmarc,
auth_results, ratelimit on Redis, score) against run.py's loopback DNS and a private Redis.

The CPU figures are psutil's, in clock ticks: 3,000 messages a round resolve 0.003 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import systems
from bench.run import Signed, services, smtp_source
from bench.systems import free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", type=Path, required=True, metavar="DIR", help="checkout A")
    parser.add_argument("--after", type=Path, default=systems.ROOT, metavar="DIR",
                        help="checkout B (default: this one)")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000, help="per checkout and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reuse", action="store_true",
                        help="smtp-source sends many messages per connection (-d), as the "
                             "Haraka comparison's reused-session rows do")
    parser.add_argument("--chain", action="store_true",
                        help="both with the smtpproxy-chain row's plugins (run.py's DNS, a private Redis)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sink-pairs-"))
    work.chmod(0o755)
    signed = Signed.create()
    proxies: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    with services(work, args.chain, signed) as svc:
        try:
            for name, tree in (("A", args.before.resolve()), ("B", args.after.resolve())):
                proxies[name] = start_proxy(systems.SmtpProxy(name, svc, chain=args.chain, root=tree), work)
            rows = measure(proxies, args, signed, work)
        finally:
            for _, proc in proxies.values():
                proc.terminate()
                proc.wait()
    print(rows)
    return 0


def start_proxy(system: systems.SmtpProxy, work: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """*system*'s configuration (run.py's, the limits raised), its port, its process."""
    system.port, system.dir = free_port(), work / system.name
    system.dir.mkdir()
    config = system.config()
    config["limits"] = {"max_sessions": 5000, "max_sessions_per_ip": 5000}
    (system.dir / "smtpproxy.yaml").write_text(yaml.safe_dump(config))
    with (system.dir / "log").open("wb") as log:
        command = [sys.executable, str(system.root / "bench" / "_smtpproxy.py"),
                   "run", "-c", str(system.dir / "smtpproxy.yaml")]
        return system.port, subprocess.Popen(command, stderr=log)


def measure(proxies: dict[str, tuple[int, subprocess.Popen[bytes]]], args: argparse.Namespace,
            signed: Signed, work: Path) -> str:
    """The rounds, A and B in turns; the summary table."""
    time.sleep(2)  # the proxies start
    message = work / "message.eml"
    message.write_bytes(signed.message(1024).replace(b"\r\n", b"\n"))
    for port, _ in proxies.values():
        smtp_source(port, args.concurrency, 500, message, reuse=args.reuse)  # warm up
    ms: dict[str, list[float]] = {"A": [], "B": []}
    for round_ in range(args.rounds):
        for name in "AB" if round_ % 2 == 0 else "BA":
            port, proc = proxies[name]
            process = psutil.Process(proc.pid)
            before = sum(process.cpu_times()[:2])
            smtp_source(port, args.concurrency, args.messages, message, reuse=args.reuse)
            ms[name].append((sum(process.cpu_times()[:2]) - before) / args.messages * 1000)
        print(f"round {round_ + 1}: A {ms['A'][-1]:.3f} B {ms['B'][-1]:.3f} ms/msg, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    diffs = [b - a for a, b in zip(ms["A"], ms["B"], strict=True)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    workload = (", chain" if args.chain else "") + (", many per connection" if args.reuse else "")
    return (f"\n| CPU ms/msg | A median | B median | B - A (mean ± s.e.) | rounds B lower |\n"
            f"|---|--:|--:|--:|--:|\n"
            f"| proxy → smtp-sink, c{args.concurrency}{workload} | {statistics.median(ms['A']):.3f} | "
            f"{statistics.median(ms['B']):.3f} | {statistics.mean(diffs):+.3f} ± {error:.3f} | "
            f"{sum(d < 0 for d in diffs)}/{len(diffs)} |")


if __name__ == "__main__":
    sys.exit(main())
