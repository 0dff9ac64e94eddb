"""auth_results: one RFC 8601 ``Authentication-Results:`` header from every recorded check.

    plugins:
      - name: spf
      - name: dkim_verify
      - name: arc
      - name: dmarc
      - name: auth_results          # last of the checking plugins
        settings:
          authserv_id: mx.example.com

At ``data`` the plugin first removes every ``Authentication-Results:`` field that claims to
come from this host (its authserv-id equals ``authserv_id``, compared case-insensitively):
a sender could have forged one, or the message passed here before (RFC 8601 section 5).
Fields from other hosts are kept, in their order. Then it prepends exactly one field built
as the ``authres`` package writes it from the checks the earlier plugins recorded
(``smtpproxy.authresults``): SPF, DKIM (one clause per signature), DMARC and ARC, in that
order, then any other method in the order recorded. With nothing recorded the field says
``<authserv_id>; none`` (RFC 8601 section 2.2)::

    Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=a@example.org;
     dkim=pass header.d=example.org header.s=sel header.b=AbCdEf12; dmarc=pass ...

The field is written as one logical line; ``Message`` folds it only past 998 octets.
Removing a forged field has to remove all ``Authentication-Results:`` fields and put the
foreign ones back at the top (``Message`` has no way to drop a single field), so when that
happens the foreign fields move above the other header fields and are re-encoded unfolded.
A message with no field of ours is left exactly as it came, apart from the new field.
"""

from __future__ import annotations

import functools
import re

from pydantic import Field, field_validator

from smtpproxy import AuthCheck, EventLog, Message, PluginSettings, Transaction, auth_checks, hookimpl

__all__ = ["AuthResults", "authserv_id_of", "header_value"]

log = EventLog(__name__)

HEADER = "Authentication-Results"
_ORDER = {"spf": 0, "dkim": 1, "dmarc": 2, "arc": 3}
_SIGNATURE_PREFIX = 8  # RFC 6008 section 4: header.b carries at least 8 characters of b=
# RFC 2045 token: printable ASCII except SPACE and tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")  # RFC 8601 method/result/ptype
_PROPERTY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# An RFC 8601 pvalue written as [local-part] "@" domain: dot-atom or quoted-string local part
# (UTF-8 allowed, RFC 6532), dot-atom domain.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u00a0-\U0010ffff]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_MAILBOX = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})?@{_DOT_ATOM}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Value(str):
    """A pvalue or reason that quotes itself as RFC 8601 requires.

    ``authres`` leaves anything containing ``@`` unquoted, which is wrong for a reason text
    such as ``"no key for a@b"``; this writes a token or a mailbox as is and everything else
    as a quoted-string.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> _Value:
        return super().__new__(cls, _CONTROL.sub("?", text))

    def quote_if_needed(self) -> str:
        if _TOKEN.fullmatch(self) or _MAILBOX.fullmatch(self):
            return str(self)
        return '"' + self.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Reason(_Value):
    __slots__ = ()

    def quote_if_needed(self) -> str:
        if _TOKEN.fullmatch(self):
            return str(self)
        return '"' + self.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=512)
def _is_keyword(text: str) -> bool:
    """A valid RFC 8601 method, result or ptype (the same few names on every message)."""
    return _KEYWORD.fullmatch(text) is not None


@functools.lru_cache(maxsize=512)
def _property_key(key: str) -> tuple[str, str] | None:
    """``ptype.property`` split and checked, or None when it cannot be written."""
    ptype, _, name = key.partition(".")
    if not _KEYWORD.fullmatch(ptype) or not _PROPERTY.fullmatch(name):
        return None
    return ptype, name


def _clause(check: AuthCheck) -> str | None:
    """One resinfo clause as ``authres`` writes it (its AuthenticationResult with these
    properties, and the reason set afterwards), or None for a check that cannot be written
    (logged). Written here: building authres' objects for every message cost more than the
    rest of this plugin; tests/plugins/test_auth_results.py compares the two."""
    if not _is_keyword(check.method) or not _is_keyword(check.result):
        log.warning("auth_results_skipped", method=check.method, result=check.result,
                    reason="not a valid RFC 8601 method or result")
        return None
    parts = [check.method.lower(), "=", check.result.lower()]
    if check.reason:
        parts += [" reason=", _written(check.reason, _Reason)]
    for key, text in check.properties.items():
        names = _property_key(key)
        if names is None or not text:
            continue
        value = _written(text[:_SIGNATURE_PREFIX] if key == "header.b" else text, _Value)
        parts += [" ", names[0].lower(), ".", names[1].lower(), "=", value]
    return "".join(parts)


@functools.lru_cache(maxsize=2048)
def _written(text: str, kind: type[_Value]) -> str:
    """A pvalue or reason as written (made safe, quoted when needed): the same domains,
    selectors and reasons come back on every message, and the patterns are not cheap."""
    return kind(text).quote_if_needed()


def header_value(authserv_id: str, recorded: list[AuthCheck]) -> str:
    """The field value: ``authserv-id; method=result ...; ...`` or ``authserv-id; none``,
    exactly as ``authres``' AuthenticationResultsHeader writes it."""
    ordered = sorted(recorded, key=lambda c: _ORDER.get(c.method, len(_ORDER)))
    clauses = [c for c in map(_clause, ordered) if c is not None]
    return "; ".join([authserv_id.lower(), *(clauses or ["none"])])


def _skip_cfws(text: str, pos: int) -> int:
    """Skip whitespace and (nested) comments from ``pos``."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if depth and ch == "\\":
            pos += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and ch not in " \t":
            break
        pos += 1
    return pos


def authserv_id_of(value: str) -> str | None:
    """The authserv-id an ``Authentication-Results`` value starts with, or None if unreadable."""
    pos = _skip_cfws(value, 0)
    if value[pos : pos + 1] == '"':
        match = re.compile(_QUOTED).match(value, pos)
        if match is None:
            return None
        return re.sub(r"\\(.)", r"\1", match.group()[1:-1])
    match = _TOKEN.match(value, pos)
    return match.group() if match else None


def valid_authserv_id(value: str) -> str:
    """An authserv-id as RFC 8601 wants it here: this host's name (shared with ARC sealing)."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(
            "not a valid authserv-id: must be a host name (letters, digits, '.', '-'; no spaces or ';')"
        )
    return value


class AuthResults:
    """Write ``Authentication-Results:`` at ``data``; place it after every checking plugin."""

    class Settings(PluginSettings):
        authserv_id: str = Field(
            description="This host's name as written in the header (the authserv-id), "
            "e.g. mx.example.com. Fields carrying it that arrive with the message are removed.",
        )
        remove_forged: bool = Field(
            default=True,
            description="Remove Authentication-Results fields that arrive with our authserv-id "
            "(forged, or from an earlier pass through this host); fields of other hosts are kept.",
        )

        @field_validator("authserv_id")
        @classmethod
        def _token(cls, value: str) -> str:
            return valid_authserv_id(value)

    def __init__(self, settings: Settings):
        self.settings = settings

    def remove_ours(self, message: Message) -> int:
        """Remove fields whose authserv-id is ours; others stay byte for byte where they are."""
        ours = self.settings.authserv_id.lower()
        return message.remove_header(HEADER, matching=lambda v: (authserv_id_of(v) or "").lower() == ours)

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> None:
        # async although it never awaits: a few microseconds of header work run on the loop,
        # where a plain hook would cost a hand-off to the hook threads and back.
        if self.settings.remove_forged:
            removed = self.remove_ours(message)
            if removed:
                log.info("auth_results_removed", fields=removed, authserv_id=self.settings.authserv_id)
        message.add_header(HEADER, header_value(self.settings.authserv_id, auth_checks(transaction)))
