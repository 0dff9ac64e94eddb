"""clamav: the zINSTREAM exchange against a real, private clamd (Debian's clamav-daemon), and
the verdicts through a real proxy to a real sink and to the tests' real Postfix.

clamd is started once for this module (tests/clamd_server.py), on a private unix socket and a
free loopback TCP port, with a config and a signature database written by the tests (nothing
downloaded, no freshclam): EICAR and a PUA marker as .ndb body signatures, and a custom
payload as an .hdb hash signature, which the tests hide in a zip, base64-encoded inside a
multipart message. The tests skip, with the reason, only where clamd is not installed (CI
installs it).
"""

from __future__ import annotations

import asyncio
import base64
import email
import importlib.metadata
import io
import json
import logging
import mmap
import re
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from smtpproxy_plugins.clamav import (
    CHUNK,
    MAIL_MARKER,
    ClamAV,
    ClamdError,
    ClamdResult,
    Server,
    classify,
    instream,
    instream_writes,
    parse_reply,
)

from smtpproxy import Message
from smtpproxy.milter import codec
from smtpproxy.startup import StartupError
from tests.clamd_server import EICAR, MAX_FILE_SIZE, PAYLOAD, PUA_MARKER, STREAM_MAX, Clamd, start_clamd
from tests.conftest import ProxyFactory, Sink, closed_port, port_of
from tests.postfix_instance import PostfixFactory
from tests.scanner_parts import CLEAN, Probe, header, mail, send
from tests.wire.test_milter import Factory as MilterFactory
from tests.wire.test_milter import FakeMTA
from tests.wire.test_milter import milter as milter  # noqa: PLC0414 - the milter front end's fixture

EICAR_SIG = "Smtpproxy.Test.EICAR.UNOFFICIAL"
CUSTOM_SIG = "Smtpproxy.Test.Custom.UNOFFICIAL"
PUA_SIG = "PUA.Win.Tool.SmtpproxyTest.UNOFFICIAL"


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    workdir = Path(tempfile.mkdtemp(prefix="smtpproxy-clamd-"))  # short: a unix socket path
    try:
        server = start_clamd(workdir)
        yield server
        server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- messages ------------------------------------------------------------------------------------


def multipart(attachment: bytes, name: str, ctype: str = "application/zip") -> bytes:
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        b"From: Alice <alice@sender.test>\r\nTo: Bob <bob@dest.test>\r\nSubject: the files\r\n"
        b"Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMessage-ID: <mp-1@sender.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=-b-="\r\n\r\n'
        b"--=-b-=\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee the attachment.\r\n"
        b"--=-b-=\r\nContent-Type: " + ctype.encode() + b'; name="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n\r\n'
        + encoded + b"--=-b-=--\r\n"
    )


def zipped(payload: bytes, name: str = "invoice.bin", *, encrypted: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, payload)
    data = bytearray(buf.getvalue())
    if encrypted:  # the "encrypted" flag bit in the local and the central header, as zip -e sets it
        data[6] |= 1
        central = data.find(b"PK\x01\x02")
        data[central + 8] |= 1
    return bytes(data)


INFECTED = mail("Hi Bob,\r\n\r\n" + EICAR.decode() + "\r\n\r\nAlice", subject="the test file")
ZIP_IN_MULTIPART = multipart(zipped(PAYLOAD), "invoice.zip")
CLEAN_ZIP = multipart(zipped(b"just a harmless text file\n"), "notes.zip")


def clamav(*servers: str, **settings: Any) -> ClamAV:
    plugin = ClamAV(ClamAV.Settings.model_validate({"servers": list(servers), **settings}))
    plugin.name = "clamav"  # type: ignore[attr-defined]
    plugin.timeout = 10  # type: ignore[attr-defined]  # the chain's time limit for the hook
    return plugin


async def scan(address: str, content: bytes | Message) -> ClamdResult:
    message = content if isinstance(content, Message) else Message(content)
    return await instream(Server.parse(address), message.parts(), connect_timeout=2)


# -- the protocol, against the real clamd ---------------------------------------------------------


@pytest.mark.parametrize("where", ["unix", "tcp"])
async def test_instream_clean_and_eicar_over_unix_socket_and_tcp(clamd: Clamd, where: str) -> None:
    address = clamd.unix if where == "unix" else clamd.tcp
    assert await scan(address, CLEAN) == ClamdResult(None)
    assert await scan(address, INFECTED) == ClamdResult(EICAR_SIG)


async def test_custom_signature_in_a_zip_base64_encoded_in_a_multipart(clamd: Clamd) -> None:
    assert await scan(clamd.unix, ZIP_IN_MULTIPART) == ClamdResult(CUSTOM_SIG)
    assert await scan(clamd.unix, CLEAN_ZIP) == ClamdResult(None)


async def test_a_header_block_clamd_would_not_take_for_mail_is_still_decoded(clamd: Clamd) -> None:
    # clamd types a stream by its first bytes: a message whose header block starts with
    # Content-Type (no From, To, Subject, ...) is not mail to it, and the base64 zip is never
    # opened. The plugin's Received line in front of the stream makes it mail.
    bare = ZIP_IN_MULTIPART[ZIP_IN_MULTIPART.index(b"Content-Type: multipart"):]
    assert await scan(clamd.unix, bare) == ClamdResult(CUSTOM_SIG)
    assert await scan(clamd.unix, b"Comments: hi\r\n" + bare) == ClamdResult(CUSTOM_SIG)


async def test_pua_encrypted_and_limit_results_are_told_apart(clamd: Clamd) -> None:
    pua = await scan(clamd.unix, mail(f"get the {PUA_MARKER.decode()} tool"))
    assert pua.signature == PUA_SIG and classify(PUA_SIG) == "pua"
    encrypted = await scan(clamd.unix, multipart(zipped(PAYLOAD, encrypted=True), "locked.zip"))
    assert encrypted.signature == "Heuristics.Encrypted.Zip" and classify("Heuristics.Encrypted.Zip") == "encrypted"
    big = multipart(bytes(range(256)) * (MAX_FILE_SIZE // 256 + 100), "big.bin", "application/octet-stream")
    limits = await scan(clamd.unix, big)
    assert limits.signature == "Heuristics.Limits.Exceeded.MaxFileSize"
    assert classify(limits.signature) == "unscanned"


async def test_stream_over_streammaxlength_is_its_own_result(clamd: Clamd) -> None:
    body = mail("x" * 70 + "\r\n") * (STREAM_MAX // 200)
    assert len(body) > STREAM_MAX
    for address in (clamd.unix, clamd.tcp):
        try:
            result = await scan(address, body)
        except ClamdError as exc:  # TCP may lose clamd's answer to the reset: then it is an error
            assert address == clamd.tcp and "closed the connection" in str(exc)
        else:
            assert result == ClamdResult(None, over_stream_limit=True)


async def test_a_spooled_message_is_streamed_from_its_map_never_copied_whole(
    clamd: Clamd, tmp_path: Path
) -> None:
    spool = tmp_path / "spooled.eml"
    filler = b"".join(b"line %07d of a long and harmless message body\r\n" % i for i in range(60000))
    spool.write_bytes(INFECTED.replace(b"Hi Bob,", filler + b"Hi Bob,"))
    assert spool.stat().st_size > 3_000_000
    with spool.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    message = Message(mapped)
    message.add_header("X-Stamp", "edited")  # parts() are then a head, the body view, ...
    tracemalloc.start()
    try:
        result = await scan(clamd.unix, message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.signature == "Heuristics.Limits.Exceeded.MaxFileSize"  # 3 MB > MaxFileSize: flagged
    assert peak < 1_000_000, f"{peak} bytes allocated while streaming a {spool.stat().st_size}-byte message"
    mapped.close()  # raises BufferError if a view of the map were still held


def test_signature_kinds() -> None:
    assert [classify(n) for n in (
        "Win.Trojan.Agent-1", "Heuristics.Broken.Executable", "Heuristics.Phishing.Email.SpoofedDomain",
        "PUA.Win.Packer.Upx-1", "Heuristics.Encrypted.PDF", "Heuristics.Limits.Exceeded.MaxScanSize",
        "Broken.Executable",
    )] == ["infected", "heuristic", "phishing", "pua", "encrypted", "unscanned", "heuristic"]


# -- parsing, without clamd ----------------------------------------------------------------------


def test_reply_parsing() -> None:
    assert parse_reply(b"stream: OK\0") == ClamdResult(None)
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == ClamdResult("Win.Test.EICAR_HDB-1")
    extended = b"stream: Eicar-Signature(44d88612fea8a8f36de82e1278abb02f:68) FOUND\0"
    assert parse_reply(extended) == ClamdResult("Eicar-Signature")  # ExtendedDetectionInfo yes
    assert parse_reply(b"INSTREAM size limit exceeded. ERROR\0").over_stream_limit
    for bad, match in [(b"stream: Can't allocate memory ERROR\0", "answered"),
                       (b"UNKNOWN COMMAND\0", "not a clamd"), (b"stream: \x01 FOUND\0", "not a clamd"),
                       (b"1: stream: OK\0", "not a clamd"), (b"stream:  FOUND\0", "not a clamd")]:
        with pytest.raises(ClamdError, match=match):
            parse_reply(bad)


@given(st.binary(max_size=300))
def test_any_reply_is_a_result_or_a_clamd_error(reply: bytes) -> None:
    try:
        result = parse_reply(reply)
    except ClamdError:
        return
    if result.signature is not None:
        assert re.fullmatch(r"[\x21-\x7e][\x20-\x7e]*", result.signature) and len(result.signature) <= 200


def _unframe(stream: bytes) -> list[bytes]:
    """zINSTREAM's chunks, as clamd reads them, up to the zero-length end (which must end it)."""
    assert stream.startswith(b"zINSTREAM\0")
    chunks, at = [], len(b"zINSTREAM\0")
    while (length := int.from_bytes(stream[at : at + 4], "big")) != 0:
        assert 0 < length <= CHUNK
        chunks.append(stream[at + 4 : at + 4 + length])
        at += 4 + length
    assert at + 4 == len(stream), "octets after the end of the stream"
    return chunks


@given(st.lists(st.binary(max_size=3 * CHUNK // 2), max_size=4))
def test_the_stream_carries_the_marker_and_every_part_in_writes_of_about_a_chunk(parts: list[bytes]) -> None:
    writes = list(instream_writes(parts))
    chunks = _unframe(b"".join(writes))
    assert chunks[0] == MAIL_MARKER and b"".join(chunks[1:]) == b"".join(parts)
    # One system call per write: only the last may be short, however the message was cut.
    assert all(len(w) >= CHUNK for w in writes[:-1])


def test_a_small_message_in_parts_goes_to_clamd_in_one_write() -> None:
    """A header edit makes three parts (head, separator, body); still one write."""
    writes = list(instream_writes([b"Subject: hi\r\n", b"\r\n", b"body\r\n"]))
    assert len(writes) == 1
    assert _unframe(writes[0]) == [MAIL_MARKER, b"Subject: hi\r\n", b"\r\n", b"body\r\n"]


@given(st.text(max_size=60))
def test_any_server_text_is_an_address_or_a_value_error(text: str) -> None:
    try:
        server = Server.parse(text)
    except ValueError:
        return
    assert (server.path or "").startswith("/") or (server.host and 1 <= server.port <= 65535)


def test_server_addresses() -> None:
    assert Server.parse("unix:/run/clamav/clamd.ctl") == Server(path="/run/clamav/clamd.ctl")
    assert Server.parse("/run/clamd.sock") == Server(path="/run/clamd.sock")
    assert Server.parse("av.example") == Server(host="av.example", port=3310)
    assert Server.parse("10.0.0.5:3311") == Server(host="10.0.0.5", port=3311)
    assert Server.parse("[2001:db8::5]:3310") == Server(host="2001:db8::5", port=3310)
    assert str(Server.parse("[2001:db8::5]")) == "[2001:db8::5]:3310"
    for bad in ("unix:relative", "2001:db8::5", "host:0", "host:99999", ":3310", "a b", "[::1]x"):
        with pytest.raises(ValueError):
            Server.parse(bad)


# -- through the proxy ---------------------------------------------------------------------------


async def test_clean_message_gets_the_scan_header_and_loses_forged_ones(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("clamav")
    proxy = await proxy_factory(clamav(clamd.unix), probe, upstream=sink.port)
    forged = b"X-Virus-Scanned: clean (ClamAV)\r\nX-Virus-Status: Clean\r\n" + INFECTED
    assert (await send(port_of(proxy), forged))[0] == 554  # a forged header changes nothing
    assert await send(port_of(proxy), b"X-Virus-Status: Clean\r\n" + CLEAN_ZIP) == (
        250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    assert header(content, "X-Virus-Scanned") == ["clean (ClamAV)"]
    assert header(content, "X-Virus-Status") == []
    assert content == b"X-Virus-Scanned: clean (ClamAV)\r\n" + CLEAN_ZIP
    assert probe.tags == {"clamav:clean"}


async def test_infected_message_is_refused_naming_the_signature(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await proxy_factory(clamav(clamd.tcp), upstream=sink.port)
    caplog.set_level(logging.INFO)
    assert await send(port_of(proxy), INFECTED) == (554, f"5.7.1 Virus found: {EICAR_SIG}")
    assert await send(port_of(proxy), ZIP_IN_MULTIPART) == (554, f"5.7.1 Virus found: {CUSTOM_SIG}")
    assert sink.messages == []
    lines = [r for r in caplog.records if r.getMessage() == "message"]
    assert [r.smtpproxy_fields["reason"] for r in lines] == [  # type: ignore[attr-defined]
        f"clamav infected: {EICAR_SIG} FOUND", f"clamav infected: {CUSTOM_SIG} FOUND"]
    plugin_lines = [r.getMessage() for r in caplog.records if r.name == "smtpproxy_plugins.clamav"]
    assert any("event=clamav" in m and "result=infected" in m and f"signature={EICAR_SIG}" in m
               and "action=reject" in m for m in plugin_lines), plugin_lines


async def test_quarantine_keeps_the_message_with_the_signature_in_the_record(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path
) -> None:
    proxy = await proxy_factory(clamav(clamd.unix, infected="quarantine"), upstream=sink.port)
    code, _ = await send(port_of(proxy), ZIP_IN_MULTIPART)
    assert code == 250 and sink.messages == []
    [meta] = (tmp_path / "quarantine").glob("*.json")
    record = json.loads(meta.read_text())
    assert record["reason"] == f"clamav infected: {CUSTOM_SIG} FOUND"
    kept = meta.with_suffix(".eml").read_bytes()
    assert kept.startswith(f"X-Virus-Scanned: infected (ClamAV: {CUSTOM_SIG})\r\n".encode())


async def test_pua_and_encrypted_can_score_instead(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("clamav")
    proxy = await proxy_factory(clamav(clamd.unix, pua=4.5, encrypted=2.0), probe, upstream=sink.port)
    assert (await send(port_of(proxy), mail(f"get the {PUA_MARKER.decode()} tool")))[0] == 250
    assert probe.tags == {"clamav:pua", f"clamav:{PUA_SIG}"} and probe.score == 4.5
    assert header(sink.messages[0].content, "X-Virus-Scanned") == [f"pua (ClamAV: {PUA_SIG})"]
    assert (await send(port_of(proxy), multipart(zipped(PAYLOAD, encrypted=True), "a.zip")))[0] == 250
    assert probe.tags == {"clamav:encrypted", "clamav:Heuristics.Encrypted.Zip"} and probe.score == 2.0


async def test_signature_patterns_override_the_results_action(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("clamav")
    settings = {"signatures": {"smtpproxy.test.custom.*": "reject", "*.UNOFFICIAL": 2.5}}
    proxy = await proxy_factory(clamav(clamd.unix, **settings), probe, upstream=sink.port)
    assert (await send(port_of(proxy), INFECTED))[0] == 250  # first pattern misses, second matches
    assert probe.score == 2.5 and probe.tags == {"clamav:infected", f"clamav:{EICAR_SIG}"}
    assert await send(port_of(proxy), ZIP_IN_MULTIPART) == (554, f"5.7.1 Virus found: {CUSTOM_SIG}")


async def test_not_fully_scanned_is_quarantined_by_default_or_as_configured(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path
) -> None:
    big = multipart(bytes(range(256)) * (MAX_FILE_SIZE // 256 + 100), "big.bin", "application/octet-stream")
    proxy = await proxy_factory(clamav(clamd.unix), upstream=sink.port)
    assert (await send(port_of(proxy), big))[0] == 250 and sink.messages == []
    [meta] = (tmp_path / "quarantine").glob("*.json")
    assert json.loads(meta.read_text())["reason"] == (
        "clamav unscanned: Heuristics.Limits.Exceeded.MaxFileSize FOUND")
    strict = await proxy_factory(clamav(clamd.unix, unscanned="reject"), upstream=sink.port)
    assert await send(port_of(strict), big) == (554, "5.7.1 Message could not be scanned for viruses")


async def test_oversize_is_not_sent_and_gets_its_own_action(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("clamav")
    # No clamd at all: an oversize message must not even be sent.
    proxy = await proxy_factory(clamav(f"127.0.0.1:{closed_port()}", max_size=200, oversize=1.0), probe,
                                upstream=sink.port)
    assert len(CLEAN) > 200
    assert (await send(port_of(proxy), CLEAN))[0] == 250
    assert probe.tags == {"clamav:oversize"} and probe.score == 1.0
    assert "over max_size 200" in probe.reasons[0]
    assert header(sink.messages[0].content, "X-Virus-Scanned") == ["oversize (ClamAV: over max_size)"]


async def test_failover_to_the_next_server(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    nonsense = await asyncio.start_server(_answering(b"HELLO THERE\0"), "127.0.0.1", 0)
    try:
        first, second = f"127.0.0.1:{closed_port()}", f"127.0.0.1:{nonsense.sockets[0].getsockname()[1]}"
        proxy = await proxy_factory(clamav(first, second, clamd.unix), upstream=sink.port)
        with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.clamav"):
            assert await send(port_of(proxy), INFECTED) == (554, f"5.7.1 Virus found: {EICAR_SIG}")
        failed = [r.getMessage() for r in caplog.records if "clamav_server_failed" in r.getMessage()]
        assert len(failed) == 2 and "cannot connect" in failed[0] and "not a clamd" in failed[1]
    finally:
        nonsense.close()


async def test_randomize_shuffles_the_servers_for_each_message(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders: list[list[str]] = []

    def reverse(servers: list[Any]) -> None:  # a "shuffle" the test can predict
        servers.reverse()
        orders.append([str(s) for s in servers])

    monkeypatch.setattr("smtpproxy_plugins.clamav.random.shuffle", reverse)
    down = f"127.0.0.1:{closed_port()}"
    proxy = await proxy_factory(clamav(clamd.unix, down, randomize=True, probe_limits="off"), upstream=sink.port)
    with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.clamav"):
        assert await send(port_of(proxy), INFECTED) == (554, f"5.7.1 Virus found: {EICAR_SIG}")
    assert orders == [[down, clamd.unix]]  # the closed one first: it failed, clamd answered
    assert [down in r.getMessage() for r in caplog.records if "clamav_server_failed" in r.getMessage()] == [True]


# -- the startup probe of AlertExceedsMax ---------------------------------------------------------


async def test_startup_probe_finds_a_clamd_that_reports_its_limits(
    clamd: Clamd, proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="smtpproxy_plugins.clamav"):
        await proxy_factory(clamav(clamd.unix, clamd.tcp, probe_limits="refuse"), upstream=sink.port)
    probes = [r.getMessage() for r in caplog.records if "event=clamav_probe " in r.getMessage()]
    assert len(probes) == 2 and all(
        "result=reported signature=Heuristics.Limits.Exceeded.MaxRecursion" in m for m in probes), probes


async def test_startup_probe_finds_a_clamd_that_answers_ok_for_what_it_did_not_scan(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="smtpproxy-clamd-"))
    try:
        lax = await asyncio.to_thread(start_clamd, workdir, alert_exceeds_max=False)
        try:
            # What the probe is for: over MaxFileSize, this clamd says OK and the message passes.
            big = multipart(bytes(range(256)) * (MAX_FILE_SIZE // 256 + 100), "big.bin", "application/octet-stream")
            assert await scan(lax.unix, big) == ClamdResult(None)
            with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.clamav"):
                await proxy_factory(clamav(lax.unix), upstream=sink.port)  # probe_limits: warn
            assert any("event=clamav_limits_unreported" in r.getMessage() and lax.unix in r.getMessage()
                       and "AlertExceedsMax yes" in r.getMessage() for r in caplog.records)
            with pytest.raises(StartupError, match=r"answered OK for a zip it cannot scan.*AlertExceedsMax yes") as info:
                await proxy_factory(clamav(lax.unix, probe_limits="refuse"), upstream=sink.port)
            assert str(info.value).startswith("plugin clamav: startup failed: RuntimeError: clamd at unix:")
        finally:
            lax.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_startup_probe_of_an_unreachable_clamd_only_logs(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.clamav"):
        await proxy_factory(clamav(f"127.0.0.1:{closed_port()}", probe_limits="refuse"), upstream=sink.port)
    assert any("event=clamav_probe " in r.getMessage() and "result=error" in r.getMessage()
               for r in caplog.records)


# -- failures: clamd down, slow, answering nonsense ------------------------------------------------


def _answering(reply: bytes, *, delay: float = 0.0, read_all: bool = True) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if read_all:
                while (await reader.read(65536)).find(b"\0\0\0\0") == -1:
                    pass
            await asyncio.sleep(delay)
            writer.write(reply)
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
    return serve


@pytest.mark.parametrize("case", [
    pytest.param((b"stream: OK\0", 5.0, "within 0.3 s"), id="slow"),
    pytest.param((b"Sure, looks fine to me\0", 0.0, "not a clamd INSTREAM result"), id="nonsense"),
    pytest.param((b"stream: OK", 0.0, "not NUL-terminated"), id="unterminated"),
    pytest.param((b"", 0.0, "without an answer"), id="silent-close"),
    pytest.param((b"stream: Can't allocate memory ERROR\0", 0.0, "answered"), id="error"),
    pytest.param((b"stream: " + b"A" * 5000 + b" FOUND\0", 0.0, "longer than"), id="huge"),
])
async def test_a_broken_clamd_tempfails_by_default(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture, case: tuple[bytes, float, str],
) -> None:
    reply, delay, expect = case
    server = await asyncio.start_server(_answering(reply, delay=delay), "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proxy = await proxy_factory(clamav(address, timeout=0.3), upstream=sink.port)
        with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.clamav"):
            assert await send(port_of(proxy), CLEAN) == (
                451, "4.7.1 Virus scan temporarily unavailable, try again later")
        assert sink.messages == []
        assert any("event=clamav " in r.getMessage() and "result=error" in r.getMessage()
                   and expect in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        server.close()


async def test_clamd_down_tempfails_or_does_what_on_error_says(
    proxy_factory: ProxyFactory, sink: Sink, tmp_path: Path
) -> None:
    down = [f"127.0.0.1:{closed_port()}", f"unix:{tmp_path}/no-such.sock"]
    proxy = await proxy_factory(clamav(*down), upstream=sink.port)
    assert await send(port_of(proxy), CLEAN) == (451, "4.7.1 Virus scan temporarily unavailable, try again later")
    probe = Probe("clamav")
    lenient = await proxy_factory(clamav(*down, on_error=2.0), probe, upstream=sink.port)
    assert (await send(port_of(lenient), CLEAN))[0] == 250
    assert probe.tags == {"clamav:error"} and probe.score == 2.0
    assert header(sink.messages[0].content, "X-Virus-Scanned") == ["error (ClamAV: scan failed)"]


# -- through the proxy to the tests' Postfix ------------------------------------------------------


async def test_through_postfix_clean_arrives_byte_identical_and_infected_is_refused(
    clamd: Clamd, proxy_factory: ProxyFactory, postfix_factory: PostfixFactory
) -> None:
    postfix = postfix_factory()
    delivery = {"type": "smtp", "host": "127.0.0.1", "port": postfix.port, "tls": "none",
                "connect_timeout": 5, "command_timeout": 10, "data_timeout": 30}
    proxy = await proxy_factory(clamav(clamd.unix, clamd.tcp), relay={"domains": ["dest.test"], "networks": []},
                                delivery=delivery)
    assert await send(port_of(proxy), INFECTED) == (554, f"5.7.1 Virus found: {EICAR_SIG}")
    assert await send(port_of(proxy), ZIP_IN_MULTIPART) == (554, f"5.7.1 Virus found: {CUSTOM_SIG}")
    code, text = await send(port_of(proxy), CLEAN_ZIP)
    assert code == 250 and "queued as" in text
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    parsed = email.message_from_bytes(stored)
    assert parsed["X-Virus-Scanned"] == "clean (ClamAV)"
    # Postfix stores LF line ends and adds Return-Path, Delivered-To and its Received: the rest,
    # from our header on, is the message byte for byte.
    wire = stored.replace(b"\n", b"\r\n")
    assert wire.endswith(b"X-Virus-Scanned: clean (ClamAV)\r\n" + CLEAN_ZIP)
    assert postfix.messages("bob") == [stored]  # the infected ones never reached it


# -- settings and registration --------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = ClamAV.Settings()
    assert s.servers == ["unix:/run/clamav/clamd.ctl"] and s.on_error == "tempfail"
    assert (s.infected, s.heuristic, s.pua, s.encrypted, s.phishing) == ("reject",) * 4 + (5.0,)
    assert (s.unscanned, s.oversize, s.max_size, s.reject_code) == ("quarantine", "quarantine", 26214400, 554)
    for bad in ({"servers": []}, {"servers": ["host:0"]}, {"on_error": "explode"}, {"timeout": 0},
                {"reject_text": "Virus {name}"}, {"reject_text": "a\r\nb"}, {"header": "X Bad"},
                {"remove_headers": ["X:y"]}, {"signatures": {"a\nb": 1.0}}, {"signatures": {"x": "maybe"}}, {"reject_code": 450}, {"infected": float("nan")}, {"hots": 1}):
        with pytest.raises(ValidationError):
            ClamAV.Settings.model_validate(bad)
    for name, field in ClamAV.Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_docs_example_chain_is_valid(tmp_path: Path) -> None:
    from smtpproxy.config import load_config

    text = (Path(__file__).parents[2] / "docs" / "plugins" / "clamav.md").read_text()
    block = re.findall(r"```yaml\n(.*?)```", text, re.S)[0]
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\ndelivery: {type: maildir, path: /tmp/m}\n" + block
    )
    config, _ = load_config(tmp_path / "smtpproxy.yaml")
    assert config.plugins[0].name == "clamav"
    ClamAV.Settings.model_validate(config.plugins[0].settings)


def test_entry_point_is_registered() -> None:
    [ep] = [e for e in importlib.metadata.entry_points(group="smtpproxy.plugins") if e.name == "clamav"]
    assert ep.load() is ClamAV


# -- the same plugin in the milter front end ------------------------------------------------------


async def test_in_the_milter_an_infected_message_is_refused_and_a_clean_one_gets_the_header(
    clamd: Clamd, milter: MilterFactory
) -> None:
    server = await milter(clamav(clamd.unix))
    headers = [("From", " Alice <alice@sender.test>"), ("To", " bob@dest.test"), ("Subject", " files"),
               ("X-Virus-Status", " Clean")]
    mta = await FakeMTA.open(server)
    await mta.start()
    await mta.envelope()
    assert await mta.content(headers, b"Hi,\r\n" + EICAR + b"\r\n") == [
        codec.ReplyCode(f"554 5.7.1 Virus found: {EICAR_SIG}")]
    await mta.envelope()
    responses = await mta.content(headers, b"Hi Bob, lunch at noon?\r\n")
    await mta.close()
    assert responses[-1] == codec.Accept()
    assert sorted(map(repr, responses[:-1])) == sorted(map(repr, [
        codec.ChangeHeader(1, "X-Virus-Status", ""), codec.InsertHeader(0, "X-Virus-Scanned", " clean (ClamAV)")]))


def test_the_offline_tracer_asks_clamd_too(clamd: Clamd, tmp_path: Path) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        f"listeners: [{{port: 2525}}]\ndelivery: {{type: maildir, path: {tmp_path / 'mail'}}}\n"
        f"plugins:\n  - name: clamav\n    settings: {{servers: ['{clamd.unix}']}}\n"
    )
    eml = tmp_path / "infected.eml"
    eml.write_bytes(ZIP_IN_MULTIPART)
    result = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "test-message", str(eml), "--from", "alice@sender.test",
         "--rcpt", "bob@dest.test", "-c", str(config)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stdout + result.stderr  # rejected
    assert f"decision  REJECTED  554 5.7.1 Virus found: {CUSTOM_SIG}" in result.stdout
