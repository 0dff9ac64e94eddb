"""The console's Sessions page: who is signed in, and ending their sessions (admins only).

For an admin who hears of a lost laptop, or has just changed a password in the directory
(which the console's lookups of a session's account cannot see): the sessions end now.
Anyone else gets 404, as for the audit log. A session is named by its handle, never by the
id its cookie carries; every ending is in the audit log (``action=end_session``).
"""

from __future__ import annotations

import html

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from smtpproxy.web.accounts import Viewer
from smtpproxy.web.console import (
    _audit,
    _checked_form,
    _csrf_field,
    _live,
    _not_found,
    _page,
    _refused,
    _signed_in,
    _table,
    _when,
)
from smtpproxy.web.context import WebContext
from smtpproxy.web.sessions import LiveSession

__all__ = ["routes"]

_VIA = {"password": "password", "link": "digest link"}


def routes() -> list[Route]:
    return [
        Route("/console/sessions", _signed_in(sessions_page), methods=["GET"]),
        Route("/console/sessions/end", _signed_in(end, post=True), methods=["POST"]),
    ]


async def sessions_page(request: Request, context: WebContext, viewer: Viewer) -> Response:
    if not viewer.is_admin:
        return _not_found(request, viewer)
    return _listing(request, context, viewer)


def _listing(request: Request, context: WebContext, viewer: Viewer, done: str = "") -> Response:
    e = html.escape
    csrf = _csrf_field(request)
    own = _live(request)
    rows = []
    for s in context.sessions.live():
        button = (f'<form method="post" action="/console/sessions/end">{csrf}'
                  f'<input type="hidden" name="handle" value="{e(s.handle, quote=True)}">'
                  "<button>End</button></form>")
        rows.append([
            e(s.viewer.name) + (" <em>(this session)</em>" if s is own else ""),
            e(s.viewer.role), e(_VIA.get(s.via, s.via)), e(s.client), e(_when(s.started)),
            e(_when(s.seen)), button,
        ])
    every = (
        "<h2>Every session of one name</h2>"
        f'<form class="search" method="post" action="/console/sessions/end">{csrf}'
        '<label>name<input name="name" required></label><button>End all their sessions</button></form>'
    )
    note = (
        "<p>Signed in to this console now. An account removed or changed in an accounts table "
        f"or the directory is signed out at its first request {context.sessions.recheck / 60:g} "
        "minutes after its last lookup (a table may answer from its cache a little longer); "
        "ending its sessions here signs it out now. A restart of smtpproxy web "
        f"ends every session; each lasts at most {context.sessions.lifetime / 3600:g} hours, "
        f"and ends after {context.sessions.idle / 60:g} minutes without a request.</p>"
    )
    result = f'<p class="done">{e(done)}</p>' if done else ""
    table = _table(["Who", "Role", "Signed in by", "From", "Since (UTC)", "Last seen (UTC)", ""], rows)
    return _page(request, "Sessions", result + note + table + every, viewer=viewer)


async def end(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """POST ``handle`` (one session) or ``name`` (every session of that name)."""
    form = await _checked_form(request)
    if form is None:
        return _refused(request)
    if not viewer.is_admin:
        return _not_found(request, viewer)
    handle, name = form.get("handle"), form.get("name")
    ended: list[LiveSession] = []
    if isinstance(handle, str) and handle:
        found = context.sessions.end_handle(handle)
        ended = [found] if found is not None else []
    elif isinstance(name, str) and name.strip():
        ended = context.sessions.end_all(name.strip())
    for s in ended:
        await _audit(context, viewer, "end_session",
                     detail=f"{s.viewer.role}:{s.viewer.name} by {s.via} from {s.client} "
                            f"since {_when(s.started)}")
    if not ended:
        done = "No such session (it has ended already)." if handle else f"{name or 'Nobody'} has no session."
    else:
        who = ", ".join(sorted({s.viewer.name for s in ended}))
        done = f"Ended {len(ended)} session{'s' if len(ended) != 1 else ''} of {who}."
    if any(s is _live(request) for s in ended):  # the admin ended their own
        request.session.clear()
        return RedirectResponse("/console/login", status_code=303)
    return _listing(request, context, viewer, done)
