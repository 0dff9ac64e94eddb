"""The web app: shared state, security headers on every response, and the route groups."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smtpproxy.web.console import routes as console_routes
from smtpproxy.web.context import WebContext
from smtpproxy.web.links import routes as link_routes
from smtpproxy.web.lists import routes as list_routes
from smtpproxy.web.sessionpage import routes as session_routes

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["WebContext", "create_app"]

_HEADERS = [
    # No scripts, frames or outside resources; forms post only to this site.
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # A link's token never leaks to another site in a Referer; "same-origin", not "no-referrer",
    # because under no-referrer browsers send "Origin: null" with this site's own form posts,
    # which the Origin checks (rightly) refuse.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Adds :data:`_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in _HEADERS if h[0] not in own)]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok\n")


def create_app(context: WebContext) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await context.delivery.start()
        try:
            yield
        finally:
            await context.delivery.close()
            await context.store.close()
            if context.throttle is not None:
                await context.throttle.close()
            await context.tables.close()

    routes = [Route("/healthz", _healthz), *link_routes()]
    middleware = [Middleware(SecurityHeaders)]
    if context.accounts is not None:
        routes += console_routes() + list_routes() + session_routes()
        console = context.config.console
        # A signed cookie (itsdangerous), HttpOnly always; Secure unless turned off for plain
        # HTTP; SameSite=Strict, so no other site's page sends it along at all.
        middleware.append(Middleware(
            SessionMiddleware, secret_key=context.session_secret, session_cookie="smtpproxy_console",
            max_age=round(console.session_hours * 3600), same_site="strict",
            https_only=console.secure_cookie))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.context = context
    return app
