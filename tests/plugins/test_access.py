"""access: allow/deny lists end to end (real sockets, PROXY protocol for client IPs) and units."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pydantic
import pytest
from smtpproxy_plugins import access as access_module
from smtpproxy_plugins.access import Access, compile_entries

from smtpproxy import Session, Verdict, hookimpl
from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain
from tests.conftest import ProxyFactory, Sink, Talk, port_of

PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}
BODY = b"From: a@sender.example\r\nTo: b@dest.example\r\nSubject: hi\r\n\r\nbody\r\n"


def plugin(**settings: Any) -> Access:
    access = Access(Access.Settings.model_validate(settings))
    access.name = "access"  # type: ignore[attr-defined]
    return access


class DenyAll:
    """A later plugin that refuses every connection and sender: an allow must skip it."""

    name = "denyall"

    @hookimpl
    def connect(self, session: Session) -> Verdict:
        return Verdict.reject("Nobody gets in", code=554, enhanced="5.7.1")

    @hookimpl
    def mail_from(self) -> Verdict:
        return Verdict.reject("No senders", enhanced="5.7.1")


async def start(proxy_factory: ProxyFactory, *plugins: object, sink: Sink | None = None) -> int:
    proxy = await proxy_factory(*plugins, listeners=[PROXIED], upstream=sink.port if sink else None)
    return port_of(proxy)


async def connect(port: int, ip: str = "192.0.2.10") -> Talk:
    client = await Talk.open(port)
    client.send(f"PROXY TCP4 {ip} 192.0.2.25 40001 25\r\n")
    return client


async def session(port: int, ip: str = "192.0.2.10", helo: str = "mail.client.example") -> Talk:
    client = await connect(port, ip)
    code, text = await client.hello(helo)
    assert code == 250, text
    return client


# -- client IP, at connect --------------------------------------------------------------------


async def test_denied_ip_gets_554_at_the_banner_and_is_closed(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(client={"deny": {"rules": ["192.0.2.0/24", "2001:db8::1"]}}))
    client = await connect(port, "192.0.2.77")
    assert await client.greeting() == (554, "5.7.1 Access denied")
    assert await client.closed()
    await client.close()
    client = await connect(port, "198.51.100.1")
    assert (await client.greeting())[0] == 220
    await client.close()


async def test_allowed_ip_skips_a_later_deny_plugin_of_the_same_phase_only(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(client={"allow": {"rules": ["192.0.2.10"]}}), DenyAll())
    client = await connect(port, "192.0.2.10")
    assert (await client.greeting())[0] == 220
    await client.cmd("EHLO mail.client.example")
    # accept at connect skips only the connect phase: DenyAll still answers MAIL FROM
    assert await client.cmd("MAIL FROM:<a@sender.example>") == (550, "5.7.1 No senders")
    await client.close()
    client = await connect(port, "192.0.2.11")
    assert await client.greeting() == (554, "5.7.1 Nobody gets in")
    await client.close()


async def test_tempfail_action_and_custom_reply(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(
        client={"deny": {"rules": ["192.0.2.0/24"]}, "action": "tempfail", "reply": "Come back later"}
    ))
    client = await connect(port, "192.0.2.5")
    assert await client.greeting() == (421, "4.7.1 Come back later")
    await client.close()


# -- HELO, sender, recipient ------------------------------------------------------------------


async def test_helo_regex(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(helo={"deny": {"rules": [r"/\.dynamic\.|^localhost$/i"]}}))
    client = await connect(port)
    assert (await client.greeting())[0] == 220
    code, text = await client.cmd("EHLO host-1.DYNAMIC.isp.example")
    assert (code, text) == (550, "5.7.1 HELO rejected: Access denied")
    assert (await client.cmd("EHLO mail.static.example"))[0] == 250
    await client.close()


async def test_sender_wildcard(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(sender={"deny": {"rules": ["*@spammer.example", "<>"]}}))
    client = await session(port)
    assert await client.cmd("MAIL FROM:<Bob@SPAMMER.example>") == (
        550, "5.7.1 Sender address rejected: Access denied")
    assert (await client.cmd("MAIL FROM:<bob@sub.spammer.example>"))[0] == 250
    await client.cmd("RSET")
    assert (await client.cmd("MAIL FROM:<>"))[0] == 550
    await client.close()


async def test_sender_allow_skips_later_mail_from_plugins(proxy_factory: ProxyFactory) -> None:
    # the client allow gets past DenyAll's connect; the sender allow past its mail_from
    port = await start(proxy_factory, plugin(
        client={"allow": {"rules": ["0.0.0.0/0"]}}, sender={"allow": {"rules": ["*@partner.example"]}},
    ), DenyAll())
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<x@partner.example>"))[0] == 250
    await client.cmd("RSET")
    assert (await client.cmd("MAIL FROM:<x@other.example>")) == (550, "5.7.1 No senders")
    await client.close()


async def test_recipient_deny_is_per_recipient(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, plugin(recipient={"deny": {"rules": ["ceo@dest.example"]}}), sink=sink)
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert await client.cmd("RCPT TO:<CEO@dest.example>") == (
        550, "5.7.1 Recipient address rejected: Access denied")
    assert (await client.cmd("RCPT TO:<staff@dest.example>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    await client.close()
    assert sink.messages[0].recipients == ["staff@dest.example"]


# -- list files -------------------------------------------------------------------------------


async def test_list_file_is_reread_after_a_change(
    proxy_factory: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access_module, "CHECK_INTERVAL", 0.0)
    listing = tmp_path / "deny.txt"
    listing.write_text("# bad senders\nold@bad.example\n")
    port = await start(proxy_factory, plugin(sender={"deny": {"file": str(listing)}}))
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<old@bad.example>"))[0] == 550
    assert (await client.cmd("MAIL FROM:<new@bad.example>"))[0] == 250
    await client.close()

    listing.write_text("new@bad.example  # replaced\n")
    stat = listing.stat()
    os.utime(listing, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    client = await session(port)
    assert (await client.cmd("MAIL FROM:<old@bad.example>"))[0] == 250
    await client.cmd("RSET")
    assert (await client.cmd("MAIL FROM:<new@bad.example>"))[0] == 550
    await client.close()


async def test_a_broken_list_file_keeps_the_previous_list(
    proxy_factory: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(access_module, "CHECK_INTERVAL", 0.0)
    listing = tmp_path / "deny.txt"
    listing.write_text("192.0.2.0/24\n")
    port = await start(proxy_factory, plugin(client={"deny": {"file": str(listing)}}))
    listing.write_text("192.0.2.0/24\n198.51.100.0/24\nnot-an-ip\n")
    os.utime(listing, ns=(0, listing.stat().st_mtime_ns + 2_000_000_000))
    with caplog.at_level(logging.ERROR, logger="smtpproxy_plugins.access"):
        client = await connect(port, "192.0.2.9")
        assert (await client.greeting())[0] == 554
        await client.close()
        client = await connect(port, "198.51.100.9")  # in the broken file only
        assert (await client.greeting())[0] == 220
        await client.close()
    assert "not-an-ip" in caplog.text and "keeping the previous list" in caplog.text


def test_the_file_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    listing = tmp_path / "helo.txt"
    listing.write_text("one.example\n")
    access = plugin(helo={"deny": {"file": str(listing)}})
    assert access.check("helo", "one.example") is not None
    listing.write_text("two.example\n")
    os.utime(listing, ns=(0, listing.stat().st_mtime_ns + 2_000_000_000))
    assert access.check("helo", "one.example") is not None  # within the second: not looked at yet
    assert access.check("helo", "two.example") is None


# -- matching units ---------------------------------------------------------------------------


def test_entry_kinds() -> None:
    m = compile_entries(["a@x.example", "*@y.example", "*.z.example", "/^bulk[0-9]+@/i"], "sender")
    assert m.match("A@X.EXAMPLE") == "a@x.example"
    assert m.match("q@Y.example") == "*@y.example"
    assert m.match("q@sub.y.example") is None
    assert m.match("mx.z.example") == "*.z.example"
    assert m.match("z.example") is None
    assert m.match("BULK42@anything.example") == "/^bulk[0-9]+@/i"
    ips = compile_entries(["10.0.0.0/8", "2001:db8::/32"], "client")
    assert ips.match("::ffff:10.1.2.3", is_ip=True) == "10.0.0.0/8"
    assert ips.match("2001:db8::5", is_ip=True) == "2001:db8::/32"
    assert ips.match("192.0.2.1", is_ip=True) is None


def test_bad_settings_are_refused() -> None:
    for bad in (
        {"helo": {"deny": {"rules": ["/(unclosed/"]}}},
        {"client": {"allow": {"rules": ["10.0.0.1/8"]}}},
        {"sender": {"deny": {"rule": ["x@y.example"]}}},
        {"recipient": {"action": "bounce"}},
        {"sender": {"reply": "two\r\nlines"}},
        {"sender": {"deny": {"file": "/nonexistent/list.txt"}}},
    ):
        with pytest.raises(pydantic.ValidationError):
            Access.Settings.model_validate(bad)


def write_config(tmp_path: Path, settings: str) -> Path:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: access\n"
        "    settings:\n" + settings
    )
    return path


@pytest.mark.parametrize(("settings", "expected"), [
    ("      helo:\n        deny: {rules: ['/[bad/']}\n", "bad regular expression"),
    ("      client:\n        deny: {rules: [example.com]}\n", "not an IP address or CIDR network"),
    ("      sender:\n        denny: {rules: [a@b.example]}\n", "plugins[0].settings.sender.denny"),
    ("      sender:\n        deny: {file: missing.txt}\n", "cannot read list file"),
])
def test_configuration_errors_are_clear(tmp_path: Path, settings: str, expected: str) -> None:
    config, source = load_config(write_config(tmp_path, settings))
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    assert expected in str(caught.value)
    assert "smtpproxy.yaml" in str(caught.value)


def test_list_file_relative_to_the_configuration_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "deny.txt").write_text("/^bulk@/i\n")
    config, source = load_config(write_config(tmp_path, "      sender:\n        deny: {file: lists/deny.txt}\n"))
    [step] = build_chain(config.plugins, source).steps
    assert isinstance(step.plugin, Access)
    verdict = step.plugin.check("sender", "Bulk@x.example")
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text == "Sender address rejected: Access denied"


def test_the_documented_examples_are_valid(tmp_path: Path) -> None:
    import re

    import yaml

    (tmp_path / "access").mkdir()
    for name in ("deny-ips.txt", "protected.txt", "partners.txt"):
        (tmp_path / "access" / name).write_text("# empty\n")
    doc = (Path(__file__).parents[2] / "docs" / "plugins" / "access.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)]
    settings = [p.get("settings", {}) for b in blocks for p in b["plugins"] if p["name"] == "access"]
    assert len(settings) == 2
    for data in settings:
        Access(Access.Settings.model_validate(data, context={"base_dir": tmp_path}))
