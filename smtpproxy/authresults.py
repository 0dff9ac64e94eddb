"""Authentication results that plugins share: SPF, DKIM, DMARC, ARC, iprev.

Each check a plugin makes is recorded as an :class:`AuthCheck` on the transaction, so the
DMARC plugin can read SPF's and DKIM's outcomes, the scoring plugin can add points for a
``fail``, and the ``auth_results`` plugin can write one RFC 8601 ``Authentication-Results:``
header from all of them. Results use RFC 8601's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpproxy.session import Transaction

__all__ = ["AuthCheck", "checks", "record"]

_NOTE = "smtpproxy.auth"


@dataclass(frozen=True, slots=True)
class AuthCheck:
    """One authentication check, as RFC 8601 would report it."""

    method: str
    """``spf``, ``dkim``, ``dmarc``, ``arc``, ``iprev``, ..."""
    result: str
    """``pass``, ``fail``, ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``, ``policy``."""
    reason: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    """RFC 8601 ptype.property pairs, e.g. ``{"smtp.mailfrom": "a@example.com"}`` or
    ``{"header.d": "example.com", "header.s": "sel1"}``."""


def record(transaction: Transaction, check: AuthCheck) -> None:
    """Add a check to the transaction's record."""
    transaction.notes.setdefault(_NOTE, []).append(check)


def checks(transaction: Transaction, method: str | None = None) -> list[AuthCheck]:
    """The checks recorded so far, in order; only one method's when given."""
    found: list[AuthCheck] = transaction.notes.get(_NOTE, [])
    return [c for c in found if method is None or c.method == method]
