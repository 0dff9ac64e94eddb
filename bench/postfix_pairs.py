"""Paired A/B of two smtpproxy checkouts in front of a real Postfix: small CPU changes, measured.

postfix_rows.py measures one row after the other, each the median of 3 runs; on this shared
machine a row moves by 5-15 % with the neighbours, so a change of a few percent does not show.
Here both checkouts run at once, each in front of its own private Postfix, and take turns:
every round sends the same number of messages through A and then B (B then A in the next
round), and the figure is the mean of the per-round differences B - A with its standard
error, so what the neighbours do to a round falls on both sides of the pair.

    git archive <commit> | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python bench/postfix_pairs.py --before /tmp/before                 # proxy, c100, 8 rounds
    python bench/postfix_pairs.py --before /tmp/before --system proxy-chain --concurrency 10 --rounds 12
    python bench/postfix_pairs.py --before /tmp/before --system milter-chain     # Postfix calling each milter

A is the --before checkout, B this one (or --after DIR). Run as root (private Postfix masters).
The CPU figures are psutil's, in clock ticks: 1,000 messages a round resolve 0.01 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import systems
from bench.postfix_rows import postfix, smtpproxy_milter, smtpproxy_proxy, tree_cpu
from bench.run import Signed, smtp_source
from bench.systems import DnsZone


def summary(label: str, a: list[float], b: list[float]) -> str:
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return (f"| {label} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
            f"{statistics.mean(diffs):+.3f} ± {error:.3f} | {sum(d < 0 for d in diffs)}/{len(diffs)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", type=Path, required=True, metavar="DIR", help="checkout A")
    parser.add_argument("--after", type=Path, default=systems.ROOT, metavar="DIR",
                        help="checkout B (default: this one)")
    parser.add_argument("--system", choices=["proxy", "proxy-chain", "proxy-xforward", "milter",
                                             "milter-chain", "milter-unix"],
                        default="proxy")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000, help="per checkout and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reuse", action="store_true",
                        help="many messages per connection (smtp-source -d), as from an MTA's "
                             "connection cache")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: a private Postfix master must be started as root", file=sys.stderr)
        return 1
    trees = {"A": args.before.resolve(), "B": args.after.resolve()}
    filter_ms: dict[str, list[float]] = {"A": [], "B": []}
    postfix_ms: dict[str, list[float]] = {"A": [], "B": []}
    signed = Signed.create()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpproxy-pairs-")))
        base.chmod(0o755)
        message = base / "message-1k.eml"
        message.write_bytes(signed.message(1024).replace(b"\r\n", b"\n"))  # smtp-source adds CR
        dns = DnsZone(base, signed.zone)
        dns.start()
        stack.callback(dns.stop)
        ports, pids = {}, {}
        for side, tree in trees.items():
            workdir = base / side
            workdir.mkdir()
            root = None if tree == systems.ROOT else tree
            if args.system.startswith("milter"):  # the milter first: Postfix is configured with it
                filt = smtpproxy_milter(args.system, workdir, dns.port, root)
                stack.callback(filt.stop)
                mta = stack.enter_context(postfix(filt))
                port = mta.port
            else:
                mta = stack.enter_context(postfix(None))
                filt = smtpproxy_proxy(args.system, workdir, dns.port, mta.port, root)
                stack.callback(filt.stop)
                port = filt.port
            ports[side], pids[side] = port, (filt.pid, mta._process.pid)
        for side in trees:  # warm-up: processes spawned, DNS cached; not measured
            smtp_source(ports[side], args.concurrency, max(300, 2 * args.concurrency), message,
                        reuse=args.reuse)
        for n in range(args.rounds):
            order = "AB" if n % 2 == 0 else "BA"
            for side in order:
                f0, p0 = tree_cpu(pids[side][0]), tree_cpu(pids[side][1])
                smtp_source(ports[side], args.concurrency, args.messages, message, reuse=args.reuse)
                f1, p1 = tree_cpu(pids[side][0]), tree_cpu(pids[side][1])
                filter_ms[side].append((f1 - f0) / args.messages * 1000)
                postfix_ms[side].append((p1 - p0) / args.messages * 1000)
            print(f"[{time.strftime('%H:%M:%S')}] round {n + 1} ({order[0]} first): filter A "
                  f"{filter_ms['A'][-1]:.3f} B {filter_ms['B'][-1]:.3f} ms/msg, Postfix A "
                  f"{postfix_ms['A'][-1]:.3f} B {postfix_ms['B'][-1]:.3f}, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    print(f"\n{args.system}, 1 KB, c{args.concurrency}, {args.rounds} rounds of {args.messages} messages"
          + (", many per connection" if args.reuse else ", a connection each") + "; "
          f"{started} UTC, load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"A = {trees['A']}, B = {trees['B']}\n")
    print("| CPU ms/msg | A median | B median | B - A (mean ± s.e.) | rounds B lower |")
    print("|---|--:|--:|--:|--:|")
    print(summary(f"{args.system} (filter)", filter_ms["A"], filter_ms["B"]))
    print(summary("Postfix behind it", postfix_ms["A"], postfix_ms["B"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
