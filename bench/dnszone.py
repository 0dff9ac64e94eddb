"""The benchmark's DNS: the tests' authoritative loopback server, as its own process.

    python bench/dnszone.py ZONEFILE

Serves the records of ZONEFILE (zone-file syntax, one record a line) on 127.0.0.1, UDP and TCP
on one free port, prints that port on stdout once it answers, and runs until stdin closes.
A separate process so that its CPU is not charged to the load generator or the system under test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dns_server import running_zone_server


def main(zonefile: str) -> None:
    with running_zone_server() as zone:
        for line in Path(zonefile).read_text(encoding="ascii").splitlines():
            if line.strip():
                zone.add(line)
        print(zone.port, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)


if __name__ == "__main__":
    main(sys.argv[1])
