"""Strict, lossless parsing of MAIL FROM / RCPT TO arguments (RFC 5321 4.1.2, RFC 6531).

Why not ``email.utils.parseaddr`` or ``email._header_value_parser``: they parse RFC 5322
*headers*, so they drop comments, unfold, normalise and accept things an SMTP path must
not contain.  The proxy forwards exactly what it validated, so ``Address.text`` here is
always a verbatim slice of the client's input (minus the angle brackets and an ignored
source route), and it can never carry CR, LF, NUL or any other control character.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final, NamedTuple

import idna

__all__ = [
    "Address",
    "AddressError",
    "PathArgument",
    "parse_mail_from",
    "parse_mailbox",
    "parse_rcpt_to",
]

# RFC 5321 section 4.5.3.1 limits, in octets of the UTF-8 encoding.
MAX_LOCAL_OCTETS: Final = 64
MAX_DOMAIN_OCTETS: Final = 255
MAX_LABEL_OCTETS: Final = 63
MAX_PATH_OCTETS: Final = 256  # including "<", ">" and any source route
MAX_SIZE_DIGITS: Final = 20

# C0, DEL and C1: never acceptable anywhere in a command argument.
_CTRL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
# surrogateescape turns undecodable bytes into lone surrogates U+DC80..U+DCFF.
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
_NON_ASCII_RE: Final = re.compile("[^\x00-\x7f]")
# Format characters that scripts legitimately need (ZWNJ, ZWJ); all other C*/Z* are refused.
_ALLOWED_FORMAT: Final = frozenset("\u200c\u200d")

_UTF8: Final = r"\u0080-\U0010ffff"  # non-ASCII; vetted separately (controls, surrogates...)
_ATEXT: Final = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-" + _UTF8
_ATEXT_RE: Final = re.compile(f"[{_ATEXT}]")
_DOT_STRING_RE: Final = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# qtextSMTP (%d32-33 / %d35-91 / %d93-126 / UTF-8) and quoted-pairSMTP ("\" %d32-126).
_QUOTED_RE: Final = re.compile(rf'"(?:[ !#-\[\]-~{_UTF8}]|\\[ -~])*"')
_LD: Final = r"A-Za-z0-9" + _UTF8
_LABEL: Final = rf"[{_LD}](?:[{_LD}\-]*[{_LD}])?"
_DOMAIN_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV4_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_RE: Final = re.compile(r"[0-9A-Fa-f:.]+")  # no "%zone": ipaddress would accept one

# Tokenisers: deliberately loose so that the strict checks below can say what is wrong.
_ANGLE_PATH_RE: Final = re.compile(
    r"<(?P<route>@[^:<> ]*:)?"
    r'(?P<local>"(?:[^"\\]|\\.)*"|[^@<> ]*)'
    r"(?:@(?P<domain>[^<> ]*))?>",
    re.DOTALL,
)
_MAILBOX_RE: Final = re.compile(
    r'(?P<local>"(?:[^"\\]|\\.)*"|[^@]*)(?:@(?P<domain>.*))?', re.DOTALL
)
_PARAM_RE: Final = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>.*))?", re.DOTALL)
_PARAM_VALUE_RE: Final = re.compile(f"[!-<>-~{_UTF8}]+")  # %d33-60 / %d62-126 / UTF-8
_SIZE_RE: Final = re.compile(rf"[0-9]{{1,{MAX_SIZE_DIGITS}}}")
_BODY_VALUES: Final = frozenset({"7BIT", "8BITMIME"})


class AddressError(ValueError):
    """A MAIL/RCPT argument that is not acceptable. Carries the SMTP reply to send."""

    code: int
    enhanced: str
    text: str

    def __init__(self, text: str, *, code: int = 553, enhanced: str = "5.1.3") -> None:
        # The text goes straight into an SMTP reply line: force printable ASCII, one line.
        if not (text.isascii() and text.isprintable()):
            text = "".join(c if " " <= c <= "~" else f"<U+{ord(c):04X}>" for c in text)
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text


@dataclass(frozen=True, slots=True)
class Address:
    """A validated mailbox; ``text`` is exactly what was checked and is what gets forwarded.

    Every instance is valid: the constructor checks that ``text`` is ``local@domain`` (or
    ``""``, the null path, with empty parts; or a bare ``postmaster`` with an empty domain)
    and that the parts pass the same strict rules as ``MAIL FROM``/``RCPT TO`` on the wire
    (no CR, LF, NUL or other control character, RFC 5321 syntax, local part and domain
    lengths, IDNA2008 domains), else it raises ValueError. So no plugin can put an address on the wire, in a
    Maildir file or in a quarantine record that would break a line. Plugins build addresses
    from text with :meth:`Address.parse`.
    """

    text: str
    local: str
    domain: str

    def __post_init__(self) -> None:
        problem = _address_problem(self.text, self.local, self.domain)
        if problem:
            raise ValueError(f"invalid Address {self.text[:80]!r}: {problem} "
                             "(build addresses from text with Address.parse)")

    @classmethod
    def _checked(cls, text: str, local: str, domain: str) -> Address:
        """An address whose parts a parser here has just put through the very checks of
        :func:`_address_problem` (characters, local part, domain): not made twice, as the
        constructor would (a sender and a recipient of every message, issue 31's profile)."""
        address = object.__new__(cls)
        object.__setattr__(address, "text", text)
        object.__setattr__(address, "local", local)
        object.__setattr__(address, "domain", domain)
        return address

    @classmethod
    def parse(cls, text: str, *, allow_utf8: bool = True) -> Address:
        """Parse ``local@domain`` (without angle brackets) with the strict wire parser.

        ``""`` gives the null path ``<>``. Raises :class:`AddressError` (a ValueError whose
        text says what is wrong) for anything the proxy would refuse on the wire; non-ASCII
        needs ``allow_utf8`` (the transaction's SMTPUTF8, when the address goes upstream).
        """
        if text == "":
            return _NULL
        return parse_mailbox(text, allow_utf8=allow_utf8)

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>`` (bounces must not be bounced)."""
        return not self.text

    @property
    def needs_smtputf8(self) -> bool:
        """True if relaying this address upstream requires the SMTPUTF8 extension."""
        return not self.text.isascii()

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class PathArgument:
    """A parsed MAIL/RCPT argument: the address plus ESMTP parameters, values verbatim."""

    address: Address
    params: dict[str, str | None]


class _Role(NamedTuple):
    """Reply wording and codes, so sender and recipient errors read like Postfix's."""

    syntax: str  # prefix for address syntax errors
    rejected: str  # prefix for policy (SMTPUTF8) rejections
    params: str  # prefix for parameter errors
    code: int
    enhanced: str
    ctrl_code: int  # control characters / invalid UTF-8
    ctrl_enhanced: str


_MAIL: Final = _Role(
    syntax="Bad sender address syntax",
    rejected="Sender address rejected",
    params="Bad MAIL FROM parameters",
    code=501,
    enhanced="5.1.7",
    ctrl_code=501,
    ctrl_enhanced="5.5.2",
)
_RCPT: Final = _Role(
    syntax="Bad recipient address syntax",
    rejected="Recipient address rejected",
    params="Bad RCPT TO parameters",
    code=501,
    enhanced="5.1.3",
    ctrl_code=501,
    ctrl_enhanced="5.5.2",
)
_BARE: Final = _Role(
    syntax="Bad address syntax",
    rejected="Address rejected",
    params="Bad parameters",
    code=553,
    enhanced="5.1.3",
    ctrl_code=553,
    ctrl_enhanced="5.1.3",
)


def _show(ch: str) -> str:
    """Name one character for a reply without echoing anything unprintable."""
    if "!" <= ch <= "~":
        return f"'{ch}'"
    return "space" if ch == " " else f"U+{ord(ch):04X}"


def _snippet(s: str, limit: int = 32) -> str:
    """A short, printable-ASCII rendering of client input for error replies."""
    out = "".join(c if "!" <= c <= "~" else f"<U+{ord(c):04X}>" for c in s[:limit])
    return out + ("..." if len(s) > limit else "")


def _octets(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _syntax(role: _Role, reason: str) -> AddressError:
    return AddressError(f"{role.syntax}: {reason}", code=role.code, enhanced=role.enhanced)


def _param_error(role: _Role, reason: str) -> AddressError:
    return AddressError(f"{role.params}: {reason}", code=501, enhanced="5.5.4")


def _utf8_error(role: _Role, reason: str) -> AddressError:
    return AddressError(f"{role.rejected}: {reason}", code=553, enhanced="5.6.7")


def _check_characters(s: str, role: _Role) -> bool:
    """Refuse controls, undecodable bytes and invisible characters; return True if ASCII."""
    m = _CTRL_RE.search(s)
    if m is not None:
        raise AddressError(
            f"{role.syntax}: control character {_show(m.group())} in address",
            code=role.ctrl_code,
            enhanced=role.ctrl_enhanced,
        )
    if s.isascii():
        return True
    m = _SURROGATE_RE.search(s)
    if m is not None:
        cp = ord(m.group())
        what = f"byte 0x{cp - 0xDC00:02X}" if 0xDC80 <= cp <= 0xDCFF else f"U+{cp:04X}"
        raise AddressError(
            f"{role.syntax}: invalid UTF-8 ({what} cannot be decoded)",
            code=role.ctrl_code,
            enhanced=role.ctrl_enhanced,
        )
    for ch in _NON_ASCII_RE.findall(s):
        # Format, private-use, unassigned and separator characters (bidi overrides,
        # U+2028, NBSP...) make an address look different from what it is.
        if unicodedata.category(ch)[0] in "CZ" and ch not in _ALLOWED_FORMAT:
            raise AddressError(
                f"{role.syntax}: invisible or non-printable character {_show(ch)} in address",
                code=role.ctrl_code,
                enhanced=role.ctrl_enhanced,
            )
    return False


def _dot_string_problem(s: str, what: str) -> str:
    if not s:
        return f"empty {what}"
    if s[0] == ".":
        return f"{what} starts with a dot"
    if s[-1] == ".":
        return f"{what} ends with a dot"
    if ".." in s:
        return f"consecutive dots in {what}"
    for ch in s:
        if ch != "." and _ATEXT_RE.match(ch) is None:
            return f"invalid character {_show(ch)} in {what}"
    return f"invalid {what}"  # unreachable: the cases above are exhaustive


def _quoted_problem(local: str) -> str:
    last = len(local) - 1
    i = 1
    while i <= last:
        ch = local[i]
        if ch == "\\":
            if i == last:
                break
            if not " " <= local[i + 1] <= "~":
                return f"invalid escaped character {_show(local[i + 1])} in quoted local part"
            i += 2
        elif ch == '"':
            return "text after closing quote in local part"
        else:
            i += 1  # controls were refused earlier; everything else is qtextSMTP
    return "unterminated quoted local part"


def _check_local(local: str, role: _Role) -> None:
    if _octets(local) > MAX_LOCAL_OCTETS:
        raise _syntax(role, f"local part longer than {MAX_LOCAL_OCTETS} octets")
    if local.startswith('"'):
        if _QUOTED_RE.fullmatch(local) is None:
            raise _syntax(role, _quoted_problem(local))
    elif _DOT_STRING_RE.fullmatch(local) is None:
        raise _syntax(role, _dot_string_problem(local, "local part"))


def _domain_problem(domain: str) -> str:
    if domain.endswith("."):
        return "domain ends with a dot"
    if domain.startswith(".") or ".." in domain:
        return "empty label in domain"
    for ch in domain:
        if ch.isascii() and not (ch.isalnum() or ch in ".-"):
            return f"invalid character {_show(ch)} in domain"
    for label in domain.split("."):
        if label.startswith("-"):
            return "domain label starts with a hyphen"
        if label.endswith("-"):
            return "domain label ends with a hyphen"
    return "invalid domain"  # unreachable: the cases above are exhaustive


def _check_literal(domain: str, role: _Role) -> None:
    if not domain.endswith("]") or len(domain) < 2:
        raise _syntax(role, "unterminated address literal (missing ']')")
    inner = domain[1:-1]
    if not inner.isascii():
        raise _syntax(role, "invalid address literal")
    if inner[:5].lower() == "ipv6:":
        v6 = inner[5:]
        try:
            if _IPV6_RE.fullmatch(v6) is None:
                raise ValueError(v6)
            ipaddress.IPv6Address(v6)
        except ValueError:
            raise _syntax(role, "invalid IPv6 address literal") from None
    elif ":" in inner:
        raise _syntax(role, "general address literals are not supported")
    else:
        try:
            if _IPV4_RE.fullmatch(inner) is None:
                raise ValueError(inner)
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise _syntax(role, "invalid IPv4 address literal") from None


def _check_domain(domain: str, role: _Role) -> None:
    if not domain:
        raise _syntax(role, "missing domain after '@'")
    if _octets(domain) > MAX_DOMAIN_OCTETS:
        raise _syntax(role, f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    if domain[0] == "[":
        _check_literal(domain, role)
        return
    if _DOMAIN_RE.fullmatch(domain) is None:
        raise _syntax(role, _domain_problem(domain))
    if len(domain) <= MAX_LABEL_OCTETS and domain.isascii() and "xn--" not in domain.lower():
        return
    for label in domain.split("."):
        if label.isascii():
            if len(label) > MAX_LABEL_OCTETS:
                raise _syntax(role, f"domain label longer than {MAX_LABEL_OCTETS} characters")
            if label[:4].lower() == "xn--":
                _check_a_label(label, role)
            continue
        for ch in label:
            # Letters, marks and digits only; this also refuses the ideographic full
            # stops (U+3002...) that UTS #46 would turn into dots.
            if ch >= "\x80" and unicodedata.category(ch)[0] not in "LMN":
                raise _syntax(role, f"invalid character {_show(ch)} in domain")
        if 4 + len(label.encode("punycode")) > MAX_LABEL_OCTETS:
            raise _syntax(role, f"domain label longer than {MAX_LABEL_OCTETS} octets as IDNA")
        _check_u_label(label, role)


def _idna_error(role: _Role, label: str, why: str) -> AddressError:
    """553 with the role's enhanced code: the mailbox name is not allowed (RFC 5321 4.2.2)."""
    return AddressError(f"{role.syntax}: domain label {_snippet(label)} is not valid IDNA2008 ({why})",
                        code=553, enhanced=role.enhanced)


def _check_u_label(label: str, role: _Role) -> None:
    """A non-ASCII label must be an IDNA2008 U-label exactly as sent (RFC 6531 section 3.3).

    The ``idna`` package implements IDNA2008 (RFC 5891-5893: PVALID code points, CONTEXTJ/O,
    the bidi rule, NFC, no leading combining mark). No UTS #46 mapping is applied: the
    address is forwarded byte for byte as validated, so a label that would need mapping
    (fullwidth letters, upper case, compatibility characters such as U+216B or U+FB01) is
    refused, and the reply names the mapped form when there is one.
    """
    try:
        idna.alabel(label)
    except (idna.IDNAError, UnicodeError) as exc:
        why = _idna_reason(exc)
        try:
            mapped = idna.uts46_remap(label, std3_rules=True, transitional=False)
            if mapped != label:
                idna.alabel(mapped)
                why += f"; UTS #46 would map it to {_snippet(mapped)}: send that"
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
        raise _idna_error(role, label, why) from None


def _check_a_label(label: str, role: _Role) -> None:
    """An ``xn--`` label must decode to a valid U-label and encode back to itself (RFC 5891 5.4)."""
    try:
        u_label = idna.ulabel(label.lower())
        if idna.alabel(u_label).decode("ascii") != label.lower():
            raise idna.IDNAError("not the canonical A-label of its U-label")
    except (idna.IDNAError, UnicodeError) as exc:
        raise _idna_error(role, label, _idna_reason(exc)) from None


def _idna_reason(exc: Exception) -> str:
    """idna's message, printable ASCII (it quotes the label, which the reply shows already)."""
    text = str(exc) or type(exc).__name__
    text = re.sub(r" of '[^']*'| in '[^']*'| \('[^']*'\)", "", text)
    return "".join(c if " " <= c <= "~" else f"<U+{ord(c):04X}>" for c in text)


def _address_problem(text: object, local: object, domain: object) -> str:
    """Why these are not the parts of a valid :class:`Address`, or ""."""
    if not (isinstance(text, str) and isinstance(local, str) and isinstance(domain, str)):
        return "text, local and domain must be str"
    for part in (text, local, domain):
        bad = _CTRL_RE.search(part)
        if bad is not None:
            what = _show(bad.group())
            return f"control character {what} (CR, LF, NUL and other controls are never allowed)"
    if not text:
        return "" if not local and not domain else "the null path has empty local and domain"
    if not domain:
        ok = text == local and text.isascii() and text.lower() == "postmaster"
        return "" if ok else "missing domain (expected local-part@domain)"
    if text != f"{local}@{domain}":
        return "text is not local@domain"
    try:
        _check_characters(text, _BARE)
        _check_local(local, _BARE)
        _check_domain(domain, _BARE)
    except AddressError as err:
        return err.text.removeprefix(f"{_BARE.syntax}: ")
    return ""  # the whole path's limit is the parsers' (and the MTA's) to enforce


def _check_route(route: str, role: _Role) -> None:
    """Validate (then drop) an RFC 5321 source route such as ``@a.example,@b.example:``."""
    for hop in route[:-1].split(","):
        ok = hop.startswith("@") and not hop.startswith("@[")
        if ok:
            try:
                _check_domain(hop[1:], role)
            except AddressError:
                ok = False
        if not ok:
            raise _syntax(role, "invalid source route")


def _mailbox(local: str, domain: str | None, role: _Role, *, allow_postmaster: bool) -> Address:
    """The address of parts whose characters the caller checked (:func:`_check_characters`)."""
    if domain is None:
        if allow_postmaster and local.isascii() and local.lower() == "postmaster":
            return Address._checked(local, local, "")
        raise _syntax(role, "missing domain (expected local-part@domain)")
    _check_local(local, role)
    _check_domain(domain, role)
    return Address._checked(f"{local}@{domain}", local, domain)


_NULL: Final = Address("", "", "")


def _parse_params(tail: str, role: _Role) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in tail.split(" "):
        if not item:
            continue
        m = _PARAM_RE.fullmatch(item)
        if m is None:
            raise _param_error(role, f"invalid parameter {_snippet(item)}")
        key = m.group("key").upper()
        value: str | None = m.group("value")
        if value is not None and _PARAM_VALUE_RE.fullmatch(value) is None:
            if not value:
                raise _param_error(role, f"empty value for parameter {key}")
            raise _param_error(role, f"invalid character in value of parameter {key}")
        if key in params:
            raise _param_error(role, f"duplicate parameter {key}")
        params[key] = value
    return params


def _check_mail_params(params: dict[str, str | None]) -> None:
    """Values the proxy itself depends on; unknown keywords are left to the caller."""
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        raise _param_error(_MAIL, "SMTPUTF8 does not take a value")
    if "BODY" in params:
        body = params["BODY"]
        if body is None or not body.isascii() or body.upper() not in _BODY_VALUES:
            raise _param_error(_MAIL, "BODY must be 7BIT or 8BITMIME")
    if "SIZE" in params:
        size = params["SIZE"]
        if size is None or _SIZE_RE.fullmatch(size) is None:
            raise _param_error(
                _MAIL, f"SIZE must be a decimal number of at most {MAX_SIZE_DIGITS} digits"
            )


def _parse_path_argument(
    arg: str, keyword: str, role: _Role, *, smtputf8_enabled: bool, is_mail: bool
) -> PathArgument:
    verb = "MAIL" if is_mail else "RCPT"
    ascii_only = _check_characters(arg, role)
    if not ascii_only and not smtputf8_enabled:
        raise _utf8_error(role, "non-ASCII address requires SMTPUTF8")
    head = arg[: len(keyword)]
    rest = arg[len(keyword) :].lstrip(" ")
    if not (head.isascii() and head.upper() == keyword) or not rest:
        raise AddressError(
            f"Syntax: {verb} {keyword}<address> [parameters]", code=501, enhanced="5.5.4"
        )

    route: str | None = None
    if rest[0] == "<":
        m = _ANGLE_PATH_RE.match(rest)
        if m is None:
            end = rest.find(">")
            if end < 0:
                raise _syntax(role, "missing '>' at end of address")
            inner = rest[1:end]
            if "<" in inner:
                raise _syntax(role, "unexpected '<' in address")
            if " " in inner:
                raise _syntax(role, "space in address (allowed only in a quoted local part)")
            raise _syntax(role, "malformed address")
        route, local, domain = m.group("route", "local", "domain")
        path_len = m.end()
        path = rest[:path_len]
        tail = rest[path_len:]
        if tail and tail[0] != " ":
            raise _syntax(role, "unexpected text after '>'")
    else:
        # Lenient like Postfix: a bare mailbox, ending at the first space.
        token, _, tail = rest.partition(" ")
        if "<" in token or ">" in token:
            raise _syntax(role, "unbalanced angle brackets")
        mb = _MAILBOX_RE.fullmatch(token)
        assert mb is not None  # the pattern matches every string
        local, domain = mb.group("local", "domain")
        path = f"<{token}>"

    if route is not None:
        _check_route(route, role)
    if not local and domain is None:
        if route is not None:
            raise _syntax(role, "source route without a mailbox")
        if not is_mail:
            raise AddressError(
                f"{role.syntax}: null address <> is not a valid recipient",
                code=501,
                enhanced="5.1.3",
            )
        address = _NULL
    else:
        address = _mailbox(local, domain, role, allow_postmaster=not is_mail)
    # After the part checks, so that the reply names the most specific limit.
    if _octets(path) > MAX_PATH_OCTETS:
        raise _syntax(role, f"address longer than {MAX_PATH_OCTETS} octets")

    params = _parse_params(tail, role) if tail else {}
    if is_mail:
        _check_mail_params(params)
        if not ascii_only and "SMTPUTF8" not in params:
            raise _utf8_error(role, "non-ASCII address requires the SMTPUTF8 parameter")
    return PathArgument(address, params)


def parse_mail_from(arg: str, *, smtputf8_enabled: bool) -> PathArgument:
    """Parse ``FROM:<reverse-path> [params]``; non-ASCII needs SMTPUTF8 offered *and* sent."""
    return _parse_path_argument(
        arg, "FROM:", _MAIL, smtputf8_enabled=smtputf8_enabled, is_mail=True
    )


def parse_rcpt_to(arg: str, *, smtputf8_enabled: bool) -> PathArgument:
    """Parse ``TO:<forward-path> [params]``; whether the transaction is SMTPUTF8 is the
    caller's check, so non-ASCII only needs ``smtputf8_enabled``."""
    return _parse_path_argument(arg, "TO:", _RCPT, smtputf8_enabled=smtputf8_enabled, is_mail=False)


def parse_mailbox(text: str, *, allow_utf8: bool) -> Address:
    """Validate a bare ``local@domain`` (config, plugins) with the same rules as the wire."""
    ascii_only = _check_characters(text, _BARE)
    if not ascii_only and not allow_utf8:
        raise _utf8_error(_BARE, "non-ASCII address requires SMTPUTF8")
    if not text:
        raise _syntax(_BARE, "empty address")
    m = _MAILBOX_RE.fullmatch(text)
    assert m is not None  # the pattern matches every string
    local, domain = m.group("local", "domain")
    address = _mailbox(local, domain, _BARE, allow_postmaster=False)
    if _octets(text) + 2 > MAX_PATH_OCTETS:  # it must still fit in "<...>" on the wire
        raise _syntax(_BARE, f"address longer than {MAX_PATH_OCTETS - 2} octets")
    return address
