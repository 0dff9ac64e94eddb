"""What `smtpproxy policy` adds per request: Postfix's round trip, measured over loopback.

One client asks as Postfix's check_policy_service does (one connection, one request at a
time): per message one RCPT request (the first of an instance: connect, helo, mail_from
and rcpt_to run) and one END-OF-MESSAGE request. Chains: ``none`` (the protocol and the
Conversation alone) and ``access`` (the access plugin with a few rules). It is a
micro-benchmark, not a test: run it by hand (a few seconds)::

    python bench/policy_latency.py                 # --messages N (default 2000)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpproxy.config import load_config
from smtpproxy.policy.server import PolicyServer

CHAINS = {
    "none": "plugins: []\n",
    "access": ("plugins:\n  - name: access\n    settings:\n"
               "      client: {deny: {rules: [198.51.100.0/24]}}\n"
               "      sender: {deny: {rules: ['*@spammer.test', '/^bulk-/']}}\n"),
}


def request(state: str, instance: str) -> bytes:
    attributes = {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": "192.0.2.7", "client_name": "mail.client.test",
        "reverse_client_name": "mail.client.test", "helo_name": "mail.client.test",
        "sender": "alice@sender.test", "recipient": "bob@dest.test", "instance": instance,
        "size": "1234", "server_address": "127.0.0.1", "server_port": "25",
    }
    return b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n"


async def measure(chain: str, messages: int, workdir: Path) -> list[float]:
    path = workdir / f"{chain}.yaml"
    path.write_text("listeners: [{port: 2525}]\ndelivery: {type: maildir, path: mail}\n"
                    "logging: {level: warning}\npolicy: {listen: 'inet:127.0.0.1:0'}\n" + CHAINS[chain])
    config, source = load_config(path)
    server = PolicyServer(config, source)
    await server.start()
    address = server.address
    assert isinstance(address, tuple)
    reader, writer = await asyncio.open_connection(*address)
    seconds: list[float] = []
    try:
        for n in range(messages):
            for state in ("RCPT", "END-OF-MESSAGE"):
                started = time.perf_counter()
                writer.write(request(state, f"bench.{n}"))
                await reader.readuntil(b"\n\n")
                seconds.append(time.perf_counter() - started)
    finally:
        writer.close()
        await server.stop(grace=1)
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.messages} messages "
          f"(2 requests each), one connection\n")
    print("| chain | median µs | p99 µs | requests/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for chain in CHAINS:
            seconds = await measure(chain, args.messages, Path(workdir))
            ordered = sorted(seconds)
            p99 = ordered[int(len(ordered) * 0.99) - 1]
            print(f"| {chain} | {statistics.median(seconds) * 1e6:.0f} | {p99 * 1e6:.0f} | "
                  f"{len(seconds) / sum(seconds):.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
