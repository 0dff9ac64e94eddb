"""HTML pages of the web app: small, self-contained (no scripts, no outside resources), and
every value escaped."""

from __future__ import annotations

import html

from starlette.responses import HTMLResponse

__all__ = ["page"]

_STYLE = ("body{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em;line-height:1.4}"
          "dt{font-weight:bold}button{font-size:1.1em;padding:.4em 1.2em}")


def page(title: str, body_html: str, status: int = 200) -> HTMLResponse:
    """A complete page; *body_html* must already be escaped (use :func:`html.escape`)."""
    text = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\">"
            f"<meta name=\"robots\" content=\"noindex\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body_html}</body></html>")
    return HTMLResponse(text, status_code=status)
