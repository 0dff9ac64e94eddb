"""attachments in a real proxy in front of the tests' private Postfix, as docs/plugins/attachments.md
describes it: clean mail arrives byte for byte, each dangerous case gets its documented answer
and never reaches Postfix, a stripped part arrives as its notice."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import pytest
from smtpproxy_plugins.attachments import Attachments

from smtpproxy.pytest_plugin import make_plugin
from smtpproxy.quarantine import QuarantineStore
from tests import attachment_samples as samples
from tests.attachment_samples import message
from tests.conftest import ProxyFactory, Talk, port_of
from tests.postfix.test_milter_postfix import Start as MilterStart
from tests.postfix.test_milter_postfix import postfix_with_milter  # noqa: F401 - the fixture
from tests.postfix.test_milter_postfix import send as milter_send
from tests.postfix_instance import PostfixFactory, PostfixInstance

RELAY = {"domains": ["dest.test"], "networks": []}


def upstream(instance: PostfixInstance) -> dict[str, object]:
    return {"type": "smtp", "host": "127.0.0.1", "port": instance.port, "tls": "none",
            "connect_timeout": 5, "command_timeout": 10, "data_timeout": 30}


async def send(port: int, body: bytes) -> tuple[int, str]:
    client = await Talk.open(port)
    await client.hello("mail.client.example")
    reply = await client.send_message("alice@sender.test", ["bob@dest.test"], body)
    await client.close()
    return reply


def body_of(stored: bytes) -> bytes:
    """Postfix stores Maildir files with LF line ends; compare bodies in wire form."""
    return stored.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


@pytest.fixture
def postfix(postfix_factory: PostfixFactory) -> PostfixInstance:
    return postfix_factory()


async def proxy_port(proxy_factory: ProxyFactory, postfix: PostfixInstance, **settings: object) -> int:
    plugin = make_plugin(Attachments, **settings)
    proxy = await proxy_factory(plugin, relay=RELAY, delivery=upstream(postfix))
    return port_of(proxy)


async def test_clean_attachments_arrive_byte_identical(
    proxy_factory: ProxyFactory, postfix: PostfixInstance
) -> None:
    raw = message(("report.pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n" * 50, "application/pdf"),
                  ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(2000), "image/png"),
                  ("data.zip", samples.zipped(("a.txt", b"hello"), ("b.csv", b"1,2\n")), "application/zip"),
                  ("report.docx", samples.ooxml(), "application/vnd.openxmlformats-officedocument."
                                                   "wordprocessingml.document"))
    code, text = await send(await proxy_port(proxy_factory, postfix), raw)
    assert code == 250 and "queued as" in text
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    assert body_of(stored) == raw.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(("attachment", "reply"), [
    (("invoice.pdf.exe", samples.pe(), "application/octet-stream"),
     'Message refused: attachment "invoice.pdf.exe" is not allowed (executable file)'),
    (("invoice.pdf", samples.pe(), "application/pdf"),
     'Message refused: attachment "invoice.pdf" is not allowed (executable file)'),
    (("invoice\u202efdp.js", b"WScript.Shell", "application/octet-stream"),
     'Message refused: attachment "invoice?fdp.js" is not allowed (deceptive file name)'),
    (("docs.zip", samples.zipped(("setup.exe", samples.pe())), "application/zip"),
     'Message refused: attachment "docs.zip/setup.exe" is not allowed (executable file)'),
    (("tools.rar", samples.rar5(("setup.exe", samples.pe())), "application/x-rar"),
     'Message refused: attachment "tools.rar/setup.exe" is not allowed (executable file)'),
    (("cd.iso", samples.iso(), "application/octet-stream"),
     'Message refused: attachment "cd.iso" is not allowed (disk image)'),
    (("shortcut.lnk", samples.lnk(), "application/octet-stream"),
     'Message refused: attachment "shortcut.lnk" is not allowed (Windows shortcut)'),
    (("report.docm", samples.ooxml(macros=True), "application/octet-stream"),
     'Message refused: attachment "report.docm" is not allowed (Office document with macros)'),
    (("bomb.zip", samples.zipped(("zeros.bin", bytes(4 * 1024 * 1024))), "application/zip"),
     'Message refused: attachment "bomb.zip" is not allowed (archive over the size limits)'),
], ids=["double-extension", "renamed", "rtl-override", "zip", "rar", "iso", "lnk", "macros", "bomb"])
async def test_dangerous_attachments_are_refused_and_never_reach_postfix(
    proxy_factory: ProxyFactory, postfix: PostfixInstance, attachment: tuple[str, bytes, str], reply: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy_plugins.attachments")
    port = await proxy_port(proxy_factory, postfix)
    assert await send(port, message(attachment)) == (550, f"5.7.1 {reply}")
    assert any("event=attachments" in r.getMessage() and "result=reject" in r.getMessage()
               for r in caplog.records)
    assert (await send(port, message(("ok.pdf", b"%PDF-1.4\n", "application/pdf"))))[0] == 250
    assert len(await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)) == 1  # only the clean one


async def test_html_and_encrypted_files_are_quarantined(
    proxy_factory: ProxyFactory, postfix: PostfixInstance, tmp_path: Path
) -> None:
    port = await proxy_port(proxy_factory, postfix)
    for attachment in (("page.html", b"<html><body><script>x</script></body></html>", "text/html"),
                       ("secret.zip", samples.zipped(("a.txt", b"x"), encrypted=True), "application/zip"),
                       ("report.docx", samples.encrypted_ooxml(), "application/octet-stream")):
        code, _ = await send(port, message(attachment))
        assert code == 250
    records = QuarantineStore(tmp_path / "quarantine").list()
    reasons = [str(r.get("reason")) for r in records]
    assert len(records) == 3, records
    assert "html" in reasons[0] and "encrypted_archive" in reasons[1] and "encrypted_office" in reasons[2]
    assert postfix.messages("bob") == []


async def test_a_stripped_part_arrives_as_its_notice_and_the_rest_unchanged(
    proxy_factory: ProxyFactory, postfix: PostfixInstance
) -> None:
    raw = message(("report.pdf", b"%PDF-1.4\n", "application/pdf"),
                  ("invoice.exe", samples.pe(), "application/octet-stream"))
    port = await proxy_port(proxy_factory, postfix, rules={"executable": {"action": "strip"}})
    assert (await send(port, raw))[0] == 250
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    body = body_of(stored)
    before, after = raw.split(b"\r\n\r\n", 1)[1].split(b"Content-Type: application/octet-stream", 1)
    assert body.startswith(before)
    assert b'The attachment "invoice.exe" was removed by the mail filter: executable file.' in body
    assert base64.b64encode(samples.pe()[:48]) not in body.replace(b"\r\n", b"")
    assert body.endswith(raw[raw.rindex(b"\r\n--") :])  # the closing delimiter, as sent
    assert after  # the stripped part was there to begin with


# -- the same rules as a milter behind Postfix (the sibling front end) ---------------------------


async def test_as_a_milter_refuses_and_strips_the_same_way(
    postfix_with_milter: MilterStart,  # noqa: F811 - the fixture imported above
) -> None:
    plugin = make_plugin(Attachments, rules={"html": {"action": "strip"}})
    postfix = await postfix_with_milter(plugin)
    refused = await milter_send(postfix, ["bob@dest.test"], message(("invoice.pdf.exe", samples.pe(),
                                                                      "application/octet-stream")))
    assert refused[-1] == (550, '5.7.1 Message refused: attachment "invoice.pdf.exe" is not allowed '
                                '(executable file)')
    raw = message(("report.pdf", b"%PDF-1.4\n", "application/pdf"),
                  ("page.html", b"<html><body><script>x</script></body></html>", "text/html"))
    assert (await milter_send(postfix, ["bob@dest.test"], raw))[-1][0] == 250
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    body = body_of(stored)
    assert b'The attachment "page.html" was removed by the mail filter: HTML file.' in body
    assert b"<script>" not in body and b"report.pdf" in body
