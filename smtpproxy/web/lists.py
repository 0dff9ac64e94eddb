"""The console's allow and block list pages: the lists plugin's tables, per domain and person.

An admin sees and edits every list; a domain admin the lists of their domains (``domain``,
``@domain`` and each address in it); a recipient their own address's list, and sees the
domain's entries that apply to them too. Every key and entry a form sends is checked again
here, whatever the page offered (:func:`smtpproxy.web.listtables.may_manage`): another
domain's key is refused (403) and nothing changes. Changes are POSTs with the session's CSRF
token and this site's Origin (:func:`smtpproxy.web.console._checked_form`); each one is in
the audit log. Tables that smtpproxy does not write (inline, regexp, SQL, LDAP) are shown
read-only, with the reason.
"""

from __future__ import annotations

import html
import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smtpproxy.eventlog import event
from smtpproxy.tables import TableError, TableUnavailable
from smtpproxy.tables.edit import Edit
from smtpproxy.web.accounts import Viewer
from smtpproxy.web.console import _audit, _checked_form, _csrf_field, _page, _refused, _signed_in, _table
from smtpproxy.web.context import WebContext
from smtpproxy.web.listtables import KINDS, ListTable, ListTables, check_entry, check_key, may_manage

__all__ = ["routes"]

_TITLES = {"block": "Block list", "allow": "Allow list"}
_MEANING = {
    "block": "Mail from these senders is refused for the list's owner (550 at RCPT TO)",
    "allow": "These senders' mail scores as not spam, when the sender is authenticated (SPF, DKIM, DMARC)",
}


def routes() -> list[Route]:
    return [
        Route("/console/lists", _signed_in(lists_page), methods=["GET"]),
        Route("/console/lists/{kind:str}/{action:str}", _signed_in(change, post=True), methods=["POST"]),
    ]


def _scope_note(viewer: Viewer) -> str:
    if viewer.role == "admin":
        return "every domain and address"
    if viewer.role == "domain":
        return "the domains " + ", ".join(viewer.domains) + " and their addresses"
    return f"your address {viewer.name}"


Rows = list[tuple[str, list[str]]]


async def _rows(lists: ListTables, table: ListTable, viewer: Viewer, wanted: str | None) -> Rows:
    """The (key, entries) the viewer sees in *table*, *wanted* narrowing or naming a key."""
    if viewer.role == "recipient":
        # Their own list, and the domain's entries that apply to them as well (read-only).
        keys = lists.keys_of(viewer.name)
        return [(key, await table.entries(key)) for key in keys]
    if table.listable:
        rows = [(k, v) for k, v in await table.rows() if may_manage(viewer, k)]
        return [(k, v) for k, v in rows if wanted in k] if wanted else rows
    keys = [] if viewer.role == "admin" else [k for d in viewer.domains for k in (d, "@" + d)]
    if wanted is not None and wanted not in keys:
        try:
            key = check_key(wanted)
        except ValueError:
            key = None
        if key is not None and may_manage(viewer, key):
            keys.append(key)
    return [(key, await table.entries(key)) for key in keys]


def _section(request: Request, table: ListTable, viewer: Viewer, rows: Rows, form: dict[str, str]) -> str:
    e = html.escape
    csrf = _csrf_field(request)
    kind = table.kind
    body = (f'<h2 id="{kind}">{_TITLES[kind]}</h2><p>{e(_MEANING[kind])}. Table <code>{e(table.table.name)}'
            f"</code> ({e(table.spec.type)})")
    reason = table.read_only_reason
    if reason:
        body += f": read-only here, because {e(reason)}.</p>"
    else:
        body += f"; a change applies {e(table.applies)}.</p>"
    cells = []
    for key, entries in rows:
        mine = table.writable and may_manage(viewer, key)
        for entry in entries or ([] if mine else ["(none)"]):
            button = ""
            if mine:
                button = (f'<form method="post" action="/console/lists/{kind}/remove">{csrf}'
                          f'<input type="hidden" name="key" value="{e(key, quote=True)}">'
                          f'<input type="hidden" name="entry" value="{e(entry, quote=True)}">'
                          f'<button aria-label="remove {e(entry, quote=True)} from {e(key, quote=True)}">'
                          "Remove</button></form>")
            cells.append([e(key), e(entry), button])
    body += _table(["For", "Entry", ""], cells)
    if table.writable:
        if viewer.role == "recipient":
            owner = (f'<label>For<input name="key" value="{e(viewer.name.lower(), quote=True)}" readonly>'
                     "</label>")
        else:
            value = form.get("key", "") if form.get("kind") == kind else ""
            owner = (f'<label>For (address, domain or @domain)<input name="key" required '
                     f'value="{e(value, quote=True)}"></label>')
        entry = form.get("entry", "") if form.get("kind") == kind else ""
        body += (f'<form class="search" method="post" action="/console/lists/{kind}/add">{csrf}{owner}'
                 f'<label>Sender (address, domain or *.domain)<input name="entry" required '
                 f'value="{e(entry, quote=True)}"></label><button>Add to the {kind} list</button></form>')
    return body


async def _render(request: Request, context: WebContext, viewer: Viewer, *, message: str = "",
                  error: str = "", status: int = 200, form: dict[str, str] | None = None) -> Response:
    e = html.escape
    lists = context.lists
    assert lists is not None
    wanted = request.query_params.get("key", "").strip().lower()[:320] or None
    body = ""
    if message:
        body += f'<p class="done" role="status">{e(message)}</p>'
    if error:
        body += f'<p class="error" role="alert">{e(error)}</p>'
    body += (f"<p>The lists of {e(_scope_note(viewer))}. An entry is an address "
             "(<code>friend@partner.example</code>), a domain (<code>partner.example</code> or "
             "<code>@partner.example</code>) or its subdomains (<code>*.partner.example</code>).</p>")
    if viewer.role != "recipient":
        body += ('<form class="search" method="get" action="/console/lists"><label>Show lists for'
                 f'<input name="key" value="{e(wanted or "", quote=True)}"></label>'
                 "<button>Show</button></form>")
    for kind in KINDS:
        table = lists.tables.get(kind)
        if table is not None:
            rows = await _rows(lists, table, viewer, wanted)
            body += _section(request, table, viewer, rows, form or {})
    return _page(request, "Allow and block lists", body, status, viewer)


async def lists_page(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """GET: the lists the viewer manages (it changes nothing)."""
    if context.lists is None:
        return _page(request, "Not found", "<p>No lists plugin is configured.</p>", 404, viewer)
    try:
        return await _render(request, context, viewer)
    except (TableUnavailable, TableError) as exc:
        return _unavailable(request, viewer, exc)


def _unavailable(request: Request, viewer: Viewer, exc: Exception) -> Response:
    event("console_lists_unavailable", level=logging.WARNING, error=str(exc)[:300])
    return _page(request, "Try again later",
                 "<p>The list's table cannot be reached right now; nothing was changed.</p>", 503, viewer)


async def change(request: Request, context: WebContext, viewer: Viewer) -> Response:
    """POST add/remove one entry of one list (the key checked against the viewer's scope)."""
    try:
        return await _change(request, context, viewer)
    except (TableUnavailable, TableError) as exc:
        return _unavailable(request, viewer, exc)


async def _change(request: Request, context: WebContext, viewer: Viewer) -> Response:
    form = await _checked_form(request)
    if form is None:
        return _refused(request)
    kind, action = request.path_params["kind"], request.path_params["action"]
    lists = context.lists
    table = lists.tables.get(kind) if lists is not None else None
    if table is None or action not in ("add", "remove"):
        return _page(request, "Not found", "<p>No such list.</p>", 404, viewer)
    raw_key, raw_entry = form.get("key"), form.get("entry")
    sent = {"kind": kind, "key": raw_key if isinstance(raw_key, str) else "",
            "entry": raw_entry if isinstance(raw_entry, str) else ""}
    try:
        key = check_key(sent["key"])
        entry = check_entry(sent["entry"])
    except ValueError as exc:
        return await _render(request, context, viewer, error=str(exc), status=400, form=sent)
    if not may_manage(viewer, key):
        event("console_lists_refused", level=logging.WARNING, actor=f"{viewer.role}:{viewer.name}",
              list=kind, key=key, entry=entry)
        return _page(request, "Not allowed",
                     f"<p>You manage the lists of {html.escape(_scope_note(viewer))} only.</p>"
                     '<p><a href="/console/lists">Back to the lists</a></p>', 403, viewer)
    if not table.writable:
        return await _render(request, context, viewer, status=409, form=sent,
                             error=f"The {kind} list is read-only here: {table.read_only_reason}.")
    result = await table.edit(key, entry, add=action == "add")
    if result is Edit.DONE:
        await _audit(context, viewer, f"list_{action}", recipients=[key],
                     detail=f"{kind} list: {entry} (table {table.table.name})")
        done = (f"{entry} added to the {kind} list of {key}" if action == "add"
                else f"{entry} removed from the {kind} list of {key}")
        return await _render(request, context, viewer, message=f"{done}; it applies {table.applies}.")
    note = (f"{entry} is already on the {kind} list of {key}." if result is Edit.ALREADY_THERE
            else f"{entry} is not on the {kind} list of {key}.")
    return await _render(request, context, viewer, message=note)
