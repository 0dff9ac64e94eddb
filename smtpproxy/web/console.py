"""The web console: sign-in, the overview, history search, the quarantine and the audit log.

Server-rendered pages without scripts. Security, as for any admin interface on the internet:
the session is a signed cookie (HttpOnly, Secure, SameSite=Strict, see
:func:`smtpproxy.web.app.create_app`) naming a session kept on the server
(:mod:`smtpproxy.web.sessions`), so that signing out ends it for good; every POST carries
the session's CSRF token and a browser's ``Origin`` must be this site's; no GET changes
anything; sign-ins go through the login throttle SMTP AUTH uses
(:mod:`smtpproxy.loginthrottle`); a message the viewer may not see is "not found" (404),
exactly like one that does not exist; the only redirects go to fixed paths of this app.
Every action, and an admin opening someone else's mail, is written to the audit log in the
store.
"""

from __future__ import annotations

import calendar
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from smtpproxy.eventlog import event
from smtpproxy.links import LinkError
from smtpproxy.metrics import DECISIONS
from smtpproxy.quarantine import QuarantineError
from smtpproxy.store import AuditEntry, Held, Search, StoreError
from smtpproxy.web.accounts import AccountsUnavailable, Viewer
from smtpproxy.web.context import WebContext
from smtpproxy.web.preview import preview, render
from smtpproxy.web.reports import Done, allow_button, allow_sender, report_form, report_message
from smtpproxy.web.sessions import LiveSession

__all__ = ["routes"]

_STYLE = (
    "body{font-family:sans-serif;margin:0;line-height:1.4}main{padding:0 1em 2em}"
    "nav{background:#234;padding:.5em 1em;display:flex;flex-wrap:wrap;gap:1em;align-items:center}"
    "nav a,nav span{color:#fff}nav form{margin-left:auto}"
    "table{border-collapse:collapse;width:100%;font-size:.9em}td,th{border-bottom:1px solid #ccc;"
    "padding:.25em .4em;text-align:left;vertical-align:top}.scroll{overflow-x:auto}"
    "pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:.5em}"
    "iframe.html{width:100%;height:24em;border:1px solid #999;background:#fff}"
    "form.search{display:flex;flex-wrap:wrap;gap:.5em}form.search label{display:flex;flex-direction:column;"
    "font-size:.85em}.bar{background:#48c;height:1em;display:inline-block}.error{color:#a00}"
    "button{padding:.3em 1em}.done{color:#060}"
)
_HISTORY_FIELDS = (
    "sender",
    "recipient",
    "decision",
    "decided_by",
    "node",
    "client",
    "message_id",
    "subject",
    "reason",
    "policy_group",
)

Handler = Callable[[Request, WebContext, Viewer], Awaitable[Response]]
_UNSEEN = object()


def routes() -> list[Route]:
    return [
        Route("/console", _signed_in(overview), methods=["GET"]),
        Route("/console/login", login_form, methods=["GET"]),
        Route("/console/login", login, methods=["POST"]),
        Route("/console/logout", logout, methods=["POST"]),
        Route("/console/signin", link_signin, methods=["POST"]),
        Route("/console/history", _signed_in(history), methods=["GET"]),
        Route("/console/quarantine", _signed_in(quarantine), methods=["GET"]),
        Route("/console/quarantine/{qid}", _signed_in(message), methods=["GET"]),
        Route("/console/quarantine/{qid}/{action:str}", _signed_in(act, post=True), methods=["POST"]),
        Route("/console/bulk", _signed_in(bulk, post=True), methods=["POST"]),
        Route("/console/audit", _signed_in(audit), methods=["GET"]),
    ]


# -- pages, sessions and the checks every request goes through -----------------------------


def _page(
    request: Request, title: str, body: str, status: int = 200, viewer: Viewer | None = None
) -> HTMLResponse:
    e = html.escape
    nav = ""
    if viewer is not None:
        links = [
            ("/console", "Overview"),
            ("/console/history", "History"),
            ("/console/quarantine", "Quarantine"),
        ]
        if _context(request).lists is not None:
            links.append(("/console/lists", "Lists"))
        if viewer.is_admin:
            links += [("/console/audit", "Audit log"), ("/console/sessions", "Sessions")]
        nav = (
            "<nav>"
            + "".join(f'<a href="{href}">{label}</a>' for href, label in links)
            + f'<form method="post" action="/console/logout">{_csrf_field(request)}'
            + f"<span>{e(viewer.name)} ({e(viewer.role)})</span> <button>Sign out</button></form></nav>"
        )
    text = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{e(title)} · smtpproxy</title><style>{_STYLE}</style></head>"
        f"<body>{nav}<main><h1>{e(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(text, status_code=status)


def _context(request: Request) -> WebContext:
    context: WebContext = request.app.state.context
    return context


def _live(request: Request) -> LiveSession | None:
    """The request's live session (see :mod:`smtpproxy.web.sessions`), or None: no cookie, or
    a session that ended or expired."""
    cached = getattr(request.state, "live", _UNSEEN)
    if cached is not _UNSEEN:
        return cast("LiveSession | None", cached)
    live = _context(request).sessions.find(request.session.get("sid"))
    request.state.live = live
    return live


async def _account_holds(context: WebContext, live: LiveSession) -> bool:
    """Whether a password session's account still signs in as it did, looked up again at its
    source every few minutes (:meth:`SessionTable.due`): removed there, given another role,
    domains or password, the session ends. A source that cannot answer keeps it."""
    if context.accounts is None or live.login is None or not context.sessions.due(live):
        return True
    try:
        account = await context.accounts.current(live.login)
    except AccountsUnavailable as exc:
        event("console_accounts_unavailable", level=logging.WARNING, error=str(exc)[:300],
              session=live.handle)
        return True
    if account is not None and account.viewer == live.viewer and account.stamp == live.stamp:
        return True
    context.sessions.end(live.id)
    event("console_session_ended", level=logging.WARNING, session=live.handle, name=live.viewer.name,
          reason="account_removed" if account is None else "account_changed")
    return False


def _viewer(request: Request) -> Viewer | None:
    live = _live(request)
    return live.viewer if live is not None else None


def _csrf_field(request: Request) -> str:
    live = _live(request)
    token = live.csrf if live is not None else ""
    return f'<input type="hidden" name="csrf" value="{html.escape(token, quote=True)}">'


def _same_origin(request: Request) -> bool:
    """A browser's Origin (when it sends one) must be this site: Host, or digest.base_url."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc
    base = _context(request).config.digest.base_url
    return netloc == request.headers.get("host") or (base is not None and netloc == urlsplit(base).netloc)


async def _checked_form(request: Request) -> FormData | None:
    """The form of a state-changing POST, or None if its origin or CSRF token is wrong."""
    if not _same_origin(request):
        return None
    form = await request.form()
    live = _live(request)
    sent = form.get("csrf")
    if live is None or not isinstance(sent, str) or not hmac.compare_digest(sent, live.csrf):
        return None
    return form


def _refused(request: Request) -> HTMLResponse:
    event("console_csrf_refused", level=logging.WARNING, client=_client(request), path=request.url.path)
    return _page(
        request,
        "Refused",
        "<p>This form was not sent from this site, or your session ended. "
        '<a href="/console/login">Sign in again</a>.</p>',
        403,
    )


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _signed_in(handler: Handler, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        live = _live(request)
        viewer = live.viewer if live is not None and await _account_holds(_context(request), live) else None
        if viewer is None:
            if post:
                return _refused(request)
            return RedirectResponse("/console/login", status_code=303)  # a fixed path: no open redirect
        try:
            return await handler(request, _context(request), viewer)
        except StoreError as exc:
            event("console_store_failed", level=logging.WARNING, error=str(exc))
            return _page(
                request, "Try again later", "<p>The store is not reachable right now.</p>", 503, viewer
            )

    return endpoint


def _start_session(request: Request, viewer: Viewer, via: str, *, login: str | None = None,
                   stamp: str = "") -> None:
    """A new server-side session (and CSRF token) at each sign-in, the browser's old one
    ended: no fixation."""
    sessions = _context(request).sessions
    old = _live(request)
    if old is not None:
        sessions.end(old.id)
    live = sessions.start(viewer, via, _client(request), login=login, stamp=stamp)
    request.session.clear()
    request.session["sid"] = live.id
    request.state.live = live


async def _audit(
    context: WebContext,
    viewer: Viewer | str,
    action: str,
    qid: str | None = None,
    *,
    recipients: list[str] | None = None,
    detail: str | None = None,
) -> None:
    actor = viewer if isinstance(viewer, str) else f"{viewer.role}:{viewer.name}"
    entry = AuditEntry(time.time(), actor, action, qid, recipients or [], detail)
    await context.store.audit(entry)
    event(
        "console_audit",
        actor=actor,
        action=action,
        qid=qid,
        recipients=",".join(recipients or []) or None,
        detail=detail,
    )


# -- sign-in ------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    if _viewer(request) is not None:
        return RedirectResponse("/console", status_code=303)
    return _login_page(request, "")


def _login_page(request: Request, message: str, status: int = 200) -> HTMLResponse:
    error = f'<p class="error">{html.escape(message)}</p>' if message else ""
    return _page(
        request,
        "Sign in",
        error
        + (
            '<form method="post" action="/console/login">'
            '<p><label>Name<br><input name="name" autocomplete="username" required></label></p>'
            '<p><label>Password<br><input name="password" type="password" autocomplete="current-password" '
            'required></label></p><p><button type="submit">Sign in</button></p></form>'
            "<p>Recipients: the links in your quarantine digest sign you in too.</p>"
        ),
        status,
    )


async def login(request: Request) -> Response:
    """Name and password, through the login throttle (delay before the check, lockout)."""
    context = _context(request)
    if not _same_origin(request):
        return _refused(request)
    form = await request.form()
    name, password = form.get("name"), form.get("password")
    if (
        not isinstance(name, str)
        or not isinstance(password, str)
        or not name
        or len(name) > 320
        or len(password) > 1024
        or context.accounts is None
    ):
        return _login_page(request, "Name or password is wrong.", 401)
    ip = _client(request)
    if context.throttle is not None and (await context.throttle.admit(ip, name)).locked:
        return _login_page(request, "Too many failed sign-ins from your address; try again later.", 429)
    try:
        account = await context.accounts.verify(name, password)
    except AccountsUnavailable as exc:  # never a sign-in, and not a failure the throttle counts
        event("console_accounts_unavailable", level=logging.WARNING, error=str(exc)[:300])
        return _login_page(request, "Sign-in is not possible right now (the account directory "
                           "does not answer); try again later.", 503)
    if account is None:
        if context.throttle is not None:
            await context.throttle.failed(
                ip, name, password.encode("utf-8", "surrogateescape"), mechanism="console"
            )
        return _login_page(request, "Name or password is wrong.", 401)
    if context.throttle is not None:
        await context.throttle.succeeded(ip, name)
    _start_session(request, account.viewer, "password", login=name, stamp=account.stamp)
    await _audit(context, account.viewer, "sign_in", detail=f"password from {ip}")
    return RedirectResponse("/console", status_code=303)


async def link_signin(request: Request) -> Response:
    """A digest link's token signs its recipient in (as that recipient only)."""
    context = _context(request)
    if not _same_origin(request):
        return _refused(request)
    form = await request.form()
    token = form.get("token")
    if not isinstance(token, str) or len(token) > 4096:
        return _page(request, "Link not valid", "<p>This link is not valid.</p>", 400)
    try:
        link = context.signer.verify(token)
    except LinkError as exc:
        return _page(request, "Link not valid", f"<p>{html.escape(str(exc))}.</p>", 400)
    viewer = Viewer(link.recipient, "recipient")
    _start_session(request, viewer, "link")
    await _audit(context, viewer, "sign_in", detail=f"digest link from {_client(request)}")
    return RedirectResponse("/console/quarantine", status_code=303)


async def logout(request: Request) -> Response:
    """Ends the session on the server too: the cookie, if someone kept a copy, opens nothing."""
    live = _live(request)
    if live is not None:
        if await _checked_form(request) is None:
            return _refused(request)
        _context(request).sessions.end(live.id)
    request.session.clear()
    return RedirectResponse("/console/login", status_code=303)


# -- pages --------------------------------------------------------------------------------


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _parse_day(text: str | None, end: bool = False) -> float | None:
    """A YYYY-MM-DD day (UTC) as seconds: its start, or with *end* the next day's start."""
    if not text:
        return None
    try:
        day = calendar.timegm(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        return None
    return float(day + (86400 if end else 0))


def _table(head: list[str], rows: list[list[str]]) -> str:
    """*rows* are already escaped HTML cells."""
    if not rows:
        return "<p>Nothing found.</p>"
    return (
        '<div class="scroll"><table><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        + "</tbody></table></div>"
    )


async def overview(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """Decisions per day (last 14 days), top senders, reasons and deciding plugins."""
    e = html.escape
    summary = await context.store.summarize_history(viewer.scoped(Search(since=time.time() - 14 * 86400)))
    days = sorted({day for day, _, _ in summary.per_day})
    counts = {(day, decision): n for day, decision, n in summary.per_day}
    most = max((n for _, _, n in summary.per_day), default=1)
    rows = []
    for day in days:
        cells = [e(day)]
        for decision in DECISIONS:
            n = counts.get((day, decision), 0)
            cells.append(f'{n} <span class="bar" style="width:{round(6 * n / most, 2)}em"></span>')
        rows.append(cells)
    body = "<h2>Messages per decision, last 14 days</h2>" + _table(["Day (UTC)", *DECISIONS], rows)
    for title, items in (
        ("Top senders", summary.senders),
        ("Top reasons", summary.reasons),
        ("Deciding plugins", summary.deciders),
    ):
        body += f"<h2>{title}</h2>" + _table(
            [title.split()[-1].capitalize(), "Messages"], [[e(value), str(n)] for value, n in items]
        )
    return _page(request, "Overview", body, viewer=viewer)


def _search_from(request: Request, limit: int = 200) -> Search:
    q = request.query_params
    search = Search(limit=limit)
    for name in _HISTORY_FIELDS:
        value = q.get(name, "").strip()
        if value:
            setattr(search, name, value[:998])
    search.since = _parse_day(q.get("since"))
    search.until = _parse_day(q.get("until"), end=True)
    return search


def _search_form(request: Request, action: str, fields: tuple[str, ...]) -> str:
    q = request.query_params
    inputs = "".join(
        f'<label>{html.escape(name.replace("_", " "))}<input name="{name}" '
        f'value="{html.escape(q.get(name, ""), quote=True)}"></label>'
        for name in fields
    )
    for name in ("since", "until"):
        inputs += (
            f'<label>{name} (day)<input name="{name}" type="date" '
            f'value="{html.escape(q.get(name, ""), quote=True)}"></label>'
        )
    return f'<form class="search" method="get" action="{action}">{inputs}<button>Search</button></form>'


async def history(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """Search the history by every field it keeps (a GET: it changes nothing)."""
    e = html.escape
    entries = await context.store.search_history(viewer.scoped(_search_from(request)))
    rows = []
    for entry in entries:
        recipients = [r for r in entry.recipients if viewer.may_act_for(r)]
        groups = sorted({entry.groups[r] for r in recipients if r in entry.groups})  # only theirs
        qid = entry.quarantine_id
        held = f'<a href="/console/quarantine/{e(qid, quote=True)}">{e(qid)}</a>' if qid else ""
        rows.append(
            [
                e(_when(entry.time)),
                e(entry.decision),
                e(entry.sender or "<>"),
                e(", ".join(recipients)),
                e(", ".join(groups)),
                e(entry.subject or ""),
                e(entry.decided_by or ""),
                e("" if entry.score is None else str(entry.score)),
                e(entry.reason or ""),
                e(entry.reply or ""),
                e(entry.client or ""),
                e(entry.helo or ""),
                e(entry.message_id or ""),
                e(str(entry.size or "")),
                e(entry.node),
                e(entry.session or ""),
                held,
            ]
        )
    head = [
        "Time (UTC)",
        "Decision",
        "Sender",
        "Recipients",
        "Group",
        "Subject",
        "Decided by",
        "Score",
        "Reason",
        "Reply",
        "Client",
        "HELO",
        "Message-ID",
        "Size",
        "Node",
        "Session",
        "Quarantine",
    ]
    return _page(
        request,
        "History",
        _search_form(request, "/console/history", _HISTORY_FIELDS)
        + f"<p>{len(entries)} shown (newest first, at most 200).</p>"
        + _table(head, rows),
        viewer=viewer,
    )


async def quarantine(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """Held messages the viewer may see, with a bulk release/delete form."""
    e = html.escape
    search = viewer.scoped(_search_from(request, limit=500))
    found = await context.quarantine.list(search)
    rows = []
    for held in found:
        mine = [r for r in viewer.recipients(held) if held.recipients[r] == "held"]
        if not mine:
            continue
        qid = e(held.id, quote=True)
        rows.append(
            [
                f'<input type="checkbox" name="qid" value="{qid}" aria-label="select">',
                e(_when(held.time)),
                e(held.sender or "<>"),
                e(", ".join(mine)),
                f'<a href="/console/quarantine/{qid}">{e(held.subject or "(no subject)")}</a>',
                e(held.reason or ""),
                e(held.decided_by or "") + (" (admin only)" if held.admin_only else ""),
            ]
        )
    form = _search_form(
        request, "/console/quarantine", ("sender", "recipient", "subject", "reason", "decided_by")
    )
    body = (
        form
        + f'<form method="post" action="/console/bulk">{_csrf_field(request)}'
        + _table(["", "Time (UTC)", "Sender", "Held for", "Subject", "Reason", "Held by"], rows)
        + (
            '<p><button name="action" value="release">Release selected</button> '
            '<button name="action" value="delete">Delete selected</button></p>'
            if rows
            else ""
        )
        + "</form>"
    )
    return _page(request, "Quarantine", body, viewer=viewer)


async def _visible(context: WebContext, viewer: Viewer, qid: str) -> tuple[Held, list[str]] | None:
    """The message and the recipients the viewer acts for; None (→ 404) when it is not theirs."""
    if len(qid) > 200:
        return None
    held = await context.quarantine.db.get(qid)
    if held is None:
        return None
    mine = viewer.recipients(held)
    return (held, mine) if mine else None


def _not_found(request: Request, viewer: Viewer) -> HTMLResponse:
    return _page(request, "Not found", "<p>No such message.</p>", 404, viewer)


async def message(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """One message: its record, a safe preview, and per-recipient release and delete."""
    e = html.escape
    qid = request.path_params["qid"]
    visible = await _visible(context, viewer, qid)
    if visible is None:
        return _not_found(request, viewer)
    held, mine = visible
    content = await context.store.content(qid)
    if viewer.role != "recipient":  # someone opens another person's mail: privacy says record it
        await _audit(context, viewer, "preview", qid, recipients=mine)
    facts = (
        f"<dl><dt>From</dt><dd>{e(held.sender or '<>')}</dd><dt>Subject</dt><dd>{e(held.subject or '')}</dd>"
        f"<dt>Kept</dt><dd>{e(_when(held.time))} UTC on {e(held.node)}, until {e(_when(held.expires))}</dd>"
        f"<dt>Reason</dt><dd>{e(held.reason or '-')} ({e(held.decided_by or '-')}, score "
        f"{e('-' if held.score is None else str(held.score))})</dd></dl>"
    )
    boxes = "".join(
        f'<li><label><input type="checkbox" name="recipient" value="{e(r, quote=True)}"'
        f"{' checked' if held.recipients[r] == 'held' else ' disabled'}> "
        f"{e(r)}: {e(held.recipients[r])}</label></li>"
        for r in mine
    )
    actions = "<h2>Recipients</h2>"
    if held.admin_only and not viewer.is_admin:
        actions += (
            '<p class="error">Held by a security check: only an administrator can release it.</p>'
            f"<ul>{boxes}</ul>"
        )
        actions += (
            f'<form method="post" action="/console/quarantine/{e(qid, quote=True)}/delete">'
            f"{_csrf_field(request)}"
            + "".join(
                f'<input type="hidden" name="recipient" value="{e(r, quote=True)}">'
                for r in mine
                if held.recipients[r] == "held"
            )
            + "<button>Delete</button></form>"
        )
    else:
        actions += (
            f'<form method="post" action="/console/quarantine/{e(qid, quote=True)}/release">'
            f"{_csrf_field(request)}<ul>{boxes}</ul>"
            f'<button>Release</button> <button formaction="/console/quarantine/{e(qid, quote=True)}/delete">'
            f"Delete</button>{allow_button(context, viewer, held, mine, content)}</form>"
        )
    actions += report_form(_csrf_field(request), viewer, held, mine)
    return _page(
        request, held.subject or "(no subject)", facts + actions + render(preview(content)), viewer=viewer
    )


async def _report_or_allow(
    request: Request, context: WebContext, viewer: Viewer, held: Held, *, asked: list[str], form: FormData
) -> Response:
    """POST report (spam, ham, ham-release) or allow (release and allow sender)."""
    mine = asked or viewer.recipients(held)
    if request.path_params["action"] == "report":
        verdict = form.get("verdict")
        if verdict not in ("spam", "ham", "ham-release"):
            return _page(request, "Nothing done", "<p>Choose spam or not spam.</p>", 400, viewer)
        done = await report_message(context, viewer, held, recipients=mine,
                                    verdict="spam" if verdict == "spam" else "ham", audit=_audit)
        if verdict == "ham-release" and done.status not in (403, 503):
            done = Done(done.status, [*done.lines, await _do(context, viewer, held, "release", mine)])
    else:
        held_now = [r for r in mine if held.recipients.get(r) == "held"]
        outcome = await allow_sender(
            context, viewer, held, wanted=held_now, scope=str(form.get("scope") or "address"),
            release=lambda wanted: _do(context, viewer, held, "release", wanted), audit=_audit,
        )
        if outcome is None:
            return _not_found(request, viewer)
        done = outcome
    items = "".join(f"<li>{html.escape(line)}</li>" for line in done.lines)
    qid = html.escape(held.id, quote=True)
    return _page(
        request,
        "Done" if done.status == 200 else "Not done" if done.status in (403, 409) else "Partly done",
        f'<ul>{items}</ul><p><a href="/console/quarantine/{qid}">Back to the message</a> · '
        '<a href="/console/quarantine">Back to the quarantine</a></p>',
        done.status,
        viewer,
    )


async def _do(context: WebContext, viewer: Viewer, held: Held, action: str, wanted: list[str]) -> str:
    """Release or delete *wanted* (already checked as the viewer's) of one message; what happened."""
    actor = f"{viewer.role}:{viewer.name}"
    wanted = [r for r in wanted if held.recipients.get(r) == "held"]
    if not wanted:
        return f"{held.id}: nothing held for these recipients"
    if action == "release":
        if held.admin_only and not viewer.is_admin:
            await _audit(context, viewer, "release_refused", held.id, recipients=wanted, detail="admin only")
            return f"{held.id}: held by {held.decided_by}; only an administrator can release it"
        try:
            released = await context.quarantine.release(
                held.id, context.delivery, wanted, actor=actor, admin=viewer.is_admin
            )
        except QuarantineError as exc:
            return str(exc)
        except Exception as exc:
            await _audit(context, viewer, "release_failed", held.id, recipients=wanted,
                         detail=repr(exc)[:500])
            return f"{held.id}: the delivery failed ({exc}); it is still held"
        await _audit(context, viewer, "release", held.id, recipients=released.recipients,
                     detail=str(released.delivered.reply))
        return f"{held.id}: released for {', '.join(released.recipients)}"
    claimed = await context.store.claim(held.id, wanted, actor)
    if claimed:
        await context.store.settle(held.id, claimed, "deleted", actor=actor)
        await _audit(context, viewer, "delete", held.id, recipients=claimed)
    return f"{held.id}: deleted for {', '.join(claimed) or 'nobody (already done)'}"


async def act(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """POST release/delete/report/allow of one message for the recipients ticked (the viewer's only)."""
    form = await _checked_form(request)
    if form is None:
        return _refused(request)
    action = request.path_params["action"]
    if action not in ("release", "delete", "report", "allow"):
        return _not_found(request, viewer)
    visible = await _visible(context, viewer, request.path_params["qid"])
    if visible is None:
        return _not_found(request, viewer)
    held, mine = visible
    asked = [str(r) for r in form.getlist("recipient")]
    if any(r not in mine for r in asked):
        return _not_found(request, viewer)  # a recipient not theirs: as if the message were not there
    if action in ("report", "allow"):
        return await _report_or_allow(request, context, viewer, held, asked=asked, form=form)
    result = await _do(context, viewer, held, action, asked)
    status = 403 if "only an administrator" in result else 200
    return _page(
        request,
        "Done" if status == 200 else "Not allowed",
        f'<p>{html.escape(result)}</p><p><a href="/console/quarantine">Back to the quarantine</a></p>',
        status,
        viewer,
    )


async def bulk(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """POST release/delete of the ticked messages, each for the viewer's own recipients."""
    form = await _checked_form(request)
    if form is None:
        return _refused(request)
    action = form.get("action")
    if action not in ("release", "delete"):
        return _page(request, "Nothing done", "<p>Choose release or delete.</p>", 400, viewer)
    results = []
    for qid in [str(q) for q in form.getlist("qid")][:500]:
        visible = await _visible(context, viewer, qid)
        if visible is None:
            results.append(f"{qid}: not found")
            continue
        held, mine = visible
        results.append(await _do(context, viewer, held, str(action), mine))
    items = "".join(f"<li>{html.escape(r)}</li>" for r in results) or "<li>No message selected.</li>"
    return _page(
        request, "Done", f'<ul>{items}</ul><p><a href="/console/quarantine">Back</a></p>', viewer=viewer
    )


async def audit(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """The audit log (admins only; anyone else gets 404, as for a page that is not there)."""
    if not viewer.is_admin:
        return _not_found(request, viewer)
    e = html.escape
    qid = request.query_params.get("qid") or None
    actor = request.query_params.get("actor") or None
    entries = await context.store.audit_log(qid=qid, actor=actor)
    rows = [
        [
            e(_when(a.time)),
            e(a.actor),
            e(a.action),
            e(a.qid or ""),
            e(", ".join(a.recipients)),
            e(a.detail or ""),
        ]
        for a in entries
    ]
    form = (
        '<form class="search" method="get" action="/console/audit">'
        f'<label>message id<input name="qid" value="{e(qid or "", quote=True)}"></label>'
        f'<label>actor<input name="actor" value="{e(actor or "", quote=True)}"></label>'
        "<button>Filter</button></form>"
    )
    return _page(
        request,
        "Audit log",
        form + _table(["Time (UTC)", "Who", "Did", "Message", "Recipients", "Detail"], rows),
        viewer=viewer,
    )


def signin_form(token: str) -> str:
    """The button the release-link page shows to open the recipient's quarantine."""
    return (
        '<form method="post" action="/console/signin">'
        f'<input type="hidden" name="token" value="{html.escape(token, quote=True)}">'
        '<button type="submit">Open my quarantine</button></form>'
    )
