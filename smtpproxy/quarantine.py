"""The quarantine store: accepted messages kept aside, with the reasons, instead of delivered.

Each message is two files named by its id: ``ID.eml`` (the message as the plugins left it)
and ``ID.json`` (envelope, client, reasons, plugin outcomes). Both are fsynced before the
client hears 250, exactly like a delivery. Files are created 0600 and directories 0700,
whatever the umask (:mod:`smtpproxy.private_files`).

An admin lists, shows, releases and deletes them (``smtpproxy quarantine``, in
:mod:`smtpproxy.quarantine_cli`). A release hands
the message to the configured delivery backend with its original envelope; once the backend
took it, both files move to ``released/`` (with the release recorded in the JSON), so a
message cannot be released twice. A release the backend refuses leaves it where it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpproxy.addresses import Address
from smtpproxy.blocking import run_blocking
from smtpproxy.message import Buffer, Message
from smtpproxy.private_files import make_private_dirs, narrow_modes, open_private
from smtpproxy.session import Client, Envelope, Session, Transaction

if TYPE_CHECKING:
    from smtpproxy.delivery import Delivered, Delivery

__all__ = ["QuarantineError", "QuarantineStore", "rebuild"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
Record = dict[str, Any]


class QuarantineError(Exception):
    """No such quarantined message, it was already released, or it is being released."""


class QuarantineStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    async def store(
        self, session: Session, transaction: Transaction, content: bytes | Message, reason: str,
        *, decided_by: str | None = None,
    ) -> str:
        """Keep the message; return its quarantine id. Raises OSError when it could not.

        A :class:`Message` is written out part by part (a spooled one is never copied whole).
        """
        qid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{transaction.id}"
        record: dict[str, Any] = {
            "id": qid,
            "time": time.time(),
            "reason": reason,
            "decided_by": decided_by,
            "session": session.id,
            "client": {"ip": session.client.ip, "port": session.client.port,
                       "hostname": session.client.hostname, "helo": session.helo},
            "sender": transaction.envelope.sender.text,
            "sender_params": dict(transaction.envelope.sender_params),
            "recipients": [r.address.text for r in transaction.envelope.recipients],
            "score": transaction.score,
            "outcomes": [
                {"plugin": o.plugin, "phase": o.phase, "action": o.action.value,
                 "reason": o.reason, "score": o.score, "error": o.error,
                 **({"shadow": True} if o.shadow else {})}  # enforce: false: not applied
                for o in (*session.results, *transaction.results)
            ],
        }
        parts = content.parts() if isinstance(content, Message) else (content,)
        await run_blocking(self._write, qid, parts, json.dumps(record, indent=2).encode())
        return qid

    async def start(self) -> None:
        """Narrow what an older version left readable to others (the store itself is made,
        0700, when the first message is quarantined)."""
        await run_blocking(narrow_modes, (self.path, self.released_path), store="quarantine")

    def _write(self, qid: str, content: tuple[Buffer, ...], meta: bytes) -> None:
        make_private_dirs(self.path)
        for suffix, data in ((".eml", content), (".json", (meta,))):
            target = self.path / f"{qid}{suffix}"
            tmp = target.with_suffix(suffix + ".tmp")
            with open_private(tmp) as fh:
                for part in data:
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, target)
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- administration -------------------------------------------------------------------

    @property
    def released_path(self) -> Path:
        return self.path / "released"

    def _file(self, qid: str, suffix: str) -> Path:
        if not _ID.match(qid) or ".." in qid:
            raise QuarantineError(f"{qid!r} is not a quarantine id")
        return self.path / f"{qid}{suffix}"

    def list(self) -> list[Record]:
        """Every quarantined (not released) message's record, oldest first."""
        records: list[Record] = []
        if not self.path.is_dir():
            return records
        for meta in self.path.glob("*.json"):
            try:
                record = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue  # removed meanwhile, or not ours
            if isinstance(record, dict):
                record.setdefault("id", meta.stem)
                records.append(record)
        return sorted(records, key=lambda r: (r.get("time") or 0, str(r["id"])))

    def show(self, qid: str) -> tuple[Record, bytes]:
        """A message's record and its content; QuarantineError if there is none by that id."""
        meta, eml = self._file(qid, ".json"), self._file(qid, ".eml")
        try:
            return json.loads(meta.read_text()), eml.read_bytes()
        except FileNotFoundError:
            raise QuarantineError(self._missing(qid)) from None

    def _missing(self, qid: str) -> str:
        if (self.released_path / f"{qid}.json").exists():
            return f"{qid} was already released"
        return f"no quarantined message {qid}"

    def delete(self, qid: str) -> None:
        """Remove a quarantined message for good."""
        meta, eml = self._file(qid, ".json"), self._file(qid, ".eml")
        if not meta.exists():
            raise QuarantineError(self._missing(qid))
        with self._claim(meta):
            eml.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)

    async def release(self, qid: str, delivery: Delivery) -> Delivered:
        """Deliver with the original envelope; on success move the files to ``released/``.

        Raises QuarantineError (unknown id, already released, busy) or the backend's
        DeliveryError (the message then stays in quarantine).
        """
        from smtpproxy.delivery import deliver_alone

        meta, eml = self._file(qid, ".json"), self._file(qid, ".eml")
        if not meta.exists():
            raise QuarantineError(self._missing(qid))
        with self._claim(meta):
            if not meta.exists():  # released or deleted between the check and the lock
                raise QuarantineError(self._missing(qid))
            record = json.loads(meta.read_text())
            content = eml.read_bytes()
            session, transaction = rebuild(record)
            delivered = await deliver_alone(delivery, session, transaction, Message(content))
            record["released"] = {
                "time": time.time(),
                "destination": delivered.destination,
                "reply": str(delivered.reply),
            }
            await run_blocking(self._move_released, qid, json.dumps(record, indent=2).encode())
        return delivered

    @contextlib.contextmanager
    def _claim(self, meta: Path) -> Iterator[None]:
        """An exclusive lock on the record, so two admins cannot release one message twice."""
        try:
            fd = os.open(meta, os.O_RDONLY)
        except FileNotFoundError:
            raise QuarantineError(self._missing(meta.stem)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QuarantineError(f"{meta.stem} is being released or deleted right now") from None
            yield
        finally:
            os.close(fd)

    def _move_released(self, qid: str, meta: bytes) -> None:
        target = self.released_path
        make_private_dirs(target)
        tmp = target / f"{qid}.json.tmp"
        with open_private(tmp) as fh:
            fh.write(meta)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(self.path / f"{qid}.eml", target / f"{qid}.eml")
        os.rename(tmp, target / f"{qid}.json")
        os.unlink(self.path / f"{qid}.json")
        for directory in (target, self.path):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _address(text: str) -> Address:
    """An address from the record: it was validated when the message came in."""
    local, _, domain = text.rpartition("@") if "@" in text else (text, "", "")
    return Address(text, local, domain)


def rebuild(record: Record) -> tuple[Session, Transaction]:
    """The session and transaction a delivery backend needs, from a quarantine record."""
    client = record.get("client") or {}
    session = Session(
        Client(str(client.get("ip") or "127.0.0.1"), int(client.get("port") or 0), client.get("hostname")),
        session_id=str(record.get("session") or "quarantine"),
        transport="offline",
    )
    session.helo = client.get("helo")
    envelope = Envelope(_address(str(record.get("sender") or "")), record.get("sender_params") or {})
    for rcpt in record.get("recipients") or []:
        envelope.add_recipient(_address(str(rcpt)))
    transaction = Transaction(f"{session.id}.q", envelope)
    return session, transaction
