"""rewrite: header templates, subject tag, address rewriting, end to end (real sockets) and units."""

from __future__ import annotations

import email
import email.policy
import logging
from pathlib import Path
from typing import Any

import pydantic
import pytest
from smtpproxy_plugins.rewrite import Rewrite

from smtpproxy import Address, Client, Envelope, Message, Recipient, Session, Transaction
from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain
from tests.conftest import ProxyFactory, Sink, Talk, port_of

PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}


def body(sender: str = "alice@old.example", to: str = "Bob <bob@dest.example>", subject: str = "hello",
         extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: {to}\r\nCc: carol@dest.example\r\nSubject: {subject}\r\n"
            f"{extra}Message-ID: <1@old.example>\r\n\r\nbody\r\n").encode()


def plugin(**settings: Any) -> Rewrite:
    rewrite = Rewrite(Rewrite.Settings.model_validate(settings))
    rewrite.name = "rewrite"  # type: ignore[attr-defined]
    return rewrite


async def send(proxy_factory: ProxyFactory, sink: Sink, rewrite: Rewrite, *, ip: str = "192.0.2.10",
               sender: str = "alice@old.example", rcpts: tuple[str, ...] = ("bob@dest.example",),
               message: bytes | None = None) -> email.message.EmailMessage:
    proxy = await proxy_factory(rewrite, listeners=[PROXIED], upstream=sink.port)
    client = await Talk.open(port_of(proxy))
    client.send(f"PROXY TCP4 {ip} 192.0.2.25 40001 25\r\n")
    await client.hello("mail.client.example")
    code, text = await client.send_message(sender, list(rcpts), message or body(sender))
    assert code == 250, text
    await client.close()
    assert len(sink.messages) == 1
    parsed = email.message_from_bytes(sink.messages[0].content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


# -- headers ------------------------------------------------------------------------------------


async def test_templated_headers_reach_the_upstream(proxy_factory: ProxyFactory, sink: Sink) -> None:
    msg = await send(proxy_factory, sink, plugin(
        add_headers={"X-Origin": "{client_ip} {client_name} helo={helo} from={sender} tls={tls_version}",
                     "X-Trace": "{session_id}/{transaction_id}"},
        replace_headers={"Message-ID": "<{transaction_id}@proxy.test>"},
    ))
    assert msg["X-Origin"] == "192.0.2.10 unknown helo=mail.client.example from=alice@old.example tls=none"
    session_id, transaction_id = msg["X-Trace"].split("/")
    assert transaction_id == f"{session_id}.1"
    assert msg.get_all("Message-ID") == [f"<{transaction_id}@proxy.test>"]


async def test_strip_headers_with_wildcards(proxy_factory: ProxyFactory, sink: Sink) -> None:
    extra = "X-Internal-Route: a\r\nx-internal-host: b\r\nX-Spam-Score: 1\r\nX-Keep: yes\r\n"
    msg = await send(proxy_factory, sink, plugin(strip_headers=["X-Internal-*", "x-spam-score"]),
                     message=body(extra=extra))
    assert msg["X-Internal-Route"] is None and msg["X-Internal-Host"] is None and msg["X-Spam-Score"] is None
    assert msg["X-Keep"] == "yes"


async def test_subject_tag_is_added_once(proxy_factory: ProxyFactory, sink: Sink) -> None:
    msg = await send(proxy_factory, sink, plugin(subject_tag="[EXTERNAL]"))
    assert msg["Subject"] == "[EXTERNAL] hello"
    rewrite = plugin(subject_tag="[EXTERNAL]")
    message = Message(body(subject="Re: [external] hello"))
    await rewrite.data(session_for("192.0.2.1"), transaction_for(), message)
    assert message.get("Subject") == "Re: [external] hello"


async def test_subject_tag_only_from_outside(proxy_factory: ProxyFactory, sink: Sink) -> None:
    settings = {"subject_tag": "[EXTERNAL]", "only_from_outside": True, "inside_networks": ["10.0.0.0/8"]}
    msg = await send(proxy_factory, sink, plugin(**settings), ip="10.1.2.3")
    assert msg["Subject"] == "hello"
    message = Message(body())
    await plugin(**settings).data(session_for("192.0.2.1"), transaction_for(), message)
    assert message.get("Subject") == "[EXTERNAL] hello"


# -- addresses ----------------------------------------------------------------------------------


async def test_envelope_rewrite_reaches_the_upstream(proxy_factory: ProxyFactory, sink: Sink) -> None:
    await send(proxy_factory, sink, plugin(
        sender={"map": {"*@old.example": "*@new.example"}},
        recipients={"map": {"bob@dest.example": "robert@dest.example", "*@legacy.example": "inbox@dest.example"}},
    ), rcpts=("BOB@dest.example", "x@legacy.example", "keep@dest.example"))
    got = sink.messages[0]
    assert got.sender == "alice@new.example"
    assert sorted(got.recipients) == ["inbox@dest.example", "keep@dest.example", "robert@dest.example"]
    assert b"From: Alice <alice@old.example>" in got.content  # headers untouched by default


async def test_header_addresses_are_rewritten_too(proxy_factory: ProxyFactory, sink: Sink) -> None:
    msg = await send(proxy_factory, sink, plugin(
        sender={"map": {"*@old.example": "*@new.example"}},
        recipients={"map": {"carol@dest.example": "caroline@dest.example"}},
        rewrite_headers=True,
    ), message=body(to="Bob <bob@dest.example>, Carol <carol@dest.example>"))
    assert msg["From"] == "Alice <alice@new.example>"
    assert msg["To"] == "Bob <bob@dest.example>, Carol <caroline@dest.example>"
    assert msg["Cc"] == "caroline@dest.example"
    assert msg["Message-ID"] == "<1@old.example>"  # only address headers change


async def test_regex_rewrite_with_backrefs(proxy_factory: ProxyFactory, sink: Sink) -> None:
    await send(proxy_factory, sink, plugin(
        sender={"regex": [{"pattern": r"(?i)([^@+]+)\+[^@]*@(.+)", "replace": r"\1@\2"}]},
        recipients={"regex": [{"pattern": r"(?P<user>[^@]+)@(?P<dom>[^.]+)\.dest\.example",
                               "replace": r"\g<dom>-\g<user>@dest.example"}]},
    ), sender="alice+lists@old.example", rcpts=("bob@sales.dest.example",))
    assert sink.messages[0].sender == "alice@old.example"
    assert sink.messages[0].recipients == ["sales-bob@dest.example"]


async def test_an_invalid_result_is_skipped_and_logged(
    proxy_factory: ProxyFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="smtpproxy_plugins.rewrite"):
        await send(proxy_factory, sink, plugin(
            sender={"regex": [{"pattern": r"(.+)@old\.example", "replace": r"\1.@new.example"}]},
        ))
    assert sink.messages[0].sender == "alice@old.example"
    assert "rewrite_skipped" in caplog.text and "alice.@new.example" in caplog.text


async def test_envelope_changes_are_recorded() -> None:
    tx = transaction_for("a@old.example", ["b@old.example", "c@dest.example"])
    await plugin(sender={"map": {"*@old.example": "*@new.example"}},
                 recipients={"map": {"*@old.example": "*@new.example"}}).data(
        session_for("192.0.2.1"), tx, Message(body()))
    assert [(c.op, c.address.text) for c in tx.envelope.changes] == [
        ("sender", "a@new.example"), ("remove_recipient", "b@old.example"), ("add_recipient", "b@new.example"),
    ]


# -- configuration ------------------------------------------------------------------------------


def test_bad_settings_are_refused() -> None:
    for bad, message in (
        ({"add_headers": {"X-A": "{client_addr}"}}, "unknown placeholder {client_addr}"),
        ({"add_headers": {"X-A": "{helo!r}"}}, "no format spec"),
        ({"add_headers": {"Bad Name": "x"}}, "not a header field name"),
        ({"sender": {"regex": [{"pattern": "(unclosed", "replace": "x@y.example"}]}}, "regular expression"),
        ({"sender": {"regex": [{"pattern": "(a)@b", "replace": r"\2@b.example"}]}}, "group '2'"),
        ({"sender": {"map": {"a@b.example": "not an address"}}}, "not a valid address"),
        ({"sender": {"map": {"a*@b.example": "*@c.example"}}}, "'*@domain'"),
        ({"subject_tagg": "[X]"}, "subject_tagg"),
    ):
        with pytest.raises(pydantic.ValidationError, match=message):
            Rewrite.Settings.model_validate(bad)


@pytest.mark.parametrize(("settings", "expected"), [
    ("      add_headers: {X-Origin: '{clientip}'}\n", "unknown placeholder {clientip}"),
    ("      sender:\n        regex: [{pattern: '([a-z]', replace: x@y.example}]\n", "regular expression"),
    ("      strip_header: [X-A]\n", "plugins[0].settings.strip_header"),
])
def test_configuration_errors_are_clear(tmp_path: Path, settings: str, expected: str) -> None:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text("listeners: [{port: 2525}]\ndelivery: {type: maildir, path: mail}\n"
                    "plugins:\n  - name: rewrite\n    settings:\n" + settings)
    config, source = load_config(path)
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    assert expected in str(caught.value) and "smtpproxy.yaml" in str(caught.value)


# -- helpers ------------------------------------------------------------------------------------


def session_for(ip: str) -> Session:
    session = Session(Client(ip, 25))
    session.helo = "h.example"
    return session


def transaction_for(sender: str = "a@old.example", rcpts: tuple[str, ...] | list[str] = ()) -> Transaction:
    def addr(text: str) -> Address:
        local, _, domain = text.partition("@")
        return Address(text, local, domain)

    envelope = Envelope(addr(sender))
    for r in rcpts:
        envelope._accept_recipient(Recipient(addr(r)))
    return Transaction("s.1", envelope)


def test_the_documented_examples_are_valid() -> None:
    import re

    import yaml

    doc = (Path(__file__).parents[2] / "docs" / "plugins" / "rewrite.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)]
    settings = [p.get("settings", {}) for b in blocks for p in b["plugins"] if p["name"] == "rewrite"]
    assert len(settings) == 4
    for data in settings:
        Rewrite(Rewrite.Settings.model_validate(data))
