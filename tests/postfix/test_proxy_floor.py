"""bench/proxy_floor.py, the proxy's floor for bench/postfix_rows.py, delivers through a real Postfix.

The floor's CPU per message is only a floor if it does the proxy's work: the messages must
arrive whole (dot-stuffing undone once), the upstream's refusal of a recipient must reach the
client at RCPT, and Postfix must have been told the original client: with XCLIENT on a new
connection per message (Postfix's Received: field names the client's HELO, not the
relay's), with XFORWARD on one pooled connection (Postfix's log counts the commands).
Started as postfix_rows.py starts it; no timing.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from bench.postfix_rows import floor_proxy
from tests.postfix_instance import PostfixFactory

MESSAGE = (b"From: a@sender.example\r\nTo: bob@dest.test\r\nSubject: floor\r\n\r\n"
           b"first line\r\n.a line that starts with a dot\r\n..and one with two\r\nlast line\r\n")


@pytest.mark.parametrize("identity", ["xclient", "xforward"])
def test_floor_relays_to_postfix(identity: str, tmp_path: Path, postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory()
    name = "proxy-floor-xforward" if identity == "xforward" else "proxy-floor"
    floor = floor_proxy(name, tmp_path, 0, postfix.port)
    try:
        with smtplib.SMTP("127.0.0.1", floor.port, timeout=30) as client:  # EHLO, two messages
            client.ehlo("client.example")
            assert client.has_extn("pipelining") and client.has_extn("dsn")
            assert client.sendmail("a@sender.example", ["bob@dest.test"], MESSAGE) == {}
            refused = client.sendmail("a@sender.example", ["nobody@dest.test", "alice@dest.test"], MESSAGE)
            assert list(refused) == ["nobody@dest.test"] and refused["nobody@dest.test"][0] == 550
        with smtplib.SMTP("127.0.0.1", floor.port, timeout=30) as client:  # HELO, as smtp-source
            client.helo("helo.example")
            assert client.sendmail("a@sender.example", ["bob@dest.test"], MESSAGE) == {}
        assert floor.proc is not None and floor.proc.poll() is None
    finally:
        floor.stop()
    stored = postfix.wait_for_messages("bob", 2) + postfix.wait_for_messages("alice", 1)
    for message in stored:
        assert message.endswith(b"\nfirst line\n.a line that starts with a dot\n..and one with two\n"
                                b"last line\n")
    received = [message.split(b"\nReceived: ", 1)[1].split(b"\n", 1)[0] for message in stored]  # Postfix's
    helos = sorted(field.split(b" ")[1] for field in received)
    if identity == "xclient":  # Postfix speaks to the client itself: a connection per message
        assert helos == [b"client.example", b"client.example", b"helo.example"], received
        postfix.wait_for_log(r"(?s)(xclient=\S+ mail=1 rcpt=[0-9/]+ bdat=1 quit=1 .*){3}")
    else:  # XFORWARD is for Postfix's logs; one pooled connection carried all three messages
        assert helos == [b"floor.bench"] * 3, received
        postfix.wait_for_log(r"ehlo=1 xforward=3 mail=3 rcpt=3/4 bdat=3 ")
