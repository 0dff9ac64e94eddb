"""Tests for smtpproxy.addresses: the strict, lossless MAIL/RCPT argument parser."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy import Transaction, hookimpl
from smtpproxy.addresses import (
    Address,
    AddressError,
    PathArgument,
    parse_mail_from,
    parse_mailbox,
    parse_rcpt_to,
)
from tests.conftest import ProxyFactory, Sink, Talk, maildir_messages, port_of

Parser = Callable[..., PathArgument]
MAIL = parse_mail_from
RCPT = parse_rcpt_to

_CTRL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_REPLY_TEXT_RE = re.compile(r"[ -~]+")  # one line of printable ASCII
_ENHANCED_RE = re.compile(r"5\.[0-9]\.[0-9]")


def _assert_good_error(err: AddressError) -> None:
    assert err.code in (501, 553, 555)
    assert _ENHANCED_RE.fullmatch(err.enhanced)
    assert _REPLY_TEXT_RE.fullmatch(err.text), err.text
    assert str(err) == err.text


# --------------------------------------------------------------------------- valid input

VALID: list[tuple[Parser, str, bool, str, str, str, dict[str, str | None]]] = [
    # parser, arg, smtputf8_enabled, text, local, domain, params
    (MAIL, "FROM:<alice@example.com>", False, "alice@example.com", "alice", "example.com", {}),
    (MAIL, "from:<Alice@Example.COM>", False, "Alice@Example.COM", "Alice", "Example.COM", {}),
    (MAIL, "FROM:<a.b+tag@example.com>", False,
     "a.b+tag@example.com", "a.b+tag", "example.com", {}),
    (MAIL, "FROM:<!#$%&'*+-/=?^_`{|}~@x.example>", False,
     "!#$%&'*+-/=?^_`{|}~@x.example", "!#$%&'*+-/=?^_`{|}~", "x.example", {}),
    (MAIL, 'FROM:<"john doe"@example.com>', False,
     '"john doe"@example.com', '"john doe"', "example.com", {}),
    (MAIL, r'FROM:<"a\"b\\c"@example.com>', False,
     r'"a\"b\\c"@example.com', r'"a\"b\\c"', "example.com", {}),
    (MAIL, 'FROM:<"a>b@c <d>"@example.com> SIZE=5', False,
     '"a>b@c <d>"@example.com', '"a>b@c <d>"', "example.com", {"SIZE": "5"}),
    (MAIL, 'FROM:<""@example.com>', False, '""@example.com', '""', "example.com", {}),
    (MAIL, "FROM:<user@[192.0.2.1]>", False, "user@[192.0.2.1]", "user", "[192.0.2.1]", {}),
    (MAIL, "FROM:<user@[IPv6:2001:db8::1]>", False,
     "user@[IPv6:2001:db8::1]", "user", "[IPv6:2001:db8::1]", {}),
    (MAIL, "FROM:<user@[ipv6:::ffff:192.0.2.1]>", False,
     "user@[ipv6:::ffff:192.0.2.1]", "user", "[ipv6:::ffff:192.0.2.1]", {}),
    (MAIL, "FROM:<@a.example,@b.example:user@c.example>", False,
     "user@c.example", "user", "c.example", {}),
    (MAIL, "FROM:<x@xn--bcher-kva.example>", False,
     "x@xn--bcher-kva.example", "x", "xn--bcher-kva.example", {}),
    (MAIL, "FROM:<x@1.2.3.4>", False, "x@1.2.3.4", "x", "1.2.3.4", {}),
    (MAIL, "FROM:<x@a-b.c--d.example>", False, "x@a-b.c--d.example", "x", "a-b.c--d.example", {}),
    (MAIL, "FROM:<>", False, "", "", "", {}),
    (MAIL, "FROM:<> SIZE=0", False, "", "", "", {"SIZE": "0"}),
    (MAIL, "FROM:<alice@example.com> SIZE=1000 BODY=8BITMIME", False,
     "alice@example.com", "alice", "example.com", {"SIZE": "1000", "BODY": "8BITMIME"}),
    (MAIL, "FROM:<a@example.com> size=10 body=7bit", False,
     "a@example.com", "a", "example.com", {"SIZE": "10", "BODY": "7bit"}),
    (MAIL, "FROM:<a@example.com>   RET=HDRS  ENVID=QQ+2Bx ", False,
     "a@example.com", "a", "example.com", {"RET": "HDRS", "ENVID": "QQ+2Bx"}),
    (MAIL, "FROM:<a@example.com> AUTH=<> X-Y-1", False,
     "a@example.com", "a", "example.com", {"AUTH": "<>", "X-Y-1": None}),
    (MAIL, "FROM:<a@example.com> SIZE=" + "9" * 20, False,
     "a@example.com", "a", "example.com", {"SIZE": "9" * 20}),
    # The parser does not judge support: SMTPUTF8 is returned even if not offered.
    (MAIL, "FROM:<a@example.com> SMTPUTF8", False,
     "a@example.com", "a", "example.com", {"SMTPUTF8": None}),
    (MAIL, "FROM: <a@b>", False, "a@b", "a", "b", {}),
    (MAIL, "FROM:   <a@b> SIZE=1", False, "a@b", "a", "b", {"SIZE": "1"}),
    (MAIL, "FROM:a@b", False, "a@b", "a", "b", {}),
    (MAIL, "FROM: a@b SIZE=12  BODY=7BIT", False, "a@b", "a", "b", {"SIZE": "12", "BODY": "7BIT"}),
    (MAIL, 'FROM:"a@b"@c', False, '"a@b"@c', '"a@b"', "c", {}),
    # UTF-8 (RFC 6531)
    (MAIL, "FROM:<jörg@exämple.de> SMTPUTF8", True,
     "jörg@exämple.de", "jörg", "exämple.de", {"SMTPUTF8": None}),
    (MAIL, "FROM:<用户@例子.广告> SMTPUTF8 BODY=8BITMIME", True,
     "用户@例子.广告", "用户", "例子.广告", {"SMTPUTF8": None, "BODY": "8BITMIME"}),
    (MAIL, 'FROM:<"ü x"@example.com> SMTPUTF8', True,
     '"ü x"@example.com', '"ü x"', "example.com", {"SMTPUTF8": None}),
    (MAIL, "FROM:<a@b.example> SMTPUTF8 X=é", True, "a@b.example", "a", "b.example",
     {"SMTPUTF8": None, "X": "é"}),
    (MAIL, "FROM:<a@b.example>", True, "a@b.example", "a", "b.example", {}),
    (RCPT, "TO:<bob@example.org>", False, "bob@example.org", "bob", "example.org", {}),
    (RCPT, "to:<Postmaster>", False, "Postmaster", "Postmaster", "", {}),
    (RCPT, "TO:<POSTMASTER>", False, "POSTMASTER", "POSTMASTER", "", {}),
    (RCPT, "TO:postmaster", False, "postmaster", "postmaster", "", {}),
    (RCPT, "TO:<postmaster@example.org>", False,
     "postmaster@example.org", "postmaster", "example.org", {}),
    (RCPT, "TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org", False,
     "bob@example.org", "bob", "example.org",
     {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob@example.org"}),
    (RCPT, "TO:<@relay.example:bob@example.org>", False,
     "bob@example.org", "bob", "example.org", {}),
    (RCPT, "TO: <bob@example.org>", False, "bob@example.org", "bob", "example.org", {}),
    (RCPT, "TO:bob@example.org NOTIFY=NEVER", False,
     "bob@example.org", "bob", "example.org", {"NOTIFY": "NEVER"}),
    (RCPT, "TO:<用户@例子.广告>", True, "用户@例子.广告", "用户", "例子.广告", {}),
    (RCPT, "TO:<δοκιμή@παράδειγμα.δοκιμή>", True,
     "δοκιμή@παράδειγμα.δοκιμή", "δοκιμή", "παράδειγμα.δοκιμή", {}),
]  # fmt: skip


ValidCase = tuple[Parser, str, bool, str, str, str, dict[str, str | None]]


@pytest.mark.parametrize("case", VALID, ids=[repr(case[1]) for case in VALID])
def test_valid(case: ValidCase) -> None:
    parser, arg, utf8, text, local, domain, params = case
    result = parser(arg, smtputf8_enabled=utf8)
    assert result.address == Address(text, local, domain)
    assert result.address.text == text
    assert result.address.local == local
    assert result.address.domain == domain
    assert result.params == params
    assert list(result.params) == list(params)  # order as written
    assert str(result.address) == text
    assert result.address.is_null == (text == "")
    assert result.address.needs_smtputf8 == (not text.isascii())


def test_limits_at_boundary_are_accepted() -> None:
    local = "a" * 64
    assert parse_mail_from(f"FROM:<{local}@x.example>", smtputf8_enabled=False).address.local == (
        local
    )
    label = "b" * 63
    assert parse_mail_from(f"FROM:<a@{label}.example>", smtputf8_enabled=False).address.domain == (
        f"{label}.example"
    )
    # The whole path "<a@DOMAIN>" may be 256 octets, so the domain at most 252.
    domain = ".".join(["c" * 62] * 4) + ".d"  # 62*4 + 3 + 2 = 253
    assert len(domain) == 253
    with pytest.raises(AddressError):
        parse_mail_from(f"FROM:<a@{domain}>", smtputf8_enabled=False)
    domain = domain[:-2] + "d"  # 252
    result = parse_mail_from(f"FROM:<a@{domain}>", smtputf8_enabled=False)
    assert result.address.domain == domain
    # 64 octets of UTF-8 (32 two-byte characters) is still fine.
    result = parse_mail_from(f"FROM:<{'ä' * 32}@x.example> SMTPUTF8", smtputf8_enabled=True)
    assert result.address.local == "ä" * 32


# ------------------------------------------------------------------------- invalid input

C1 = "\x85"
INVALID: list[tuple[Parser, str, bool, int, str, str]] = [
    # parser, arg, smtputf8_enabled, code, enhanced, fragment of the reply text
    # control characters anywhere
    (MAIL, "FROM:<a\r@b.example>", False, 501, "5.5.2", "control character U+000D"),
    (MAIL, "FROM:<a@b.example>\r\n", False, 501, "5.5.2", "control character"),
    (MAIL, "FROM:<a@b.example\n>", False, 501, "5.5.2", "control character U+000A"),
    (MAIL, "FROM:<a\x00@b.example>", False, 501, "5.5.2", "control character U+0000"),
    (MAIL, "FROM:\x00<a@b.example>", False, 501, "5.5.2", "control character"),
    (MAIL, "FROM:<a\t@b.example>", False, 501, "5.5.2", "control character U+0009"),
    (MAIL, "FROM:\t<a@b.example>", False, 501, "5.5.2", "control character"),
    (MAIL, "FROM:<a@b.example>\tSIZE=1", False, 501, "5.5.2", "control character"),
    (MAIL, "FROM:<a@b.example> SIZE=1\x00", False, 501, "5.5.2", "control character"),
    (MAIL, 'FROM:<"a\x7f"@b.example>', False, 501, "5.5.2", "control character U+007F"),
    (MAIL, f"FROM:<a{C1}@b.example> SMTPUTF8", True, 501, "5.5.2", "control character U+0085"),
    (RCPT, "TO:<b@c.example\r>", False, 501, "5.5.2", "control character"),
    (RCPT, "TO:<b@c.example>\n", True, 501, "5.5.2", "control character"),
    # invisible / undecodable characters
    (MAIL, "FROM:<a\udcff@b.example> SMTPUTF8", True, 501, "5.5.2", "invalid UTF-8 (byte 0xFF"),
    (MAIL, "FROM:<a\udcc3@b.example>", False, 501, "5.5.2", "invalid UTF-8"),
    (RCPT, "TO:<a@b\udc80.example>", True, 501, "5.5.2", "invalid UTF-8"),
    (MAIL, "FROM:<a\u202eb@c.example> SMTPUTF8", True, 501, "5.5.2", "U+202E"),
    (MAIL, "FROM:<a\u2028b@c.example> SMTPUTF8", True, 501, "5.5.2", "U+2028"),
    (MAIL, "FROM:<a\u00a0b@c.example> SMTPUTF8", True, 501, "5.5.2", "U+00A0"),
    (MAIL, "FROM:<a@b.example> SMTPUTF8 X=\ufeff", True, 501, "5.5.2", "U+FEFF"),
    # brackets and overall shape
    (MAIL, "FROM:<a@b.example", False, 501, "5.1.7", "missing '>'"),
    (MAIL, "FROM:a@b.example>", False, 501, "5.1.7", "unbalanced angle brackets"),
    (MAIL, "FROM:<a@b.example>>", False, 501, "5.1.7", "unexpected text after '>'"),
    (MAIL, "FROM:<a@b.example>SIZE=1", False, 501, "5.1.7", "unexpected text after '>'"),
    (MAIL, "FROM:<<a@b.example>>", False, 501, "5.1.7", "unexpected '<'"),
    (MAIL, "FROM:<a b@c.example>", False, 501, "5.1.7", "space in address"),
    (MAIL, "FROM:<a@b.example> <c@d.example>", False, 501, "5.5.4", "invalid parameter"),
    (RCPT, "TO:<b@c.example", False, 501, "5.1.3", "missing '>'"),
    # local part
    (MAIL, "FROM:<a..b@c.example>", False, 501, "5.1.7", "consecutive dots"),
    (MAIL, "FROM:<.a@c.example>", False, 501, "5.1.7", "starts with a dot"),
    (MAIL, "FROM:<a.@c.example>", False, 501, "5.1.7", "ends with a dot"),
    (MAIL, "FROM:<@c.example>", False, 501, "5.1.7", "empty local part"),
    (MAIL, "FROM:<a,b@c.example>", False, 501, "5.1.7", "invalid character ',' in local part"),
    (MAIL, 'FROM:<a"b@c.example>', False, 501, "5.1.7", "invalid character '\"'"),
    (MAIL, 'FROM:<"a@c.example>', False, 501, "5.1.7", "unterminated quoted local part"),
    (MAIL, 'FROM:<"a"b@c.example>', False, 501, "5.1.7", "text after closing quote"),
    (MAIL, 'FROM:"a\\é"@c.example SMTPUTF8', True, 501, "5.1.7", "invalid escaped character"),
    (MAIL, "FROM:<" + "a" * 65 + "@c.example>", False, 501, "5.1.7", "longer than 64 octets"),
    (MAIL, "FROM:<" + "ä" * 33 + "@c.example> SMTPUTF8", True, 501, "5.1.7", "64 octets"),
    (RCPT, "TO:<" + "a" * 65 + "@c.example>", False, 501, "5.1.3", "longer than 64 octets"),
    # domain
    (MAIL, "FROM:<a@example.com.>", False, 501, "5.1.7", "domain ends with a dot"),
    (MAIL, "FROM:<a@.example.com>", False, 501, "5.1.7", "empty label"),
    (MAIL, "FROM:<a@ex..com>", False, 501, "5.1.7", "empty label"),
    (MAIL, "FROM:<a@-example.com>", False, 501, "5.1.7", "starts with a hyphen"),
    (MAIL, "FROM:<a@example-.com>", False, 501, "5.1.7", "ends with a hyphen"),
    (MAIL, "FROM:<a@exa_mple.com>", False, 501, "5.1.7", "invalid character '_' in domain"),
    (MAIL, "FROM:<a@b@c.example>", False, 501, "5.1.7", "invalid character '@' in domain"),
    (MAIL, "FROM:<a@>", False, 501, "5.1.7", "missing domain"),
    (MAIL, "FROM:<a>", False, 501, "5.1.7", "missing domain"),
    (MAIL, "FROM:<postmaster>", False, 501, "5.1.7", "missing domain"),
    (RCPT, "TO:<bob>", False, 501, "5.1.3", "missing domain"),
    (MAIL, "FROM:<a@" + "b" * 64 + ".example>", False, 501, "5.1.7", "longer than 63"),
    (MAIL, "FROM:<a@" + ("b" * 60 + ".") * 5 + "example>", False, 501, "5.1.7", "255 octets"),
    (MAIL, "FROM:<" + "a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example>", False,
     501, "5.1.7", "longer than 256 octets"),
    (RCPT, "TO:<@x.example:" + "a" * 64 + "@" + ("b" * 60 + ".") * 3 + "c>", False,
     501, "5.1.3", "256 octets"),
    (MAIL, "FROM:<a@例え。jp> SMTPUTF8", True, 501, "5.1.7", "U+3002"),
    (MAIL, "FROM:<a@ex\u00e4mple\u2713.de> SMTPUTF8", True, 501, "5.1.7", "U+2713"),
    (MAIL, "FROM:<a@" + "ä" * 60 + ".de> SMTPUTF8", True, 501, "5.1.7", "as IDNA"),
    # address literals
    (MAIL, "FROM:<a@[300.1.1.1]>", False, 501, "5.1.7", "invalid IPv4"),
    (MAIL, "FROM:<a@[192.0.2]>", False, 501, "5.1.7", "invalid IPv4"),
    (MAIL, "FROM:<a@[192.0.02.1]>", False, 501, "5.1.7", "invalid IPv4"),
    (MAIL, "FROM:<a@[]>", False, 501, "5.1.7", "invalid IPv4"),
    (MAIL, "FROM:<a@[192.0.2.1>", False, 501, "5.1.7", "unterminated address literal"),
    (MAIL, "FROM:<a@[192.0.2.1]x>", False, 501, "5.1.7", "unterminated address literal"),
    (MAIL, "FROM:<a@[IPv6:2001:db8::g]>", False, 501, "5.1.7", "invalid IPv6"),
    (MAIL, "FROM:<a@[IPv6:fe80::1%eth0]>", False, 501, "5.1.7", "invalid IPv6"),
    (MAIL, "FROM:<a@[IPv6:1:2:3:4:5:6:7:8:9]>", False, 501, "5.1.7", "invalid IPv6"),
    (MAIL, "FROM:<a@[2001:db8::1]>", False, 501, "5.1.7", "general address literals"),
    (MAIL, "FROM:<a@[x-tag:foo]>", False, 501, "5.1.7", "general address literals"),
    # source routes
    (MAIL, "FROM:<@a.example:>", False, 501, "5.1.7", "source route without a mailbox"),
    (MAIL, "FROM:<@a_b:c@d.example>", False, 501, "5.1.7", "invalid source route"),
    (MAIL, "FROM:<@a.example,b.example:c@d.example>", False, 501, "5.1.7", "invalid source route"),
    (MAIL, "FROM:<@[192.0.2.1]:c@d.example>", False, 501, "5.1.7", "invalid source route"),
    # parameters
    (MAIL, "FROM:<a@b.example> SIZE=", False, 501, "5.5.4", "empty value for parameter SIZE"),
    (MAIL, "FROM:<a@b.example> X=", False, 501, "5.5.4", "empty value for parameter X"),
    (MAIL, "FROM:<a@b.example> SIZE=1 size=2", False, 501, "5.5.4", "duplicate parameter SIZE"),
    (MAIL, "FROM:<a@b.example> =x", False, 501, "5.5.4", "invalid parameter"),
    (MAIL, "FROM:<a@b.example> -X=1", False, 501, "5.5.4", "invalid parameter"),
    (MAIL, "FROM:<a@b.example> X_Y=1", False, 501, "5.5.4", "invalid parameter"),
    (MAIL, "FROM:<a@b.example> X=a=b", False, 501, "5.5.4", "invalid character in value"),
    (MAIL, "FROM:<a@b.example> SIZE=abc", False, 501, "5.5.4", "SIZE must be"),
    (MAIL, "FROM:<a@b.example> SIZE=-1", False, 501, "5.5.4", "SIZE must be"),
    (MAIL, "FROM:<a@b.example> SIZE=" + "9" * 21, False, 501, "5.5.4", "at most 20 digits"),
    (MAIL, "FROM:<a@b.example> SIZE", False, 501, "5.5.4", "SIZE must be"),
    (MAIL, "FROM:<a@b.example> SMTPUTF8 SIZE=\u0661\u0662", True, 501, "5.5.4", "SIZE must be"),
    (MAIL, "FROM:<a@b.example> BODY=foo", False, 501, "5.5.4", "BODY must be 7BIT or 8BITMIME"),
    (MAIL, "FROM:<a@b.example> BODY=BINARYMIME", False, 501, "5.5.4", "BODY must be"),
    (MAIL, "FROM:<a@b.example> BODY", False, 501, "5.5.4", "BODY must be"),
    (MAIL, "FROM:<a@b.example> SMTPUTF8 BODY=8b\u0131tm\u0131me", True, 501, "5.5.4", "BODY"),
    (MAIL, "FROM:<a@b.example> SMTPUTF8=x", False, 501, "5.5.4", "SMTPUTF8 does not take"),
    (RCPT, "TO:<b@c.example> NOTIFY=", False, 501, "5.5.4", "empty value"),
    (RCPT, "TO:<b@c.example> NOTIFY=NEVER notify=NEVER", False, 501, "5.5.4", "duplicate"),
    # null path, keyword
    (RCPT, "TO:<>", False, 501, "5.1.3", "null address"),
    (RCPT, "TO:<> NOTIFY=NEVER", False, 501, "5.1.3", "null address"),
    (MAIL, "FROM<a@b.example>", False, 501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]"),
    (MAIL, "<a@b.example>", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (MAIL, "FROM :<a@b.example>", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (MAIL, "TO:<a@b.example>", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (MAIL, "", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (MAIL, "FROM:", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (MAIL, "FROM:   ", False, 501, "5.5.4", "Syntax: MAIL FROM:"),
    (RCPT, "FROM:<a@b.example>", False, 501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]"),
    (RCPT, "TO<a@b.example>", False, 501, "5.5.4", "Syntax: RCPT TO:"),
    (RCPT, "TO:", False, 501, "5.5.4", "Syntax: RCPT TO:"),
    # non-ASCII without SMTPUTF8
    (MAIL, "FROM:<jörg@example.de> SMTPUTF8", False, 553, "5.6.7", "requires SMTPUTF8"),
    (MAIL, "FROM:<jörg@example.de>", True, 553, "5.6.7", "SMTPUTF8 parameter"),
    (MAIL, "FROM:<a@exämple.de>", True, 553, "5.6.7", "SMTPUTF8 parameter"),
    (MAIL, "FROM:<a@b.example> X=é", True, 553, "5.6.7", "SMTPUTF8"),
    (RCPT, "TO:<jörg@example.de>", False, 553, "5.6.7", "requires SMTPUTF8"),
    (RCPT, "TO:<a@例子.广告>", False, 553, "5.6.7", "requires SMTPUTF8"),
]  # fmt: skip


@pytest.mark.parametrize("case", INVALID, ids=[ascii(case[1])[:60] for case in INVALID])
def test_invalid(case: tuple[Parser, str, bool, int, str, str]) -> None:
    parser, arg, utf8, code, enhanced, fragment = case
    with pytest.raises(AddressError) as info:
        parser(arg, smtputf8_enabled=utf8)
    err = info.value
    assert (err.code, err.enhanced) == (code, enhanced), err.text
    assert fragment in err.text
    _assert_good_error(err)


def test_error_prefixes_name_the_role() -> None:
    with pytest.raises(AddressError, match=r"^Bad sender address syntax: "):
        parse_mail_from("FROM:<a..b@c>", smtputf8_enabled=False)
    with pytest.raises(AddressError, match=r"^Bad recipient address syntax: "):
        parse_rcpt_to("TO:<a..b@c>", smtputf8_enabled=False)
    with pytest.raises(AddressError, match=r"^Bad address syntax: "):
        parse_mailbox("a..b@c", allow_utf8=False)


def test_errors_never_echo_raw_input() -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_from("FROM:<a@b.example> \u00e9\u202e=1", smtputf8_enabled=False)
    _assert_good_error(info.value)
    with pytest.raises(AddressError) as info:
        parse_mail_from("FROM:<a@b.example> SMTPUTF8 \u00e9=1", smtputf8_enabled=True)
    assert "U+00E9" in info.value.text
    _assert_good_error(info.value)


def test_address_error_sanitises_its_text() -> None:
    err = AddressError("bad\r\nthing \u00e9")
    assert (err.code, err.enhanced) == (553, "5.1.3")
    assert err.text == "bad<U+000D><U+000A>thing <U+00E9>"
    assert isinstance(err, ValueError)
    err = AddressError("fine text", code=555, enhanced="5.5.4")
    assert (err.code, err.enhanced, err.text, str(err)) == (555, "5.5.4", "fine text", "fine text")


def test_address_value_object() -> None:
    a = Address("a@b", "a", "b")
    assert str(a) == "a@b"
    assert not a.is_null
    assert not a.needs_smtputf8
    assert Address("", "", "").is_null
    assert Address("ü@b", "ü", "b").needs_smtputf8
    with pytest.raises(AttributeError):
        a.text = "x"  # type: ignore[misc]


# -------------------------------------------------------------------------- parse_mailbox


@pytest.mark.parametrize(
    ("text", "utf8", "local", "domain"),
    [
        ("alice@example.com", False, "alice", "example.com"),
        ('"a b"@example.com', False, '"a b"', "example.com"),
        ('"a@b"@example.com', False, '"a@b"', "example.com"),
        ("a@[192.0.2.1]", False, "a", "[192.0.2.1]"),
        ("a@[IPv6:::1]", False, "a", "[IPv6:::1]"),
        ("jörg@exämple.de", True, "jörg", "exämple.de"),
    ],
)
def test_parse_mailbox_valid(text: str, utf8: bool, local: str, domain: str) -> None:
    assert parse_mailbox(text, allow_utf8=utf8) == Address(text, local, domain)


@pytest.mark.parametrize(
    ("text", "utf8", "code", "enhanced", "fragment"),
    [
        ("", False, 553, "5.1.3", "empty address"),
        ("postmaster", False, 553, "5.1.3", "missing domain"),
        ("<a@b.example>", False, 553, "5.1.3", "invalid character '<'"),
        ("a b@c.example", False, 553, "5.1.3", "invalid character space"),
        ("a@b.example ", False, 553, "5.1.3", "invalid character space in domain"),
        ("a@b.example\r\n", False, 553, "5.1.3", "control character"),
        ("a\x00@b.example", True, 553, "5.1.3", "control character"),
        ("a\udcff@b.example", True, 553, "5.1.3", "invalid UTF-8"),
        ("jörg@example.de", False, 553, "5.6.7", "requires SMTPUTF8"),
        ("a@b.example.", False, 553, "5.1.3", "ends with a dot"),
        ("a" * 65 + "@b.example", False, 553, "5.1.3", "64 octets"),
        ("a@" + "b." * 127 + "c", False, 553, "5.1.3", "254 octets"),
    ],
)
def test_parse_mailbox_invalid(
    text: str, utf8: bool, code: int, enhanced: str, fragment: str
) -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox(text, allow_utf8=utf8)
    assert (info.value.code, info.value.enhanced) == (code, enhanced)
    assert fragment in info.value.text
    _assert_good_error(info.value)


# ---------------------------------------------------------------------------- properties

_NASTY = [
    *'<>@".\\ :,;[]()=-_+!#~%',
    "\x00", "\r", "\n", "\t", "\x7f", "\x85", "\x9f", "\u00a0", "\u00ad", "\u200d", "\u202e",
    "\u2028", "\u3002", "\ufeff", "\uffff", "\udcff", "\udc80", "\ud800", "é", "ß", "\u0131",
    "\u017f", "\u212a", "用", "\U0001f600",
]  # fmt: skip
_chars = st.one_of(
    st.sampled_from(_NASTY),
    st.sampled_from(string.ascii_letters + string.digits),
    st.characters(),
)
_nasty_text = st.text(_chars, max_size=24)

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_atom = st.text(st.sampled_from(_ATEXT), min_size=1, max_size=10)
_dot_atom = st.lists(_atom, min_size=1, max_size=5).map(".".join)
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=5).map(".".join)

_letters = st.characters(categories=["L"])
_u_atom = st.text(st.one_of(st.sampled_from(_ATEXT), _letters), min_size=1, max_size=6)
_u_local = (
    st.lists(_u_atom, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda s: len(s.encode("utf-8")) <= 64)
)
# IDNA2008 PVALID letters of left-to-right scripts (no bidi rule, no CONTEXTJ/O).
_PVALID = "äöüßéèçñøåœæğışčřžłąęёжщдяあいうアイ中文한국αβγ"
_u_label = st.text(st.sampled_from(string.ascii_lowercase + _PVALID), min_size=1,
                   max_size=6).filter(lambda s: not s.isascii())  # fmt: skip
_u_domain = st.lists(_u_label, min_size=1, max_size=4).map(".".join)

_quoted = st.text(
    st.one_of(st.sampled_from(' !#<>@,:;[]."\\'), st.sampled_from(string.ascii_letters)),
    max_size=12,
).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')


@st.composite
def _command_args(draw: st.DrawFn, keyword: str) -> str:
    """MAIL/RCPT-shaped arguments, mostly well-formed, sometimes hit by a hostile character:
    that way a good share of the examples is accepted and the success-path properties run."""
    other = "TO:" if keyword == "FROM:" else "FROM:"
    kw = draw(
        st.sampled_from(
            [keyword] * 6 + [keyword.lower(), f"{keyword}  ", f"{keyword[:-1]} :", other]
        )
    )
    opening, closing = draw(
        st.sampled_from(
            [("<", ">")] * 8 + [("", ""), ("<", ""), ("", ">"), ("<<", ">"), ("<", ">>")]
        )
    )
    route = draw(st.sampled_from([""] * 6 + ["@a.example:", "@a.example,@b.example:", "@x..y:"]))
    local = draw(
        st.one_of(_dot_atom, _dot_atom, _u_local, _quoted, st.sampled_from(["postmaster", ""]))
    )
    literals = ["[192.0.2.1]", "[IPv6:::1]", "[IPv6:::ffff:1.2.3.4]", "[1.2.3]", "[t:x]", ""]
    domain = draw(st.one_of(_domain, _domain, _u_domain, st.sampled_from(literals)))
    at = draw(st.sampled_from(["@"] * 8 + ["", "@@"]))
    params = draw(
        st.sampled_from(
            [
                "",
                "",
                " SIZE=10",
                " SMTPUTF8",
                " SMTPUTF8 SIZE=1",
                " BODY=8BITMIME  SMTPUTF8 ",
                " X=",
                " AUTH=<>",
            ]
        )
    )
    arg = kw + opening + route + local + at + domain + closing + params
    mutations = draw(st.sampled_from([0, 0, 0, 1, 1, 3]))
    for _ in range(mutations):  # splice in hostile characters or text anywhere
        pos = draw(st.integers(0, len(arg)))
        arg = arg[:pos] + draw(st.one_of(_chars, _nasty_text)) + arg[pos:]
    return arg


def _reserialised(keyword: str, address: Address) -> str:
    return f"{keyword}<{address.text}>" + (" SMTPUTF8" if address.needs_smtputf8 else "")


def _check_accepted(result: PathArgument, arg: str) -> None:
    address = result.address
    assert isinstance(address, Address)
    # The parsers build it without the constructor's checks (they just made the same ones):
    # the constructor accepts it all the same.
    assert Address(address.text, address.local, address.domain) == address
    assert address.text in arg  # a verbatim slice of what the client sent
    assert address.local in arg
    assert address.domain in arg
    assert not _CTRL_RE.search(address.text)
    for ch in "\r\n\x00":
        assert ch not in address.text
    assert not any("\ud800" <= ch <= "\udfff" for ch in address.text)
    # Space and angle brackets may appear only inside a quoted local part.
    if address.domain or address.text != address.local:
        assert address.text == f"{address.local}@{address.domain}"
    for ch in " <>":
        assert ch not in address.domain
        if ch in address.local:
            assert address.local.startswith('"')
            assert address.local.endswith('"')
    for key, value in result.params.items():
        assert re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", key)
        if value is not None:
            assert value
            assert value in arg
            assert not _CTRL_RE.search(value)
            assert " " not in value
            assert "=" not in value


@settings(deadline=None, max_examples=300)
@given(arg=st.one_of(_command_args("FROM:"), _nasty_text, st.text()), utf8=st.booleans())
def test_fuzz_mail_from(arg: str, utf8: bool) -> None:
    try:
        result = parse_mail_from(arg, smtputf8_enabled=utf8)
    except AddressError as err:
        _assert_good_error(err)
        return
    _check_accepted(result, arg)
    address = result.address
    if address.needs_smtputf8:
        assert utf8
        assert "SMTPUTF8" in result.params
    again = parse_mail_from(_reserialised("FROM:", address), smtputf8_enabled=True)
    assert again.address == address
    assert again.params == ({"SMTPUTF8": None} if address.needs_smtputf8 else {})
    if not address.is_null:
        assert parse_mailbox(address.text, allow_utf8=True) == address
        assert parse_mailbox(address.text, allow_utf8=utf8) == address


@settings(deadline=None, max_examples=300)
@given(arg=st.one_of(_command_args("TO:"), _nasty_text, st.text()), utf8=st.booleans())
def test_fuzz_rcpt_to(arg: str, utf8: bool) -> None:
    try:
        result = parse_rcpt_to(arg, smtputf8_enabled=utf8)
    except AddressError as err:
        _assert_good_error(err)
        return
    _check_accepted(result, arg)
    address = result.address
    assert not address.is_null
    if address.needs_smtputf8:
        assert utf8
    again = parse_rcpt_to(f"TO:<{address.text}>", smtputf8_enabled=True)
    assert again.address == address
    if address.domain:
        assert parse_mail_from(_reserialised("FROM:", address), smtputf8_enabled=True) == (
            PathArgument(address, {"SMTPUTF8": None} if address.needs_smtputf8 else {})
        )
        assert parse_mailbox(address.text, allow_utf8=True) == address
    else:
        assert address.local.lower() == "postmaster"


@settings(deadline=None, max_examples=200)
@given(text=st.one_of(_nasty_text, st.text()), utf8=st.booleans())
def test_fuzz_parse_mailbox(text: str, utf8: bool) -> None:
    try:
        address = parse_mailbox(text, allow_utf8=utf8)
    except AddressError as err:
        _assert_good_error(err)
        return
    assert address.text == text
    assert Address(address.text, address.local, address.domain) == address  # built unchecked, valid
    assert address.domain
    assert parse_mail_from(_reserialised("FROM:", address), smtputf8_enabled=True).address == (
        address
    )


@settings(deadline=None)
@given(local=_dot_atom, domain=_domain)
def test_valid_dot_atoms_are_kept_exactly(local: str, domain: str) -> None:
    expected = Address(f"{local}@{domain}", local, domain)
    assert parse_mail_from(f"FROM:<{local}@{domain}>", smtputf8_enabled=False) == PathArgument(
        expected, {}
    )
    assert parse_rcpt_to(f"TO:<{local}@{domain}> NOTIFY=NEVER", smtputf8_enabled=False) == (
        PathArgument(expected, {"NOTIFY": "NEVER"})
    )
    assert parse_mail_from(f"FROM:{local}@{domain}", smtputf8_enabled=False).address == expected
    assert parse_mailbox(f"{local}@{domain}", allow_utf8=False) == expected


@settings(deadline=None)
@given(local=_u_local, domain=_u_domain)
def test_valid_utf8_dot_atoms_are_kept_exactly(local: str, domain: str) -> None:
    expected = Address(f"{local}@{domain}", local, domain)
    result = parse_mail_from(f"FROM:<{local}@{domain}> SMTPUTF8", smtputf8_enabled=True)
    assert result == PathArgument(expected, {"SMTPUTF8": None})
    assert parse_rcpt_to(f"TO:<{local}@{domain}>", smtputf8_enabled=True).address == expected
    assert parse_mailbox(f"{local}@{domain}", allow_utf8=True) == expected


@settings(deadline=None)
@given(local=_quoted, domain=_domain)
def test_valid_quoted_local_parts_are_kept_exactly(local: str, domain: str) -> None:
    expected = Address(f"{local}@{domain}", local, domain)
    result = parse_mail_from(f"FROM:<{local}@{domain}> SIZE=1", smtputf8_enabled=False)
    assert result == PathArgument(expected, {"SIZE": "1"})
    assert parse_mailbox(f"{local}@{domain}", allow_utf8=False) == expected


# --------------------------------------------------------------------------- IDNA2008 (issue 14)

NOT_IDNA2008 = [
    # domain, what the reply must say
    ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com", "map it to example"),  # fullwidth
    ("\u216b.example", "map it to xii"),  # ROMAN NUMERAL TWELVE
    ("\u2460.example", "map it to 1"),  # CIRCLED DIGIT ONE
    ("x\u00b2.example", "map it to x2"),  # SUPERSCRIPT TWO
    ("\ufb01le.example", "map it to file"),  # LATIN SMALL LIGATURE FI
    ("B\u00dcCHER.example", "map it to b<U+00FC>cher"),  # upper case is not a U-label
    ("\u0301abc.example", "illegal combining character"),  # leading combining mark
    ("xn--abc.example", "is not valid IDNA2008"),  # an A-label that decodes to nothing valid
]


@pytest.mark.parametrize(("domain", "says"), NOT_IDNA2008)
@pytest.mark.parametrize(("parser", "keyword", "enhanced"), [(MAIL, "FROM:", "5.1.7"), (RCPT, "TO:", "5.1.3")])
def test_domains_that_are_not_idna2008_are_refused_with_553(
    parser: Parser, keyword: str, enhanced: str, domain: str, says: str
) -> None:
    """Before the fix every one of these was accepted and forwarded."""
    with pytest.raises(AddressError) as caught:
        parser(f"{keyword}<user@{domain}> SMTPUTF8" if parser is MAIL else f"{keyword}<user@{domain}>",
               smtputf8_enabled=True)
    err = caught.value
    assert (err.code, err.enhanced) == (553, enhanced)
    assert "is not valid IDNA2008" in err.text and says in err.text, err.text
    _assert_good_error(err)
    with pytest.raises(AddressError):
        parse_mailbox(f"user@{domain}", allow_utf8=True)


@pytest.mark.parametrize("domain", ["b\u00fccher.example", "xn--bcher-kva.example", "\u4f8b\u3048.\u30c6\u30b9\u30c8",
                                    "stra\u00dfe.de", "XN--BCHER-KVA.example"])
def test_idna2008_domains_are_kept_exactly(domain: str) -> None:
    address = RCPT(f"TO:<user@{domain}>", smtputf8_enabled=True).address
    assert address.domain == domain


@settings(deadline=None, max_examples=300)
@given(label=st.text(st.characters(categories=["L", "M", "N"]), min_size=1, max_size=5))
def test_a_unicode_label_is_accepted_exactly_when_idna_says_it_is_a_u_label(label: str) -> None:
    import idna

    try:
        idna.alabel(label)
        valid = not label.isascii() or label.isalnum()
    except (idna.IDNAError, UnicodeError):
        valid = False
    try:
        address = RCPT(f"TO:<u@{label}.example>", smtputf8_enabled=True).address
    except AddressError as err:
        _assert_good_error(err)
        assert not valid or err.text.endswith("octets as IDNA"), err.text
        return
    assert valid and address.domain == f"{label}.example"


async def test_the_proxy_refuses_a_fullwidth_domain_on_the_wire(proxy_factory: ProxyFactory, sink: Sink) -> None:
    proxy = await proxy_factory(upstream=sink.port)
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    code, text = await talk.cmd("MAIL FROM:<alice@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com> SMTPUTF8")
    assert code == 553 and text.startswith("5.1.7 ") and "IDNA2008" in text
    assert (await talk.cmd("MAIL FROM:<alice@b\u00fccher.example> SMTPUTF8"))[0] == 250
    code, text = await talk.cmd("RCPT TO:<bob@\u2460.example>")
    assert code == 553 and text.startswith("5.1.3 ") and "map it to 1" in text
    await talk.close()


# --------------------------------------------------------------------------- Address is valid by construction


INJECTION = "x@y\r\nX-Injected: yes"


@pytest.mark.parametrize(
    ("text", "local", "domain", "says"),
    [
        (INJECTION, "x", "y\r\nX-Injected: yes", "control character U+000D"),
        ("x@y", "x", "y\nX-Injected: yes", "control character U+000A"),
        ("x\x00@y.example", "x\x00", "y.example", "control character U+0000"),
        ("x@y.example", "x", "z.example", "text is not local@domain"),
        ("a b@y.example", "a b", "y.example", "invalid character space in local part"),
        ("x@\uff45xample.com", "x", "\uff45xample.com", "is not valid IDNA2008"),
        ("x", "x", "", "missing domain"),
        ("", "x", "", "the null path has empty local and domain"),
        ("x@-y.example", "x", "-y.example", "domain label starts with a hyphen"),
    ],
)
def test_address_refuses_invalid_parts_on_construction(text: str, local: str, domain: str, says: str) -> None:
    """Before: Address took anything, and a CR LF in it reached the Maildir file as a header line."""
    with pytest.raises(ValueError, match="invalid Address") as caught:
        Address(text, local, domain)
    assert says in str(caught.value) and "Address.parse" in str(caught.value)
    assert "\r" not in str(caught.value) and "\n" not in str(caught.value)


def test_valid_addresses_still_construct_and_replace_is_checked_too() -> None:
    import dataclasses

    assert Address("", "", "").is_null
    assert Address("postmaster", "postmaster", "").text == "postmaster"
    assert Address('"a b"@[192.0.2.1]', '"a b"', "[192.0.2.1]").domain == "[192.0.2.1]"
    ok = Address("a@b.example", "a", "b.example")
    with pytest.raises(ValueError, match="control character"):
        dataclasses.replace(ok, text=INJECTION, domain="y\r\nX-Injected: yes")


def test_address_parse_builds_from_text_with_the_wire_parser() -> None:
    assert Address.parse("Alice@Example.COM") == Address("Alice@Example.COM", "Alice", "Example.COM")
    assert Address.parse("").is_null
    assert Address.parse("b\u00fccher@b\u00fccher.example").needs_smtputf8
    with pytest.raises(AddressError, match="non-ASCII address requires SMTPUTF8"):
        Address.parse("b\u00fccher@b\u00fccher.example", allow_utf8=False)
    with pytest.raises(AddressError, match="control character"):
        Address.parse(INJECTION)
    with pytest.raises(AddressError, match="missing domain"):
        Address.parse("postmaster")


class HostileBcc:
    """A plugin that tries to write a header line through an envelope recipient."""

    name = "hostile_bcc"

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def _inject(self, transaction: Transaction) -> None:
        transaction.envelope.add_recipient(Address(INJECTION, "x", "y\r\nX-Injected: yes"))

    @hookimpl
    def rcpt_to(self, transaction: Transaction) -> None:
        if self.phase == "rcpt_to":
            self._inject(transaction)

    @hookimpl
    def data(self, transaction: Transaction) -> None:
        if self.phase == "data":
            self._inject(transaction)


@pytest.mark.parametrize("phase", ["rcpt_to", "data"])
async def test_a_hostile_plugin_cannot_inject_a_header_into_a_maildir_file(
    proxy_factory: ProxyFactory, tmp_path: Path, phase: str
) -> None:
    proxy = await proxy_factory(HostileBcc(phase))
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
    code, text = await talk.cmd("RCPT TO:<bob@dest.example>")
    if phase == "rcpt_to":
        assert code == 451, text  # the plugin's error: tempfail (on_error default)
    else:
        assert code == 250, text
        assert (await talk.cmd("DATA"))[0] == 354
        talk.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        code, text = await talk.reply()
        assert code == 451, text
    await talk.close()
    stored = maildir_messages(tmp_path / "mail")
    assert stored == []
    assert not any(b"X-Injected" in m for m in stored)
