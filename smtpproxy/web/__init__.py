"""``smtpproxy web``: the small web app behind the digest's release links.

Starlette (routing, requests, responses) served by uvicorn, its own process, bound to
127.0.0.1 by default (put a TLS-terminating reverse proxy in front for the recipients).
:func:`smtpproxy.web.app.create_app` assembles the app from route groups, so the web console
(a later issue) adds its own group (with its own login) beside :mod:`smtpproxy.web.links`.
"""

from smtpproxy.web.app import create_app
from smtpproxy.web.context import WebContext

__all__ = ["WebContext", "create_app"]
