"""``smtpproxy quarantine ...`` and ``smtpproxy history ...`` on a configured store.

The admin side of :mod:`smtpproxy.store`: list and search (filters), show, release (all
recipients or ``--recipient`` ones), delete, purge (retention now), import a directory
quarantine; search the history, export it as JSON lines, erase one person's entries. An
admin may release anything; the recipients' own release links are in a later layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smtpproxy.allowsender import AllowTable, allow_tables, any_allow_table, author
from smtpproxy.chain import Chain
from smtpproxy.config import Config
from smtpproxy.history import node_name
from smtpproxy.learning import Verdict
from smtpproxy.quarantine import QuarantineError
from smtpproxy.recipientgroups import client_of
from smtpproxy.store import AuditEntry, Held, Search, Store, StoreError, store_from_config
from smtpproxy.store.quarantine import DatabaseQuarantine

__all__ = ["add_search_options", "history_command", "parse_when", "quarantine_command"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str) -> float:
    """A point in time: ``2026-12-01``, ``2026-12-01T10:30`` (UTC unless it has an offset)
    or an age (``90m``, ``24h``, ``7d``: that long ago)."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        return time.time() - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use 2026-12-01, 2026-12-01T10:30 or an age like 24h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def add_search_options(parser: argparse.ArgumentParser, *, history: bool) -> None:
    """The filters both listings take (history has a few more)."""
    parser.add_argument("--sender", help="envelope sender, exactly")
    parser.add_argument("--recipient", help="a recipient, exactly")
    parser.add_argument("--since", type=parse_when, help="from this time (2026-12-01, 24h, 7d)")
    parser.add_argument("--until", type=parse_when, help="before this time")
    parser.add_argument("--node", help="the proxy that handled it")
    parser.add_argument("--subject", help="a part of the subject (any case)")
    parser.add_argument("--reason", help="a part of the reason (any case)")
    parser.add_argument("--message-id", help="the Message-ID, exactly (with <>)")
    parser.add_argument("--decided-by", help="the deciding plugin")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    if history:
        parser.add_argument("--decision", choices=["delivered", "quarantined", "discarded", "rejected",
                                                   "tempfailed"])
        parser.add_argument("--client", help="client IP address")
        parser.add_argument("--group", dest="policy_group",
                            help="messages with a recipient in this policy group (docs/multi-domain.md)")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _search(args: argparse.Namespace) -> Search:
    return Search(
        sender=args.sender, recipient=args.recipient, since=args.since, until=args.until, node=args.node,
        subject=args.subject, reason=args.reason, message_id=args.message_id, decided_by=args.decided_by,
        decision=getattr(args, "decision", None), client=getattr(args, "client", None), limit=args.limit,
        policy_group=getattr(args, "policy_group", None),
    )


def _fail(text: str, code: int = 1) -> int:
    print(f"smtpproxy: {text}", file=sys.stderr)
    return code


def _with_store(config: Config, work: Callable[[Store], Awaitable[int]]) -> int:
    store = store_from_config(config)
    assert store is not None

    async def run() -> int:
        try:
            return await work(store)
        except StoreError as exc:
            return _fail(f"the store failed: {exc}")
        finally:
            await store.close()

    return asyncio.run(run())


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# -- quarantine -------------------------------------------------------------------------


def quarantine_command(config: Config, args: argparse.Namespace) -> int:
    """The quarantine commands on the store; exit 0 ok, 1 something failed, 2 bad usage."""
    def quarantine_of(store: Store) -> DatabaseQuarantine:
        return DatabaseQuarantine(store, node=node_name(config),
                                  retention_days=config.quarantine.retention_days,
                                  admin_only=config.quarantine.admin_only)

    action, ids = args.action, list(getattr(args, "ids", None) or [])
    if action in ("list", "purge") and ids:
        return _fail(f"quarantine {action} takes no ids", 2)
    if action in ("show", "release", "delete", "report") and not ids:
        return _fail(f"quarantine {action} needs at least one id", 2)
    if action == "show" and len(ids) != 1:
        return _fail("quarantine show takes exactly one id", 2)
    if action == "import" and len(ids) > 1:
        return _fail("quarantine import takes one directory at most", 2)
    if action == "report" and args.release and args.verdict != "ham":
        return _fail("quarantine report --release goes with --ham (not spam): spam stays held", 2)
    allow = None
    if getattr(args, "allow_sender", False):
        table = any_allow_table(config)
        if not table.writable:
            return _fail(f"cannot allow the sender: {table.problem}", 2)
    chain = None
    if action == "report" or getattr(args, "allow_sender", False):
        from smtpproxy.config import ConfigError
        from smtpproxy.learning import learners

        try:
            built = learners(config)  # with the policy groups: whose learners, whose allow table
        except ConfigError as exc:
            return _fail(f"the plugins cannot be built, so none can learn:\n{exc}", 2)
        chain = built if action == "report" else None
        allow = built if getattr(args, "allow_sender", False) else None

    async def work(store: Store) -> int:
        q = quarantine_of(store)
        if action == "list":
            return _print_held(await q.list(_search(args), include_done=args.all), store)
        if action == "show":
            return await _show(q, ids[0])
        if action == "delete":
            failed = 0
            for qid in ids:
                try:
                    await q.delete(qid)
                    print(f"{qid}: deleted")
                except QuarantineError as exc:
                    failed += 1
                    print(f"{qid}: FAILED: {exc}")
            return 1 if failed else 0
        if action == "purge":
            print(f"{await q.purge()} expired message(s) removed")
            return 0
        if action == "import":
            path = Path(ids[0]) if ids else Path(config.quarantine.path)
            imported, skipped = await q.import_directory(path)
            print(f"{imported} message(s) imported from {path} (files moved to {path / 'imported'}), "
                  f"{skipped} already in the store")
            return 0
        if chain is not None:
            failed = await _report(q, chain, ids, args.verdict, args.recipient or [], tables=config.tables)
            if args.release and not failed:
                return await _release(config, q, ids, args.recipient or [], allow)
            return 1 if failed else 0
        return await _release(config, q, ids, args.recipient or [], allow)

    return _with_store(config, work)


async def _report(q: DatabaseQuarantine, chain: Chain, ids: list[str], verdict: Verdict,
                  recipients: list[str], *, tables: Mapping[str, Any]) -> int:
    """Teach the learning plugins of each recipient's policy group each message; every report
    goes to the audit log. Failures."""
    from smtpproxy.learning import report

    failed = 0
    for qid in ids:
        try:
            held, content = await q.show(qid)
        except QuarantineError as exc:
            failed += 1
            print(f"{qid}: FAILED: {exc}")
            continue
        unknown = [r for r in recipients if r not in held.recipients]
        if unknown:
            failed += 1
            print(f"{qid}: FAILED: no recipient {', '.join(unknown)}")
            continue
        learned = await report(chain, content, verdict, "cli", recipients or list(held.recipients),
                               table_specs=tables, client_ip=client_of(held.record))
        lines = learned.lines()
        await q.db.audit(AuditEntry(time.time(), "cli", f"report_{verdict}", qid,
                                    recipients or list(held.recipients), "; ".join(lines)[:1000]))
        for line in lines:
            print(f"{qid}: reported as {verdict}: {line}")
        failed += learned.failed
    return failed


def _print_held(found: list[Held], store: Store) -> int:
    if not found:
        print(f"no quarantined messages match ({store.name} store)")
        return 0
    rows = [("ID", "TIME (UTC)", "NODE", "SENDER", "HELD FOR", "SCORE", "SUBJECT / REASON")]
    for h in found:
        held = h.held
        rows.append((
            h.id, _when(h.time), h.node, h.sender or "<>",
            ",".join(held) if len(held) <= 2 else f"{held[0]} +{len(held) - 1}" if held else "-",
            f"{h.score:.1f}" if h.score is not None else "-",
            _one_line(f"{h.subject or ''} / {h.reason or ''}", 80),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths, strict=True)) + "  " + row[6])
    print(f"{len(found)} message(s)")
    return 0


async def _show(q: DatabaseQuarantine, qid: str) -> int:
    try:
        held, content = await q.show(qid)
    except QuarantineError as exc:
        return _fail(str(exc))
    print(json.dumps({**held.record, "node": held.node, "expires": held.expires,
                      "recipients_state": held.recipients}, indent=2, ensure_ascii=False))
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    print()
    print(head.decode("utf-8", errors="replace").replace("\r\n", "\n"), end="")
    return 0


async def _release(config: Config, q: DatabaseQuarantine, ids: list[str], recipients: list[str],
                   allow: Chain | None = None) -> int:
    """Release; with *allow* (the configured chain, for its policy groups) allow the sender too."""
    from smtpproxy.delivery import DeliveryError
    from smtpproxy.delivery.factory import make_delivery

    delivery = make_delivery(config)
    failed = 0
    try:
        try:
            await delivery.start()
        except Exception as exc:
            return _fail(f"cannot start the {delivery.name} delivery: {exc}")
        for n, qid in enumerate(ids, 1):
            progress = f"[{n}/{len(ids)}] " if len(ids) > 1 else ""
            try:
                plan = None
                if allow is not None:  # read while kept: once all are released, the content is gone
                    plan = await _allow_plan(config, q, allow, qid, recipients)
                    if plan is None:
                        failed += 1
                        continue
                done = await q.release(qid, delivery, recipients or None, actor="admin", admin=True)
            except QuarantineError as exc:
                failed += 1
                print(f"{progress}{qid}: FAILED: {exc}", flush=True)
            except DeliveryError as exc:
                failed += 1
                detail = f" ({exc.detail})" if exc.detail else ""
                print(f"{progress}{qid}: FAILED: delivery refused it: {exc.reply}{detail}; "
                      "it stays in quarantine", flush=True)
            except StoreError:
                raise
            except Exception as exc:
                failed += 1
                print(f"{progress}{qid}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            else:
                print(f"{progress}{qid}: released for {', '.join(done.recipients)} to "
                      f"{done.delivered.destination}: {done.delivered.reply}", flush=True)
                if plan is not None:
                    failed += not await _allow(config, q, qid, plan, done.recipients)
    finally:
        await delivery.close()
    if len(ids) > 1:
        print(f"{len(ids) - failed} released, {failed} failed")
    return 1 if failed else 0


async def _allow_plan(config: Config, q: DatabaseQuarantine, chain: Chain, qid: str,
                      recipients: list[str]) -> tuple[str, list[tuple[AllowTable, list[str]]]] | None:
    """Before a release: the From: address to allow and each recipient's allow table (its
    policy group's), read while the message is still kept; None (said why) when it cannot be."""
    from smtpproxy.recipientgroups import GroupUnknown

    held, content = await q.show(qid)
    sender = author(content)
    if sender is None:
        print(f"{qid}: FAILED to allow the sender: the message has no single From: address; "
              "nothing was released", flush=True)
        return None
    try:
        tables = await allow_tables(config, chain, recipients or held.held, client_ip=client_of(held.record))
    except GroupUnknown as exc:
        print(f"{qid}: FAILED to allow {sender}: {exc}; nothing was released", flush=True)
        return None
    for table, for_whom in tables:
        if not table.writable:
            print(f"{qid}: FAILED to allow {sender} for {', '.join(for_whom)}: {table.problem}; "
                  "nothing was released", flush=True)
            return None
    return sender, tables


async def _allow(config: Config, q: DatabaseQuarantine, qid: str,
                 plan: tuple[str, list[tuple[AllowTable, list[str]]]], released: list[str]) -> bool:
    """Add the From: address to each released recipient's allow list; whether it could."""
    sender, tables = plan
    for table, for_whom in tables:
        for recipient in (r for r in for_whom if r in released):
            try:
                said = await table.add(config, recipient, sender)
            except Exception as exc:  # the table's own errors (redis down, file not writable)
                print(f"{qid}: FAILED to allow {sender} for {recipient}: {type(exc).__name__}: {exc}",
                      flush=True)
                return False
            await q.db.audit(AuditEntry(time.time(), "cli", "allow_sender", qid, [recipient], said[:1000]))
            print(f"{qid}: {said}", flush=True)
    return True


# -- history ---------------------------------------------------------------------------


def history_command(config: Config, args: argparse.Namespace) -> int:
    """``history search|export|erase``; exit 0 ok, 1 the store failed, 2 bad usage."""

    async def work(store: Store) -> int:
        if args.action == "erase":
            history, held = await store.erase_address(args.address)
            print(f"{args.address}: {history} history entr{'y' if history == 1 else 'ies'} and "
                  f"{held} quarantined message(s) erased")
            return 0
        found = await store.search_history(_search(args))
        if args.action == "export" or args.json:
            for entry in found:
                print(json.dumps(entry.as_dict(), ensure_ascii=False))
            return 0
        return _print_history(found)

    return _with_store(config, work)


def _print_history(found: list[Any]) -> int:
    if not found:
        print("no history entries match")
        return 0
    rows = [("TIME (UTC)", "NODE", "CLIENT", "SENDER", "RCPTS", "GROUP", "DECISION", "BY",
             "SUBJECT / REASON")]
    for e in found:
        rows.append((_when(e.time), e.node, e.client or "-", e.sender or "<>", str(len(e.recipients)),
                     e.policy_group or "-", e.decision, e.decided_by or "-",
                     _one_line(f"{e.subject or ''} / {e.reason or ''}", 70)))
    widths = [max(len(row[i]) for row in rows) for i in range(8)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:8], widths, strict=True)) + "  " + row[8])
    print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'} (newest first)")
    return 0
