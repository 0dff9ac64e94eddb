"""The embedded default backend: a Maildir that needs no mail server to try the proxy out."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from smtpproxy.addresses import Address
from smtpproxy.blocking import run_blocking
from smtpproxy.delivery import Delivered, DeliveryError, DeliveryState, UpstreamTransaction
from smtpproxy.message import Buffer, Message
from smtpproxy.private_files import FILE_MODE, make_private_dirs, narrow_modes
from smtpproxy.received import received_field, wants_received
from smtpproxy.session import Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["MaildirDelivery"]


class MaildirDelivery:
    """Writes each message once, with ``Return-Path`` and one ``Delivered-To`` per recipient.

    The file is written to ``tmp/``, fsynced, renamed into ``new/`` and the directory is
    fsynced (the Maildir protocol), so the 250 the client gets means the bytes are on disk.
    """

    name = "maildir"
    rcpt_mode = "at_data"

    def __init__(self, path: Path, *, received: str = "auto", hostname: str = "localhost"):
        self.path = Path(path)
        self.received = received
        """``received_header``: a Maildir is never told the client, so ``auto`` writes it."""
        self.hostname = hostname
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._counter = 0

    def route_key(self, address: Address) -> str:
        return "maildir"

    def open_transaction(self, session: Session, transaction: Transaction) -> UpstreamTransaction:
        raise NotImplementedError("a Maildir has no upstream transaction")

    def remembered_refusal(self, sender: Address, recipient: Address) -> Reply | None:
        return None  # a Maildir refuses no recipient

    def offers_dsn(self) -> bool:
        return False  # a success DSN would have to come from us; the proxy sends no mail

    def offers_8bitmime(self) -> bool:
        return True  # a file takes any octet

    def offers_smtputf8(self) -> bool:
        return True

    def size_limit(self) -> int | None:
        return None

    def reply_bound(self) -> float:
        return 30.0  # a write and two fsyncs

    async def probe(self, greeting_seconds: float) -> DeliveryState:
        """Usable while the Maildir's new/ can be written (no server to greet)."""
        path = self.path / "new"
        if path.is_dir() and os.access(path, os.W_OK | os.X_OK):
            return DeliveryState(True, f"maildir {self.path}: writable", {})
        return DeliveryState(False, f"maildir {self.path}: not writable", {})

    def upstream_names(self) -> list[str]:
        return []

    def report_to(self, on_down: Callable[[str, str], None],
                  on_identity: Callable[[str, str], None]) -> None:
        return None  # no upstream to be down, no identity to pass on

    def end_session(self, session: Session) -> None:
        return None  # nothing is kept per client

    async def start(self) -> None:
        await run_blocking(self._make_dirs)

    def _make_dirs(self) -> None:
        """The Maildir, 0700 from its creation; an existing one is narrowed to its owner."""
        subdirs = [self.path / sub for sub in ("tmp", "new", "cur")]
        for sub in subdirs:
            make_private_dirs(sub)
        narrow_modes((self.path, *subdirs), store="maildir")

    async def deliver(self, session: Session, transaction: Transaction, content: Message) -> Delivered:
        envelope = transaction.envelope
        trace = [f"Return-Path: <{envelope.sender.text}>\r\n".encode()]
        trace += [f"Delivered-To: {r.address.text}\r\n".encode() for r in envelope.recipients]
        if wants_received(self.received, client_told=False):
            trace.append(received_field(session, transaction, self.hostname))
        self._counter += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._counter}M{transaction.id}.{self._host}"
        try:
            await run_blocking(self._write, name, b"".join(trace), content.parts())
        except OSError as exc:
            raise DeliveryError(
                Reply(451, "4.3.0", "Local delivery failed, try again later"), str(exc)
            ) from exc
        return Delivered(Reply(250, "2.0.0", f"Ok: delivered as {transaction.id}"), f"maildir:{name}")

    def _write(self, name: str, trace: bytes, parts: tuple[Buffer, ...]) -> None:
        tmp = self.path / "tmp" / name
        final = self.path / "new" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(trace)
                for part in parts:
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def close(self) -> None:
        return None
