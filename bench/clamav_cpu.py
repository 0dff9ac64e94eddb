"""CPU per message of the ``clamav`` plugin, in-process, and clamd's own CPU apart.

    python bench/clamav_cpu.py [SIZE] [MESSAGES]     # default: 1024 bytes, 300 messages

Starts a private clamd (tests/clamd_server.py: its own tiny signature database, unix socket),
then calls the plugin's ``data`` hook directly, one message after another, on the same message
as bench/plugin_cpu.py, after 20 warm-up messages. The plugin's CPU is ``time.process_time()``
of this process (the zINSTREAM exchange, the header edits, the verdict); clamd's is the
change of its utime+stime in /proc over the same messages. The chain without ``clamav`` is
bench/plugin_cpu.py's five plugins, measured in the same run for the comparison.
clamd's scan time grows with its database: with the full official one (millions of
signatures) a real clamd spends more per message than this one; the plugin's side does not
change.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.plugin_cpu import measure as measure_chain
from bench.plugin_cpu import size_and_count
from bench.run import Signed
from smtpproxy import Message
from smtpproxy.pytest_plugin import make_session
from tests.clamd_server import clamd_binary, start_clamd
from tests.dns_server import running_zone_server


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(address: str, clamd_pid: int, raw: bytes, count: int) -> tuple[float, float]:
    from smtpproxy_plugins.clamav import ClamAV

    plugin = ClamAV(ClamAV.Settings(servers=[address]))

    async def one() -> None:
        session = make_session(client_ip="127.0.0.1", helo="client.bench", sender="bench@sender.test",
                               recipients=["rcpt@bench.test"])
        assert session.transaction is not None
        verdict = await plugin.data(session.transaction, Message(raw))
        assert verdict is not None and verdict.tags == ("clamav:clean",), verdict

    for _ in range(20):
        await one()
    mine, theirs = time.process_time(), _cpu_seconds(clamd_pid)
    for _ in range(count):
        await one()
    return (1000 * (time.process_time() - mine) / count, 1000 * (_cpu_seconds(clamd_pid) - theirs) / count)


def main(argv: list[str]) -> int:
    size, count = size_and_count(argv, __doc__)
    if clamd_binary() is None:
        print("clamd is not installed: apt-get install clamav-daemon", file=sys.stderr)
        return 1
    signed = Signed.create()
    raw = signed.message(size)
    with running_zone_server() as zone:
        for line in signed.zone:
            zone.add(line)
        chain = asyncio.run(measure_chain(zone.port, raw, count))
    workdir = Path(tempfile.mkdtemp(prefix="bench-clamd-"))
    try:
        clamd = start_clamd(workdir)
        try:
            plugin_ms, clamd_ms = asyncio.run(measure(clamd.unix, clamd.process.pid, raw, count))
        finally:
            clamd.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = sum(chain.values())
    print(f"{len(raw)}-byte message, {count} messages, CPU ms per message:")
    print(f"  chain without clamav (plugin_cpu.py) {total:.3f}")
    print(f"  clamav plugin {plugin_ms:.3f}  -> chain with clamav {total + plugin_ms:.3f}")
    print(f"  clamd (its own process, apart) {clamd_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
