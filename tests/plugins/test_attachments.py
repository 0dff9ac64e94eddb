"""The attachments plugin: names, types, Office files, archives, hostile MIME and the verdicts.

The scan is called directly for what it finds; the verdicts go through the offline tracer
(the proxy's own decision rules). tests/postfix/test_attachments_e2e.py runs it in a real proxy in
front of the tests' Postfix.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import os
import threading
from typing import Any

import py7zr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtpproxy_plugins._attachment_names import candidates, clean
from smtpproxy_plugins._mime_tree import Limits, walk
from smtpproxy_plugins.attachments import Attachments, AttachmentSettings, Report, scan

from smtpproxy import Message
from smtpproxy.pytest_plugin import make_plugin, run_plugins
from tests import attachment_samples as samples
from tests.attachment_samples import message, raw_message


def findings(raw: bytes, **overrides: Any) -> set[tuple[str, str]]:
    """(rule, filename) of every finding, with default settings unless overridden."""
    report = scan(raw, AttachmentSettings.model_validate(overrides))
    assert not report.timed_out
    return {(f.rule, f.filename) for f in report.findings}


def rules(raw: bytes, **overrides: Any) -> set[str]:
    return {rule for rule, _ in findings(raw, **overrides)}


# -- file names ------------------------------------------------------------------------------


def headers_of(text: str) -> Any:
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    return BytesHeaderParser(policy=compat32).parsebytes(text.replace("\n", "\r\n").encode() + b"\r\n")


def test_names_come_from_disposition_and_content_type_alike() -> None:
    headers = headers_of('Content-Type: application/pdf; name="b.exe"\n'
                         'Content-Disposition: attachment; filename="a.pdf"\n')
    assert candidates(headers) == ["a.pdf", "b.exe"]


def test_names_in_the_swapped_parameters_count_too() -> None:
    headers = headers_of('Content-Type: application/pdf; filename="a.exe"\n'
                         'Content-Disposition: attachment; name="b.scr"\n')
    assert sorted(candidates(headers)) == ["a.exe", "b.scr"]


def test_rfc2231_continuations_and_charset_are_joined_and_decoded() -> None:
    headers = headers_of("Content-Disposition: attachment;\n"
                         " filename*0*=utf-8''Rechnung%20%C3%BC;\n"
                         " filename*1*=ber.pdf%2E;\n"
                         " filename*2*=ex%65\n")
    assert candidates(headers) == ["Rechnung über.pdf.exe"]


def test_rfc2047_encoded_words_in_a_parameter_are_decoded_as_clients_do() -> None:
    headers = headers_of('Content-Type: application/octet-stream; name="=?utf-8?B?aW52b2ljZS5leGU=?="\n')
    assert candidates(headers)[0] == "invoice.exe"
    assert rules(raw_message('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"',
                             b'--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: application/'
                             b'octet-stream; name="=?utf-8?B?aW52b2ljZS5leGU=?="\n\nxx\n--b--\n')) == {"executable"}


@pytest.mark.parametrize(("sent", "effective", "trick"), [
    ("Invoice.PDF.EXE", "Invoice.PDF.EXE", None),
    ("invoice.exe.", "invoice.exe", None),  # Windows drops trailing dots and spaces
    ("invoice.exe . . ", "invoice.exe", None),
    ("invoice\u202efdp.exe", "invoicefdp.exe", "bidi control"),  # reads as invoiceexe.pdf
    ("invoice.e\u200bxe", "invoice.exe", "invisible character"),
    ("invoice.\u0435x\u0435", "invoice.exe", "look-alike characters"),  # Cyrillic ie
    ("invoice\ua60eexe", "invoice.exe", "look-alike characters"),  # VAI FULL STOP
    ("invoice\uff0e\uff45\uff58\uff45", "invoice.exe", None),  # fullwidth: NFKC makes it plain
    ("C:\\temp\\..\\invoice.exe", "invoice.exe", None),
    ("Счёт.pdf", None, None),  # Cyrillic in the stem, an honest extension: no trick
])
def test_names_are_what_windows_opens(sent: str, effective: str | None, trick: str | None) -> None:
    name = clean(sent)
    if effective is not None:
        assert name.effective.casefold() == effective.casefold()
    assert name.tricks == ((trick,) if trick else ())


@pytest.mark.parametrize("filename", [
    "invoice.exe", "INVOICE.EXE", "invoice.pdf.exe", "x.js", "x.hta", "x.ps1", "invoice.exe.",
    "invoice\u202efdp.exe", "invoice.\u0435x\u0435", "payload.scr",
])
def test_executable_names_are_refused_however_spelt(filename: str) -> None:
    assert "executable" in rules(message((filename, b"not really", "application/octet-stream")))


def test_double_extension_and_direction_tricks_are_deceptive_names() -> None:
    assert rules(message(("invoice.pdf.exe", b"x", "application/octet-stream"))) == {"executable", "deceptive_name"}
    assert "deceptive_name" in rules(message(("invoice\u202efdp.exe", b"x", "application/octet-stream")))
    assert rules(message(("report.tar.gz", gzip.compress(samples.tarred(("a.txt", b"hi"))), "application/gzip"))) == set()


# -- what the content is -----------------------------------------------------------------------


def test_a_renamed_executable_is_found_by_its_content() -> None:
    found = findings(message(("invoice.pdf", samples.pe(), "application/pdf")))
    assert ("executable", "invoice.pdf") in found
    assert ("type_mismatch", "invoice.pdf") in found


@pytest.mark.parametrize(("filename", "data", "rule"), [
    ("cd.iso", samples.iso(), "disk_image"),
    ("invoice.pdf", samples.iso(), "disk_image"),  # by content
    ("disk.vhdx", b"vhdxfile" + bytes(600), "disk_image"),
    ("shortcut.lnk", samples.lnk(), "shortcut"),
    ("photo.jpg", samples.lnk(), "shortcut"),
    ("notes.one", b"\xe4\x52\x5c\x7b" + bytes(100), "onenote"),
    ("page.html", b"<html><body><script>x</script></body></html>", "html"),
    ("scan.svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "svg"),
    ("payload.bin", samples.pe(), "executable"),
])
def test_todays_delivery_vectors_by_name_or_content(filename: str, data: bytes, rule: str) -> None:
    assert rule in rules(message((filename, data, "application/octet-stream")))


def test_office_macros_and_encryption() -> None:
    assert rules(message(("report.docm", samples.ooxml(macros=True), "application/octet-stream"))) == {
        "office_macros"}
    assert rules(message(("report.doc", samples.vba_project(), "application/msword"))) == {"office_macros"}
    assert rules(message(("report.docx", samples.encrypted_ooxml(), "application/octet-stream"))) == {
        "encrypted_office"}
    assert rules(message(("report.docx", samples.ooxml(), "application/vnd.openxmlformats-officedocument."
                                                          "wordprocessingml.document"))) == set()


def test_clean_attachments_find_nothing() -> None:
    raw = message(("report.pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "application/pdf"),
                  ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png"),
                  ("notes.txt", b"plain words\n", "text/plain"),
                  ("data.zip", samples.zipped(("a.txt", b"hello"), ("b.csv", b"1,2\n")), "application/zip"))
    assert findings(raw) == set()


def test_what_is_opened_by_its_name_is_judged_by_its_name() -> None:
    # Web reports saved as .xls are HTML, CSV goes out as Excel: Excel opens both, no browser.
    html = b"<html><body><table><tr><td>1</td></tr></table></body></html>"
    assert rules(message(("report.xls", html, "application/vnd.ms-excel"))) == {"type_mismatch"}
    assert findings(message(("table.xls", b"a,b\n1,2\n", "application/vnd.ms-excel"))) == set()
    unnamed = raw_message(MIXED, b"--b\nContent-Type: text/html\nContent-Disposition: attachment\n\n"
                                 + html + b"\n--b--\n")
    assert rules(unnamed) == {"html"}  # no name: a client renders it by its type


def test_two_zips_in_one_file_are_malformed() -> None:
    twice = samples.zipped(("a.txt", b"x")) + samples.zipped(("setup.exe", samples.pe()))
    assert rules(message(("a.zip", twice, "application/zip"))) == {"malformed", "executable"}


def test_an_html_body_is_not_an_html_attachment() -> None:
    raw = raw_message("MIME-Version: 1.0\nContent-Type: text/html", b"<html><body>Hello</body></html>\n")
    assert findings(raw) == set()


# -- archives ------------------------------------------------------------------------------------


def test_executables_inside_archives_nested_or_compressed() -> None:
    inner = samples.zipped(("setup.exe", samples.pe()))
    assert ("executable", "docs.zip/setup.exe") in findings(message(("docs.zip", inner, "application/zip")))
    nested = samples.zipped(("inner.zip", inner))
    assert ("executable", "outer.zip/inner.zip/setup.exe") in findings(
        message(("outer.zip", nested, "application/zip")))
    tgz = gzip.compress(samples.tarred(("bin/tool", samples.pe())))
    assert "executable" in rules(message(("tools.tar.gz", tgz, "application/gzip")))
    assert "executable" in rules(message(("x.bz2", bz2.compress(samples.pe()), "application/x-bzip2")))


def test_encrypted_archives() -> None:
    assert rules(message(("secret.zip", samples.zipped(("a.txt", b"x"), encrypted=True), "application/zip"))) == {
        "encrypted_archive"}
    out = io.BytesIO()
    with py7zr.SevenZipFile(out, "w", password="secret") as archive:
        archive.writestr(b"hello", "a.txt")
    assert rules(message(("secret.7z", out.getvalue(), "application/x-7z-compressed"))) == {"encrypted_archive"}
    out = io.BytesIO()
    with py7zr.SevenZipFile(out, "w", password="secret", header_encryption=True) as archive:
        archive.writestr(b"hello", "a.txt")
    assert rules(message(("names.7z", out.getvalue(), "application/x-7z-compressed"))) == {"encrypted_archive"}


def test_rar_entries_are_listed_without_unrar() -> None:
    rar = samples.rar5(("setup.exe", b"MZ" + bytes(100)), ("readme.txt", b"hi"))
    assert findings(message(("x.rar", rar, "application/octet-stream"))) == {("executable", "x.rar/setup.exe")}
    secret = samples.rar5(("a.txt", b"hello"), encrypted=True)
    assert rules(message(("secret.rar", secret, "application/x-rar"))) == {"encrypted_archive"}


def test_7z_entries_are_checked_by_name() -> None:
    out = io.BytesIO()
    with py7zr.SevenZipFile(out, "w") as archive:
        archive.writestr(b"MZ", "setup.exe")
    assert ("executable", "x.7z/setup.exe") in findings(message(("x.7z", out.getvalue(), "application/octet-stream")))


def test_archive_bombs_are_caught_before_they_are_inflated() -> None:
    ratio = samples.zipped(("zeros.bin", bytes(4 * 1024 * 1024)))  # ~4 KiB packed: 1000:1
    assert rules(message(("r.zip", ratio, "application/zip"))) == {"archive_bomb"}
    many = samples.zipped(*[(f"f{i}.txt", b"x") for i in range(30)])
    assert rules(message(("m.zip", many, "application/zip")), archives={"max_entries": 20}) == {"archive_bomb"}
    # The budget is the message's: once spent, later archives are not opened at all.
    spread = message(*[(f"m{i}.zip", samples.zipped(*[(f"f{j}.txt", b"x") for j in range(8)]), "application/zip")
                       for i in range(4)], ("z.zip", samples.zipped(("setup.exe", b"MZ")), "application/zip"))
    report = scan(spread, AttachmentSettings.model_validate({"archives": {"max_entries": 20}}))
    assert [(f.rule, f.filename) for f in report.findings] == [("archive_bomb", "m2.zip")]
    gz = gzip.compress(bytes(8 * 1024 * 1024))
    assert rules(message(("z.gz", gz, "application/gzip")), archives={"max_size": 1024 * 1024}) == {"archive_bomb"}
    # A big file that compresses like text is no bomb because it is longer than max_read.
    log_lines = b"".join(b"%08d GET /index.html 200 %s\n" % (i, os.urandom(8).hex().encode())
                         for i in range(40_000))
    big = gzip.compress(log_lines)
    assert rules(message(("access.log.gz", big, "application/gzip")), archives={"max_read": 1024 * 1024}) == set()
    deep = samples.zipped(("a.txt", b"x"))
    for level in range(5):
        deep = samples.zipped((f"level{level}.zip", deep))
    assert "archive_bomb" in rules(message(("deep.zip", deep, "application/zip")))
    assert rules(message(("deep.zip", deep, "application/zip")), archives={"max_depth": 10}) == set()


def test_a_damaged_archive_is_malformed_not_an_error() -> None:
    broken = samples.zipped(("a.txt", b"hello" * 100))[:-30]
    assert rules(message(("broken.zip", b"PK\x03\x04" + broken[4:], "application/zip"))) <= {"malformed"}
    assert rules(message(("b.7z", b"7z\xbc\xaf\x27\x1c" + bytes(40), "application/x-7z-compressed"))) == {"malformed"}
    # rarfile lists a RAR 5 signature followed by nothing as an empty archive: no entry, no finding
    assert rules(message(("b.rar", b"Rar!\x1a\x07\x01\x00" + bytes(40), "application/x-rar"))) == set()


# -- hostile structure --------------------------------------------------------------------------


MIXED = 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"'


def test_malformed_structures_each_give_a_finding() -> None:
    assert rules(raw_message("MIME-Version: 1.0\nContent-Type: multipart/mixed", b"no boundary\n")) == {"malformed"}
    assert rules(raw_message(MIXED, b"the boundary never comes\n")) == {"malformed"}
    unclosed = b'--b\nContent-Type: application/octet-stream; name="a.exe"\n\nxx\n'
    assert rules(raw_message(MIXED, unclosed)) == {"malformed", "executable"}  # walked as clients do
    reused = (b'--b\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nx\n'
              b"--b--\n--b--\n")
    assert "malformed" in rules(raw_message(MIXED, reused))
    junk = b'--b\nContent-Type: application/pdf; name="a.pdf"\nContent-Transfer-Encoding: base64\n\n!!JVBER%%%i0x\n--b--\n'
    assert "malformed" in rules(raw_message(MIXED, junk))


def test_what_clients_read_differently_is_malformed() -> None:
    # Some clients split at a line that merely starts with the delimiter; RFC 2046 does not.
    lookalike = (b'--b\nContent-Type: text/plain\n\nhi\n--bX\nContent-Type: application/octet-stream; '
                 b'name="a.exe"\n\nMZ\n--b--\n')
    report = scan(raw_message(MIXED, lookalike), AttachmentSettings())
    assert [f.detail for f in report.findings] == ["part body: a line starts with the boundary but is no delimiter"]
    # Two Content-Type fields: the first for one client, the last for another.
    double = (b'--b\nContent-Type: application/pdf; name="a.pdf"\nContent-Type: application/x-msdownload; '
              b'name="a.exe"\n\nMZ\n--b--\n')
    found = {(f.rule, f.detail) for f in scan(raw_message(MIXED, double), AttachmentSettings()).findings}
    assert ("malformed", "part 1: more than one content-type field") in found
    assert ("executable", "extension .exe") in found  # the second field's name is checked too
    headers = b"X-Long: " + b"x" * 100 + b"\n"
    huge = b"--b\n" + headers * 3000 + b"\nbody\n--b--\n"
    details = [f.detail for f in scan(raw_message(MIXED, huge), AttachmentSettings()).findings]
    assert "part 1: header block over 262144 bytes" in details


def test_uuencoded_parts_are_decoded_and_fragments_reported() -> None:
    import binascii

    encoded = b"".join(binascii.b2a_uu(samples.pe()[i : i + 45]) for i in range(0, len(samples.pe()), 45))
    body = (b'--b\nContent-Type: application/octet-stream; name="a.dat"\nContent-Transfer-Encoding: x-uuencode'
            b"\n\nbegin 644 a.dat\n" + encoded + b"`\nend\n--b--\n")
    assert "executable" in rules(raw_message(MIXED, body))
    partial = raw_message("MIME-Version: 1.0\nContent-Type: message/partial; id=x; number=1; total=2", b"TVqQ\n")
    assert rules(partial) == {"malformed"}


def test_ten_thousand_parts_stop_at_the_limit() -> None:
    body = b"".join(b"--b\nContent-Type: text/plain\n\nx\n" for _ in range(10_000)) + b"--b--\n"
    report = scan(raw_message(MIXED, body), AttachmentSettings())
    assert [f.detail for f in report.findings if f.rule == "too_complex"] == ["more than 1000 MIME parts"]


def nested_rfc822(depth: int, inner: bytes = b"Subject: bottom\n\nhello\n") -> bytes:
    raw = inner
    for _ in range(depth):
        raw = b"Content-Type: message/rfc822\n\n" + raw
    return raw


RFC822 = "MIME-Version: 1.0\nContent-Type: message/rfc822"


def test_message_rfc822_a_hundred_deep() -> None:
    raw = raw_message(RFC822, nested_rfc822(99))
    report = scan(raw, AttachmentSettings())
    assert [f.detail for f in report.findings] == ["MIME parts nested more than 20 deep"]
    deep_exe = nested_rfc822(99, b'Content-Type: application/octet-stream; name="x.exe"\n\nMZ\n')
    assert rules(raw_message(RFC822, deep_exe), max_depth=200) == {"executable"}


def test_base64_encoded_rfc822_is_decoded_and_walked() -> None:
    inner = message(("evil.exe", samples.pe(), "application/octet-stream"))
    body = (b'--b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n'
            + base64.encodebytes(inner).replace(b"\n", b"\r\n") + b"--b--\n")
    assert "executable" in rules(raw_message(MIXED, body))


def test_decoded_size_limit() -> None:
    raw = message(("big.bin", bytes(300_000), "application/octet-stream"))
    assert rules(raw, max_decoded_size=100_000) == {"too_complex"}


def test_the_time_limit_stops_the_walk() -> None:
    stop = threading.Event()
    stop.set()
    report = scan(message(("a.pdf", b"%PDF-1.4\n", "application/pdf")), AttachmentSettings(), stop)
    assert report.timed_out and report.findings == []


def test_part_spans_are_exact_bytes_of_the_message() -> None:
    raw = message(("a.exe", samples.pe(), "application/octet-stream"))
    tree = walk(raw, Limits())
    start, end = tree.parts[1].span or (0, 0)
    assert raw[start:end].startswith(b"Content-Type: application/octet-stream")
    assert raw[end:].startswith(b"\r\n--")


mime_text = st.lists(
    st.sampled_from([
        b"--b\r\n", b"--b--\r\n", b"--c\r\n", b"--c--\r\n", b"Content-Type: multipart/mixed; boundary=c\r\n",
        b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Type: application/zip; name=a.zip\r\n", b"Content-Disposition: attachment; filename*0*=x;\r\n",
        b"\r\n", b"UEsDBBQ=\r\n", b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAA==\r\n", b"junk ===\r\n",
        b"Content-Type: application/octet-stream; name=\"=?utf-8?Q?a=2Eexe?=\"\r\n",
    ]),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=mime_text)
def test_any_mime_soup_gives_a_report_never_an_exception(body: list[bytes]) -> None:
    raw = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(body)
    report = scan(raw, AttachmentSettings(max_parts=50, max_depth=8))
    assert isinstance(report, Report) and not report.timed_out


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000), name=st.text(max_size=40))
def test_any_attachment_bytes_and_name_give_a_report(data: bytes, name: str) -> None:
    raw = message(("x", data, "application/octet-stream"))
    raw = raw.replace(b'filename="x"', b'filename*=utf-8\'\'' + bytes(
        "".join(f"%{b:02X}" for b in name.encode("utf-8")), "ascii"))
    assert isinstance(scan(raw, AttachmentSettings()), Report)


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=60))
def test_any_name_is_cleaned_to_something_without_invisible_characters(name: str) -> None:
    import unicodedata

    cleaned = clean(name)
    assert not any(unicodedata.category(c) in ("Cf", "Cc") for c in cleaned.effective)
    assert all(ext == ext.casefold() for ext in cleaned.extensions)
    assert not cleaned.effective.endswith((".", " "))


@settings(max_examples=40, deadline=None)
@given(attachments=st.lists(st.tuples(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=20),
    st.binary(max_size=300),
    st.sampled_from(["application/octet-stream", "image/png", "text/plain", "application/pdf"])), max_size=5))
def test_the_walk_finds_the_parts_the_stdlib_parser_finds(attachments: list[tuple[str, bytes, str]]) -> None:
    import email
    from email.policy import default

    raw = message(*attachments)
    leaves = [p for p in email.message_from_bytes(raw, policy=default).walk() if not p.is_multipart()]
    tree = walk(raw, Limits())
    assert len(tree.parts) == len(leaves) and tree.malformed == []
    for part, leaf in zip(tree.parts, leaves, strict=True):
        assert part.payload == leaf.get_payload(decode=True)
        start, end = part.span or (0, 0)
        assert raw[start:end].startswith(b"Content-Type: " if part.number else b"From: ")


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile normalises some names alike
@settings(max_examples=60, deadline=None)
@given(entries=st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=200)), max_size=8,
                        unique_by=lambda entry: entry[0]),
       cut=st.integers(min_value=0, max_value=400))
def test_any_truncated_zip_gives_a_report(entries: list[tuple[str, bytes]], cut: int) -> None:
    data = samples.zipped(*entries)
    data = data[: len(data) - cut] if cut < len(data) else data
    assert isinstance(scan(message(("a.zip", data, "application/zip")), AttachmentSettings()), Report)


# -- verdicts, through the tracer ---------------------------------------------------------------------


async def trace(raw: bytes, **settings_: Any) -> Any:
    return await run_plugins([make_plugin(Attachments, **settings_)], raw)


async def test_reject_names_the_file_and_the_rule() -> None:
    result = await trace(message(("invoice.pdf.exe", samples.pe(), "application/octet-stream")))
    assert result.decision == "rejected"
    assert result.reply == '550 5.7.1 Message refused: attachment "invoice.pdf.exe" is not allowed (executable file)'
    assert "attachments:executable" in result.tags and "attachments:deceptive_name" in result.tags


async def test_the_reply_never_carries_what_the_client_sent_raw() -> None:
    result = await trace(message(("inv\u202efdp.exe\u0007", b"x", "application/octet-stream")))
    assert result.decision == "rejected"
    assert result.reply.isascii() and "\u202e" not in result.reply and "\x07" not in result.reply


async def test_quarantine_and_score_actions() -> None:
    html = message(("page.html", b"<html><body>x</body></html>", "text/html"))
    assert (await trace(html)).decision == "quarantined"
    scored = await trace(html, rules={"html": {"action": 4.5}})
    assert scored.decision == "delivered" and scored.score == 4.5
    assert "attachments:html" in scored.tags


async def test_timeout_tempfails_by_default() -> None:
    result = await trace(message(("a.pdf", b"%PDF-1.4\n", "application/pdf")), timeout=1e-9)
    assert result.decision == "tempfailed"
    assert result.reply == "451 4.7.1 Attachment check did not finish, try again later"


async def test_a_reject_found_before_time_ran_out_still_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    from smtpproxy_plugins import attachments

    def out_of_time(data: bytes) -> str:
        raise attachments.ScanTimeout  # time runs out at the first content check

    monkeypatch.setattr(attachments, "detect", out_of_time)
    slow = message(("a.exe", b"MZ", "application/octet-stream"), ("b.pdf", b"%PDF-1.4\n", "application/pdf"))
    report = scan(slow, AttachmentSettings())
    assert report.timed_out and {f.rule for f in report.findings} == {"executable"}  # by its name
    result = await trace(slow)
    assert result.decision == "rejected" and '"a.exe"' in result.reply
    unnamed = await trace(message(("b.pdf", b"%PDF-1.4\n", "application/pdf")))
    assert unnamed.decision == "tempfailed"  # nothing found yet: on_timeout


async def test_strip_replaces_only_the_part_and_keeps_every_other_byte() -> None:
    raw = message(("report.pdf", b"%PDF-1.4\n", "application/pdf"),
                  ("invoice.exe", samples.pe(), "application/octet-stream"),
                  ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(16), "image/png"))
    result = await trace(raw, rules={"executable": {"action": "strip"}, "deceptive_name": {"action": "strip"}})
    assert result.decision == "delivered" and result.body_replaced
    assert "attachments:stripped" in result.tags
    out = result.message.raw
    start, end = walk(raw, Limits()).parts[2].span or (0, 0)
    notice = (b"Content-Type: text/plain; charset=us-ascii\r\nContent-Disposition: inline\r\n"
              b"Content-Transfer-Encoding: 7bit\r\n\r\n"
              b'The attachment "invoice.exe" was removed by the mail filter: executable file.')
    assert out == raw[:start] + notice + raw[end:]
    assert rules(out) == set()  # what is delivered passes its own check


async def test_strip_of_a_structure_problem_falls_back_to_reject() -> None:
    raw = raw_message(RFC822, nested_rfc822(30))
    result = await trace(raw, rules={"too_complex": {"action": "strip"}})
    assert result.decision == "rejected"
    assert result.reply == "550 5.7.1 Message refused: attachment (message) is not allowed (message too complex to check)"


async def test_a_clean_message_is_untouched() -> None:
    raw = message(("report.pdf", b"%PDF-1.4\n", "application/pdf"))
    result = await trace(raw)
    assert result.decision == "delivered" and result.steps_for("attachments")[0].action == "continue"
    assert isinstance(result.message, Message) and result.message.raw == raw
