"""The quarantine store: accepted messages kept aside, with the reasons, instead of delivered.

Each message is two files named by its id: ``ID.eml`` (the message as the plugins left it)
and ``ID.json`` (envelope, client, reasons, plugin outcomes). Both are fsynced before the
client hears 250, exactly like a delivery.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from smtpproxy.blocking import run_blocking
from smtpproxy.session import Session, Transaction

__all__ = ["QuarantineStore"]


class QuarantineStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    async def store(
        self, session: Session, transaction: Transaction, content: bytes, reason: str
    ) -> str:
        """Keep the message; return its quarantine id. Raises OSError when it could not."""
        qid = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{transaction.id}"
        record: dict[str, Any] = {
            "id": qid,
            "time": time.time(),
            "reason": reason,
            "session": session.id,
            "client": {"ip": session.client.ip, "port": session.client.port,
                       "hostname": session.client.hostname, "helo": session.helo},
            "sender": transaction.envelope.sender.text,
            "sender_params": transaction.envelope.sender_params,
            "recipients": [r.address.text for r in transaction.envelope.recipients],
            "score": transaction.results.score,
            "outcomes": [
                {"plugin": o.plugin, "phase": o.phase, "action": o.action.value,
                 "reason": o.reason, "score": o.score, "error": o.error}
                for o in (*session.results, *transaction.results)
            ],
        }
        await run_blocking(self._write, qid, content, json.dumps(record, indent=2).encode())
        return qid

    def _write(self, qid: str, content: bytes, meta: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".eml", content), (".json", meta)):
            target = self.path / f"{qid}{suffix}"
            tmp = target.with_suffix(suffix + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, target)
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
