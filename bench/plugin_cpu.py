"""CPU per message of each plugin of the bench chain, in-process, without SMTP around it.

    python bench/plugin_cpu.py [SIZE] [MESSAGES]     # default: 1024 bytes, 300 messages

Calls the hooks of spf (mail_from), dkim_verify, dmarc, auth_results and score (data) directly,
one message after another, on the same DKIM-signed message and loopback DNS as bench/run.py,
after 20 warm-up messages (caches warm, as in a busy MX). CPU is ``time.process_time()`` of the
whole process, so work a hook hands to a thread is counted too. ratelimit is left out (its cost
is a Redis round trip). What issue 15's "what each change gained" table was measured with.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import Signed
from smtpproxy import Message
from smtpproxy.dns import Resolver, configure
from smtpproxy.pytest_plugin import make_session
from tests.dns_server import running_zone_server

PHASES = ("message", "spf", "dkim_verify", "dmarc", "auth_results", "score")


async def measure(zone_port: int, raw: bytes, count: int) -> dict[str, float]:
    from smtpproxy_plugins.auth_results import AuthResults
    from smtpproxy_plugins.dkim import DKIMVerify
    from smtpproxy_plugins.dmarc import DMARC
    from smtpproxy_plugins.score import Score
    from smtpproxy_plugins.spf import SPF

    configure(Resolver(["127.0.0.1"], port=zone_port, timeout=5))
    spf, dkim, dmarc = SPF(), DKIMVerify(), DMARC()
    auth_results = AuthResults(AuthResults.Settings(authserv_id="proxy.bench"))
    score = Score(Score.Settings.model_validate({"tag": 5.0, "reject": 15.0, "rules": [
        {"name": "SPF_FAIL", "score": 4.0, "match": {"tag": "spf:fail"}},
        {"name": "SUBJ_PILLS", "score": 3.0,
         "match": {"header": {"name": "Subject", "regex": "cheap pills"}}},
    ]}))
    spent = dict.fromkeys(PHASES, 0.0)

    async def one() -> None:
        clock = time.process_time
        t0 = clock()
        session = make_session(client_ip="127.0.0.1", helo="client.bench", sender="bench@sender.test",
                               recipients=["rcpt@bench.test"])
        tx = session.transaction
        assert tx is not None
        message = Message(raw)
        steps: list[tuple[str, Any]] = [
            ("spf", lambda: spf.mail_from(session, tx, tx.envelope.sender)),
            ("dkim_verify", lambda: dkim.data(session, tx, message)),
            ("dmarc", lambda: dmarc.data(session, tx, message)),
            ("auth_results", lambda: auth_results.data(tx, message)),
            ("score", lambda: score.data(session, tx, message)),
        ]
        t1 = clock()
        spent["message"] += t1 - t0
        for name, call in steps:
            result = call()
            if asyncio.iscoroutine(result):
                await result
            t2 = clock()
            spent[name] += t2 - t1
            t1 = t2

    for _ in range(20):
        await one()
    spent.update(dict.fromkeys(PHASES, 0.0))
    for _ in range(count):
        await one()
    return {name: 1000 * seconds / count for name, seconds in spent.items()}


def size_and_count(argv: list[str], doc: str | None) -> tuple[int, int]:
    """``[SIZE] [MESSAGES]`` from the command line (this script's and clamav_cpu.py's)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", nargs="?", type=int, default=1024, help="message size in bytes")
    parser.add_argument("messages", nargs="?", type=int, default=300, help="messages measured")
    args = parser.parse_args(argv)
    return args.size, args.messages


def main(argv: list[str]) -> int:
    size, count = size_and_count(argv, __doc__)
    signed = Signed.create()
    raw = signed.message(size)
    with running_zone_server() as zone:
        for line in signed.zone:
            zone.add(line)
        ms = asyncio.run(measure(zone.port, raw, count))
    print(f"{len(raw)}-byte message, {count} messages, CPU ms per message:")
    print("  ".join(f"{name} {value:.3f}" for name, value in ms.items()) + f"  total {sum(ms.values()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
