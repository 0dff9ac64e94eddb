"""ratelimit: limit connections, messages, recipients or bytes per client, network, sender or user.

    plugins:
      - name: ratelimit
        settings:
          backend: redis
          redis_url: ${REDIS_URL}
          rules:
            - {name: conn-per-ip, key: client_ip, what: connections, limit: 30, window: 60}
            - {name: rcpt-per-sender, key: sender, what: recipients, limit: 200, window: 3600}

Each rule counts events for one key (the client address, its network, the sender, its domain,
the recipient or the SMTP AUTH user) in a **sliding window log**: every counted event is kept
with its time (and size, for bytes), and an event is allowed when the events of the last
``window`` seconds plus this one stay within ``limit``. Refused events are not counted.

The memory backend keeps the logs in this process (expired logs are swept). The redis backend
keeps each log in a sorted set and runs one Lua script per event (expire old entries, sum the
rest, add the new one, set the key's expiry) so that several proxy instances share one limit
atomically; Redis's own clock (``TIME``) is used, so the proxies' clocks do not matter.
"""

from __future__ import annotations

import ipaddress
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from pydantic import Field, field_validator, model_validator

from smtpproxy import (
    EventLog,
    Message,
    Network,
    PluginSettings,
    Recipient,
    Session,
    Transaction,
    Verdict,
    hookimpl,
    ip_in_networks,
)

from ._policy import ActionSpec, check_reply_template, verdict_for
from ._redis import RedisScript, RedisUnavailable, StateStore

__all__ = ["MemoryBackend", "RateLimit", "RedisBackend", "Rule"]

log = EventLog(__name__)

KeyKind = Literal["client_ip", "client_network", "sender", "sender_domain", "recipient", "auth_user"]
What = Literal["connections", "messages", "recipients", "bytes"]

# What each counting point knows: a connection has only the client.
_KEYS_AT_CONNECT = ("client_ip", "client_network")

_PLACEHOLDERS = {"key": "192.0.2.7", "rule": "per-ip", "limit": "10", "window": "60", "what": "messages"}
_MAX_KEY_IN_REPLY = 100


def _check_template(value: str) -> str:
    return check_reply_template(value, _PLACEHOLDERS)


class Rule(PluginSettings):
    """One limit: at most ``limit`` ``what`` per ``key`` in any ``window`` seconds."""

    name: str = Field(
        min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Unique rule name (letters, digits, _ . -), used in tags (ratelimit:<name>) and keys.",
    )
    key: KeyKind = Field(
        description=(
            "What is counted separately: client_ip, client_network (the client's /prefix_v4 or "
            "/prefix_v6 network), sender, sender_domain, recipient or auth_user."
        ),
    )
    prefix_v4: int = Field(
        default=24, strict=True, ge=0, le=32, description="IPv4 prefix grouping clients (client_network)."
    )
    prefix_v6: int = Field(
        default=64, strict=True, ge=0, le=128, description="IPv6 prefix grouping clients (client_network)."
    )
    what: What = Field(
        description=(
            "What is counted: connections (at connect), messages or bytes (the message size, at "
            "DATA) or recipients (each RCPT TO)."
        ),
    )
    limit: int = Field(strict=True, ge=1, description="The most allowed in any window (events, or bytes).")
    window: float = Field(gt=0, allow_inf_nan=False, description="The sliding window, in seconds.")
    action: ActionSpec = Field(
        default="tempfail",
        description="Past the limit: tempfail, reject, quarantine, continue, or a number (add that score).",
    )
    text: str = Field(
        default="Rate limit exceeded for {key}, try again later",
        description="Reply text past the limit. Placeholders: {key}, {rule}, {limit}, {window}, {what}.",
    )

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return _check_template(value)

    @model_validator(mode="after")
    def _key_known_when_counted(self) -> Rule:
        if self.what == "connections" and self.key not in _KEYS_AT_CONNECT:
            raise ValueError(
                f"key {self.key!r} is not known when a client connects; "
                "connections rules take key client_ip or client_network"
            )
        return self


# -- backends ------------------------------------------------------------------------


class Backend(Protocol):
    async def hit(self, key: str, window: float, limit: int, amount: int) -> tuple[bool, int]:
        """Count ``amount`` for ``key`` if the window's total stays within ``limit``.

        Returns (allowed, total): the total including this event if allowed, else without it.
        """
        ...


@dataclass
class _Log:
    window: float
    events: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def expire(self, now: float) -> None:
        horizon = now - self.window
        while self.events and self.events[0][0] <= horizon:
            self.total -= self.events.popleft()[1]


class MemoryBackend:
    """Sliding window logs in this process. ``clock`` is injectable for tests."""

    SWEEP_EVERY = 10.0  # seconds between sweeps of idle keys

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.logs: dict[str, _Log] = {}
        self._last_sweep = clock()

    async def hit(self, key: str, window: float, limit: int, amount: int) -> tuple[bool, int]:
        return self.hit_now(key, window, limit, amount)

    def hit_now(self, key: str, window: float, limit: int, amount: int) -> tuple[bool, int]:
        now = self.clock()
        if now - self._last_sweep >= self.SWEEP_EVERY:
            self.sweep(now)
        entry = self.logs.get(key)
        if entry is None:
            entry = self.logs[key] = _Log(window)
        entry.expire(now)
        if entry.total + amount > limit:
            return False, entry.total
        entry.events.append((now, amount))
        entry.total += amount
        return True, entry.total

    def sweep(self, now: float | None = None) -> None:
        """Forget every key whose window holds nothing any more (bounds memory)."""
        now = self.clock() if now is None else now
        self._last_sweep = now
        for key in list(self.logs):
            entry = self.logs[key]
            entry.expire(now)
            if not entry.events:
                del self.logs[key]


# KEYS[1]: the sorted set of events (score: time in microseconds, member: "<unique>:<amount>").
# ARGV: window (microseconds), limit, amount, unique member id, "1" if amounts must be summed.
_LUA = """
local key = KEYS[1]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local total = 0
if ARGV[5] == '1' then
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + tonumber(string.match(m, ':(%d+)$'))
  end
else
  total = redis.call('ZCARD', key)
end
if total + amount > limit then
  return {0, total}
end
redis.call('ZADD', key, now, ARGV[4] .. ':' .. amount)
redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1000)
return {1, total + amount}
"""


class RedisBackend:
    """Sliding window logs in Redis sorted sets, shared by every proxy using the same Redis."""

    def __init__(self, url: str, timeout: float, prefix: str):
        self.redis = RedisScript(url, timeout, prefix, _LUA)

    async def hit(self, key: str, window: float, limit: int, amount: int) -> tuple[bool, int]:
        window_us = max(1, math.ceil(window * 1_000_000))
        weighted = "1" if key.startswith("bytes:") else "0"  # byte logs store sizes: sum them
        allowed, total = await self.redis.run(key, [window_us, limit, amount, uuid.uuid4().hex, weighted])
        return bool(allowed), int(total)

    async def close(self) -> None:
        await self.redis.close()


# -- the plugin ----------------------------------------------------------------------


class RateLimit:
    """Sliding-window rate limits on connections, messages, recipients and bytes."""

    class Settings(PluginSettings):
        rules: list[Rule] = Field(
            min_length=1, description="The limits; every rule applies on its own (all must pass)."
        )
        backend: Literal["memory", "redis"] = Field(
            default="memory",
            description=(
                "Where the counts live: memory (this process only) or redis (shared by every "
                "proxy instance using the same Redis)."
            ),
        )
        redis_url: str | None = Field(
            default=None,
            description="Redis URL (redis://host:6379/0, rediss://, unix://); required for backend redis.",
        )
        redis_prefix: str = Field(
            default="smtpproxy:ratelimit:", description="Prefix of every Redis key this plugin writes."
        )
        redis_failure: Literal["open", "closed"] = Field(
            default="open",
            description=(
                "When Redis does not answer: open allows the event (logged as a warning), closed "
                "answers 451 4.3.0 (421 at connect) so the client retries."
            ),
        )
        redis_timeout: float = Field(
            default=0.5, gt=0, allow_inf_nan=False,
            description="Seconds one Redis call may take (connect included) before it counts as a failure.",
        )
        skip_networks: list[Network] = Field(
            default=[], description="Client networks never limited (your own relays and submission hosts)."
        )
        skip_authenticated: bool = Field(
            default=False, strict=True, description="Do not limit clients that authenticated (SMTP AUTH)."
        )

        @model_validator(mode="after")
        def _consistent(self) -> RateLimit.Settings:
            if self.backend == "redis" and not self.redis_url:
                raise ValueError("backend redis needs redis_url (e.g. redis://127.0.0.1:6379/0)")
            names = [rule.name for rule in self.rules]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
            return self

    def __init__(self, settings: Settings, *, backend: Backend | None = None):
        self.settings = settings
        self.store: StateStore[Backend] = StateStore(backend, self._make_backend)

    # -- lifecycle ---------------------------------------------------------------------

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

    # -- the hooks ---------------------------------------------------------------------

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        return await self._check(session, None, "connections", [None], 1)

    @hookimpl
    async def rcpt_to(
        self, session: Session, transaction: Transaction, recipient: Recipient
    ) -> Verdict | None:
        return await self._check(session, transaction, "recipients", [recipient], 1)

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        recipients: list[Recipient | None] = list(transaction.envelope.recipients)
        verdict = await self._check(session, transaction, "messages", recipients, 1)
        if verdict is not None and verdict.reply is not None:
            return verdict
        # message.size, not len(message.raw): raw would copy a spooled message whole.
        size_verdict = await self._check(session, transaction, "bytes", recipients, message.size)
        return size_verdict or verdict

    # -- counting ----------------------------------------------------------------------

    async def _check(
        self, session: Session, transaction: Transaction | None, what: What,
        recipients: list[Recipient | None], amount: int,
    ) -> Verdict | None:
        rules = [rule for rule in self.settings.rules if rule.what == what]
        if not rules or self._skipped(session):
            return None
        backend = self.store.get()
        verdicts: list[Verdict] = []
        for rule in rules:
            for value in self._values(rule, session, transaction, recipients):
                store_key = f"{what}:{rule.name}:{value}"
                try:
                    allowed, total = await backend.hit(store_key, rule.window, rule.limit, amount)
                except RedisUnavailable as exc:
                    if self.settings.redis_failure == "open":
                        log.warning("ratelimit_redis_down", rule=rule.name, policy="open", error=str(exc))
                        continue
                    log.warning("ratelimit_redis_down", rule=rule.name, policy="closed", error=str(exc))
                    return Verdict.tempfail(
                        "Rate limit check unavailable, try again later", code=451, enhanced="4.3.0",
                        reason=f"rule {rule.name}: Redis unavailable ({exc}), redis_failure closed",
                    )
                if allowed:
                    continue
                log.info("ratelimit", rule=rule.name, key=rule.key, value=value, count=total,
                         limit=rule.limit, what=what, window=rule.window)
                verdict = self._verdict(rule, value, total, amount)
                if verdict is not None:
                    if verdict.reply is not None:
                        return verdict
                    verdicts.append(verdict)
                break  # one refusal per rule is enough
        if not verdicts:
            return None
        return replace(
            verdicts[0], score=sum(v.score for v in verdicts),
            tags=tuple(t for v in verdicts for t in v.tags),
            reason="; ".join(v.reason for v in verdicts),
        )

    def _skipped(self, session: Session) -> bool:
        if self.settings.skip_authenticated and session.auth_user is not None:
            return True
        networks = self.settings.skip_networks
        return bool(networks) and ip_in_networks(session.client.ip, networks)

    @staticmethod
    def _values(
        rule: Rule, session: Session, transaction: Transaction | None, recipients: list[Recipient | None]
    ) -> list[str]:
        """The key values an event counts under for ``rule``; empty when the rule does not apply."""
        if rule.key in ("client_ip", "client_network"):
            try:
                ip = ipaddress.ip_address(session.client.ip)
            except ValueError:
                return []
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if rule.key == "client_ip":
                return [str(ip)]
            prefix = rule.prefix_v4 if ip.version == 4 else rule.prefix_v6
            return [str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))]
        if rule.key == "auth_user":
            return [session.auth_user] if session.auth_user is not None else []
        if rule.key == "recipient":
            return list(dict.fromkeys(r.address.text.lower() for r in recipients if r is not None))
        sender = transaction.envelope.sender if transaction is not None else None
        if sender is None or sender.is_null:
            return []
        return [sender.text.lower() if rule.key == "sender" else sender.domain.lower()]

    @staticmethod
    def _verdict(rule: Rule, value: str, total: int, amount: int) -> Verdict | None:
        shown = "".join(c if " " <= c <= "~" else "?" for c in value)[:_MAX_KEY_IN_REPLY]
        text = rule.text.format_map({
            "key": shown, "rule": rule.name, "limit": str(rule.limit), "window": f"{rule.window:g}",
            "what": rule.what,
        })
        reason = (
            f"rate limit {rule.name}: {rule.key} {shown} has {total} {rule.what} in {rule.window:g}s "
            f"(limit {rule.limit}" + (f", this message {amount} bytes)" if rule.what == "bytes" else ")")
        )
        verdict = verdict_for(
            rule.action, reject_text=text, tempfail_text=text, reason=reason, tags=(f"ratelimit:{rule.name}",)
        )
        if verdict is not None and rule.what == "recipients" and rule.action == "tempfail":
            # RFC 5321 4.5.3.1.10: 452 tells the client to send the other recipients later.
            verdict = replace(
                Verdict.tempfail(text, code=452, enhanced="4.7.1", reason=reason), tags=verdict.tags
            )
        return verdict
