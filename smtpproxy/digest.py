"""``smtpproxy digest``: mail each recipient a summary of what is held for them, with links.

Run from a timer (``contrib/smtpproxy-digest.timer``) every ``digest.period_hours``: each
recipient of a ``digest.domains`` domain with messages held in that period gets one plain
text message through the configured delivery, listing sender, subject, date and reason of
each message, and a signed single-use link per action (:mod:`smtpproxy.links`). Messages
held by an ``quarantine.admin_only`` plugin are listed without links: only an admin
releases those. Header values are shown without control characters and bounded, so a
hostile subject cannot change the digest's layout.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import sys
import time
from collections import defaultdict
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote

from smtpproxy.config import Config
from smtpproxy.delivery.factory import config_hostname
from smtpproxy.history import node_name
from smtpproxy.links import ACTIONS, Link, LinkSigner, read_keys
from smtpproxy.message import Message
from smtpproxy.quarantine import rebuild
from smtpproxy.store import Held, Search, StoreError, store_from_config
from smtpproxy.store.quarantine import DatabaseQuarantine

__all__ = ["DEFAULT_TEMPLATE", "compose", "digest_command", "printable"]

DEFAULT_TEMPLATE = """\
Hello {recipient},

{count} message(s) sent to you were held in quarantine. They are not in your mailbox.
If one of them is mail you want, release it; the others are removed in time by themselves.

{messages}
Each link works once, for {days} day(s). Opening it shows a confirmation page: nothing
happens until you confirm there.
"""

_ENTRY = """\
From:    {sender}
Subject: {subject}
Date:    {date}
Reason:  {reason}
{links}
"""


def printable(text: str | None, width: int = 200) -> str:
    """One line, no control characters, at most *width* characters."""
    flat = "".join(c if c.isprintable() else " " for c in str(text or ""))
    flat = " ".join(flat.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _link_url(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/link/{quote(token, safe='')}"


def compose(recipient: str, held: list[Held], config: Config, signer: LinkSigner, now: float) -> bytes:
    """The digest message for *recipient* (RFC 5322 bytes, CRLF)."""
    d = config.digest
    assert d.base_url is not None
    expires = now + d.link_days * 86400
    entries = []
    for h in held:
        if h.admin_only:
            links = "         Held by a security check: only an administrator can release it."
        else:
            tokens = {a: signer.sign(Link(recipient, h.id, a, expires)) for a in ACTIONS}
            links = "\n".join(f"{a.capitalize() + ':':<8} {_link_url(d.base_url, t)}"
                              for a, t in tokens.items())
        entries.append(_ENTRY.format(
            sender=printable(h.sender or "<>"), subject=printable(h.subject or "(no subject)"),
            date=email.utils.formatdate(h.time, usegmt=True), reason=printable(h.reason or "-"), links=links))
    template = Path(d.template).read_text() if d.template is not None else DEFAULT_TEMPLATE
    body = template.format(recipient=recipient, count=len(held), messages="\n".join(entries),
                           days=f"{d.link_days:g}")
    hostname = config_hostname(config)
    sender = d.sender or f"postmaster@{hostname}"
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = d.subject.format(count=len(held), recipient=recipient)
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid("digest", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body, charset="utf-8")
    return msg.as_bytes()


def digest_command(config: Config, *, dry_run: bool = False) -> int:
    """Send every digest due; 0 all sent, 1 something failed, 2 not configured."""
    d = config.digest
    problems = [text for missing, text in (
        (not config.store.configured, "a store (store.sqlite or store.postgresql)"),
        (d.base_url is None, "digest.base_url"), (not d.keys, "digest.keys"),
        (not d.domains, "digest.domains (the recipient domains that opted in)")) if missing]
    if problems:
        print(f"smtpproxy: digests need {', '.join(problems)}", file=sys.stderr)
        return 2
    try:
        signer = LinkSigner(read_keys(d.keys))
    except (OSError, ValueError) as exc:
        print(f"smtpproxy: digest.keys: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_send_all(config, signer, dry_run))


async def _send_all(config: Config, signer: LinkSigner, dry_run: bool) -> int:
    from smtpproxy.delivery import DeliveryError, deliver_alone
    from smtpproxy.delivery.factory import make_delivery

    store = store_from_config(config)
    assert store is not None
    d = config.digest
    domains = {x.lower().rstrip(".") for x in d.domains}
    now = time.time()
    quarantine = DatabaseQuarantine(store, node=node_name(config))
    try:
        held = await quarantine.list(Search(since=now - d.period_hours * 3600, limit=100_000))
    except StoreError as exc:
        print(f"smtpproxy: the store failed: {exc}", file=sys.stderr)
        await store.close()
        return 1
    await store.close()
    per_recipient: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        for address in h.held:
            if address.rpartition("@")[2].lower() in domains:
                per_recipient[address].append(h)
    delivery = make_delivery(config)
    sent = failed = 0
    try:
        if not dry_run:
            await delivery.start()
        for recipient, messages in sorted(per_recipient.items()):
            content = compose(recipient, messages, config, signer, now)
            if dry_run:
                parsed = email.message_from_bytes(content, policy=email.policy.default)
                print(f"--- {recipient} ({len(messages)} message(s)): {parsed['Subject']}")
                print(parsed.get_content(), flush=True)
                continue
            sender = d.sender or f"postmaster@{config_hostname(config)}"
            session, transaction = rebuild({"sender": sender, "recipients": [recipient], "session": "digest"})
            try:
                delivered = await deliver_alone(delivery, session, transaction, Message(content))
            except DeliveryError as exc:
                failed += 1
                print(f"{recipient}: FAILED: {exc.reply}", flush=True)
            else:
                sent += 1
                print(f"{recipient}: {len(messages)} message(s), sent to {delivered.destination}", flush=True)
    finally:
        if not dry_run:
            await delivery.close()
    if not dry_run:
        print(f"{sent} digest(s) sent, {failed} failed")
    return 1 if failed else 0
