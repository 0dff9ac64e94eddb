"""The console's "Spam" / "Not spam" and "Release and allow sender" actions: the work and who
may do it; :mod:`smtpproxy.web.console` renders the buttons and the answer.

- Anyone who sees a message may report it for the recipients they act for (a recipient:
  their own mail). "Not spam" on a message held by a security check (``admin_only``: a virus,
  a dangerous attachment) is for administrators only, as its release is.
- "Release and allow sender" releases the ticked recipients' copies, then adds the message's
  ``From:`` address to each one's allow list in the lists plugin's allow table, only where
  that table is writable (file or redis). A recipient's entry is for themselves; a domain
  admin (or an admin) may add it for the whole domain (``@domain``) instead.
- With ``policies:``, both follow each recipient's policy group (as at RCPT): its learners,
  its allow table (:mod:`smtpproxy.learning`, :mod:`smtpproxy.allowsender`).

Every report, refusal and allow entry is written to the audit log through the console's own
audit function.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from smtpproxy.allowsender import AllowTable, allow_tables, any_allow_table, author
from smtpproxy.chain import Chain
from smtpproxy.config import ConfigError
from smtpproxy.learning import Verdict, learners, report
from smtpproxy.recipientgroups import GroupUnknown, client_of
from smtpproxy.store import Held
from smtpproxy.web.accounts import Viewer
from smtpproxy.web.context import WebContext

__all__ = ["Done", "allow_button", "allow_sender", "report_form", "report_message", "writable_allow_table"]

Audit = Callable[..., Awaitable[None]]
Release = Callable[[list[str]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Done:
    """What an action came to: an HTTP status and the lines to show."""

    status: int
    lines: list[str]


def writable_allow_table(context: WebContext) -> AllowTable:
    """A writable allow table (the global one or a policy group's), or why there is none."""
    return any_allow_table(context.config)


def _chain(context: WebContext) -> Chain | Done:
    """The configured chain with its groups (built on first use), or why it cannot be built."""
    if context.learners is None:
        try:
            context.learners = learners(context.config)
        except ConfigError as exc:
            return Done(503, [f"The plugins cannot be built, so none can learn: {exc}"])
    return context.learners


async def report_message(context: WebContext, viewer: Viewer, held: Held, *, recipients: list[str],
                         verdict: Verdict, audit: Audit) -> Done:
    """Teach the learning plugins *held* as *verdict*, for *recipients* (the viewer's)."""
    if verdict == "ham" and held.admin_only and not viewer.is_admin:
        await audit(context, viewer, "report_refused", held.id, recipients=recipients, detail="admin only")
        return Done(403, [f"Held by {held.decided_by}: only an administrator can report it as not spam."])
    chain = _chain(context)
    if isinstance(chain, Done):
        return chain
    content = await context.store.content(held.id)
    learned = await report(chain, content, verdict, f"{viewer.role}:{viewer.name}", recipients,
                           table_specs=context.config.tables, client_ip=client_of(held.record))
    lines = learned.lines()
    await audit(context, viewer, f"report_{verdict}", held.id, recipients=recipients,
                detail="; ".join(lines)[:1000])
    shown = "spam" if verdict == "spam" else "not spam"
    return Done(502 if learned.failed else 200, [f"Reported as {shown}.", *lines])


async def allow_sender(context: WebContext, viewer: Viewer, held: Held, *, wanted: list[str], scope: str,
                       release: Release, audit: Audit) -> Done | None:
    """Release *wanted* (the viewer's) and allow the sender for each, or for their domains
    (``scope="domain"``, not for recipients). None: a scope the viewer may not use (404)."""
    if scope not in ("address", "domain") or (scope == "domain" and viewer.role == "recipient"):
        return None
    table = writable_allow_table(context)
    if not table.writable:
        return Done(409, [f"The sender cannot be allowed here: {table.problem}."])
    sender = author(await context.store.content(held.id))
    if sender is None:
        return Done(409, ["This message has no single From: address to allow."])
    wanted = [r for r in wanted if held.recipients.get(r) == "held"]
    if not wanted:
        return Done(409, [f"{held.id}: nothing held for these recipients"])
    if held.admin_only and not viewer.is_admin:
        await audit(context, viewer, "release_refused", held.id, recipients=wanted, detail="admin only")
        return Done(403, [f"{held.id}: held by {held.decided_by}; only an administrator can release it"])
    chain = _chain(context)
    if isinstance(chain, Done):
        return chain
    try:  # each recipient's group's table, known before anything is released
        tables = await allow_tables(context.config, chain, wanted, client_ip=client_of(held.record))
    except GroupUnknown as exc:
        return Done(503, [f"The sender cannot be allowed now, nothing was released: {exc}."])
    for table, for_whom in tables:
        if not table.writable:
            whom = ", ".join(for_whom)
            return Done(409, [f"The sender cannot be allowed for {whom}: {table.problem}."])
    result = await release(wanted)
    after = await context.quarantine.db.get(held.id)
    released = [r for r in wanted if after is not None and after.recipients.get(r) == "released"]
    if not released:
        return Done(502, [result, "Nothing was released, so the sender was not allowed."])
    lines = [result]
    for table, for_whom in tables:
        keys = sorted({f"@{r.rpartition('@')[2].lower()}" if scope == "domain" else r
                       for r in for_whom if r in released})
        for key in keys:
            try:
                said = await table.add(context.config, key, sender)
            except Exception as exc:  # the table's own errors (redis down, file not writable)
                await audit(context, viewer, "allow_sender_failed", held.id, recipients=released,
                            detail=f"{key}: {exc!r}"[:500])
                return Done(502, [*lines, f"The sender could not be allowed for {key}: {exc}"])
            await audit(context, viewer, "allow_sender", held.id, recipients=released, detail=said[:1000])
            lines.append(f"{sender} is now on the allow list of {key}.")
    return Done(200, lines)


def allow_button(context: WebContext, viewer: Viewer, held: Held, mine: list[str], content: bytes) -> str:
    """"Release and allow sender", only where something is held for the viewer, the message has
    one From: address and the allow table is writable; it says which address it adds."""
    sender = author(content)
    held_for_viewer = any(held.recipients[r] == "held" for r in mine)
    if sender is None or not held_for_viewer or not writable_allow_table(context).writable:
        return ""
    scope = (
        ""
        if viewer.role == "recipient"
        else ' <label>allow for <select name="scope"><option value="address">each recipient</option>'
        '<option value="domain">their whole domain</option></select></label>'
    )
    return (
        f' <button formaction="/console/quarantine/{html.escape(held.id, quote=True)}/allow">'
        f"Release and allow sender</button>{scope}"
        f' <small>(allows <b>{html.escape(sender)}</b>, the From: address)</small>'
    )


def report_form(csrf: str, viewer: Viewer, held: Held, mine: list[str]) -> str:
    """"Spam" / "Not spam" (and "Not spam: release" while something is held for the viewer)."""
    qid = html.escape(held.id, quote=True)
    buttons = '<button name="verdict" value="spam">Report as spam</button>'
    if not held.admin_only or viewer.is_admin:
        buttons += ' <button name="verdict" value="ham">Not spam</button>'
        if any(held.recipients[r] == "held" for r in mine):
            buttons += ' <button name="verdict" value="ham-release">Not spam: release</button>'
    return (
        f'<h2>Report</h2><form method="post" action="/console/quarantine/{qid}/report">'
        f"{csrf}<p>{buttons}</p></form>"
    )
