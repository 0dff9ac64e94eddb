"""The quarantine on the store: kept by one node, listed, searched and released from any.

Keeping a message is a delivery: :meth:`DatabaseQuarantine.store` returns only once the
record and every chunk of the message are committed, and raises otherwise (the front end
then answers 451, never 250). A release is per recipient: the recipients asked for are
claimed in the store (so two nodes or two admins never deliver one recipient twice),
delivered with the original sender, then marked released, or given back to the
quarantine if the delivery refused them. Messages held by a plugin listed in
``quarantine.admin_only`` (a virus, a dangerous attachment) are released by an admin only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpproxy.blocking import run_blocking
from smtpproxy.history import decoded_header
from smtpproxy.message import Message
from smtpproxy.quarantine import QuarantineError, rebuild
from smtpproxy.store import Held, Search, Store, StoreError

if TYPE_CHECKING:
    from smtpproxy.delivery import Delivered, Delivery
    from smtpproxy.session import Session, Transaction

__all__ = ["DatabaseQuarantine", "Released"]

DAY = 86400.0


class Released:
    """What one release did: the recipients delivered, and the backend's answer."""

    def __init__(self, qid: str, recipients: list[str], delivered: Delivered) -> None:
        self.qid = qid
        self.recipients = recipients
        self.delivered = delivered


class DatabaseQuarantine:
    """The quarantine in a :class:`~smtpproxy.store.Store` (see the module docstring)."""

    def __init__(self, store: Store, *, node: str, retention_days: float = 30,
                 admin_only: Sequence[str] = (), timeout: float = 10.0) -> None:
        self.db = store
        self.node = node
        self.retention = retention_days * DAY
        self.admin_only = frozenset(admin_only)
        self.timeout = timeout
        """Seconds keeping a message may take, plus one per MiB of it (a hung connection
        to the store must not hold the client forever: it then gets 451)."""

    @property
    def where(self) -> str:
        return f"{self.db.name} store"

    async def start(self) -> None:
        """Nothing to narrow: the database keeps the messages (the server migrates its schema)."""

    async def store(self, session: Session, transaction: Transaction, content: bytes | Message,
                    reason: str, *, decided_by: str | None = None) -> str:
        """Keep the message; its quarantine id. Raises StoreError when it is not durable."""
        now = time.time()
        qid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{transaction.id}"
        message = content if isinstance(content, Message) else Message(content)
        recipients = [r.address.text for r in transaction.envelope.recipients]
        record: dict[str, Any] = {
            "id": qid, "time": now, "node": self.node, "reason": reason, "decided_by": decided_by,
            "session": session.id,
            "client": {"ip": session.client.ip, "port": session.client.port,
                       "hostname": session.client.hostname, "helo": session.helo},
            "sender": transaction.envelope.sender.text,
            "sender_params": dict(transaction.envelope.sender_params),
            "recipients": recipients, "score": transaction.score,
            "outcomes": [
                {"plugin": o.plugin, "phase": o.phase, "action": o.action.value,
                 "reason": o.reason, "score": o.score, "error": o.error,
                 **({"shadow": True} if o.shadow else {})}  # enforce: false: not applied
                for o in (*session.results, *transaction.results)
            ],
        }
        held = Held(
            id=qid, node=self.node, time=now, expires=now + self._retention(transaction),
            sender=transaction.envelope.sender.text, size=message.size, record=record,
            recipients=dict.fromkeys(recipients, "held"),
            message_id=decoded_header(message.get("Message-ID")),
            subject=decoded_header(message.get("Subject")), reason=reason, decided_by=decided_by,
            score=transaction.score, admin_only=decided_by in self.admin_only,
        )
        try:
            seconds = self.timeout + message.size / (1 << 20)
            await asyncio.wait_for(self.db.hold(held, message.parts()), seconds)
        except TimeoutError:
            raise StoreError(f"keeping {qid} took longer than the store timeout") from None
        return qid

    def _retention(self, transaction: Transaction) -> float:
        """Seconds to keep: the longest of the recipients' retentions, each its policy group's
        ``quarantine_retention_days`` or, where the group sets none, ours (the conversation
        notes them by recipient in ``transaction.notes["quarantine_retention_days"]``)."""
        by_recipient = transaction.notes.get("quarantine_retention_days")
        if not by_recipient:
            return self.retention
        return max(self.retention if days is None else float(days) * DAY for days in by_recipient.values())

    async def list(self, search: Search | None = None, *, include_done: bool = False) -> list[Held]:
        return await self.db.held(search or Search(), include_done=include_done)

    async def show(self, qid: str) -> tuple[Held, bytes]:
        held = await self._get(qid)
        return held, await self.db.content(qid)

    async def _get(self, qid: str) -> Held:
        held = await self.db.get(qid)
        if held is None:
            raise QuarantineError(f"no quarantined message {qid}")
        return held

    async def release(self, qid: str, delivery: Delivery, recipients: Sequence[str] | None = None, *,
                      actor: str = "admin", admin: bool = True) -> Released:
        """Deliver to *recipients* (default: every one still held). Raises QuarantineError
        (unknown, none of them held, not allowed) or the backend's DeliveryError (they stay)."""
        from smtpproxy.delivery import deliver_alone

        held = await self._get(qid)
        if held.admin_only and not admin:
            raise QuarantineError(f"{qid} was held by {held.decided_by}: only an admin may release it")
        wanted = list(recipients) if recipients else held.held
        unknown = [r for r in wanted if r not in held.recipients]
        if unknown:
            raise QuarantineError(f"{qid} has no recipient {', '.join(unknown)}")
        claimed = await self.db.claim(qid, wanted, actor)
        if not claimed:
            raise QuarantineError(f"{qid}: already released for {', '.join(wanted) or 'everyone'}")
        try:
            content = await self.db.content(qid)
            session, transaction = rebuild({**held.record, "recipients": claimed})
            delivered = await deliver_alone(delivery, session, transaction, Message(content))
        except BaseException:
            await self.db.settle(qid, claimed, "held", actor=actor)
            raise
        await self.db.settle(qid, claimed, "released", actor=actor, destination=delivered.destination,
                             reply=str(delivered.reply))
        return Released(qid, claimed, delivered)

    async def delete(self, qid: str) -> None:
        await self._get(qid)
        await self.db.delete(qid)

    async def purge(self, now: float | None = None) -> int:
        """Remove messages whose retention ran out; how many."""
        return await self.db.expire_quarantine(time.time() if now is None else now)

    async def import_directory(self, path: Path) -> tuple[int, int]:
        """Move a directory quarantine (``ID.json`` + ``ID.eml``) into the store; each file
        pair imported goes to ``PATH/imported/``. (imported, skipped because already there)."""
        imported = skipped = 0
        for meta in await run_blocking(lambda: sorted(path.glob("*.json"))):
            pair = await run_blocking(_read_pair, meta)
            if pair is None:
                continue
            record, content = pair
            qid = str(record.get("id") or meta.stem)
            if await self.db.get(qid) is not None:
                skipped += 1
            else:
                message = Message(content)
                when = float(record.get("time") or time.time())
                recipients = [str(r) for r in record.get("recipients") or []]
                record.setdefault("node", self.node)
                await self.db.hold(Held(
                    id=qid, node=str(record["node"]), time=when, expires=when + self.retention,
                    sender=str(record.get("sender") or ""), size=len(content), record=record,
                    recipients=dict.fromkeys(recipients, "held"),
                    message_id=decoded_header(message.get("Message-ID")),
                    subject=decoded_header(message.get("Subject")), reason=record.get("reason"),
                    decided_by=record.get("decided_by"), score=record.get("score"),
                    admin_only=record.get("decided_by") in self.admin_only,
                ), [content])
                imported += 1
            await run_blocking(_set_aside, meta, path / "imported")
        return imported, skipped


def _read_pair(meta: Path) -> tuple[dict[str, Any], bytes] | None:
    """A directory quarantine's record and message; None if either is missing or not ours."""
    try:
        record = json.loads(meta.read_text())
        content = meta.with_suffix(".eml").read_bytes()
    except (OSError, ValueError):
        return None
    return (record, content) if isinstance(record, dict) else None


def _set_aside(meta: Path, done: Path) -> None:
    done.mkdir(exist_ok=True)
    eml = meta.with_suffix(".eml")
    eml.rename(done / eml.name)
    meta.rename(done / meta.name)
