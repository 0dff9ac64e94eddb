"""CPU per message of the attachments plugin's data hook, in-process, without SMTP around it.

    python bench/attachments_cpu.py [MESSAGES]     # default: 30 messages of each kind

Two messages: 1 KB of text, and 2 MB with three attachments (a 1 MB PDF-like file, a zip of
600 KB holding a PDF and a CSV, an Office document without macros). The hook runs its scan in
the worker pool as in the proxy; CPU is ``time.process_time()`` of the whole process, so the
worker's time is counted. "message" is the cost of building the Message alone, the floor any
chain pays; bench/plugin_cpu.py has the rest of the chain for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpproxy_plugins.attachments import Attachments, AttachmentSettings

from smtpproxy import Message
from smtpproxy.pytest_plugin import make_session
from tests import attachment_samples as samples


def messages() -> dict[str, bytes]:
    pdf = b"%PDF-1.4\n" + os.urandom(1024 * 1024)
    archive = samples.zipped(("report.pdf", b"%PDF-1.4\n" + os.urandom(500 * 1024)),
                             ("table.csv", b"a,b,c\n1,2,3\n" * 8000))
    big = samples.message(("report.pdf", pdf, "application/pdf"), ("data.zip", archive, "application/zip"),
                          ("letter.docx", samples.ooxml(), "application/vnd.openxmlformats-officedocument."
                                                           "wordprocessingml.document"))
    small = samples.raw_message("Subject: hello", b"Short text. " * 80 + b"\n")
    return {"1 KB text": small, f"{len(big) // 1024} KB, 3 attachments": big}


async def measure(raw: bytes, count: int) -> tuple[float, float]:
    plugin = Attachments(AttachmentSettings())
    clock = time.process_time
    parse = scan = 0.0
    for index in range(count + 5):  # 5 warm-up messages: libraries loaded, caches warm
        session = make_session(sender="a@sender.test", recipients=["b@dest.test"])
        tx = session.transaction
        assert tx is not None
        t0 = clock()
        message = Message(raw)
        t1 = clock()
        verdict = await plugin.data(tx, message)
        t2 = clock()
        assert verdict is None, verdict
        if index >= 5:
            parse += t1 - t0
            scan += t2 - t1
    return parse / count * 1000, scan / count * 1000


async def main(count: int) -> None:
    print(f"{'message':<28} {'Message()':>10} {'attachments':>12}   (ms CPU per message, {count} each)")
    for name, raw in messages().items():
        parse, scan = await measure(raw, count)
        print(f"{name:<28} {parse:>10.3f} {scan:>12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("messages", nargs="?", type=int, default=30, help="messages of each kind")
    asyncio.run(main(parser.parse_args().messages))
