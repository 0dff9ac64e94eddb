"""ratelimit: sliding-window limits, end to end through real proxies, a real sink and a real Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
import redis.asyncio
from smtpproxy_plugins.ratelimit import MemoryBackend, RateLimit, RedisBackend, Rule

from smtpproxy import Client, Session
from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain, resolve
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.redis_server import RedisServer

RELAY = {"domains": ["dest.test"], "networks": []}
PROXY_LISTENER = [{"address": "127.0.0.1", "port": 0, "proxy_protocol": True,
                   "proxy_protocol_from": ["127.0.0.0/8"]}]
BODY = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def plugin(*rules: dict[str, Any], **settings: Any) -> RateLimit:
    return RateLimit(RateLimit.Settings.model_validate({"rules": list(rules), **settings}))


async def start(proxy_factory: ProxyFactory, sink: Sink, limiter: RateLimit) -> int:
    server = await proxy_factory(limiter, relay=RELAY, upstream=sink.port, listeners=PROXY_LISTENER)
    return port_of(server)


async def session(port: int, ip: str = "192.0.2.7") -> Talk:
    client = await Talk.open(port)
    client.send(f"PROXY TCP4 {ip} 192.0.2.25 40001 25\r\n".encode())
    return client


async def send(port: int, ip: str = "192.0.2.7", sender: str = "alice@sender.test",
               rcpts: tuple[str, ...] = ("bob@dest.test",), body: bytes = BODY) -> tuple[int, str]:
    """One message in its own connection; returns the reply to the end of DATA."""
    client = await session(port, ip)
    try:
        code, text = await client.hello()
        assert code == 250, text
        return await client.send_message(sender, list(rcpts), body)
    finally:
        await client.close()


async def eventually_allowed(port: int, *, within: float = 5.0, **kwargs: Any) -> float:
    """Poll until a message is accepted again; returns how long that took."""
    started = time.monotonic()
    while True:
        code, text = await send(port, **kwargs)
        if code == 250:
            return time.monotonic() - started
        assert code == 451, text
        assert time.monotonic() - started < within, "the window never slid"
        await asyncio.sleep(0.05)


# -- the algorithm, with an injected clock ----------------------------------------------


def test_memory_sliding_window_log_is_exact() -> None:
    now = [100.0]
    backend = MemoryBackend(clock=lambda: now[0])
    results = []
    for t in (100.0, 101.0, 102.0, 103.0, 109.9, 110.0, 110.5, 111.0):
        now[0] = t
        results.append(backend.hit_now("k", 10, 3, 1))
    assert results == [
        (True, 1), (True, 2), (True, 3),   # three in the window
        (False, 3), (False, 3),            # refused, and refusals are not counted
        (True, 3),                         # t=100 left the window at 110: exactly one slot
        (False, 3),
        (True, 3),                         # t=101 left at 111
    ]
    # No fixed-window double burst: at no point do 10 s hold more than 3 events.
    now[0] = 111.5
    assert backend.hit_now("k", 10, 3, 1) == (False, 3)


def test_memory_amounts_and_expiry_bound_memory() -> None:
    now = [0.0]
    backend = MemoryBackend(clock=lambda: now[0])
    assert backend.hit_now("bytes:a", 5, 1000, 600) == (True, 600)
    assert backend.hit_now("bytes:a", 5, 1000, 600) == (False, 600)
    assert backend.hit_now("bytes:a", 5, 1000, 400) == (True, 1000)
    for i in range(100):
        backend.hit_now(f"k{i}", 1, 5, 1)
    assert len(backend.logs) == 101
    now[0] = 2.0
    backend.sweep()
    assert list(backend.logs) == ["bytes:a"]  # still inside its 5 s window
    now[0] = 20.0                             # past SWEEP_EVERY: the next hit sweeps
    backend.hit_now("new", 1, 5, 1)
    assert list(backend.logs) == ["new"]


def test_verdict_tags_reason_and_actions() -> None:
    rule = Rule(name="per-ip", key="client_ip", what="messages", limit=3, window=60)
    verdict = RateLimit._verdict(rule, "192.0.2.7", 3, 1)
    assert verdict is not None and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    assert verdict.tags == ("ratelimit:per-ip",)
    assert verdict.reason == "rate limit per-ip: client_ip 192.0.2.7 has 3 messages in 60s (limit 3)"
    scored = RateLimit._verdict(rule.model_copy(update={"action": 2.5}), "192.0.2.7", 3, 1)
    assert scored is not None and scored.reply is None and scored.score == 2.5
    assert scored.tags == ("ratelimit:per-ip",)


async def test_skip_authenticated_and_skip_networks_apply_to_every_hook() -> None:
    rules = {"name": "c", "key": "client_ip", "what": "connections", "limit": 1, "window": 60}
    limiter = plugin(rules, skip_authenticated=True, skip_networks=["2001:db8::/32"])
    user = Session(Client("192.0.2.7", 40001))
    user.auth_user = "alice"
    for _ in range(3):
        assert await limiter.connect(user) is None
        assert await limiter.connect(Session(Client("2001:db8::5", 40001))) is None
    assert await limiter.connect(Session(Client("192.0.2.7", 40001))) is None
    verdict = await limiter.connect(Session(Client("::ffff:192.0.2.7", 40001)))  # the same client
    assert verdict is not None and verdict.tags == ("ratelimit:c",)


# -- end to end, memory backend -------------------------------------------------------------


async def test_under_the_limit_everything_is_delivered(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "per-ip", "key": "client_ip", "what": "messages", "limit": 3, "window": 60},
        {"name": "conns", "key": "client_ip", "what": "connections", "limit": 3, "window": 60},
    ))
    for _ in range(3):
        assert (await send(port))[0] == 250
    assert len(sink.messages) == 3


async def test_message_limit_hit_gives_exact_451(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "per-ip", "key": "client_ip", "what": "messages", "limit": 2, "window": 60},
    ))
    assert (await send(port))[0] == 250
    assert (await send(port))[0] == 250
    assert await send(port) == (451, "4.7.1 Rate limit exceeded for 192.0.2.7, try again later")
    assert (await send(port, ip="192.0.2.8"))[0] == 250  # another client has its own count
    assert len(sink.messages) == 3


async def test_connection_limit_closes_with_421(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "conns", "key": "client_ip", "what": "connections", "limit": 1, "window": 60,
         "text": "Too many connections from {key} ({limit} per {window} s)"},
    ))
    first = await session(port)
    assert (await first.greeting())[0] == 220
    second = await session(port)
    assert await second.greeting() == (421, "4.7.1 Too many connections from 192.0.2.7 (1 per 60 s)")
    assert await second.closed()
    await first.close()
    await second.close()


async def test_recipient_limit_refuses_that_rcpt_only(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "rcpts", "key": "sender", "what": "recipients", "limit": 2, "window": 60},
        {"name": "hard", "key": "sender_domain", "what": "recipients", "limit": 3, "window": 60,
         "action": "reject", "text": "Domain {key} sent too much"},
    ))
    client = await session(port)
    await client.hello()
    assert (await client.cmd("MAIL FROM:<Alice@Sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<r1@dest.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<r2@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<r3@dest.test>") == (
        452, "4.7.1 Rate limit exceeded for alice@sender.test, try again later")
    assert (await client.cmd("DATA"))[0] == 354
    client.send(BODY + b".\r\n")
    assert (await client.reply())[0] == 250
    # another sender of the same domain: its own 'rcpts' count, but the domain's third is refused
    assert (await client.cmd("MAIL FROM:<carol@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<r4@dest.test>"))[0] == 250
    assert await client.cmd("RCPT TO:<r5@dest.test>") == (550, "5.7.1 Domain sender.test sent too much")
    await client.close()
    assert sink.messages[0].recipients == ["r1@dest.test", "r2@dest.test"]


async def test_bytes_limit_counts_message_sizes(proxy_factory: ProxyFactory, sink: Sink) -> None:
    big = BODY + b"x" * 500 + b"\r\n"
    port = await start(proxy_factory, sink, plugin(
        {"name": "volume", "key": "sender", "what": "bytes", "limit": 2 * len(big) + 100, "window": 60},
    ))
    assert (await send(port, body=big))[0] == 250
    assert (await send(port, body=big))[0] == 250
    assert await send(port, body=big) == (451, "4.7.1 Rate limit exceeded for alice@sender.test, try again later")
    assert (await send(port, body=b"Subject: s\r\n\r\n"))[0] == 250  # a small one still fits
    assert (await send(port, body=big, sender="other@sender.test"))[0] == 250


async def test_network_grouping(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "net", "key": "client_network", "prefix_v4": 24, "what": "messages", "limit": 2, "window": 60},
    ))
    assert (await send(port, ip="192.0.2.7"))[0] == 250
    assert (await send(port, ip="192.0.2.200"))[0] == 250
    assert await send(port, ip="192.0.2.9") == (451, "4.7.1 Rate limit exceeded for 192.0.2.0/24, try again later")
    assert (await send(port, ip="198.51.100.9"))[0] == 250


async def test_skip_networks(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "per-ip", "key": "client_ip", "what": "messages", "limit": 1, "window": 60},
        skip_networks=["10.0.0.0/8"],
    ))
    for _ in range(3):
        assert (await send(port, ip="10.1.2.3"))[0] == 250
    assert (await send(port))[0] == 250
    assert (await send(port))[0] == 451


async def test_window_slides(proxy_factory: ProxyFactory, sink: Sink) -> None:
    port = await start(proxy_factory, sink, plugin(
        {"name": "fast", "key": "client_ip", "what": "messages", "limit": 1, "window": 0.3},
    ))
    assert (await send(port))[0] == 250
    assert (await send(port))[0] == 451
    waited = await eventually_allowed(port)
    assert waited < 1.0
    assert len(sink.messages) == 2


# -- Redis ------------------------------------------------------------------------------------


def redis_plugin(url: str, *rules: dict[str, Any], **settings: Any) -> RateLimit:
    return plugin(*rules, backend="redis", redis_url=url, **settings)


PER_SENDER = {"name": "per-sender", "key": "sender", "what": "messages", "limit": 3, "window": 60}


async def test_two_proxies_sharing_redis_share_one_limit(
    proxy_factory: ProxyFactory, sink: Sink, redis_server: RedisServer
) -> None:
    a = await start(proxy_factory, sink, redis_plugin(redis_server.url, PER_SENDER))
    b = await start(proxy_factory, sink, redis_plugin(redis_server.url, PER_SENDER))
    assert a != b
    assert (await send(a))[0] == 250
    assert (await send(b))[0] == 250
    assert (await send(a))[0] == 250
    limited = (451, "4.7.1 Rate limit exceeded for alice@sender.test, try again later")
    assert await send(b) == limited
    assert await send(a) == limited
    assert len(sink.messages) == 3
    client = redis.asyncio.from_url(redis_server.url)
    try:
        key = "smtpproxy:ratelimit:messages:per-sender:alice@sender.test"
        assert await client.zcard(key) == 3
        assert 0 < await client.pttl(key) <= 61_000  # expires by itself: Redis memory is bounded
    finally:
        await client.aclose()


async def test_concurrent_hits_are_atomic_in_redis(redis_server: RedisServer) -> None:
    backends = [RedisBackend(redis_server.url, 2.0, "t:") for _ in range(2)]
    try:
        results = await asyncio.gather(*(backends[i % 2].hit("k", 60, 10, 1) for i in range(40)))
        assert sum(allowed for allowed, _ in results) == 10
        bytes_results = [await backends[0].hit("bytes:k", 60, 1000, n) for n in (600, 600, 400)]
        assert bytes_results == [(True, 600), (False, 600), (True, 1000)]
    finally:
        for backend in backends:
            await backend.close()


async def test_redis_window_slides(proxy_factory: ProxyFactory, sink: Sink, redis_server: RedisServer) -> None:
    port = await start(proxy_factory, sink, redis_plugin(
        redis_server.url, {"name": "fast", "key": "client_ip", "what": "messages", "limit": 1, "window": 0.3},
    ))
    assert (await send(port))[0] == 250
    assert (await send(port))[0] == 451
    assert await eventually_allowed(port) < 1.0


async def test_redis_down_fails_open(proxy_factory: ProxyFactory, sink: Sink, redis_server: RedisServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    port = await start(proxy_factory, sink, redis_plugin(
        redis_server.url, {**PER_SENDER, "limit": 1}, redis_timeout=0.3))
    assert (await send(port))[0] == 250
    assert (await send(port))[0] == 451
    redis_server.stop()
    assert (await send(port))[0] == 250
    assert "event=ratelimit_redis_down rule=per-sender policy=open" in caplog.text


async def test_redis_down_fails_closed(proxy_factory: ProxyFactory, sink: Sink, redis_server: RedisServer) -> None:
    port = await start(proxy_factory, sink, redis_plugin(
        redis_server.url, PER_SENDER, redis_failure="closed", redis_timeout=0.3))
    assert (await send(port))[0] == 250
    redis_server.stop()
    assert await send(port) == (451, "4.3.0 Rate limit check unavailable, try again later")
    assert len(sink.messages) == 1


# -- configuration ---------------------------------------------------------------------------


def load(tmp_path: Path, settings: str) -> Any:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: ratelimit\n"
        "    settings:\n" + settings
    )
    config, source = load_config(path)
    return build_chain(config.plugins, source)


def test_configuration_file_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("ratelimit") is RateLimit
    monkeypatch.setenv("RL_REDIS", "redis://127.0.0.1:6399/2")
    chain = load(tmp_path,
                 "      backend: redis\n"
                 "      redis_url: ${RL_REDIS}\n"
                 "      rules:\n"
                 "        - {name: per-ip, key: client_ip, what: connections, limit: 10, window: 60}\n")
    [step] = chain.steps
    assert isinstance(step.plugin, RateLimit)
    assert step.plugin.settings.redis_url == "redis://127.0.0.1:6399/2"
    assert set(chain.implementers("connect")) == {"ratelimit"}


def test_documented_configuration_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    doc = (Path(__file__).parents[2] / "docs" / "plugins" / "ratelimit.md").read_text()
    monkeypatch.setenv("RATELIMIT_REDIS_URL", "redis://127.0.0.1:6399/1")
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(blocks) == 2
    for block in blocks:
        (tmp_path / "smtpproxy.yaml").write_text(
            "listeners: [{port: 2525}]\ndelivery: {type: maildir, path: mail}\n" + block)
        config, source = load_config(tmp_path / "smtpproxy.yaml")
        [step] = build_chain(config.plugins, source).steps
        assert isinstance(step.plugin, RateLimit)
    assert len(step.plugin.settings.rules) == 6


@pytest.mark.parametrize(("settings", "line", "message"), [
    ("      rules:\n"
     "        - name: r\n"
     "          key: client_ip\n"
     "          what: messages\n"
     "          limit: 5\n"
     "          windw: 60\n", 11, "windw"),
    ("      rules:\n"
     "        - name: r\n"
     "          key: client_ip\n"
     "          what: messages\n"
     "          limit: -5\n"
     "          window: 60\n", 10, "greater than or equal to 1"),
    ("      rules:\n"
     "        - {name: r, key: client_ip, what: messages, limit: 5, window: 60}\n"
     "      backend: redis\n", 5, "backend redis needs redis_url"),  # the settings block
    ("      rules:\n"
     "        - {name: r, key: sender, what: connections, limit: 5, window: 60}\n", 7,
     "connections rules take key client_ip or client_network"),
    ("      rules:\n"
     "        - {name: r, key: sender_ip, what: messages, limit: 5, window: 60}\n", 7, "sender_ip"),
])
def test_bad_configuration_names_file_and_line(tmp_path: Path, settings: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, settings)
    text = str(caught.value)
    assert f"smtpproxy.yaml:{line}:" in text, text
    assert message in text, text


def test_settings_validation() -> None:
    rule = {"name": "r", "key": "client_ip", "what": "messages", "limit": 5, "window": 60}
    bad: list[dict[str, Any]] = [
        {"rules": []},
        {"rules": [rule, rule]},
        {"rules": [{**rule, "window": 0}]},
        {"rules": [{**rule, "prefix_v4": 33}]},
        {"rules": [{**rule, "text": "over {limt}"}]},
        {"rules": [{**rule, "action": "bounce"}]},
        {"rules": [rule], "redis_failure": "maybe"},
    ]
    for data in bad:
        with pytest.raises(pydantic.ValidationError):
            RateLimit.Settings.model_validate(data)
