"""What one Redis check of ``ratelimit`` or ``greylist`` costs: CPU per script call, in one process.

    python bench/redis_script_cost.py                    # this checkout
    python bench/redis_script_cost.py --root /tmp/before # another checkout's plugins/_redis.py

Starts a private ``redis-server`` (tests/redis_server.py), then runs ratelimit's Lua script
through ``plugins/_redis.py``'s ``RedisScript`` 3,000 times one after the other and 3,000
times 50 at once, and, for reference, the same EVALSHA on one bare ``redis.asyncio.Connection``.
Process time of this process only (Redis's own CPU is not counted); best of 3. A
micro-benchmark, not a test. redis-py packs and parses with hiredis when it is installed (the
``redis`` extra installs it); the first line says which.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _redis_script(root: Path) -> Any:
    """``RedisScript`` from *root*'s ``plugins/_redis.py`` (it imports nothing of smtpproxy)."""
    spec = importlib.util.spec_from_file_location("_bench_redis", root / "plugins" / "_redis.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisScript


async def _measure(root: Path, url: str, port: int, calls: int) -> dict[str, float]:
    import redis.asyncio
    from smtpproxy_plugins.ratelimit import _LUA

    RedisScript = _redis_script(root)

    def args() -> list[object]:
        return [60_000_000, 10_000_000, 1, uuid.uuid4().hex, 0]

    script = RedisScript(url, 2.0, "bench:", _LUA)
    bare = redis.asyncio.Connection(host="127.0.0.1", port=port)
    admin = redis.asyncio.Redis(port=port)
    sha = await admin.script_load(_LUA)
    results: dict[str, float] = {}
    try:
        for _ in range(200):
            await script.run("k", args())
        for name in ("RedisScript, one at a time", "RedisScript, 50 at once", "bare connection"):
            best = float("inf")
            for _ in range(3):
                started = time.process_time()
                if name == "bare connection":
                    for _ in range(calls):
                        await bare.send_command("EVALSHA", sha, 1, "bench:k", *args())
                        await bare.read_response()
                elif name.endswith("50 at once"):
                    for _ in range(calls // 50):
                        await asyncio.gather(*(script.run("k", args()) for _ in range(50)))
                else:
                    for _ in range(calls):
                        await script.run("k", args())
                best = min(best, (time.process_time() - started) / calls * 1e6)
            results[name] = best
    finally:
        await script.close()
        await bare.disconnect()
        await admin.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose plugins/_redis.py runs")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.redis_server import start_redis

    with tempfile.TemporaryDirectory(prefix="redis-cost-") as workdir:
        server = start_redis(Path(workdir))
        try:
            import uvloop

            results = uvloop.run(_measure(args.root.resolve(), server.url, server.port, args.calls))
        finally:
            server.stop()
    from redis.utils import HIREDIS_AVAILABLE

    parser = "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser"
    print(f"µs of CPU per call, best of 3 x {args.calls} ({args.root.resolve()}, {parser}):")
    for name, micros in results.items():
        print(f"  {name}: {micros:.1f}")


if __name__ == "__main__":
    main()
