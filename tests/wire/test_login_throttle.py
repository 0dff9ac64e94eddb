"""Login throttling (smtpproxy.loginthrottle) measured through the real submission listener.

Time is the throttle's own clock: a FakeClock whose sleep advances it at once, so a test
counts the guesses a minute allows and asserts the delays the server applied, never wall time.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme

from smtpproxy.eventlog import KeyValueFormatter
from smtpproxy.loginthrottle import (
    LoginThrottle,
    MemoryStore,
    RedisStore,
    ThrottleSettings,
    address_key,
)
from smtpproxy.metrics import PrometheusRecorder
from smtpproxy.server import ProxyServer
from tests.conftest import Talk, chain_of, make_config, port_of
from tests.redis_server import RedisServer

PASSWORD = "correct horse battery staple"
INVALID = (535, "5.7.8 Authentication credentials invalid")
LOCKED = (421, "4.7.0 Too many failed logins from your address, try again later")
DEFAULTS = ThrottleSettings()  # Dovecot's figures: 2 s doubling to 15 s; lockout after 10


class FakeClock:
    """The throttle's clock: sleeping moves it forward at once (and records the sleep)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def submission(tls_ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    pem = tmp_path / "proxy.pem"
    tls_ca.issue_cert("proxy.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    users = tmp_path / "users"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    users.write_text(f"alice:{hashed}\nceo:{hashed}\n")
    return {"address": "127.0.0.1", "port": 0, "tls": {"cert": str(pem), "key": str(pem)},
            "auth": {"users_file": str(users)}}


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


Start = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy(tmp_path: Path, submission: dict[str, Any]) -> AsyncIterator[Start]:
    """Proxies with the submission listener and the login throttle a test gives them."""
    started: list[ProxyServer] = []

    async def start(throttle: LoginThrottle | None = None, **sections: Any) -> ProxyServer:
        config = make_config(tmp_path, listeners=[submission], **sections)
        server = ProxyServer(config, chain=chain_of(), login_throttle=throttle)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=1)


class Guesser:
    """A password guesser on one client address: reconnects whenever the server hangs up."""

    def __init__(self, port: int, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> None:
        self.port, self.ctx, self.source = port, ctx, source
        self.client: Talk | None = None

    async def _connect(self) -> Talk:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.source, 0))
        client = Talk(reader, writer)
        await client.hello()
        assert await client.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        await client.writer.start_tls(self.ctx, server_hostname="proxy.test")
        assert (await client.cmd("EHLO client.test"))[0] == 250
        return client

    async def guess(self, user: str, password: str) -> tuple[int, str]:
        if self.client is None:
            self.client = await self._connect()
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        reply = await self.client.cmd(f"AUTH PLAIN {blob}")
        if reply[0] == 421 or (reply == INVALID and await self._too_many_errors()):
            await self.close()
        return reply

    async def _too_many_errors(self) -> bool:
        """The 421 that follows the max_errors-th 535 on the same connection, if it came."""
        assert self.client is not None
        try:
            line = await asyncio.wait_for(self.client.reader.readline(), 0.05)
        except TimeoutError:
            return False
        return line.startswith(b"421")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "smtpproxy.session" and r.msg == name]


async def guesses_in_a_minute(clock: FakeClock, guess: Callable[[int], Awaitable[tuple[int, str]]],
                              cap: int = 60) -> tuple[int, list[tuple[int, str]]]:
    """How many wrong guesses were answered within 60 s of the throttle's clock (at most *cap*)."""
    start, answered, replies = clock.now(), 0, []
    for n in range(cap):
        reply = await guess(n)
        replies.append(reply)
        if clock.now() - start >= 60:
            break
        answered += reply == INVALID
    return answered, replies


# -- through the listener ------------------------------------------------------------------


async def test_guesses_per_minute_from_one_address(
    start_proxy: Start, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(DEFAULTS, clock=clock))
    guesser = Guesser(port_of(proxy), client_tls)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        count, replies = await guesses_in_a_minute(clock, lambda n: guesser.guess("alice", f"guess-{n}"))
        # Delays 0, 2, 4, 8, 15, 15, 15: guesses at 0, 2, 6, 14, 29, 44, 59 s (without the
        # throttle: all 60 at once).
        assert count == 7
        assert clock.slept[:7] == [2, 4, 8, 15, 15, 15, 15]
        while replies[-1] != LOCKED:  # the 10th failure locks the address out
            replies.append(await guesser.guess("alice", f"more-{len(replies)}"))
    assert replies.count(INVALID) == DEFAULTS.lockout_after
    assert [e["seconds"] for e in events(caplog, "auth_delayed")] == clock.slept
    [locked, refused] = events(caplog, "auth_locked")
    assert locked["state"] == "new" and locked["failures"] == 10 and locked["client"] == "127.0.0.1"
    assert refused["state"] == "refused"
    # Locked out: even the right password is refused until lockout_seconds have passed.
    assert await guesser.guess("alice", PASSWORD) == LOCKED
    clock.t += DEFAULTS.lockout_seconds
    assert await guesser.guess("alice", PASSWORD) == (235, "2.7.0 Authentication successful")
    await guesser.close()


async def test_one_login_from_many_addresses_is_delayed_never_locked(
    start_proxy: Start, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(DEFAULTS, clock=clock))

    async def from_new_address(n: int) -> tuple[int, str]:
        guesser = Guesser(port_of(proxy), client_tls, source=f"127.0.1.{n + 1}")
        try:
            return await guesser.guess("ceo", f"guess-{n}")
        finally:
            await guesser.close()

    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        count, replies = await guesses_in_a_minute(clock, from_new_address)
        assert count == 7  # the login's own delay: 0, 2, 4, 8, 15, 15, 15
        for n in range(len(replies), 25):  # far past lockout_after: never a lockout per login
            assert await from_new_address(n) == INVALID
    assert max(clock.slept) == DEFAULTS.max_delay and not events(caplog, "auth_locked")
    # The real CEO waits out at most max_delay, gets in, and that clears the login's delay.
    waited = len(clock.slept)
    ceo = Guesser(port_of(proxy), client_tls, source="127.0.2.1")
    assert await ceo.guess("ceo", PASSWORD) == (235, "2.7.0 Authentication successful")
    assert clock.slept[waited:] == [15]
    await ceo.close()
    assert await from_new_address(200) == INVALID
    assert len(clock.slept) == waited + 1  # no delay before the first guess after the success


async def test_the_same_wrong_password_again_does_not_escalate(
    start_proxy: Start, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(DEFAULTS, clock=clock))
    phone = Guesser(port_of(proxy), client_tls)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        for _ in range(25):  # a phone with an old password, all night
            assert await phone.guess("alice", "last year's password") == INVALID
    await phone.close()
    assert set(clock.slept) == {2}  # one failure's delay, every time
    failed = events(caplog, "auth_failed")
    assert [f["address_failures"] for f in failed] == [1] * 25
    assert [f["repeated"] for f in failed] == [None] + [True] * 24
    assert not events(caplog, "auth_locked")
    logged = " ".join(KeyValueFormatter().format(r) for r in caplog.records)
    assert "last year" not in logged


async def test_trusted_networks_are_exempt(start_proxy: Start, client_tls: ssl.SSLContext) -> None:
    clock = FakeClock()
    settings = ThrottleSettings(trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    proxy = await start_proxy(LoginThrottle(settings, clock=clock))
    guesser = Guesser(port_of(proxy), client_tls)
    for n in range(30):
        assert await guesser.guess("alice", f"g{n}") == INVALID
    await guesser.close()
    assert clock.slept == []


async def test_spraying_one_address_many_logins_is_signalled(
    start_proxy: Start, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(ThrottleSettings(lockout_after=50), clock=clock))
    guesser = Guesser(port_of(proxy), client_tls)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        for n in range(8):
            await guesser.guess(f"user{n}", "Winter2026!")
    await guesser.close()
    [spraying] = events(caplog, "auth_spraying")
    assert spraying["logins"] == 5 and spraying["client"] == "127.0.0.1"
    assert spraying["network"] == "127.0.0.1/32"


async def test_a_delayed_session_holds_its_place_under_max_sessions_per_ip(
    start_proxy: Start, client_tls: ssl.SSLContext
) -> None:
    """Documented: while a session waits out its delay it still counts against the cap."""

    class HeldClock(FakeClock):
        def __init__(self) -> None:
            super().__init__()
            self.waiting = asyncio.Event()
            self.release = asyncio.Event()

        async def sleep(self, seconds: float) -> None:
            self.waiting.set()
            await self.release.wait()

    clock = HeldClock()
    proxy = await start_proxy(LoginThrottle(DEFAULTS, clock=clock), limits={"max_sessions_per_ip": 1})
    first = Guesser(port_of(proxy), client_tls)
    assert await first.guess("alice", "wrong") == INVALID
    assert first.client is not None
    first.client.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong again") + b"\r\n")
    await asyncio.wait_for(clock.waiting.wait(), 10)
    second = await Talk.open(port_of(proxy))
    assert await second.greeting() == (421, "4.7.0 Too many connections from your address, try again later")
    await second.close()
    clock.release.set()
    assert await first.client.reply() == INVALID
    await first.close()


# -- shared through Redis ------------------------------------------------------------------


async def test_two_proxies_sharing_redis_count_together(
    start_proxy: Start, client_tls: ssl.SSLContext, redis_server: RedisServer
) -> None:
    clock = FakeClock()
    a = await start_proxy(LoginThrottle(DEFAULTS, RedisStore(redis_server.url), clock=clock))
    b = await start_proxy(LoginThrottle(DEFAULTS, RedisStore(redis_server.url), clock=clock))
    guessers = [Guesser(port_of(a), client_tls), Guesser(port_of(b), client_tls)]
    count, replies = await guesses_in_a_minute(
        clock, lambda n: guessers[n % 2].guess("alice", f"guess-{n}"))
    assert count == 7  # the same as against one proxy: the balancer buys nothing
    while replies[-1] != LOCKED:
        replies.append(await guessers[len(replies) % 2].guess("alice", f"more-{len(replies)}"))
    assert replies.count(INVALID) == DEFAULTS.lockout_after
    # The lockout holds on both proxies.
    for guesser in guessers:
        assert await guesser.guess("alice", PASSWORD) == LOCKED
    # The same wrong password repeated is recognised across proxies too (a shared key).
    clock.t += DEFAULTS.lockout_seconds
    assert await guessers[0].guess("alice", "old") == INVALID
    assert await guessers[1].guess("alice", "old") == INVALID
    assert clock.slept[-1] == 2  # still one failure's delay: the repeat did not count
    for guesser in guessers:
        await guesser.close()


async def test_redis_down_means_each_proxy_counts_alone(
    start_proxy: Start, client_tls: ssl.SSLContext, redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(DEFAULTS, RedisStore(redis_server.url, timeout=0.5), clock=clock))
    guesser = Guesser(port_of(proxy), client_tls)
    assert await guesser.guess("alice", "one") == INVALID
    assert await guesser.guess("alice", "two") == INVALID  # 2 s, counted in Redis
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        for n in range(4):
            assert await guesser.guess("alice", f"down-{n}") == INVALID
    await guesser.close()
    # Redis gone: the proxy's own counts start from zero and throttle as before.
    assert clock.slept == [2, 2, 4, 8]
    [degraded] = events(caplog, "auth_throttle_degraded")
    assert "Error" in degraded["error"] or "Timeout" in degraded["error"]


# -- the parts -----------------------------------------------------------------------------


def test_addresses_are_counted_by_network() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("2001:db8:1:2::1", ipv6_prefix=128) == "2001:db8:1:2::1/128"
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7") == "192.0.2.7/32"
    assert address_key("192.0.2.7", ipv4_prefix=24) == "192.0.2.0/24"
    assert address_key("unknown") == "unknown"


def test_delays_double_up_to_the_cap() -> None:
    assert [DEFAULTS.delay(n) for n in range(7)] == [0, 2, 4, 8, 15, 15, 15]
    assert ThrottleSettings(initial_delay=0).delay(5) == 0
    assert ThrottleSettings(max_delay=60).delay(1000) == 60


async def test_an_ipv6_subscriber_is_one_address(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    throttle = LoginThrottle(ThrottleSettings(lockout_after=3), clock=clock)
    for n, ip in enumerate(["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1:ffff::3"]):
        assert not (await throttle.admit(ip, f"u{n}")).locked
        await throttle.failed(ip, f"u{n}", b"x")
    assert (await throttle.admit("2001:db8:0:1::99", "anyone")).locked
    assert not (await throttle.admit("2001:db8:0:2::1", "anyone")).locked


async def test_only_a_keyed_hash_of_the_attempt_is_kept() -> None:
    store = MemoryStore()
    throttle = LoginThrottle(DEFAULTS, store, clock=FakeClock())
    await throttle.failed("192.0.2.1", "alice", b"hunter2")
    [(key, attempts)] = store.attempts.items()
    assert key == ("192.0.2.1/32", "alice")
    assert all(b"hunter2".hex() not in h and "hunter2" not in h for h in attempts)
    other = LoginThrottle(DEFAULTS, MemoryStore(), clock=FakeClock())
    await other.failed("192.0.2.1", "alice", b"hunter2")
    assert list(attempts) != list(other.store.attempts[key])  # type: ignore[union-attr]


async def test_metrics_count_the_events() -> None:
    metrics = PrometheusRecorder(lambda: 0, lambda: 0)
    throttle = LoginThrottle(ThrottleSettings(lockout_after=2, spraying_logins=2), clock=FakeClock(),
                             metrics=metrics)
    for login in ("a", "b"):
        await throttle.admit("192.0.2.1", login)
        await throttle.failed("192.0.2.1", login, b"x")
    await throttle.admit("192.0.2.1", "c")

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value("smtpproxy_auth_throttle_events_total", {"event": name})

    assert value("auth_failed") == 2
    assert value("auth_delayed") == 1
    assert value("auth_locked") == 1
    assert value("auth_locked_refused") == 1
    assert value("auth_spraying") == 1


# -- the fail2ban filter in docs/submission.md ----------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "submission.md"


def fail2ban_filter() -> str:
    text = DOCS.read_text()
    start = text.index("[Definition]")
    return text[start:text.index("```", start)]


async def test_the_fail2ban_filter_matches_real_log_lines(
    start_proxy: Start, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    regex = shutil.which("fail2ban-regex")
    if regex is None:
        pytest.skip("fail2ban is not installed: apt-get install fail2ban")
    clock = FakeClock()
    proxy = await start_proxy(LoginThrottle(ThrottleSettings(lockout_after=3), clock=clock))
    attacker = Guesser(port_of(proxy), client_tls, source="127.0.0.9")
    innocent = Guesser(port_of(proxy), client_tls, source="127.0.0.8")
    log = tmp_path / "smtpproxy.log"
    handler = logging.FileHandler(log)  # formatted as they happen: with their sid
    handler.setFormatter(KeyValueFormatter())
    session_log = logging.getLogger("smtpproxy.session")
    session_log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="smtpproxy"):
            # A login crafted to look like a field must not get 127.0.0.7 banned.
            for n in range(3):
                await attacker.guess(f"client=127.0.0.7 n{n}", "x")
            assert await attacker.guess("alice", "x") == LOCKED
            assert (await innocent.guess("alice", PASSWORD))[0] == 235
        await innocent.close()
        await attacker.close()
    finally:
        session_log.removeHandler(handler)
        handler.close()
    assert " sid=" in log.read_text()
    (tmp_path / "smtpproxy.conf").write_text(fail2ban_filter())
    result = await asyncio.to_thread(
        subprocess.run, [regex, "-v", str(log), str(tmp_path / "smtpproxy.conf")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # 3 auth_failed + auth_locked (new) + auth_locked (refused): 5 lines, all for the attacker.
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 5 matched", out, re.MULTILINE), out
    hits = out.split("Failregex:")[1].split("Ignoreregex:")[0]
    assert re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3}", hits, re.MULTILINE) == ["127.0.0.9"] * 5, hits


async def test_one_count_for_every_listener_with_auth(
    tmp_path: Path, submission: dict[str, Any], client_tls: ssl.SSLContext
) -> None:
    """Failures on 587 (STARTTLS) delay and lock out on 465 (implicit TLS) too."""
    clock = FakeClock()
    implicit = {**submission, "implicit_tls": True}
    config = make_config(tmp_path, listeners=[submission, implicit])
    proxy = ProxyServer(config, chain=chain_of(),
                        login_throttle=LoginThrottle(ThrottleSettings(lockout_after=3), clock=clock))
    await proxy.start()
    try:
        starttls = Guesser(proxy.addresses[0][1], client_tls)
        for n in range(2):
            assert await starttls.guess("alice", f"g{n}") == INVALID
        await starttls.close()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.addresses[1][1], ssl=client_tls, server_hostname="proxy.test")
        client = Talk(reader, writer)
        await client.hello()
        blob = base64.b64encode(b"\0alice\0g2").decode()
        assert await client.cmd(f"AUTH PLAIN {blob}") == INVALID
        assert clock.slept == [2, 4]  # the third guess, on 465, waited for the two on 587
        assert await client.cmd(f"AUTH PLAIN {blob}") == LOCKED
        await client.close()
    finally:
        await proxy.stop(grace=1)


async def test_the_throttle_is_there_only_with_auth_and_can_be_turned_off(
    start_proxy: Start, client_tls: ssl.SSLContext, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert ProxyServer(make_config(tmp_path), chain=chain_of()).services.login_throttle is None
    on = ProxyServer(make_config(tmp_path, listeners=[{"address": "127.0.0.1", "port": 0, "tls": {
        "cert": str(tmp_path / "proxy.pem"), "key": str(tmp_path / "proxy.pem")},
        "auth": {"users_file": str(tmp_path / "users")}}]), chain=chain_of())
    assert on.services.login_throttle is not None
    assert on.services.login_throttle.settings == DEFAULTS
    proxy = await start_proxy(login_throttle={"enabled": False})
    assert proxy.services.login_throttle is None
    guesser = Guesser(port_of(proxy), client_tls)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        for n in range(3):
            assert await guesser.guess("alice", f"g{n}") == INVALID
    await guesser.close()
    assert [e["client"] for e in events(caplog, "auth_failed")] == ["127.0.0.1"] * 3
    assert not events(caplog, "auth_delayed")


async def test_redis_and_memory_count_alike(redis_server: RedisServer) -> None:
    """The Lua scripts and the in-process store are one algorithm: the same steps, the same answers."""
    import random

    rng = random.Random(23)
    settings = ThrottleSettings(lockout_after=6, lockout_seconds=50, forget_after=40)
    memory, redis = MemoryStore(), RedisStore(redis_server.url)
    try:
        now = 1_000_000.0
        for _ in range(400):
            now += rng.choice([0, 0, 1, 5, 20, 45])
            address = rng.choice(["192.0.2.1/32", "192.0.2.2/32", "2001:db8::/64"])
            login = rng.choice(["alice", "bob", "ceo", "x"])
            if rng.random() < 0.6:
                attempt = rng.choice(["h1", "h2", "h3", "h4"])
                assert await memory.fail(address, login, attempt, now, settings) == \
                    await redis.fail(address, login, attempt, now, settings)
            elif rng.random() < 0.8:
                assert await memory.counts(address, login, now, settings) == \
                    await redis.counts(address, login, now, settings)
            else:
                await memory.succeed(login)
                await redis.succeed(login)
    finally:
        await redis.close()


def test_redis_url_is_checked_where_it_is_written(tmp_path: Path) -> None:
    from smtpproxy.config import ConfigError, load_config

    (tmp_path / "c.yaml").write_text("login_throttle:\n  redis_url: http://10.0.0.9/\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert "c.yaml:2:3: login_throttle.redis_url: must be a redis://, rediss:// or unix:// URL" in str(
        info.value)


async def test_behind_a_load_balancer_the_real_client_is_counted(
    tmp_path: Path, submission: dict[str, Any], client_tls: ssl.SSLContext
) -> None:
    """PROXY protocol: the address the balancer names is locked out, not the balancer."""
    clock = FakeClock()
    listener = {**submission, "proxy_protocol": True, "proxy_protocol_from": ["127.0.0.0/8"]}
    proxy = ProxyServer(make_config(tmp_path, listeners=[listener]), chain=chain_of(),
                        login_throttle=LoginThrottle(ThrottleSettings(lockout_after=2), clock=clock))
    await proxy.start()

    async def guess(client_ip: str, password: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        writer.write(f"PROXY TCP4 {client_ip} 192.0.2.25 40000 587\r\n".encode())
        client = Talk(reader, writer)
        await client.hello()
        assert await client.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        await client.writer.start_tls(client_tls, server_hostname="proxy.test")
        await client.cmd("EHLO client.test")
        reply = await client.cmd("AUTH PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()).decode())
        await client.close()
        return reply

    try:
        assert await guess("198.51.100.1", "a") == INVALID
        assert await guess("198.51.100.1", "b") == INVALID
        assert await guess("198.51.100.1", PASSWORD) == LOCKED
        assert (await guess("198.51.100.2", PASSWORD))[0] == 235  # same balancer, another client
    finally:
        await proxy.stop(grace=1)
