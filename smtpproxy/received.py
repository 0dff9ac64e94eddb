"""The proxy's own ``Received:`` trace field (RFC 5321 4.4), added when a message leaves.

Why at delivery time, and not where plugins can see it: the field records the hop the
message is taking, so it belongs to what the next system receives (the upstream MTA or the
Maildir), and whether it is needed depends on that hop: with ``received_header: auto`` it is
written only when the next hop is *not* told the original client (no XCLIENT or XFORWARD:
``client_identity: none``, an upstream that offers neither, or Maildir delivery), because
with XCLIENT Postfix writes the same facts in its own ``Received:`` field. Plugins therefore
never see it (a DKIM signature or a score is unaffected) and quarantined messages are kept
as the plugins left them.

The field names the client's HELO, reverse name (or ``unknown``) and address, the proxy's
hostname, the protocol (RFC 3848: ESMTP, ESMTPS, ESMTPA, ESMTPSA; UTF8SMTP... with SMTPUTF8),
the TLS version and cipher, the transaction id (``<session id>.<n>``), the recipient when
there is one, and the date. Whatever the client sent is reduced to printable ASCII (other
characters become ``?``), so the field is always well formed; a HELO address literal
(``[192.0.2.1]``) is written as one.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
from typing import Literal

from smtpproxy.session import Session, Transaction

__all__ = ["ReceivedMode", "received_field", "wants_received"]

ReceivedMode = Literal["auto", "always", "never"]

_UNSAFE = re.compile(r"[^!-~]|[()\[\];\\]")
"""Anything but printable ASCII, and the characters that would end a comment or a token."""


def _safe(text: str) -> str:
    return _UNSAFE.sub("?", text)[:255]


def _helo(helo: str) -> str:
    """The client's HELO name; an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)
    stays one, brackets and all, when it is a valid address (RFC 5321 4.1.3)."""
    if helo.startswith("[") and helo.endswith("]"):
        inner = helo[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:])}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            pass
    return _safe(helo)


def wants_received(mode: str, client_told: bool) -> bool:
    """Whether to write the field: ``always``, or ``auto`` when the next hop is not told."""
    return mode == "always" or (mode == "auto" and not client_told)


def received_field(session: Session, transaction: Transaction, hostname: str) -> bytes:
    """The whole field, folded, with CRLF."""
    helo = _helo(session.helo) if session.helo else "unknown"
    name = _safe(session.client.hostname) if session.client.hostname else "unknown"
    address = f"IPv6:{session.client.ip}" if ":" in session.client.ip else session.client.ip
    proto = "UTF8SMTP" if transaction.envelope.smtputf8 else ("ESMTP" if session.esmtp else "SMTP")
    if session.tls is not None:
        proto += "S"
    if session.auth_user is not None:
        proto += "A"
    lines = [f"Received: from {helo} ({name} [{address}])"]
    if session.tls is not None:
        bits = f" ({session.tls.bits} bits)" if session.tls.bits else ""
        lines.append(f"\t(using {_safe(session.tls.version)} with cipher {_safe(session.tls.cipher)}{bits})")
    lines.append(f"\tby {hostname} (smtpproxy) with {proto} id {transaction.id}")
    recipients = transaction.envelope.recipients
    when = email.utils.format_datetime(email.utils.localtime())
    if len(recipients) == 1:
        lines.append(f"\tfor <{_safe(recipients[0].address.text)}>; {when}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{when}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
