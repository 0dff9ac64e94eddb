"""Signed, single-use release links for quarantine digests.

A link carries its recipient, the quarantined message, the action and an expiry, signed
with HMAC-SHA256 (itsdangerous, the Pallets project's signer, rather than a hand-written
HMAC layout). Changing any of them breaks the signature. Several keys may be configured
(``digest.keys``): the *first* signs, all verify, so a new key is put first and an old
one removed once the links it signed have expired (``digest.link_days``). A link is used
once: its id is recorded in the store (``link_use``) when it acts, and a second use is
refused, on every node sharing the store.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadData, URLSafeSerializer

__all__ = ["ACTIONS", "Link", "LinkError", "LinkSigner", "read_keys"]

ACTIONS = ("release", "delete")
"""What a recipient may do from a digest: release their copy, or delete it."""

_SALT = "smtpproxy.release-link.v1"


class LinkError(Exception):
    """A link that is tampered with, expired, or not a link at all."""


@dataclass(frozen=True, slots=True)
class Link:
    recipient: str
    qid: str
    action: str
    expires: float

    @property
    def id(self) -> str:
        """What the store records when the link is used (the same for every signature of it)."""
        text = f"{self.recipient}\n{self.qid}\n{self.action}\n{self.expires!r}"
        return hashlib.sha256(text.encode()).hexdigest()


def read_keys(paths: Sequence[Path]) -> list[bytes]:
    """The keys from their files (first: the signing one); each must hold 32 bytes or more."""
    keys = []
    for path in paths:
        key = Path(path).read_bytes().strip()
        if len(key) < 32:
            raise ValueError(f"{path}: a link key needs at least 32 bytes (e.g. `openssl rand -hex 32`)")
        keys.append(key)
    return keys


class LinkSigner:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("no link keys")
        # itsdangerous signs with the last key and verifies with any: ours lists the signing key first.
        self._serializer = URLSafeSerializer(list(reversed(keys)), salt=_SALT)

    def sign(self, link: Link) -> str:
        token = self._serializer.dumps([link.recipient, link.qid, link.action, link.expires])
        return str(token)

    def verify(self, token: str, now: float | None = None) -> Link:
        """The link *token* stands for; LinkError if it is forged, altered or expired."""
        try:
            recipient, qid, action, expires = self._serializer.loads(token)
        except (BadData, ValueError, TypeError):
            raise LinkError("this link is not valid (altered or incomplete)") from None
        if action not in ACTIONS or not isinstance(expires, int | float):
            raise LinkError("this link is not valid")
        if (time.time() if now is None else now) > expires:
            raise LinkError("this link has expired")
        return Link(str(recipient), str(qid), str(action), float(expires))
