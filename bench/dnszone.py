"""The benchmark's DNS: the tests' authoritative loopback server, as its own process.

    python bench/dnszone.py ZONEFILE [--delay MIN-MAX]

Serves the records of ZONEFILE (zone-file syntax, one record a line) on 127.0.0.1, UDP and TCP
on one free port, prints that port on stdout once it answers, and runs until stdin closes.
A separate process so that its CPU is not charged to the load generator or the system under test.
``--delay 20-80`` answers each query after a uniformly random 20 to 80 ms, as a resolver
across a real network would (each query waits in its own thread: they overlap).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dns_server import running_zone_server


def delay_range(text: str) -> tuple[float, float]:
    """``MIN-MAX`` milliseconds (or one number) as seconds."""
    low, _, high = text.partition("-")
    try:
        pair = float(low) / 1000, float(high or low) / 1000
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX in ms, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zonefile", type=Path)
    parser.add_argument("--delay", type=delay_range, default=None, metavar="MIN-MAX",
                        help="answer each query after MIN to MAX milliseconds (uniform)")
    args = parser.parse_args(argv)
    with running_zone_server() as zone:
        for line in args.zonefile.read_text(encoding="ascii").splitlines():
            if line.strip():
                zone.add(line)
        if args.delay is not None:
            answer, (low, high) = zone._answer, args.delay

            def late(request: Any) -> Any:
                time.sleep(random.uniform(low, high))  # dnslib's handler thread, one per query
                return answer(request)

            zone._answer = late  # type: ignore[method-assign]
        print(zone.port, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)


if __name__ == "__main__":
    main()
