"""Tests of the private-Postfix fixture itself, talking to Postfix directly with smtplib.

The proxy tests rely on this Postfix behaving like a real upstream (XCLIENT, STARTTLS,
RCPT-time rejection, outages); these tests pin that behaviour down without any smtpproxy
code in the way, so that a failure here points at the fixture or the machine, not the proxy.
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from tests import postfix_instance
from tests.postfix_instance import PostfixFactory, PostfixInstance, postfix_commands

# The fixture (it skips when Postfix is not installed). Importing it "as" itself marks a deliberate
# re-export, which keeps the test parameters of the same name from counting as redefinitions.
from tests.postfix_instance import postfix_factory as postfix_factory  # noqa: PLC0414

BODY = (
    b"First line of the body.\r\n"
    b".A line that starts with a dot (dot-stuffed on the wire).\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe, 8-bit UTF-8 text.\r\n"
    b"Trailing spaces stay   \r\n"
)


def message(subject: str, body: bytes = BODY) -> bytes:
    """A minimal RFC 5322 message with CRLF line ends, as a client sends it."""
    return (
        f"From: sender@client.example\r\nTo: bob@dest.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@client.example>\r\n\r\n"
    ).encode() + body


def body_of(stored: bytes) -> bytes:
    """The body of a delivered message (Maildir files have LF line ends)."""
    return stored.split(b"\n\n", 1)[1]


def lf(data: bytes) -> bytes:
    """What Postfix stores for CRLF-ended input."""
    return data.replace(b"\r\n", b"\n")


def send(port: int, to: str, data: bytes) -> str:
    """Send one message over plain SMTP; returns the queue id from the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("sender.client.example")
        assert smtp.mail("sender@client.example", ["BODY=8BITMIME"])[0] == 250
        assert smtp.rcpt(to)[0] == 250
        return queue_id(smtp.data(data))


def queue_id(reply: tuple[int, bytes]) -> str:
    """The queue id out of Postfix's ``250 2.0.0 Ok: queued as ID``."""
    code, text = reply
    assert code == 250, reply
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", text)
    assert match, text
    return match[1].decode()


def processes_under(root: Path) -> list[int]:
    """Live processes whose working directory is inside ``root``: all Postfix daemons chdir to
    their queue directory, so this finds leftovers without trusting the fixture's bookkeeping."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if cwd == root or root in cwd.parents:
                found.append(int(entry.name))
    return found


def test_delivers_to_maildir_with_body_intact(postfix_factory: PostfixFactory) -> None:
    """The basic contract proxy tests build on: 250 at DATA, then the exact body in the Maildir."""
    postfix = postfix_factory()
    qid = send(postfix.port, "bob@dest.test", message("plain delivery"))

    [stored] = postfix.wait_for_messages("bob", 1)
    assert body_of(stored) == lf(BODY)
    assert b"\nSubject: plain delivery\n" in stored
    assert stored.startswith(b"Return-Path: <sender@client.example>\nX-Original-To: bob@dest.test\n")
    assert postfix.messages("alice") == []
    postfix.wait_for_log(rf"postfix/virtual\[\d+\]: {qid}: to=<bob@dest\.test>, relay=virtual, .*status=sent \(delivered to maildir\)")
    postfix.wait_for_log(rf"postfix/qmgr\[\d+\]: {qid}: removed")
    assert postfix.queue_is_empty()
    assert "warning:" not in postfix.log()
    assert (postfix.root / "mail" / "bob" / "new").is_dir()


def test_banner_and_no_starttls_without_certificate(postfix_factory: PostfixFactory) -> None:
    """Fixed banner and EHLO features, so proxy tests can assert on them; TLS only when asked for."""
    postfix = postfix_factory()
    with smtplib.SMTP(timeout=10) as smtp:
        assert smtp.connect("127.0.0.1", postfix.port) == (220, b"postfix.test ESMTP")
        smtp.ehlo("sender.client.example")
        assert smtp.has_extn("xclient")
        assert smtp.has_extn("xforward")
        assert not smtp.has_extn("starttls")


def test_unknown_user_is_rejected_at_rcpt(postfix_factory: PostfixFactory) -> None:
    """The exact upstream rejection texts that proxy tests expect to see relayed to the client."""
    postfix = postfix_factory()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as smtp:
        smtp.ehlo("sender.client.example")
        assert smtp.mail("sender@client.example") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("dave@dest.test") == (
            550,
            b"5.1.1 <dave@dest.test>: Recipient address rejected: User unknown in virtual mailbox table",
        )
        # Nothing is relayed: another domain is refused, not queued.
        assert smtp.rcpt("someone@elsewhere.example") == (554, b"5.7.1 <someone@elsewhere.example>: Relay access denied")
        assert smtp.rcpt("carol@dest.test") == (250, b"2.1.5 Ok")
    postfix.wait_for_log(r"reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.1\.1 <dave@dest\.test>: Recipient address rejected: User unknown in virtual mailbox table;")


def test_xclient_sets_the_client_seen_by_postfix(postfix_factory: PostfixFactory) -> None:
    """XCLIENT from loopback is authorized: Postfix logs and stamps the forwarded client, not us."""
    postfix = postfix_factory()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        # XCLIENT restarts the session: Postfix answers with a new greeting, EHLO comes again.
        assert smtp.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=client.example") == (220, b"postfix.test ESMTP")
        smtp.ehlo("helo.client.example")
        assert smtp.mail("sender@client.example") == (250, b"2.1.0 Ok")
        assert smtp.rcpt("alice@dest.test") == (250, b"2.1.5 Ok")
        qid = queue_id(smtp.data(message("via xclient")))

    line = postfix.wait_for_log(rf"^.*postfix/smtpd\[\d+\]: {qid}: client=.*$")
    assert line[0].endswith(f": {qid}: client=client.example[192.0.2.7]")
    [stored] = postfix.wait_for_messages("alice", 1)
    assert re.search(
        rb"\nReceived: from helo\.client\.example \(client\.example \[192\.0\.2\.7\]\)\n\tby postfix\.test \(Postfix\) with ESMTP id "
        + qid.encode(),
        stored,
    ), stored


def test_starttls_with_a_trustme_certificate(postfix_factory: PostfixFactory, tmp_path: Path) -> None:
    """Upstream STARTTLS with a test CA, for the proxy's TLS-to-upstream tests."""
    ca = trustme.CA()
    pem = tmp_path / "postfix.pem"
    ca.issue_cert("127.0.0.1", "postfix.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    postfix = postfix_factory(tls_cert=pem)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as smtp:
        smtp.ehlo("sender.client.example")
        assert smtp.has_extn("starttls")
        assert smtp.starttls(context=context)[0] == 220
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() in {"TLSv1.2", "TLSv1.3"}
        smtp.ehlo("sender.client.example")
        assert not smtp.has_extn("starttls")
        assert smtp.mail("sender@client.example", ["BODY=8BITMIME"])[0] == 250
        assert smtp.rcpt("carol@dest.test")[0] == 250
        qid = queue_id(smtp.data(message("over tls")))

    postfix.wait_for_log(r"postfix/smtpd\[\d+\]: Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.[23] with cipher ")
    [stored] = postfix.wait_for_messages("carol", 1)
    assert f"with ESMTPS id {qid}".encode() in stored
    assert body_of(stored) == lf(BODY)


def test_stop_and_start_again_on_the_same_port(postfix_factory: PostfixFactory) -> None:
    """An outage mid-test: stopped means refused and no process left; restarted means delivering."""
    postfix = postfix_factory()
    port, root = postfix.port, postfix.root
    send(port, "bob@dest.test", message("before outage"))
    postfix.wait_for_messages("bob", 1)

    postfix.stop()
    assert not postfix.is_running()
    assert processes_under(root) == []
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", port, timeout=10)
    postfix.stop()  # idempotent

    postfix.start()
    assert (postfix.port, postfix.root) == (port, root)
    send(port, "bob@dest.test", message("after outage"))
    first, second = postfix.wait_for_messages("bob", 2)
    assert b"Subject: before outage\n" in first
    assert b"Subject: after outage\n" in second
    assert len(re.findall(r"postfix/master\[\d+\]: daemon started", postfix.log())) == 2


def test_two_instances_at_once(postfix_factory: PostfixFactory) -> None:
    """Failover tests run two upstreams: they must not share ports, queues, mailboxes or logs."""
    first = postfix_factory()
    second = postfix_factory(domain="other.test", users=("dave",))
    assert first.port != second.port
    assert first.root != second.root

    qid1 = send(first.port, "bob@dest.test", message("to first"))
    qid2 = send(second.port, "dave@other.test", message("to second"))
    assert b"Subject: to first\n" in first.wait_for_messages("bob", 1)[0]
    assert b"Subject: to second\n" in second.wait_for_messages("dave", 1)[0]
    assert qid2 not in first.log()
    assert qid1 not in second.log()
    with smtplib.SMTP("127.0.0.1", second.port, timeout=10) as smtp:
        smtp.ehlo("sender.client.example")
        smtp.mail("sender@client.example")
        assert smtp.rcpt("bob@dest.test") == (554, b"5.7.1 <bob@dest.test>: Relay access denied")

    # One going down (a failover test) leaves the other untouched.
    first.stop()
    assert processes_under(first.root) == []
    assert processes_under(second.root) != []
    send(second.port, "dave@other.test", message("still up"))
    assert len(second.wait_for_messages("dave", 2)) == 2


def test_configuration_is_private_and_loopback_only(postfix_factory: PostfixFactory) -> None:
    """Guards the isolation promises: one loopback listener, private paths, no relaying, no typos."""
    postfix = postfix_factory()
    commands = postfix_commands()
    assert commands is not None
    _, postconf, _ = commands
    config = str(postfix.root / "etc")

    services = subprocess.run([postconf, "-c", config, "-M"], capture_output=True, text=True, check=True)
    assert services.stderr == ""
    inet = [line.split()[0] for line in services.stdout.splitlines() if line.split()[1] == "inet"]
    assert inet == [f"127.0.0.1:{postfix.port}"]

    settings = subprocess.run([postconf, "-c", config, "-n"], capture_output=True, text=True, check=True)
    assert settings.stderr == ""  # no unknown or misspelled parameters
    values = dict(line.split(" = ", 1) for line in settings.stdout.splitlines() if " = " in line)
    for name in ("queue_directory", "data_directory", "maillog_file", "virtual_mailbox_base"):
        assert Path(values[name]).is_relative_to(postfix.root), name
    assert values["inet_interfaces"] == "127.0.0.1"
    assert values["default_transport"].startswith("error:")
    assert "relayhost" not in values or values["relayhost"] == ""


def test_stopped_instance_refuses_and_reports(postfix_factory: PostfixFactory) -> None:
    """``start=False`` gives an idle instance; waits time out with a clear message instead of hanging."""
    postfix = postfix_factory(start=False)
    assert isinstance(postfix, PostfixInstance)
    assert not postfix.is_running()
    postfix.stop()  # stopping what never ran is fine
    with pytest.raises(TimeoutError, match="1 message"):
        postfix.wait_for_messages("bob", 1, timeout=0.2)
    postfix.start()
    assert postfix.is_running()
    postfix.wait_for_log(r"postfix/master\[\d+\]: daemon started -- version [\d.]+, configuration " + re.escape(str(postfix.root / "etc")))


def test_require_postfix_skips_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs everywhere: proves the skip (and only its reason) when Postfix is missing."""
    monkeypatch.setattr(postfix_instance, "postfix_commands", lambda: None)
    with pytest.raises(pytest.skip.Exception, match=r"^Postfix is not installed: apt-get install postfix$"):
        postfix_instance.require_postfix()
