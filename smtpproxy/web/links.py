"""The release-link routes: ``GET /link/{token}`` shows what the link would do, and only
``POST /link`` (the token in the form body) does it.

URL scanners (Safe Links and the like) fetch every link in a mail; a GET therefore changes
nothing. The POST is safe from cross-site forgery because it must carry the signed token,
which only the recipient's mail contains, and because a browser's ``Origin`` that is not
``digest.base_url``'s is refused. The link is checked (signature, expiry), then the
message's policy (held by an ``admin_only`` plugin: refused), then marked used in the
store (a second use, from any node, is refused), then carried out for that recipient
only; if the release fails the mark is removed so the link can be tried again.
"""

from __future__ import annotations

import contextlib
import html
import logging
import time
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from smtpproxy.eventlog import event
from smtpproxy.links import Link, LinkError
from smtpproxy.quarantine import QuarantineError
from smtpproxy.store import AuditEntry, Held, StoreError
from smtpproxy.web.console import signin_form
from smtpproxy.web.context import WebContext
from smtpproxy.web.pages import page

__all__ = ["routes"]

_VERB = {"release": "Release", "delete": "Delete"}
_DONE = {"release": "released: it is on its way to your mailbox", "delete": "deleted"}


def routes() -> list[Route]:
    return [Route("/link/{token}", confirm, methods=["GET"]), Route("/link", act, methods=["POST"])]


def _context(request: Request) -> WebContext:
    context: WebContext = request.app.state.context
    return context


def _describe(held: Held) -> str:
    e = html.escape
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(held.time))
    return (f"<dl><dt>From</dt><dd>{e(held.sender or '<>')}</dd>"
            f"<dt>Subject</dt><dd>{e(held.subject or '(no subject)')}</dd>"
            f"<dt>Date</dt><dd>{e(when)}</dd><dt>Reason</dt><dd>{e(held.reason or '-')}</dd></dl>")


async def _check(context: WebContext, token: str) -> tuple[Link, Held] | HTMLResponse:
    """The link and its message, or the page that says why not."""
    try:
        link = context.signer.verify(token)
    except LinkError as exc:
        return page("Link not valid", f"<p>{html.escape(str(exc))}.</p>", 400)
    held = await context.quarantine.db.get(link.qid)
    state = held.recipients.get(link.recipient) if held is not None else None
    if held is None or state is None:
        return page("Message gone", "<p>This message is no longer in quarantine.</p>", 410)
    if state != "held":
        return page("Already done", f"<p>This message was already {html.escape(state)} for you.</p>", 410)
    if held.admin_only:
        return page("Ask your administrator",
                    "<p>This message was held by a security check; only an administrator can "
                    "release it.</p>" + _describe(held), 403)
    return link, held


async def confirm(request: Request) -> HTMLResponse:
    """GET: what the link would do, and a button that does it. Changes nothing."""
    context = _context(request)
    token = request.path_params["token"]
    try:
        checked = await _check(context, token)
    except StoreError:
        return page("Try again later", "<p>The quarantine is not reachable right now.</p>", 503)
    if isinstance(checked, HTMLResponse):
        return checked
    link, held = checked
    verb = _VERB[link.action]
    return page(f"{verb} this message?", _describe(held)
                + f"<p>For {html.escape(link.recipient)}.</p>"
                + "<form method=\"post\" action=\"/link\">"
                + f"<input type=\"hidden\" name=\"token\" value=\"{html.escape(token, quote=True)}\">"
                + f"<button type=\"submit\">{verb}</button></form>"
                + (signin_form(token) if context.accounts is not None else ""))


def _same_origin(request: Request, base_url: str | None) -> bool:
    origin = request.headers.get("origin")
    if origin is None or base_url is None:
        return True  # not a browser that says, or nothing to compare with: the token decides
    base = urlsplit(base_url)
    return origin.rstrip("/") == f"{base.scheme}://{base.netloc}"


async def act(request: Request) -> HTMLResponse:
    """POST: carry out the link once."""
    context = _context(request)
    if not _same_origin(request, context.config.digest.base_url):
        return page("Refused", "<p>This form was not sent from this site.</p>", 403)
    form = await request.form()
    token = form.get("token")
    if not isinstance(token, str) or len(token) > 4096:
        return page("Link not valid", "<p>This link is not valid.</p>", 400)
    try:
        checked = await _check(context, token)
        if isinstance(checked, HTMLResponse):
            return checked
        link, held = checked
        if not await context.store.use_link(link.id, link.expires):
            return page("Already used", "<p>This link was used before; each link works once.</p>", 410)
    except StoreError:
        return page("Try again later", "<p>The quarantine is not reachable right now.</p>", 503)
    try:
        await _carry_out(context, link)
    except QuarantineError as exc:
        await context.store.forget_link(link.id)
        return page("Not possible", f"<p>{html.escape(str(exc))}</p>", 409)
    except Exception as exc:
        event("link_failed", level=logging.WARNING, qid=link.qid, action=link.action, error=repr(exc))
        with contextlib.suppress(StoreError):
            await context.store.forget_link(link.id)
        return page("Try again later", "<p>The message could not be delivered right now; "
                    "the link still works.</p>", 503)
    event("link_used", qid=link.qid, action=link.action, recipient=link.recipient)
    with contextlib.suppress(StoreError):  # done already: a store hiccup must not report it failed
        await context.store.audit(AuditEntry(time.time(), f"link:{link.recipient}", link.action, link.qid,
                                             [link.recipient]))
    return page("Done", f"<p>The message was {_DONE[link.action]}.</p>" + _describe(held))


async def _carry_out(context: WebContext, link: Link) -> None:
    actor = f"link:{link.recipient}"
    if link.action == "release":
        await context.quarantine.release(link.qid, context.delivery, [link.recipient], actor=actor,
                                         admin=False)
        return
    claimed = await context.store.claim(link.qid, [link.recipient], actor)
    if not claimed:
        raise QuarantineError("this message was already released or deleted for you")
    await context.store.settle(link.qid, claimed, "deleted", actor=actor)
