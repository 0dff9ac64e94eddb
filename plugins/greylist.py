"""greylist: tempfail the first delivery attempt of an unknown (client network, sender, recipient).

    plugins:
      - name: greylist
        settings:
          delay: 300
          backend: redis
          redis_url: ${REDIS_URL}
          skip_networks: [10.0.0.0/8]

At each RCPT TO the triplet (the client's /24 or /64 network, the MAIL FROM address, the
recipient) is looked up. First seen: ``451 4.7.1 Greylisted, please try again later`` and the
time is remembered. A retry before ``delay`` seconds gets the same answer; a retry after it,
within ``retry_window`` of the first attempt, passes and the triplet is remembered as good
for ``expire`` seconds (renewed each time it is used). A retry after ``retry_window`` starts
over. Real mail servers retry; most spam software does not.

The memory backend keeps the triplets in this process. The redis backend keeps each in a
hash, updated by one Lua script per check (so proxies sharing a Redis agree), timed by
Redis's clock. When Redis does not answer, ``redis_failure`` decides: ``open`` lets the
recipient through, ``closed`` answers ``451 4.3.0``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, Protocol

from pydantic import Field, field_validator, model_validator

from smtpproxy import (
    EventLog,
    Network,
    PluginSettings,
    Recipient,
    Session,
    Transaction,
    Verdict,
    hookimpl,
    ip_in_networks,
)

from ._redis import RedisScript, RedisUnavailable, StateStore

__all__ = ["Backend", "Greylist", "MemoryBackend", "RedisBackend", "Status"]

log = EventLog(__name__)

Status = Literal["new", "early", "passed", "known"]
"""new: first seen (or its retry window passed); early: retried before the delay;
passed: retried after the delay (now known); known: passed before, still remembered."""


class Backend(Protocol):
    async def check(self, key: str, delay: float, retry_window: float, expire: float) -> tuple[Status, float]:
        """The triplet's status, and the seconds since it was first seen."""
        ...


class MemoryBackend:
    """Triplets in this process: key -> (first seen, passed at or None). Expired ones are swept."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sweep_every: int = 1000):
        self.clock = clock
        self.entries: dict[str, tuple[float, float | None]] = {}
        self._sweep_every = sweep_every
        self._calls = 0

    async def check(self, key: str, delay: float, retry_window: float, expire: float) -> tuple[Status, float]:
        now = self.clock()
        self._calls += 1
        if self._calls % self._sweep_every == 0:
            self.sweep(now, retry_window, expire)
        entry = self.entries.get(key)
        if entry is not None:
            first, passed = entry
            if passed is not None and now - passed <= expire:
                self.entries[key] = (first, now)  # renewed on use
                return "known", now - first
            if passed is None and now - first <= retry_window:
                if now - first < delay:
                    return "early", now - first
                self.entries[key] = (first, now)
                return "passed", now - first
        self.entries[key] = (now, None)
        return "new", 0.0

    def sweep(self, now: float, retry_window: float, expire: float) -> None:
        self.entries = {
            k: (first, passed) for k, (first, passed) in self.entries.items()
            if (now - passed <= expire if passed is not None else now - first <= retry_window)
        }


_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, window, expire = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'first', 'passed')
local first, passed = tonumber(v[1]), tonumber(v[2])
if first and passed and now - passed <= expire then
  redis.call('HSET', KEYS[1], 'passed', now)
  redis.call('PEXPIRE', KEYS[1], expire)
  return {'known', now - first}
end
if first and not passed and now - first <= window then
  if now - first < delay then
    return {'early', now - first}
  end
  redis.call('HSET', KEYS[1], 'passed', now)
  redis.call('PEXPIRE', KEYS[1], expire)
  return {'passed', now - first}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'first', now)
redis.call('PEXPIRE', KEYS[1], window)
return {'new', 0}
"""


class RedisBackend:
    """Triplets in Redis hashes (first, passed; milliseconds of Redis's clock), with expiry."""

    def __init__(self, url: str, timeout: float, prefix: str):
        self.redis = RedisScript(url, timeout, prefix, _LUA)

    async def check(self, key: str, delay: float, retry_window: float, expire: float) -> tuple[Status, float]:
        args = [max(0, round(delay * 1000)), max(1, round(retry_window * 1000)), max(1, round(expire * 1000))]
        status, elapsed_ms = await self.redis.run(key, args)
        text = status.decode() if isinstance(status, bytes) else str(status)
        if text not in ("new", "early", "passed", "known"):
            raise ValueError(f"unexpected answer from the greylist script: {status!r}")
        return text, int(elapsed_ms) / 1000  # type: ignore[return-value]

    async def close(self) -> None:
        await self.redis.close()


def _check_pattern(value: str) -> str:
    pattern = value.strip().lower()
    local, at, domain = pattern.rpartition("@")
    bad_local = not local or ("*" in local and local != "*")
    if not at or not domain or bad_local or " " in pattern or "*" in domain:
        raise ValueError(f"{value!r} is not an address or *@domain")
    return pattern


def _check_text(value: str) -> str:
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be non-empty and without control characters (it becomes an SMTP reply line)")
    return value


class Greylist:
    """Greylisting of (client network, sender, recipient) triplets at RCPT TO."""

    class Settings(PluginSettings):
        delay: float = Field(
            default=300, ge=0, allow_inf_nan=False,
            description="Seconds a new triplet must wait before a retry is accepted.",
        )
        retry_window: float = Field(
            default=86400, gt=0, allow_inf_nan=False,
            description="Seconds after the first attempt within which the accepted retry must come.",
        )
        expire: float = Field(
            default=36 * 86400, gt=0, allow_inf_nan=False,
            description="Seconds a triplet that passed is remembered after its last use.",
        )
        text: str = Field(
            default="Greylisted, please try again later", description="Reply text of the 451 4.7.1."
        )
        prefix_v4: int = Field(
            default=24, strict=True, ge=8, le=32, description="IPv4 client network prefix."
        )
        prefix_v6: int = Field(
            default=64, strict=True, ge=16, le=128, description="IPv6 client network prefix."
        )
        skip_networks: list[Network] = Field(
            default=[], description="Client networks never greylisted (your relays, known senders)."
        )
        skip_authenticated: bool = Field(
            default=True, strict=True, description="Never greylist clients that authenticated (SMTP AUTH)."
        )
        skip_recipients: list[str] = Field(
            default=[], description="Recipients never greylisted: an address, or *@domain."
        )
        skip_senders: list[str] = Field(
            default=[], description="Senders never greylisted: an address, or *@domain."
        )
        backend: Literal["memory", "redis"] = Field(
            default="memory", description="Where triplets live: memory (this process) or redis (shared)."
        )
        redis_url: str | None = Field(
            default=None, description="Redis URL (redis://host:6379/0); required for backend redis."
        )
        redis_prefix: str = Field(default="smtpproxy:greylist:", description="Prefix of every Redis key.")
        redis_timeout: float = Field(
            default=0.5, gt=0, allow_inf_nan=False, description="Seconds one Redis call may take."
        )
        redis_failure: Literal["open", "closed"] = Field(
            default="open",
            description="When Redis does not answer: open lets the recipient pass, closed answers 451 4.3.0.",
        )

        @field_validator("skip_recipients", "skip_senders")
        @classmethod
        def _patterns(cls, value: list[str]) -> list[str]:
            return [_check_pattern(v) for v in value]

        @field_validator("text")
        @classmethod
        def _text(cls, value: str) -> str:
            return _check_text(value)

        @model_validator(mode="after")
        def _consistent(self) -> Greylist.Settings:
            if self.backend == "redis" and not self.redis_url:
                raise ValueError("backend redis needs redis_url (e.g. redis://127.0.0.1:6379/0)")
            if self.retry_window <= self.delay:
                raise ValueError(
                    f"retry_window ({self.retry_window:g}) must be longer than delay ({self.delay:g}), "
                    "or no retry could ever pass"
                )
            if self.expire < self.retry_window:
                raise ValueError(
                    f"expire ({self.expire:g}) must be at least retry_window ({self.retry_window:g})"
                )
            return self

    def __init__(self, settings: Settings | None = None, *, backend: Backend | None = None):
        self.settings = settings or self.Settings()
        self.store: StateStore[Backend] = StateStore(backend, self._make_backend)

    def _make_backend(self) -> Backend:
        s = self.settings
        if s.backend == "redis":
            assert s.redis_url is not None
            return RedisBackend(s.redis_url, s.redis_timeout, s.redis_prefix)
        return MemoryBackend()

    @hookimpl
    async def startup(self) -> None:
        self.store.get()

    @hookimpl
    async def shutdown(self) -> None:
        await self.store.close()

    @hookimpl
    async def rcpt_to(
        self, session: Session, transaction: Transaction, recipient: Recipient
    ) -> Verdict | None:
        sender = transaction.envelope.sender
        sender_text = "" if sender is None or sender.is_null else sender.text.lower()
        rcpt_text = recipient.address.text.lower()
        network = self._network(session)
        if network is None or self._skipped(session, sender_text, rcpt_text):
            return None
        key = f"{network}|{sender_text or '<>'}|{rcpt_text}"
        s = self.settings
        try:
            status, age = await self.store.get().check(key, s.delay, s.retry_window, s.expire)
        except RedisUnavailable as exc:
            if s.redis_failure == "open":
                log.warning("greylist_redis_down", policy="open", error=str(exc))
                return Verdict.cont(
                    reason=f"greylist skipped: Redis unavailable ({exc})", tags=("greylist:error",)
                )
            log.warning("greylist_redis_down", policy="closed", error=str(exc))
            return Verdict.tempfail(
                "Greylisting unavailable, try again later", code=451, enhanced="4.3.0",
                reason=f"Redis unavailable ({exc}), redis_failure closed",
            )
        log.info("greylist", status=status, triplet=key, age=round(age, 1))
        if status in ("new", "early"):
            verdict = Verdict.tempfail(
                s.text, code=451, enhanced="4.7.1",
                reason=f"greylisted ({status}, {age:.0f}s of {s.delay:g}s)",
            )
            return replace(verdict, tags=(f"greylist:{status}",))
        return Verdict.cont(reason=f"greylist {status} after {age:.0f}s", tags=(f"greylist:{status}",))

    def _network(self, session: Session) -> str | None:
        try:
            ip = ipaddress.ip_address(session.client.ip)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        prefix = self.settings.prefix_v4 if ip.version == 4 else self.settings.prefix_v6
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def _skipped(self, session: Session, sender: str, recipient: str) -> bool:
        s = self.settings
        if s.skip_authenticated and session.auth_user is not None:
            return True
        if s.skip_networks and ip_in_networks(session.client.ip, s.skip_networks):
            return True
        return _matches(recipient, s.skip_recipients) or (bool(sender) and _matches(sender, s.skip_senders))


def _matches(address: str, patterns: list[str]) -> bool:
    domain = address.rpartition("@")[2]
    return any(p == address or (p.startswith("*@") and p[2:] == domain) for p in patterns)
