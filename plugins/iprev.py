"""iprev: the client's forward-confirmed reverse DNS name (RFC 8601 2.7.3), as Postfix checks it.

    plugins:
      - name: iprev                 # early: later plugins see session.client.hostname
        settings:
          on_fail: continue         # or reject (550) / tempfail (450), like reject_unknown_client_hostname
          on_temperror: continue    # or tempfail (450)

At connect, the client's address is looked up (PTR), each name it gives (at most
``max_names``) is looked up forward (A or AAAA), and the first name whose addresses include
the client's is confirmed: it becomes ``session.client.hostname`` (what Postfix calls
``reverse_client_hostname``; in milter mode the MTA's verified name is kept). The result is
recorded as an ``iprev`` authentication check on every transaction, so the ``auth_results``
plugin reports it and the ``score`` plugin can add points for it:

- ``pass``: a name was confirmed;
- ``fail``: no PTR, no name points back to the address, or no PTR name is a hostname
  (letters, digits, ``-`` and ``_`` in labels, as Postfix's ``valid_hostname``: a name with
  control characters or spaces is never confirmed nor used);
- ``temperror``: DNS did not answer (timeout, SERVFAIL);
- loopback clients are not looked up (``none``, not recorded).

All lookups go through the shared resolver (its servers, timeout and cache), so a client
that reconnects costs no DNS traffic while the answers' TTLs last.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from smtpproxy import (
    AuthCheck,
    DNSTemporaryError,
    EventLog,
    PluginSettings,
    Session,
    Transaction,
    Verdict,
    get_resolver,
    hookimpl,
    record_auth_check,
)

__all__ = ["IPRev", "IPRevResult"]

log = EventLog("smtpproxy_plugins.iprev")
NOTE = "iprev"


@dataclass(frozen=True, slots=True)
class IPRevResult:
    """What the lookup found for one client address."""

    result: Literal["pass", "fail", "temperror", "none"]
    hostname: str | None = None
    """The confirmed name (``pass`` only)."""
    reason: str = ""


class IPRev:
    """Forward-confirmed reverse DNS for the client; records ``iprev``."""

    class Settings(PluginSettings):
        on_fail: Literal["continue", "reject", "tempfail"] = Field(
            default="continue", description="What to do with a client whose name is not confirmed: continue "
            "(record only), reject (550 5.7.25) or tempfail (450 4.7.25).",
        )
        on_temperror: Literal["continue", "tempfail"] = Field(
            default="continue",
            description="What to do when DNS does not answer: continue or tempfail (450).",
        )
        max_names: int = Field(
            default=10, ge=1, le=50, description="PTR names checked forward, at most."
        )

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        found = await check(session.client.ip, self.settings.max_names)
        session.notes[NOTE] = found
        if found.result == "none":
            return None
        if found.hostname is not None and session.client.hostname is None:
            session.client.hostname = found.hostname
        log.info("iprev", result=found.result, ip=session.client.ip, hostname=found.hostname,
                 reason=found.reason or None)
        s = self.settings
        if found.result == "fail" and s.on_fail != "continue":
            text = f"Client host rejected: cannot find your hostname, [{session.client.ip}]"
            why = f"iprev fail: {found.reason}"
            if s.on_fail == "reject":
                return Verdict.reject(text, code=550, enhanced="5.7.25", reason=why)
            return Verdict.tempfail(text, code=450, enhanced="4.7.25", reason=why)
        if found.result == "temperror" and s.on_temperror == "tempfail":
            return Verdict.tempfail(
                f"Client host rejected: cannot find your hostname, [{session.client.ip}]",
                code=450, enhanced="4.7.25", reason=f"iprev temperror: {found.reason}",
            )
        return None

    @hookimpl
    async def mail_from(self, session: Session, transaction: Transaction) -> None:
        found = session.notes.get(NOTE)
        if isinstance(found, IPRevResult) and found.result != "none":
            record_auth_check(transaction, AuthCheck(
                "iprev", found.result, found.reason, {"policy.iprev": session.client.ip}
            ))


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z)(?!\d+(?:\.\d+){{3}}\Z)(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
"""A name Postfix's valid_hostname() takes (letters, digits, hyphen, underscore; not a
dotted quad): anything else in a PTR record (control characters, spaces, escapes) is not
a hostname, is never confirmed and never becomes ``session.client.hostname``."""


async def check(ip: str, max_names: int = 10) -> IPRevResult:
    """Forward-confirmed reverse DNS of *ip* through the shared resolver."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return IPRevResult("none", reason=f"not an IP address: {ip!r}")
    if address.is_loopback:
        return IPRevResult("none", reason="loopback")
    resolver = get_resolver()
    try:
        names = (await resolver.ptr(str(address)))[:max_names]
    except DNSTemporaryError as exc:
        return IPRevResult("temperror", reason=f"PTR lookup: {exc}")
    if not names:
        return IPRevResult("fail", reason="no PTR record")
    not_hostnames = [name for name in names if not _HOSTNAME.fullmatch(name)]
    names = [name for name in names if _HOSTNAME.fullmatch(name)]
    if not names:  # dnspython shows control characters as \DDD: the reason stays printable
        return IPRevResult("fail", reason=f"PTR name is not a hostname ({', '.join(not_hostnames)})")
    lookup = resolver.aaaa if address.version == 6 else resolver.a
    answers = await asyncio.gather(*(lookup(name) for name in names), return_exceptions=True)
    temporary = False
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, DNSTemporaryError):
            temporary = True
            continue
        if isinstance(answer, BaseException):
            raise answer
        if any(ipaddress.ip_address(a) == address for a in answer):
            return IPRevResult("pass", name.lower())
    if temporary:
        return IPRevResult("temperror", reason="forward lookup did not answer")
    return IPRevResult("fail", reason=f"no name points back to the address ({', '.join(names)})")
