"""The greylist plugin end to end: memory and Redis backends, a real redis-server, real SMTP.

Each delivery attempt is a new connection with a PROXY protocol header, so the client address
(and its /24 or /64 network) is whatever the test says. Timing uses either an injected clock
(memory backend) or a short real delay (0.2 s) that the test polls past.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
import redis.asyncio
from smtpproxy_plugins.greylist import Greylist, MemoryBackend

from smtpproxy.config import ConfigError, load_config
from smtpproxy.registry import build_chain, resolve
from tests.conftest import ProxyFactory, Talk, port_of
from tests.redis_server import RedisServer

RELAY = {"domains": ["dest.test", "other.test"], "networks": []}
PROXIED = {"address": "127.0.0.1", "port": 0, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}
GREYLISTED = (451, "4.7.1 Greylisted, please try again later")
OK = (250, "2.1.5 Recipient OK")


def plugin(store: MemoryBackend | None = None, **settings: Any) -> Greylist:
    p = Greylist(Greylist.Settings.model_validate(settings), backend=store)
    p.name = "greylist"  # type: ignore[attr-defined]
    return p


async def start(proxy_factory: ProxyFactory, *plugins: object) -> int:
    return port_of(await proxy_factory(*plugins, listeners=[PROXIED], relay=RELAY))


async def attempt(port: int, rcpt: str = "b@dest.test", sender: str = "a@sender.test",
                  ip: str = "192.0.2.7") -> tuple[int, str]:
    """One delivery attempt on a new connection: the reply to RCPT TO."""
    client = await Talk.open(port)
    family = "TCP6" if ":" in ip else "TCP4"
    client.send(f"PROXY {family} {ip} {'2001:db8::25' if ':' in ip else '192.0.2.25'} 40001 25\r\n")
    try:
        assert (await client.hello("mail.client.test"))[0] == 250
        assert (await client.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
        await client.cmd("QUIT")
    finally:
        await client.close()
    return code, text.split("\n")[0]


async def retry_until_accepted(port: int, deadline: float = 5.0, **kwargs: Any) -> float:
    """Retry every 50 ms until RCPT is accepted; returns the seconds it took."""
    started = time.monotonic()
    while True:
        reply = await attempt(port, **kwargs)
        if reply[0] == 250:
            return time.monotonic() - started
        assert reply == GREYLISTED
        assert time.monotonic() - started < deadline, "the retry was never accepted"
        await asyncio.sleep(0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the triplet's life, with an injected clock --------------------------------------------


async def test_first_attempt_early_retry_and_retry_after_the_delay(proxy_factory: ProxyFactory) -> None:
    clock = Clock()
    port = await start(proxy_factory, plugin(MemoryBackend(clock)))
    assert await attempt(port) == GREYLISTED
    clock.now += 299
    assert await attempt(port) == GREYLISTED                    # before the 300 s delay
    clock.now += 2
    assert (await attempt(port))[0] == 250                      # after it: passes, remembered
    clock.now += 35 * 86400
    assert (await attempt(port))[0] == 250                      # still known (and renewed)
    clock.now += 35 * 86400
    assert (await attempt(port))[0] == 250
    clock.now += 37 * 86400
    assert await attempt(port) == GREYLISTED                    # expired: new again


async def test_a_retry_after_the_retry_window_starts_over(proxy_factory: ProxyFactory) -> None:
    clock = Clock()
    port = await start(proxy_factory, plugin(MemoryBackend(clock)))
    assert await attempt(port) == GREYLISTED
    clock.now += 86400 + 1
    assert await attempt(port) == GREYLISTED
    clock.now += 301
    assert (await attempt(port))[0] == 250


async def test_triplets_are_per_network_sender_and_recipient(proxy_factory: ProxyFactory) -> None:
    clock = Clock()
    port = await start(proxy_factory, plugin(MemoryBackend(clock), text="Come back in {} minutes"))
    assert (await attempt(port))[0] == 451
    clock.now += 301
    assert (await attempt(port))[0] == 250
    assert (await attempt(port, ip="192.0.2.200"))[0] == 250    # same /24
    assert await attempt(port, ip="198.51.100.7") == (451, "4.7.1 Come back in {} minutes")
    assert (await attempt(port, rcpt="c@dest.test"))[0] == 451
    assert (await attempt(port, sender="other@sender.test"))[0] == 451
    assert (await attempt(port, rcpt="B@DEST.TEST", sender="A@Sender.Test"))[0] == 250  # case
    assert (await attempt(port, ip="2001:db8:1:2::7"))[0] == 451
    clock.now += 301
    assert (await attempt(port, ip="2001:db8:1:2::99"))[0] == 250  # same /64


async def test_real_delay_memory_backend(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(delay=0.2, retry_window=60))
    assert await attempt(port) == GREYLISTED
    waited = await retry_until_accepted(port)
    assert waited >= 0.15
    assert (await attempt(port))[0] == 250


# -- skips ---------------------------------------------------------------------------------


async def test_skips(proxy_factory: ProxyFactory) -> None:
    port = await start(proxy_factory, plugin(
        skip_networks=["198.51.100.0/24"],
        skip_recipients=["postmaster@dest.test", "*@other.test"],
        skip_senders=["friend@sender.test"],
    ))
    assert (await attempt(port, ip="198.51.100.9"))[0] == 250
    assert (await attempt(port, rcpt="Postmaster@dest.test"))[0] == 250
    assert (await attempt(port, rcpt="anyone@other.test"))[0] == 250
    assert (await attempt(port, sender="friend@sender.test"))[0] == 250
    assert await attempt(port, sender="stranger@sender.test") == GREYLISTED


# -- Redis ---------------------------------------------------------------------------------


async def test_redis_backend(proxy_factory: ProxyFactory, redis_server: RedisServer) -> None:
    settings = {"backend": "redis", "redis_url": redis_server.url, "delay": 0.2, "retry_window": 60}
    port = await start(proxy_factory, plugin(**settings))
    assert await attempt(port) == GREYLISTED
    assert await attempt(port) == GREYLISTED
    await retry_until_accepted(port)
    # a second proxy sharing the Redis knows the triplet already
    other = await start(proxy_factory, plugin(**settings))
    assert (await attempt(other))[0] == 250
    assert await attempt(other, rcpt="c@dest.test") == GREYLISTED
    client = redis.asyncio.from_url(redis_server.url)
    try:
        keys = sorted(k.decode() for k in await client.keys("smtpproxy:greylist:*"))
        assert keys == [
            "smtpproxy:greylist:192.0.2.0/24|a@sender.test|b@dest.test",
            "smtpproxy:greylist:192.0.2.0/24|a@sender.test|c@dest.test",
        ]
        ttl = await client.pttl(keys[0])
        assert 36 * 86400 * 1000 - 60_000 < ttl <= 36 * 86400 * 1000   # passed: expire
        assert 0 < await client.pttl(keys[1]) <= 60_000                   # new: retry_window
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [("open", (250, "2.1.5 Recipient OK")),
     ("closed", (451, "4.3.0 Greylisting unavailable, try again later"))],
)
async def test_redis_down(
    proxy_factory: ProxyFactory, redis_server: RedisServer, failure: str, expected: tuple[int, str]
) -> None:
    port = await start(proxy_factory, plugin(backend="redis", redis_url=redis_server.url,
                                             redis_failure=failure, redis_timeout=0.5))
    assert await attempt(port) == GREYLISTED
    redis_server.stop()
    assert await attempt(port) == expected


# -- configuration -------------------------------------------------------------------------


def write_config(tmp_path: Path, settings: str) -> Path:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(
        "listeners: [{port: 2525}]\n"
        "delivery: {type: maildir, path: mail}\n"
        "plugins:\n"
        "  - name: greylist\n"
        "    settings:\n" + "".join(f"      {line}\n" for line in settings.splitlines())
    )
    return path


def test_entry_point_and_configuration_file(tmp_path: Path) -> None:
    assert resolve("greylist") is Greylist
    path = write_config(tmp_path, "delay: 600\nskip_recipients: ['*@Example.com']\nskip_networks: [10.0.0.0/8]")
    config, source = load_config(path)
    [step] = build_chain(config.plugins, source).steps
    assert isinstance(step.plugin, Greylist)
    assert step.plugin.settings.delay == 600
    assert step.plugin.settings.skip_recipients == ["*@example.com"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("delay: -5", "delay"),
        ("delay: 7200\nretry_window: 3600", r"retry_window \(3600\) must be longer than delay \(7200\)"),
        ("backend: redis", "backend redis needs redis_url"),
        ("backend: sql", "backend"),
        ("skip_senders: ['*@*']", "is not an address or \\*@domain"),
        ("redis_failure: maybe", "redis_failure"),
        ("dela: 5", "dela"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path: Path, settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config, source = load_config(write_config(tmp_path, settings))
        build_chain(config.plugins, source)
    assert "greylist" in str(caught.value) or "plugins[0]" in str(caught.value)


def test_settings_model_refuses_a_bad_text() -> None:
    with pytest.raises(pydantic.ValidationError, match="control characters"):
        Greylist.Settings(text="two\r\nlines")
