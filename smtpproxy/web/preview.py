"""A quarantined message shown without danger.

Headers and text parts are shown as text (escaped). An HTML part is first cleaned by
``nh3`` (the Rust ``ammonia`` sanitiser: an allow-list of tags and attributes, no scripts,
no event handlers, no ``style``), with images and image maps removed so nothing is
fetched, then shown in an ``<iframe sandbox srcdoc>``: no scripts, no same-origin access,
no forms, no navigation of the console, and the console's CSP (``default-src 'none'``)
applies to it as well. Attachments are listed (name, type, size), never opened or served.
"""

from __future__ import annotations

import email.policy
import html
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser

import nh3

__all__ = ["Preview", "preview", "render"]

_TAGS = set(nh3.ALLOWED_TAGS) - {"img", "map", "area"}
_MAX_TEXT = 200_000
"""Characters of one part shown at most (the rest is cut, and says so)."""


@dataclass
class Preview:
    headers: list[tuple[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    htmls: list[str] = field(default_factory=list)
    """Already sanitised."""
    attachments: list[tuple[str, str, int]] = field(default_factory=list)
    """(file name, content type, bytes)."""


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "\n[… cut]"


def _content(part: EmailMessage) -> str:
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def sanitise(markup: str) -> str:
    """HTML with nothing active and nothing that loads: for the sandboxed frame."""
    return nh3.clean(
        _cut(markup),
        tags=_TAGS,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def preview(content: bytes) -> Preview:
    """Parse a message for display (never raises for a malformed message)."""
    message = BytesParser(policy=email.policy.default).parsebytes(content)
    assert isinstance(message, EmailMessage)
    result = Preview()
    for name, value in message.raw_items():
        result.headers.append((name, " ".join(str(value).split())))
    for part in message.walk():
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        kind = part.get_content_type()
        filename = part.get_filename()
        if part.get_content_disposition() == "attachment" or filename or not kind.startswith("text/"):
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            result.attachments.append((filename or "(no name)", kind, size))
        elif kind == "text/html":
            result.htmls.append(sanitise(_content(part)))
        else:
            result.texts.append(_cut(_content(part)))
    return result


def render(shown: Preview) -> str:
    """The preview as escaped HTML for a console page."""
    e = html.escape
    out = ['<h2>Headers</h2><pre class="headers">']
    out += [f"{e(name)}: {e(value)}\n" for name, value in shown.headers]
    out.append("</pre>")
    for text in shown.texts:
        out.append(f'<h2>Text</h2><pre class="text">{e(text)}</pre>')
    for markup in shown.htmls:
        out.append(
            "<h2>HTML (sanitised, no scripts, no images)</h2>"
            f'<iframe class="html" sandbox="" referrerpolicy="no-referrer" '
            f'title="HTML part" srcdoc="{e(markup, quote=True)}"></iframe>'
        )
    if shown.attachments:
        out.append('<h2>Attachments (not opened)</h2><ul class="attachments">')
        out += [f"<li>{e(name)} — {e(kind)}, {size} bytes</li>" for name, kind, size in shown.attachments]
        out.append("</ul>")
    return "".join(out)
