"""Tests for smtpproxy.message: losslessness, lazy parsing, safe edits."""

from __future__ import annotations

import re
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.message import MAX_LINE_OCTETS, Change, HeaderError, Message

CRLF = b"\r\n"

ROUND_TRIP_INPUTS = [
    pytest.param(b"Subject: hi\r\nFrom: a@example.org\r\n\r\nHello\r\n", id="simple"),
    pytest.param(
        b"Received: from a\r\n\tby b\r\n  with ESMTP;\r\n Mon, 1 Jan 2024\r\n"
        b"Subject: x\r\n\r\nb\r\n",
        id="folded",
    ),
    pytest.param(
        b"Subject:no-space\r\nX-Odd:   lots   of   space \t \r\nX-Empty:\r\nX-E2: \r\n\r\nb\r\n",
        id="odd-spacing",
    ),
    pytest.param(b"Subject: hi\r\n\r\n", id="no-body"),
    pytest.param(b"Subject: hi\r\nFrom: a@example.org\r\n", id="no-blank-line"),
    pytest.param(b"\r\nbody only\r\n", id="starts-with-crlf"),
    pytest.param(b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\n", id="dot-lines"),
    pytest.param(
        "Subject: caf\u00e9\r\nX-Bin: \xff\xfe\r\n\r\n\u00fcber \x00\x80\xff\r\n".encode("latin-1"),
        id="8bit",
    ),
    pytest.param(b"Subject: a\r\nthis is not a header\r\nX: y\r\n\r\nz\r\n", id="invalid-line"),
    pytest.param(b" leading continuation\r\nSubject: a\r\n\r\nb\r\n", id="leading-wsp"),
    pytest.param(b"Subject : obsolete\r\n\r\nb\r\n", id="space-before-colon"),
    pytest.param(b"Subject: a\r\n\r\n\r\n\r\n", id="blank-body-lines"),
    pytest.param(b"Subject: unterminated", id="unterminated"),
    pytest.param(b"Subject: a\r\n continued-unterminated", id="unterminated-continuation"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\r\n", id="just-crlf"),
]


def normalise(data: bytes) -> bytes:
    """Turn every CR, LF or CRLF into CRLF, as the SMTP layer does."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


FIELD_RE = re.compile(rb"[^ \t\r][^\r]*\r\n(?:[ \t][^\r]*\r\n)*")


def has_bare_cr_or_lf(data: bytes) -> bool:
    return re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None


# -- round trip -------------------------------------------------------------


@pytest.mark.parametrize("raw", ROUND_TRIP_INPUTS)
def test_round_trip_unparsed(raw: bytes) -> None:
    msg = Message(raw)
    assert msg.raw is raw
    assert msg.size == len(raw)
    assert not msg.modified
    assert msg.changes == ()


@pytest.mark.parametrize("raw", ROUND_TRIP_INPUTS)
def test_round_trip_after_parsing(raw: bytes) -> None:
    msg = Message(raw)
    msg.headers  # noqa: B018 - parsing must not change anything
    _ = msg.body, msg.header_bytes, msg.get("subject"), "x" in msg
    assert msg.raw is raw
    assert not msg.modified
    assert raw in (msg.header_bytes + msg.body, msg.header_bytes + CRLF + msg.body)


def test_parse_folded_and_odd_spacing() -> None:
    msg = Message(
        b"Received: from a\r\n\tby b\r\n  with ESMTP\r\nSubject:no-space\r\n"
        b"X-Odd:   lots   of   space \t \r\nX-Empty:\r\n\r\nbody\r\n"
    )
    assert msg.headers == [
        ("Received", "from a\tby b  with ESMTP"),
        ("Subject", "no-space"),
        ("X-Odd", "lots   of   space"),
        ("X-Empty", ""),
    ]
    assert msg.body == b"body\r\n"
    assert msg.header_bytes.endswith(b"X-Empty:\r\n")


def test_invalid_line_ends_header_block() -> None:
    raw = b"Subject: a\r\nthis is not a header\r\nX: y\r\n\r\nz\r\n"
    msg = Message(raw)
    assert msg.headers == [("Subject", "a")]
    assert msg.header_bytes == b"Subject: a\r\n"
    assert msg.body == b"this is not a header\r\nX: y\r\n\r\nz\r\n"
    assert "X" not in msg


def test_leading_continuation_means_no_headers() -> None:
    msg = Message(b" x\r\nSubject: a\r\n\r\nb\r\n")
    assert msg.headers == []
    assert msg.body == msg.raw


def test_starts_with_crlf_has_no_headers() -> None:
    msg = Message(b"\r\nSubject: not a header\r\n")
    assert msg.headers == []
    assert msg.header_bytes == b""
    assert msg.body == b"Subject: not a header\r\n"


def test_no_blank_line_is_all_headers() -> None:
    msg = Message(b"Subject: a\r\nFrom: b\r\n")
    assert msg.headers == [("Subject", "a"), ("From", "b")]
    assert msg.body == b""


def test_eight_bit_values_are_displayed_with_replacement() -> None:
    raw = b"Subject: caf\xc3\xa9\r\nX-Bin: \xff\r\n\r\n"
    msg = Message(raw)
    assert msg.get("subject") == "caf\u00e9"
    assert msg.get("x-bin") == "\ufffd"
    assert msg.raw is raw


def test_get_get_all_contains_case_insensitive() -> None:
    msg = Message(b"Received: 1\r\nSubject: s\r\nreceived: 2\r\nRECEIVED: 3\r\n\r\n")
    assert msg.get("RECEIVED") == "1"
    assert msg.get_all("received") == ["1", "2", "3"]
    assert msg.get("missing") is None
    assert msg.get("missing", "d") == "d"
    assert msg.get_all("missing") == []
    assert "subject" in msg
    assert "Subject2" not in msg
    assert 42 not in msg
    # Non-ASCII names never match, even if they case-fold to ASCII (KELVIN SIGN).
    msg2 = Message(b"K: v\r\n\r\n")
    assert "\u212a" not in msg2
    assert msg2.remove_header("\u212a") == 0


def test_headers_returns_a_copy() -> None:
    msg = Message(b"A: 1\r\n\r\n")
    msg.headers.append(("B", "2"))
    assert msg.headers == [("A", "1")]
    assert not msg.modified


def test_bare_line_endings_rejected_on_construction() -> None:
    for raw in (b"A: b\nc", b"A: b\r\rx", b"A: b\r", b"\n", b"A\r\n\n"):
        with pytest.raises(ValueError, match="bare CR or LF"):
            Message(raw)


def test_bytes_like_input_accepted() -> None:
    assert Message(bytearray(b"A: b\r\n\r\n")).raw == b"A: b\r\n\r\n"  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Message("A: b\r\n")  # type: ignore[arg-type]


# -- editing ----------------------------------------------------------------

BASE = (
    b"Received: from x\r\n by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"
    b"Subject:   keep  my   spacing  \r\n"
    b"X-Dup: 1\r\n"
    b"To: t@example.org\r\n"
    b"x-dup: 2\r\n"
    b"\r\n"
    b"body line\r\n.dot\r\n"
)
RECEIVED = b"Received: from x\r\n by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
DKIM = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"
SUBJECT = b"Subject:   keep  my   spacing  \r\n"
BODY = b"body line\r\n.dot\r\n"


def test_add_header_prepend() -> None:
    msg = Message(BASE)
    msg.add_header("Authentication-Results", "mx; spf=pass")
    assert msg.raw == b"Authentication-Results: mx; spf=pass\r\n" + BASE
    assert msg.headers[0] == ("Authentication-Results", "mx; spf=pass")
    assert msg.modified
    assert msg.changes == (Change("add", "Authentication-Results", "mx; spf=pass"),)
    assert msg.size == len(msg.raw)


def test_add_header_append() -> None:
    msg = Message(BASE)
    msg.add_header("X-Last", "v", prepend=False)
    head, _, body = BASE.partition(b"\r\n\r\n")
    assert msg.raw == head + b"\r\nX-Last: v\r\n\r\n" + body
    assert msg.headers[-1] == ("X-Last", "v")
    assert msg.body == BODY


def test_add_header_strips_and_handles_empty() -> None:
    msg = Message(b"A: b\r\n\r\n")
    msg.add_header("X-Pad", " \tpadded\t ")
    msg.add_header("X-Empty", "")
    assert msg.raw.startswith(b"X-Empty:\r\nX-Pad: padded\r\n")
    assert msg.changes[0] == Change("add", "X-Pad", "padded")
    assert msg.get("x-empty") == ""


def test_add_header_non_ascii_value_is_utf8() -> None:
    msg = Message(b"A: b\r\n\r\n")
    msg.add_header("X-Note", "gr\u00fc\u00df \u2603")
    assert msg.raw.startswith("X-Note: gr\u00fc\u00df \u2603\r\n".encode())
    assert Message(msg.raw).get("x-note") == "gr\u00fc\u00df \u2603"


def test_remove_header_all_occurrences() -> None:
    msg = Message(BASE)
    assert msg.remove_header("X-DUP") == 2
    assert msg.get_all("x-dup") == []
    assert msg.raw == BASE.replace(b"X-Dup: 1\r\n", b"").replace(b"x-dup: 2\r\n", b"")
    assert msg.changes == (Change("remove", "X-DUP", None),)


def test_remove_missing_header_is_not_a_change() -> None:
    msg = Message(BASE)
    assert msg.remove_header("X-Nope") == 0
    assert not msg.modified
    assert msg.raw is BASE


def test_replace_header_keeps_position_and_drops_duplicates() -> None:
    msg = Message(BASE)
    msg.replace_header("x-dup", "new")
    names = [n for n, _ in msg.headers]
    assert names == ["Received", "DKIM-Signature", "Subject", "x-dup", "To"]
    assert msg.get_all("X-Dup") == ["new"]
    assert b"x-dup: new\r\nTo: t@example.org\r\n\r\n" in msg.raw
    assert msg.changes == (Change("replace", "x-dup", "new"),)


def test_replace_header_absent_adds_at_top() -> None:
    msg = Message(BASE)
    msg.replace_header("X-Spam-Flag", "YES")
    assert msg.raw == b"X-Spam-Flag: YES\r\n" + BASE
    assert msg.changes == (Change("replace", "X-Spam-Flag", "YES"),)


def test_replace_body() -> None:
    msg = Message(BASE)
    msg.replace_body(b"new body")
    assert msg.body == b"new body\r\n"
    assert msg.raw == BASE[: BASE.index(b"\r\n\r\n") + 4] + b"new body\r\n"
    assert msg.changes == (Change("replace_body", None, None),)
    msg.replace_body(b"")
    assert msg.body == b""
    assert msg.raw.endswith(b"x-dup: 2\r\n\r\n")


def test_replace_body_on_message_without_separator_adds_one() -> None:
    msg = Message(b"Subject: a\r\n")
    msg.replace_body(b"From: looks-like-a-header\r\n")
    assert msg.raw == b"Subject: a\r\n\r\nFrom: looks-like-a-header\r\n"
    again = Message(msg.raw)
    assert again.headers == [("Subject", "a")]
    assert again.body == b"From: looks-like-a-header\r\n"


def test_replace_body_rejects_bare_line_endings() -> None:
    msg = Message(BASE)
    for body in (b"a\nb", b"a\rb", b"a\r", b"\n"):
        with pytest.raises(ValueError, match="bare CR or LF"):
            msg.replace_body(body)
    assert not msg.modified


def test_untouched_fields_byte_identical_after_edits() -> None:
    msg = Message(BASE)
    msg.add_header("X-A", "1")
    msg.add_header("X-B", "2", prepend=False)
    msg.replace_header("To", "other@example.org")
    msg.remove_header("x-dup")
    out = msg.raw
    assert out == (
        b"X-A: 1\r\n"
        + RECEIVED
        + DKIM
        + SUBJECT
        + b"To: other@example.org\r\nX-B: 2\r\n\r\n"
        + BODY
    )
    assert [c.op for c in msg.changes] == ["add", "add", "replace", "remove"]
    assert msg.get("subject") == "keep  my   spacing"
    assert msg.size == len(out)


def test_changes_in_order_and_raw_cache() -> None:
    msg = Message(BASE)
    msg.add_header("X-1", "a")
    first = msg.raw
    assert msg.raw is first  # cached
    msg.replace_body(b"x\r\n")
    msg.remove_header("X-1")
    assert msg.changes == (
        Change("add", "X-1", "a"),
        Change("replace_body", None, None),
        Change("remove", "X-1", None),
    )
    assert msg.raw == BASE[: BASE.index(b"\r\n\r\n") + 4] + b"x\r\n"
    assert msg.size == len(msg.raw)


def test_size_without_serialising_matches() -> None:
    msg = Message(BASE)
    msg.add_header("X", "y")
    size = msg.size
    assert size == len(msg.raw)


def test_continuation_body_not_absorbed_after_adding_header() -> None:
    raw = b" starts with space\r\nSubject: a\r\n"
    msg = Message(raw)
    msg.add_header("X", "y")
    again = Message(msg.raw)
    assert again.headers == [("X", "y")]
    assert again.body == raw


# -- injection --------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["a\r\nBcc: x", "a\nb", "a\rb", "a\x00b", "a\x7fb", "a\x0bb", "\x85", "\r\n", "x\r\n "]
)
def test_unsafe_values_rejected(value: str) -> None:
    msg = Message(BASE)
    with pytest.raises(HeaderError):
        msg.add_header("X-Test", value)
    with pytest.raises(HeaderError):
        msg.replace_header("X-Test", value)
    assert not msg.modified
    assert msg.raw is BASE


def test_lone_surrogate_value_rejected() -> None:
    with pytest.raises(HeaderError, match="UTF-8"):
        Message(BASE).add_header("X-Test", "a\udcffb")


def test_tab_in_value_allowed() -> None:
    msg = Message(BASE)
    msg.add_header("X-Tab", "a\tb")
    assert Message(msg.raw).get("x-tab") == "a\tb"


@pytest.mark.parametrize(
    "name", ["", "X Test", "X:Test", "X-T\u00e9st", "X\tT", "X\r\nY", "X\x00", "X" * 77, ":"]
)
def test_unsafe_names_rejected(name: str) -> None:
    msg = Message(BASE)
    with pytest.raises(HeaderError):
        msg.add_header(name, "v")
    with pytest.raises(HeaderError):
        msg.replace_header(name, "v")
    assert not msg.modified


def test_non_str_name_or_value_is_type_error() -> None:
    msg = Message(BASE)
    with pytest.raises(TypeError):
        msg.add_header(b"X", "v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        msg.add_header("X", b"v")  # type: ignore[arg-type]


# -- folding ----------------------------------------------------------------


def test_long_value_is_folded() -> None:
    words = [f"w{i:04d}" for i in range(500)]
    value = " ".join(words)
    assert len(value) >= 2999
    msg = Message(BASE)
    msg.add_header("X-Long", value)
    head = msg.header_bytes
    lines = msg.raw.split(CRLF)
    assert all(len(line) <= MAX_LINE_OCTETS for line in lines)
    field = head[: head.index(RECEIVED)]
    assert field.count(CRLF) > 3
    assert not has_bare_cr_or_lf(msg.raw)
    again = Message(msg.raw)
    assert again.get("X-Long") == value
    assert again.headers == msg.headers


def test_long_value_with_tabs_and_runs_folds_without_blank_lines() -> None:
    value = "\t".join(["x" * 300] * 10) + "  " + " " * 1200 + "end"
    msg = Message(b"")
    msg.add_header("X-Long", value)
    lines = msg.raw.split(CRLF)[:-1]
    assert all(line.strip(b" \t") for line in lines)  # no whitespace-only lines
    assert Message(msg.raw).get("x-long") == value


def test_unbreakable_long_value_left_long() -> None:
    value = "a" * 2000
    msg = Message(b"")
    msg.add_header("X-Long", value)
    assert msg.raw == b"X-Long: " + value.encode() + CRLF
    assert Message(msg.raw).get("x-long") == value


# -- email view -------------------------------------------------------------

MULTIPART = (
    b"From: a@example.org\r\n"
    b"Subject: parts\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"hello\r\n"
    b"--XX\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAEC\r\n"
    b"--XX--\r\n"
)


def test_email_view_multipart() -> None:
    msg = Message(MULTIPART)
    view = msg.email
    assert isinstance(view, EmailMessage)
    assert view.is_multipart()
    parts = list(view.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/octet-stream"]
    assert parts[1].get_content() == b"\x00\x01\x02"
    assert msg.email is view  # cached
    assert msg.raw is MULTIPART  # building the view changes nothing


def test_email_view_refreshed_after_modification() -> None:
    msg = Message(MULTIPART)
    old = msg.email
    msg.replace_header("Subject", "changed")
    assert msg.email is not old
    assert msg.email["Subject"] == "changed"
    msg.replace_body(b"plain now\r\n")
    assert msg.email.get_payload() == "plain now\r\n"


# -- property-based ---------------------------------------------------------

names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=76,
)
safe_values = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs"), include_characters="\t"),
    max_size=80,
).map(lambda v: v.strip(" \t"))
crlf_bytes = st.binary(max_size=300).map(normalise)


@st.composite
def built_messages(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]]]:
    """A message built by hand from headers (optionally folded) and a body."""
    fields = draw(st.lists(st.tuples(names, safe_values), max_size=8))
    raw = b""
    for name, value in fields:
        encoded = value.encode()
        # Fold before some of the internal spaces (never leaving a blank line).
        pieces = encoded.split(b" ")
        line = pieces[0]
        for piece in pieces[1:]:
            line += (b"\r\n " if draw(st.booleans()) and line.strip() else b" ") + piece
        sep = draw(st.sampled_from([b": ", b":", b":  ", b":\t"]))
        raw += name.encode() + sep + line + CRLF
    body = draw(crlf_bytes)
    if body or draw(st.booleans()):
        raw += CRLF + body
    return raw, fields


@given(built_messages())
def test_property_built_messages_parse(case: tuple[bytes, list[tuple[str, str]]]) -> None:
    raw, fields = case
    msg = Message(raw)
    assert msg.headers == fields
    assert msg.raw is raw
    assert msg.raw == raw


@given(crlf_bytes)
def test_property_arbitrary_bytes_round_trip(raw: bytes) -> None:
    msg = Message(raw)
    assert msg.raw == raw
    headers = msg.headers
    assert msg.raw is raw
    assert raw.startswith(msg.header_bytes)
    assert raw.endswith(msg.body)
    assert len(msg.header_bytes) + len(msg.body) in (len(raw), len(raw) - 2)
    assert Message(raw).headers == headers


@given(st.binary(max_size=100))
def test_property_construction_checks_line_endings(raw: bytes) -> None:
    if has_bare_cr_or_lf(raw):
        with pytest.raises(ValueError):
            Message(raw)
    else:
        assert Message(raw).raw is raw


common_names = st.sampled_from(["Subject", "subject", "X-Dup", "x-dup", "Received", "To"])
any_name = st.one_of(common_names, names)
edit_values = st.one_of(
    st.text(
        alphabet=st.characters(exclude_categories=("Cc", "Cs"), include_characters="\t"),
        max_size=40,
    ),
    st.lists(st.text(alphabet="ab\u00e9", min_size=1, max_size=300), max_size=12).map(" ".join),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), any_name, edit_values, st.booleans()),
        st.tuples(st.just("remove"), any_name, st.none(), st.none()),
        st.tuples(st.just("replace"), any_name, edit_values, st.none()),
    ),
    max_size=10,
)
start_messages = st.one_of(built_messages().map(lambda c: c[0]), crlf_bytes, st.just(BASE))


def apply_to_model(
    model: list[tuple[str, str]], op: str, name: str, value: str | None, prepend: bool | None
) -> None:
    """The expected effect of an operation on the (name, value) list."""
    key = name.lower()
    if op == "add":
        assert value is not None
        item = (name, value.strip(" \t"))
        model.insert(0 if prepend else len(model), item)
    elif op == "remove":
        model[:] = [h for h in model if h[0].lower() != key]
    else:
        assert value is not None
        item = (name, value.strip(" \t"))
        idx = next((i for i, h in enumerate(model) if h[0].lower() == key), None)
        model[:] = [h for h in model if h[0].lower() != key]
        model.insert(0 if idx is None else idx, item)


@settings(max_examples=300)
@given(start_messages, operations, st.one_of(st.none(), crlf_bytes))
def test_property_edits_stay_safe_and_reparse(
    raw: bytes,
    ops: list[tuple[str, str, str | None, bool | None]],
    new_body: bytes | None,
) -> None:
    msg = Message(raw)
    model = list(msg.headers)
    original_fields = msg.header_bytes
    expected_changes = 0
    for op, name, value, prepend in ops:
        if op == "add":
            assert value is not None and prepend is not None
            msg.add_header(name, value, prepend=prepend)
            expected_changes += 1
        elif op == "remove":
            expected_changes += msg.remove_header(name) > 0
        else:
            assert value is not None
            msg.replace_header(name, value)
            expected_changes += 1
        apply_to_model(model, op, name, value, prepend)
    if new_body is not None:
        msg.replace_body(new_body)
        expected_changes += 1
    out = msg.raw
    assert msg.headers == model
    assert len(msg.changes) == expected_changes
    assert msg.modified == bool(expected_changes)
    assert msg.size == len(out)
    assert not has_bare_cr_or_lf(out)
    again = Message(out)
    assert again.headers == msg.headers
    assert again.body == msg.body
    if not msg.modified:
        assert out is raw
    if new_body is None:
        assert msg.body == Message(raw).body
    # Fields nobody touched keep their exact bytes, in their original order.
    touched = {name.lower() for _, name, _, _ in ops}
    pos = 0
    for field in FIELD_RE.findall(original_fields):
        if field.split(b":", 1)[0].decode().lower() not in touched:
            pos = out.index(field, pos) + len(field)


def test_remove_header_matching_keeps_the_others_byte_for_byte() -> None:
    raw = (b"Authentication-Results: mx.ours.test; spf=pass\r\n"
           b"Authentication-Results: other.test;\r\n\tdkim=pass header.d=a.test\r\n"
           b"Subject: s\r\n\r\nbody\r\n")
    message = Message(raw)
    assert message.remove_header("authentication-results", matching=lambda v: v.startswith("mx.ours.test")) == 1
    assert message.raw == raw.replace(b"Authentication-Results: mx.ours.test; spf=pass\r\n", b"")
    assert message.remove_header("Subject", matching=lambda v: False) == 0
    assert not [c for c in message.changes if c.name == "Subject"]


# -- the header block as Postfix parses it (issue 14) -----------------------------------------


def postfix_is_header(line: bytes) -> int:
    """A transliteration of Postfix is_header_buf() (src/global/is_header.c): name length, or 0."""
    length, state = 0, "init"
    for c in line[:2048]:
        if c in (0x20, 0x09):
            if state == "init":
                return 0
            state = "space"
        elif c == 0x3A:
            return length if state != "init" else 0
        elif c == 0 or c > 0x7E or c < 0x20 or c == 0x7F or state == "space":
            return 0
        else:
            state = "char"
            length += 1
    return 0


def postfix_model(raw: bytes) -> list[str]:
    """Field names the way Postfix's smtpd and cleanup (mime_state_update) would see them."""
    names: list[str] = []
    lines = raw.split(b"\r\n")[:-1]  # the last piece has no CRLF: never a header line
    for index, line in enumerate(lines):
        if line == b"":
            break
        if index == 0 and line.lstrip(b">").startswith(b"From "):
            names.append("X-Mailbox-Line")
        elif line[:1] in (b" ", b"\t"):
            if not names:
                break
        elif (n := postfix_is_header(line)) > 0:
            names.append(line[:n].decode())
        else:
            break
    return names


ODD_LINE = st.one_of(
    st.sampled_from([b"X-A: v", b"X-A : v", b"X-A\t:v", b" cont", b"\tcont", b"", b": v", b"A B: v",
                     b"From x", b">From : x", b"From : x", b"X-\xc3\xa9: v", b"X\x01: v", b"no colon"]),
    st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.builds(lambda n, s, v: n + s + b":" + v,
              st.text("AZaz09-_!~", min_size=0, max_size=6).map(str.encode),
              st.sampled_from([b"", b" ", b"\t", b" \t "]), st.binary(max_size=5).filter(
                  lambda b: b"\r" not in b and b"\n" not in b)),
)


@given(st.lists(ODD_LINE, max_size=8))
@settings(max_examples=400, deadline=None)
def test_field_names_are_those_of_the_postfix_model(lines: list[bytes]) -> None:
    raw = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
    message = Message(raw)
    assert [name for name, _ in message.headers] == postfix_model(raw)
    assert message.raw is raw  # reading never changes a byte


def test_obsolete_space_before_the_colon_is_a_field_and_the_block_goes_on() -> None:
    raw = (b"From: Mallory <m@attacker.test>\r\nX-Obs : y\r\n"
           b"Authentication-Results: mx.test; dkim=pass\r\nFrom\t: CEO <ceo@bank.test>\r\n\r\nbody\r\n")
    message = Message(raw)
    assert message.headers == [
        ("From", "Mallory <m@attacker.test>"), ("X-Obs", "y"),
        ("Authentication-Results", "mx.test; dkim=pass"), ("From", "CEO <ceo@bank.test>")]
    assert message.body == b"body\r\n"
    assert message.remove_header("Authentication-Results") == 1
    assert message.raw == raw.replace(b"Authentication-Results: mx.test; dkim=pass\r\n", b"")


def test_mbox_first_line_is_x_mailbox_line_and_keeps_its_prefix_once_edited() -> None:
    raw = b"From : CEO <ceo@bank.test>\r\nFrom: m@attacker.test\r\n\r\nbody\r\n"
    message = Message(raw)
    assert message.headers == [("X-Mailbox-Line", "From : CEO <ceo@bank.test>"), ("From", "m@attacker.test")]
    assert message.get_all("From") == ["m@attacker.test"]
    assert message.raw is raw  # unedited: forwarded as received (Postfix adds the prefix itself)
    message.add_header("Received", "by proxy")
    # Not first any more, the line would be a From field to Postfix: it goes out as Postfix saw it.
    assert message.raw == (b"Received: by proxy\r\nX-Mailbox-Line: From : CEO <ceo@bank.test>\r\n"
                           b"From: m@attacker.test\r\n\r\nbody\r\n")
    assert message.size == len(message.raw)


def test_a_name_and_colon_past_postfix_line_limit_end_the_header_block() -> None:
    inside = b"X" * 2047 + b": v\r\nX-After: 1\r\n\r\n"
    assert [n for n, _ in Message(inside).headers][-1] == "X-After"
    outside = b"X" * 2048 + b": v\r\nX-After: 1\r\n\r\n"
    assert Message(outside).headers == []


@given(st.lists(ODD_LINE, max_size=8), st.sampled_from([b"\r\nbody\r\n", b"", b"tail", b" cont", b"\r\n"]),
       st.sampled_from([b"", b"X" * 2040, b"X" * 2045]))
@settings(max_examples=500, deadline=None)
def test_whole_field_parse_equals_the_line_by_line_rules(lines: list[bytes], end: bytes, long: bytes) -> None:
    """_parse (one regex match per field) splits exactly as the line-by-line rules it replaced:
    the same fields, header end and separator, also around Postfix's 2048-octet line limit."""
    raw = b"".join(line + b"\r\n" for line in [long + line if long and i == 1 else line
                                               for i, line in enumerate(lines)]) + end
    message = Message(raw)
    fields = message._parse()
    assert (fields, message._header_end, message._sep) == message._parse_by_line()


@settings(max_examples=400, deadline=None)
@given(st.one_of(start_messages, st.lists(ODD_LINE, max_size=8).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n")), operations, st.booleans())
def test_field_bytes_are_the_split_header_blocks(
    raw: bytes, ops: list[tuple[str, str, str | None, bool | None]], undo: bool,
) -> None:
    """received_field_bytes and header_field_bytes (what the milter diffs for its header
    actions) are exactly split_fields() of received_header_bytes and header_bytes, before and
    after any edits and a rollback, mbox first lines and odd fields included."""
    from smtpproxy.milter.edits import split_fields

    msg = Message(raw)
    assert msg.received_field_bytes == split_fields(msg.received_header_bytes)
    assert msg.header_field_bytes == split_fields(msg.header_bytes)
    savepoint = msg._savepoint()
    for op, name, value, prepend in ops:
        if op == "add":
            assert value is not None and prepend is not None
            msg.add_header(name, value, prepend=prepend)
        elif op == "remove":
            msg.remove_header(name)
        else:
            assert value is not None
            msg.replace_header(name, value)
        assert msg.received_field_bytes == split_fields(msg.received_header_bytes)
        assert msg.header_field_bytes == split_fields(msg.header_bytes)
    if undo:
        msg._rollback(savepoint)
    assert msg.received_field_bytes == split_fields(msg.received_header_bytes)
    assert msg.header_field_bytes == split_fields(msg.header_bytes)
    assert b"".join(msg.header_field_bytes) == msg.header_bytes


def test_field_bytes_of_an_edited_mbox_first_line_carry_its_prefix() -> None:
    msg = Message(b"From x@y Mon\r\nSubject: s\r\n\r\nbody\r\n")
    assert msg.received_field_bytes == [b"From x@y Mon\r\n", b"Subject: s\r\n"]
    assert msg.header_field_bytes == [b"From x@y Mon\r\n", b"Subject: s\r\n"]
    msg.add_header("X-A", "1")
    assert msg.received_field_bytes == [b"From x@y Mon\r\n", b"Subject: s\r\n"]
    assert msg.header_field_bytes == [b"X-A: 1\r\n", b"X-Mailbox-Line: From x@y Mon\r\n", b"Subject: s\r\n"]
