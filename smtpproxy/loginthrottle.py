"""Login throttling: what Dovecot's auth penalty, Postfix's anvil and fail2ban give together.

Failed logins are counted per client address (an IPv6 client by its /64, configurable)
and per login. Before a login is checked it waits a delay that doubles with the failures
of its address and of its login (``initial_delay``, then twice that, up to ``max_delay``,
15 s as in Dovecot). The wait comes *before* the password check, so a client cannot learn
the answer early by giving up on a slow reply. An address that reaches ``lockout_after``
failures is locked out for ``lockout_seconds``; a login never is (a lockout per login
would let anyone lock out the CEO), it only gets the growing delay. The same login with
the same wrong password again (a phone with an old password) does not count again: only
a keyed hash of each attempt is kept, never the password. Trusted networks are exempt.

The counts live in this process, or in Redis when ``redis_url`` is set, so that several
proxies behind a balancer count together. When Redis does not answer, the counts of this
process take over (the throttle never stops throttling) until Redis answers again.

The interface is small on purpose (:meth:`LoginThrottle.admit`, :meth:`~LoginThrottle.failed`,
:meth:`~LoginThrottle.succeeded`) so that any login front end can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from smtpproxy.eventlog import event
from smtpproxy.metrics import NullRecorder
from smtpproxy.networks import IPNetwork, ip_in_networks

__all__ = [
    "Admission",
    "Clock",
    "Failure",
    "LoginThrottle",
    "MemoryStore",
    "RedisStore",
    "ThrottleSettings",
    "ThrottleStore",
    "address_key",
]

_RECENT_ATTEMPTS = 8
"""Distinct wrong passwords remembered per address and login (to spot repeats)."""
_ATTEMPT_HASH_HEX = 8
"""Hex digits kept of each attempt's HMAC (32 bits)."""


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """How hard the throttle brakes; the defaults are Dovecot's (2 s doubling, 15 s cap)."""

    initial_delay: float = 2.0
    max_delay: float = 15.0
    lockout_after: int = 10
    lockout_seconds: float = 900.0
    forget_after: float = 900.0
    """A count with no new failure for this long starts again from zero."""
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    spraying_logins: int = 5
    """Distinct logins failed from one address (within forget_after) that signal spraying."""
    trusted_networks: tuple[IPNetwork, ...] = ()

    def delay(self, failures: int) -> float:
        """The wait before the next attempt after *failures* failures."""
        if failures <= 0 or self.initial_delay <= 0:
            return 0.0
        return float(min(self.max_delay, self.initial_delay * 2 ** min(failures - 1, 32)))


class Clock(Protocol):
    """Time for the throttle: wall-clock seconds (shared with other proxies through Redis)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`LoginThrottle.admit` decided: locked out, or go on (after ``delay``)."""

    locked_until: float = 0.0
    delay: float = 0.0

    @property
    def locked(self) -> bool:
        return self.locked_until > 0


@dataclass(frozen=True, slots=True)
class Failure:
    """The counts after a failed login."""

    address_failures: int
    login_failures: int
    distinct_logins: int
    repeated: bool
    """The same login and wrong password as a recent attempt: not counted again."""
    locked_until: float = 0.0
    """Set when this failure locked the address out."""
    new_login: bool = False
    """The first failure of this login from this address (within forget_after)."""


@dataclass(frozen=True, slots=True)
class Counts:
    address_failures: int
    login_failures: int
    locked_until: float


class ThrottleStore(Protocol):
    """Where the counts live (this process, or Redis); every method is one atomic step."""

    async def counts(self, address: str, login: str, now: float, s: ThrottleSettings) -> Counts: ...

    async def fail(self, address: str, login: str, attempt: str, now: float,
                   s: ThrottleSettings) -> Failure: ...

    async def succeed(self, login: str) -> None: ...


def address_key(ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The network a client address is counted under (``2001:db8::/64``); IPv4-mapped IPv6
    counts as IPv4; anything that is not an IP address is its own key."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


# -- in this process ---------------------------------------------------------------------


@dataclass(slots=True)
class _Count:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0

    def current(self, now: float, s: ThrottleSettings) -> int:
        if now - self.last > s.forget_after:
            self.failures = 0
        return self.failures


@dataclass(slots=True)
class MemoryStore:
    """The counts of this process; entries older than ``forget_after`` are swept."""

    addresses: dict[str, _Count] = field(default_factory=dict)
    logins: dict[str, _Count] = field(default_factory=dict)
    attempts: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    tried_logins: dict[str, dict[str, float]] = field(default_factory=dict)
    _last_sweep: float = 0.0

    async def counts(self, address: str, login: str, now: float, s: ThrottleSettings) -> Counts:
        a = self.addresses.get(address)
        l_ = self.logins.get(login)
        locked = a.locked_until if a is not None and a.locked_until > now else 0.0
        return Counts(a.current(now, s) if a else 0, l_.current(now, s) if l_ else 0, locked)

    async def fail(self, address: str, login: str, attempt: str, now: float,
                   s: ThrottleSettings) -> Failure:
        self._sweep(now, s)
        a = self.addresses.setdefault(address, _Count())
        l_ = self.logins.setdefault(login, _Count())
        a.current(now, s)
        l_.current(now, s)
        recent = self.attempts.setdefault((address, login), {})
        for old in [h for h, t in recent.items() if now - t > s.forget_after]:
            del recent[old]
        repeated = attempt in recent
        recent[attempt] = now
        while len(recent) > _RECENT_ATTEMPTS:
            del recent[min(recent, key=recent.__getitem__)]
        tried = self.tried_logins.setdefault(address, {})
        for old in [n for n, t in tried.items() if now - t > s.forget_after]:
            del tried[old]
        new_login = login not in tried
        tried[login] = now
        if not repeated:
            a.failures += 1
            a.last = now
            l_.failures += 1
            l_.last = now
        failures, locked_until = a.failures, 0.0
        if failures >= s.lockout_after:
            locked_until = a.locked_until = now + s.lockout_seconds
            a.failures = 0  # after the lockout, counting starts over
        return Failure(failures, l_.failures, len(tried), repeated, locked_until, new_login)

    async def succeed(self, login: str) -> None:
        self.logins.pop(login, None)

    def _sweep(self, now: float, s: ThrottleSettings) -> None:
        """Forget what no longer counts, at most once per forget_after (bounded memory)."""
        if now - self._last_sweep < s.forget_after:
            return
        self._last_sweep = now
        horizon = now - s.forget_after
        for table in (self.addresses, self.logins):
            for key in [k for k, c in table.items() if c.last < horizon and c.locked_until < now]:
                del table[key]
        for pair in [k for k, v in self.attempts.items() if max(v.values(), default=0) < horizon]:
            del self.attempts[pair]
        for addr in [k for k, v in self.tried_logins.items() if max(v.values(), default=0) < horizon]:
            del self.tried_logins[addr]


# -- in Redis ----------------------------------------------------------------------------

# KEYS: address hash, login hash. ARGV: now, forget_after.
_COUNTS_LUA = """
local now, forget = tonumber(ARGV[1]), tonumber(ARGV[2])
local function count(key)
  local n = tonumber(redis.call('HGET', key, 'n') or '0')
  local last = tonumber(redis.call('HGET', key, 'last') or '0')
  if now - last > forget then return 0 end
  return n
end
local locked = tonumber(redis.call('HGET', KEYS[1], 'locked') or '0')
if locked <= now then locked = 0 end
return {count(KEYS[1]), count(KEYS[2]), tostring(locked)}
"""

# KEYS: address hash, login hash, attempts zset (address+login), tried-logins zset (address).
# ARGV: now, forget_after, lockout_after, lockout_seconds, attempt hash, login, keep.
_FAIL_LUA = """
local now, forget = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, lock_for = tonumber(ARGV[3]), tonumber(ARGV[4])
local attempt, login, keep = ARGV[5], ARGV[6], tonumber(ARGV[7])
local ttl = math.ceil(math.max(forget, lock_for)) + 1
local function current(key)
  local n = tonumber(redis.call('HGET', key, 'n') or '0')
  local last = tonumber(redis.call('HGET', key, 'last') or '0')
  if now - last > forget then n = 0 end
  return n
end
local a, l = current(KEYS[1]), current(KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - forget))
local repeated = redis.call('ZSCORE', KEYS[3], attempt) ~= false
redis.call('ZADD', KEYS[3], now, attempt)
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(keep + 1))
redis.call('PEXPIRE', KEYS[3], ttl * 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now - forget))
local new_login = redis.call('ZADD', KEYS[4], now, login)
redis.call('PEXPIRE', KEYS[4], ttl * 1000)
local tried = redis.call('ZCARD', KEYS[4])
if not repeated then
  a, l = a + 1, l + 1
  redis.call('HSET', KEYS[1], 'n', a, 'last', tostring(now))
  redis.call('HSET', KEYS[2], 'n', l, 'last', tostring(now))
else
  redis.call('HSET', KEYS[1], 'n', a)
  redis.call('HSET', KEYS[2], 'n', l)
end
local locked = 0
if a >= limit then
  locked = now + lock_for
  redis.call('HSET', KEYS[1], 'locked', tostring(locked), 'n', 0)
end
redis.call('PEXPIRE', KEYS[1], ttl * 1000)
redis.call('PEXPIRE', KEYS[2], ttl * 1000)
return {a, l, tried, repeated and 1 or 0, tostring(locked), new_login}
"""


class RedisUnavailable(Exception):
    """Redis did not answer (down, timed out, refused)."""


class RedisStore:
    """The counts in Redis, each step one Lua script (atomic across proxies)."""

    def __init__(self, url: str, timeout: float = 0.5, prefix: str = "smtpproxy:login:"):
        import redis.asyncio

        self.timeout = timeout
        self.prefix = prefix
        self.client: Any = redis.asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._counts = self.client.register_script(_COUNTS_LUA)
        self._fail = self.client.register_script(_FAIL_LUA)
        self._secret: bytes | None = None

    def _key(self, kind: str, name: str) -> str:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return f"{self.prefix}{kind}:{digest}"

    async def _call(self, call: Any) -> Any:
        import redis.exceptions

        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def secret(self) -> bytes:
        """The attempt-hash key every proxy sharing this Redis uses (made by the first)."""
        if self._secret is None:
            key = self.prefix + "secret"
            await self._call(self.client.set(key, os.urandom(32).hex(), nx=True))
            value = await self._call(self.client.get(key))
            self._secret = bytes.fromhex(value.decode("ascii"))
        return self._secret

    async def counts(self, address: str, login: str, now: float, s: ThrottleSettings) -> Counts:
        a, l_, locked = await self._call(self._counts(
            keys=[self._key("addr", address), self._key("login", login)], args=[now, s.forget_after]
        ))
        return Counts(int(a), int(l_), float(locked))

    async def fail(self, address: str, login: str, attempt: str, now: float,
                   s: ThrottleSettings) -> Failure:
        a, l_, tried, repeated, locked, new_login = await self._call(self._fail(
            keys=[self._key("addr", address), self._key("login", login),
                  self._key("tries", f"{address}\0{login}"), self._key("logins", address)],
            args=[now, s.forget_after, s.lockout_after, s.lockout_seconds, attempt, login,
                  _RECENT_ATTEMPTS],
        ))
        return Failure(int(a), int(l_), int(tried), bool(repeated), float(locked), bool(new_login))

    async def succeed(self, login: str) -> None:
        await self._call(self.client.delete(self._key("login", login)))

    async def close(self) -> None:
        await self.client.aclose()


# -- the throttle ------------------------------------------------------------------------


class LoginThrottle:
    """Brakes on password guessing, shared by every listener of a proxy (and through Redis,
    by every proxy). Logs ``auth_failed``, ``auth_delayed``, ``auth_locked`` and
    ``auth_spraying`` and counts them in the metrics."""

    def __init__(self, settings: ThrottleSettings, store: MemoryStore | RedisStore | None = None,
                 *, clock: Clock | None = None, metrics: NullRecorder | None = None):
        self.settings = settings
        self.store: MemoryStore | RedisStore = store if store is not None else MemoryStore()
        self.local = self.store if isinstance(self.store, MemoryStore) else MemoryStore()
        """The counts used while Redis does not answer."""
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.metrics = metrics if metrics is not None else NullRecorder()
        self._secret = os.urandom(32)
        self._redis_down = False

    def exempt(self, ip: str) -> bool:
        return ip_in_networks(ip, self.settings.trusted_networks)

    def _address(self, ip: str) -> str:
        return address_key(ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix)

    async def _stored(self, step: str, *args: Any) -> Any:
        """Run *step* on the store; while Redis does not answer, on this process's counts."""
        if self.store is not self.local:
            try:
                result = await getattr(self.store, step)(*args)
            except RedisUnavailable as exc:
                if not self._redis_down:
                    self._redis_down = True
                    event("auth_throttle_degraded", level=logging.WARNING, error=str(exc),
                          note="Redis does not answer: counting logins in this process only")
            else:
                if self._redis_down:
                    self._redis_down = False
                    event("auth_throttle_restored", note="Redis answers again")
                return result
        return await getattr(self.local, step)(*args)

    async def _attempt_hash(self, login: str, password: bytes) -> str:
        secret = self._secret
        if isinstance(self.store, RedisStore) and not self._redis_down:
            with contextlib.suppress(RedisUnavailable):  # then this process's own key
                secret = await self.store.secret()
        mac = hmac.new(secret, login.encode("utf-8", "surrogateescape") + b"\0" + password, "sha256")
        # 32 bits: enough to tell a repeat among the last few attempts, far too few to confirm
        # a password offline (every guess matches ~2^-32 of them), even with the key.
        return mac.hexdigest()[:_ATTEMPT_HASH_HEX]

    async def admit(self, ip: str, login: str) -> Admission:
        """Before checking a login: refused while the address is locked out, else after
        waiting out the delay its failures and the login's have earned (waited here)."""
        if self.exempt(ip):
            return Admission()
        s, now = self.settings, self.clock.now()
        counts: Counts = await self._stored("counts", self._address(ip), login, now, s)
        if counts.locked_until:
            self.metrics.auth_event("auth_locked_refused")
            event("auth_locked", level=logging.WARNING, client=ip, user=login,
                  seconds=round(counts.locked_until - now, 3), state="refused")
            return Admission(locked_until=counts.locked_until)
        delay = max(s.delay(counts.address_failures), s.delay(counts.login_failures))
        if delay > 0:
            self.metrics.auth_event("auth_delayed")
            event("auth_delayed", client=ip, user=login, seconds=delay,
                  address_failures=counts.address_failures, login_failures=counts.login_failures)
            await self.clock.sleep(delay)
        return Admission(delay=delay)

    async def failed(self, ip: str, login: str, password: bytes, **context: Any) -> Failure | None:
        """Count a failed login (None for a trusted client); logs ``auth_failed`` with
        *context* (the mechanism, say), and ``auth_locked``/``auth_spraying`` when due."""
        self.metrics.auth_event("auth_failed")
        if self.exempt(ip):
            event("auth_failed", level=logging.WARNING, client=ip, **context, user=login, trusted=True)
            return None
        s = self.settings
        address = self._address(ip)
        attempt = await self._attempt_hash(login, password)
        failure: Failure = await self._stored("fail", address, login, attempt, self.clock.now(), s)
        event("auth_failed", level=logging.WARNING, client=ip, **context, user=login,
              address_failures=failure.address_failures, login_failures=failure.login_failures,
              repeated=failure.repeated or None)
        if failure.locked_until:
            self.metrics.auth_event("auth_locked")
            event("auth_locked", level=logging.WARNING, client=ip, network=address,
                  failures=failure.address_failures, seconds=s.lockout_seconds, state="new")
        if failure.new_login and failure.distinct_logins == s.spraying_logins:
            self.metrics.auth_event("auth_spraying")
            event("auth_spraying", level=logging.WARNING, client=ip, network=address,
                  logins=failure.distinct_logins, seconds=s.forget_after)
        return failure

    async def succeeded(self, ip: str, login: str) -> None:
        """A login that worked: its own delay is gone (its address's failures stay)."""
        if not self.exempt(ip):
            await self._stored("succeed", login)

    async def close(self) -> None:
        if isinstance(self.store, RedisStore):
            await self.store.close()

