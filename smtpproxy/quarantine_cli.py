"""``smtpproxy quarantine list|show|release|delete``: the admin side of the quarantine store.

It needs no plugin chain (it works without the plugins' import path); a release builds the
configured delivery backend (:mod:`smtpproxy.delivery.factory`) and hands it each message.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from smtpproxy.config import Config
from smtpproxy.quarantine import QuarantineError, QuarantineStore

__all__ = ["admin_command"]


def admin_command(config: Config, action: str, ids: list[str]) -> int:
    """The CLI: 0 when everything asked for succeeded, 1 when anything failed, 2 bad usage."""
    store = QuarantineStore(Path(config.quarantine.path))
    if action == "list":
        if ids:
            return _usage("quarantine list takes no ids")
        return _print_list(store)
    if not ids:
        return _usage(f"quarantine {action} needs at least one id")
    if action == "show":
        if len(ids) != 1:
            return _usage("quarantine show takes exactly one id")
        return _print_show(store, ids[0])
    if action == "delete":
        failed = 0
        for qid in ids:
            try:
                store.delete(qid)
                print(f"{qid}: deleted")
            except QuarantineError as exc:
                failed += 1
                print(f"{qid}: FAILED: {exc}")
        return 1 if failed else 0
    return asyncio.run(_release_all(config, store, ids))


def _usage(text: str) -> int:
    print(f"smtpproxy: {text}", file=sys.stderr)
    return 2


def _print_list(store: QuarantineStore) -> int:
    records = store.list()
    if not records:
        print(f"quarantine is empty ({store.path})")
        return 0
    rows = [("ID", "TIME (UTC)", "SENDER", "RCPTS", "SCORE", "REASON")]
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(r.get("time") or 0)))
        score = r.get("score")
        reason = " ".join(str(r.get("reason") or "").split())
        rows.append((
            str(r["id"]), when, str(r.get("sender") or "<>"), str(len(r.get("recipients") or [])),
            f"{score:.1f}" if isinstance(score, int | float) else "-",
            reason if len(reason) <= 80 else reason[:77] + "...",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    print(f"{len(records)} message(s)")
    return 0


def _print_show(store: QuarantineStore, qid: str) -> int:
    try:
        record, content = store.show(qid)
    except QuarantineError as exc:
        print(f"smtpproxy: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2, ensure_ascii=False))
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    print()
    print(head.decode("utf-8", errors="replace").replace("\r\n", "\n"), end="")
    return 0


async def _release_all(config: Config, store: QuarantineStore, ids: list[str]) -> int:
    from smtpproxy.delivery import DeliveryError
    from smtpproxy.delivery.factory import make_delivery

    delivery = make_delivery(config)
    failed = 0
    try:
        try:
            await delivery.start()
        except Exception as exc:
            print(f"smtpproxy: cannot start the {delivery.name} delivery: {exc}", file=sys.stderr)
            return 1
        for n, qid in enumerate(ids, 1):
            progress = f"[{n}/{len(ids)}] " if len(ids) > 1 else ""
            try:
                delivered = await store.release(qid, delivery)
            except QuarantineError as exc:
                failed += 1
                print(f"{progress}{qid}: FAILED: {exc}", flush=True)
            except DeliveryError as exc:
                failed += 1
                detail = f" ({exc.detail})" if exc.detail else ""
                print(f"{progress}{qid}: FAILED: delivery refused it: {exc.reply}{detail}; "
                      "it stays in quarantine", flush=True)
            except Exception as exc:
                failed += 1
                print(f"{progress}{qid}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            else:
                print(f"{progress}{qid}: released to {delivered.destination}: {delivered.reply}",
                      flush=True)
    finally:
        await delivery.close()
    if len(ids) > 1:
        print(f"{len(ids) - failed} released, {failed} failed")
    return 1 if failed else 0
