"""spf: check the envelope sender against the client IP with SPF (RFC 7208), at MAIL FROM.

    plugins:
      - name: spf
        timeout: 25              # above the SPF time limit below, so SPF's own limit answers
        settings:
          actions: {fail: reject, softfail: 2.0, temperror: tempfail}
          skip_networks: [10.0.0.0/8]

The MAIL FROM identity is checked; for the null sender (``MAIL FROM:<>``, bounces) the HELO
identity is checked instead (RFC 7208 section 2.4), and ``check_helo`` checks HELO as well for
every message. Each result is recorded as an :class:`~smtpproxy.authresults.AuthCheck`
(``spf``, with ``smtp.mailfrom`` or ``smtp.helo``) for DMARC and the Authentication-Results
writer, and turned into a verdict by the configured ``actions`` (tags ``spf:<result>``).

The evaluation is pyspf's, run on the event loop against answers the shared async resolver
fetched (its servers, timeout and TTL cache): pyspf is replayed from the start each time it
asks for a name not looked up yet, after that name has been awaited (all names a round asked
for concurrently). A lookup that times out or fails (SERVFAIL) makes the result
``temperror``, as does the whole check running past ``timeout`` seconds. No thread, no
blocking DNS: one SPF record the cache holds costs one pyspf evaluation.

A result is a function of the client IP, the sender, the HELO name and the DNS answers the
evaluation read, so it is kept for that (IP, sender, HELO) until the first of those answers
expires: the same sender from the same host costs no evaluation at all while its records are
cached. Only results whose every answer the cache held are kept (not one that read a name that
does not exist, whose TTL the resolver keeps to itself, nor a temperror), and never a ``fail``,
whose explanation (``exp=``) may expand ``%{t}``, the time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args

import dns.exception
import dns.message
import dns.name
import dns.resolver
import spf as pyspf
from pydantic import Field, field_validator

from smtpproxy import (
    Action,
    Address,
    AuthCheck,
    EventLog,
    Network,
    PluginSettings,
    Resolver,
    Session,
    Transaction,
    TTLCache,
    Verdict,
    get_resolver,
    hookimpl,
    ip_in_networks,
    record_auth_check,
)

from ._policy import ActionSpec, check_reply_template, verdict_for

__all__ = ["SPF", "SPFOutcome", "SPFResult"]

log = EventLog(__name__)

SPFResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
RESULTS: tuple[str, ...] = get_args(SPFResult)

DEFAULT_ACTIONS: dict[SPFResult, ActionSpec] = {
    "fail": "reject",
    "softfail": 2.0,
    "neutral": "continue",
    "none": "continue",
    "pass": "continue",
    "temperror": "tempfail",
    "permerror": "continue",
}

# RFC 7372: X.7.23 "SPF validation failed", X.7.24 "SPF validation error" (temperror/permerror).
_ENHANCED_DETAIL: dict[str, str] = {"temperror": "7.24", "permerror": "7.24", "pass": "7.1"}
_DEFAULT_DETAIL = "7.23"

_PLACEHOLDERS = {
    "explanation": "SPF fail - not authorized",
    "result": "fail",
    "identity": "user@example.com",
    "domain": "example.com",
    "ip": "192.0.2.1",
}
_MAX_EXPLANATION = 200  # the reply line must stay well under 512 octets (RFC 5321 4.5.3.1.5)


def _check_template(value: str) -> str:
    return check_reply_template(value, _PLACEHOLDERS)


class SPF:
    """RFC 7208 SPF check of the MAIL FROM (or HELO) identity against the client IP."""

    class Settings(PluginSettings):
        actions: dict[SPFResult, ActionSpec] = Field(
            default_factory=lambda: dict(DEFAULT_ACTIONS),
            description=(
                "What to do for each SPF result: continue, reject, tempfail, quarantine, or a number "
                "(continue and add that score). Results not given keep their defaults: "
                "fail: reject, softfail: 2.0, temperror: tempfail, the others continue."
            ),
        )
        reject_text: str = Field(
            default="SPF check failed: {explanation}",
            description=(
                "Reply text for a reject (550 5.7.23, or 5.7.24 for permerror). Placeholders: "
                "{explanation} (the domain's exp= text or pyspf's), {result}, {identity}, {domain}, {ip}."
            ),
        )
        tempfail_text: str = Field(
            default="SPF check failed temporarily: {explanation}",
            description="Reply text for a tempfail (451 4.7.24 for temperror); same placeholders.",
        )
        check_helo: bool = Field(
            default=False,
            strict=True,
            description=(
                "Also check the HELO identity for every message (recorded as a separate spf check "
                "with smtp.helo, tagged spf:helo:<result>, and given the same actions)."
            ),
        )
        skip_networks: list[Network] = Field(
            default=[],
            description="Client networks never checked (internal relays, your own submission hosts).",
        )
        skip_authenticated: bool = Field(
            default=True, strict=True, description="Do not check clients that authenticated (SMTP AUTH)."
        )
        timeout: float = Field(
            default=8,
            strict=True,
            gt=0,
            allow_inf_nan=False,
            description=(
                "Seconds one SPF evaluation may take in all; past it the result is temperror. "
                "Stays below the chain's default plugin timeout (10 s) so SPF answers for itself; "
                "RFC 7208 4.6.4 suggests 20: raise both together."
            ),
        )

        @field_validator("actions")
        @classmethod
        def _with_defaults(cls, value: dict[SPFResult, ActionSpec]) -> dict[SPFResult, ActionSpec]:
            return {**DEFAULT_ACTIONS, **value}

        @field_validator("reject_text", "tempfail_text")
        @classmethod
        def _valid_template(cls, value: str) -> str:
            return _check_template(value)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()

    # -- the check ---------------------------------------------------------------------

    async def check_host(self, ip: str, sender: str, helo: str) -> SPFOutcome:
        """RFC 7208 check_host() for ``sender`` (``""``: the HELO identity) sent from ``ip``.

        ``helo`` is the HELO/EHLO name (the identity for a null sender, and ``%{h}`` in macros).
        Never raises for DNS trouble: that is ``temperror``. This is what the hook uses.
        """
        limit = self.settings.timeout
        resolver = get_resolver()
        identity = _spf_identity(sender)
        results: TTLCache[tuple[str, str, str], tuple[str, str]] = resolver.derived_cache(_RESULTS)
        kept = results.get((ip, identity, helo))
        if kept is not None:  # no evaluation, no timer (see the module's docstring)
            return SPFOutcome(cast(SPFResult, kept[0]), kept[1])
        try:
            async with asyncio.timeout(limit):
                result, explanation = await _check_async(resolver, ip, identity, helo, limit)
        except TimeoutError:
            return SPFOutcome("temperror", f"SPF Temporary Error: no result within {limit:g} seconds")
        if result not in RESULTS:  # pyspf's check2 returns only RFC 7208 results; be sure
            return SPFOutcome("permerror", f"SPF Permanent Error: unexpected result {result!r}")
        return SPFOutcome(cast(SPFResult, result), explanation)

    # -- the hook ----------------------------------------------------------------------

    @hookimpl
    async def mail_from(self, session: Session, transaction: Transaction, sender: Address) -> Verdict | None:
        ip = session.client.ip
        skip = self._skip_reason(session)
        if skip is not None:
            return Verdict.cont(reason=f"SPF not checked: {skip}")
        helo = session.helo or ""
        # (tag prefix, RFC 8601 property, identity shown, sender argument for check_host)
        checks: list[tuple[str, str, str, str]] = []
        if sender.is_null:
            checks.append(("spf", "smtp.helo", helo, ""))
        else:
            checks.append(("spf", "smtp.mailfrom", sender.text, sender.text))
            if self.settings.check_helo and helo:
                checks.append(("spf:helo", "smtp.helo", helo, ""))
        if len(checks) == 1:  # the usual case: no task to gather
            outcomes = [await self.check_host(ip, checks[0][3], helo)]
        else:
            outcomes = await asyncio.gather(*(self.check_host(ip, arg, helo) for *_, arg in checks))
        verdicts = []
        for (prefix, prop, identity, _), outcome in zip(checks, outcomes, strict=True):
            check = AuthCheck("spf", outcome.result, outcome.explanation, {prop: identity})
            record_auth_check(transaction, check)
            log.info("spf", result=outcome.result, **{prop: identity}, ip=ip, explanation=outcome.explanation)
            verdicts.append(self._verdict(outcome, prefix, identity, ip))
        return _combine(verdicts)

    def _skip_reason(self, session: Session) -> str | None:
        if self.settings.skip_authenticated and session.auth_user is not None:
            return "authenticated client"
        ip = session.client.ip
        if self.settings.skip_networks and ip_in_networks(ip, self.settings.skip_networks):
            return f"client {ip} is in skip_networks"
        if not _is_ip(ip):
            return f"client address {ip!r} is not an IP address"
        return None

    def _verdict(self, outcome: SPFOutcome, prefix: str, identity: str, ip: str) -> Verdict:
        result = outcome.result
        action = self.settings.actions[result]
        values = {
            "explanation": _printable(outcome.explanation) or f"SPF {result}",
            "result": result,
            "identity": _printable(identity) or "<>",
            "ip": ip,
        }
        detail = _ENHANCED_DETAIL.get(result, _DEFAULT_DETAIL)
        tag = f"{prefix}:{result}"
        reason = f"SPF {result} for {values['identity']} from {ip}"
        if outcome.explanation:
            reason += f": {values['explanation']}"
        reject_text = tempfail_text = ""  # the reply texts only where a reply is sent
        if action in ("reject", "tempfail"):
            values["domain"] = _printable(identity.rpartition("@")[2])
            reject_text = self.settings.reject_text.format_map(values)
            tempfail_text = self.settings.tempfail_text.format_map(values)
        verdict = verdict_for(
            action,
            reject_text=reject_text,
            tempfail_text=tempfail_text,
            reason=reason,
            tags=(tag,),
            reject_enhanced=f"5.{detail}",
            tempfail_enhanced=f"4.{detail}",
        )
        assert verdict is not None, "verdict_for always answers when tags are given"
        return verdict


@dataclass(frozen=True, slots=True)
class SPFOutcome:
    """What check_host() found: an RFC 7208 result and pyspf's explanation for it."""

    result: SPFResult
    explanation: str


_SEVERITY = {Action.REJECT: 3, Action.TEMPFAIL: 2, Action.QUARANTINE: 1}


def _combine(verdicts: list[Verdict]) -> Verdict:
    """One verdict for the MAIL FROM and HELO checks: the most severe, with all scores and tags."""
    if len(verdicts) == 1:
        return verdicts[0]
    worst = max(verdicts, key=lambda v: _SEVERITY.get(v.action, 0))
    return replace(
        worst,
        score=sum(v.score for v in verdicts),
        tags=tuple(t for v in verdicts for t in v.tags),
        reason="; ".join(v.reason for v in verdicts if v.reason),
    )


@functools.lru_cache(maxsize=4096)
def _is_ip(ip: str) -> bool:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


_NOT_PRINTABLE = re.compile(r"[^ -~]")


def _printable(text: str) -> str:
    """Text safe for an SMTP reply: printable ASCII on one line, bounded in length."""
    cleaned = _NOT_PRINTABLE.sub("?", " ".join(text.split()))
    return cleaned if len(cleaned) <= _MAX_EXPLANATION else cleaned[: _MAX_EXPLANATION - 3] + "..."


def _spf_identity(sender: str) -> str:
    """The sender as pyspf wants it: an internationalized domain as A-labels (RFC 7208 4.3)."""
    local, at, domain = sender.rpartition("@")
    if not at or domain.isascii():
        return sender
    try:
        ascii_domain = dns.name.from_unicode(domain).to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError):
        return sender  # malformed: pyspf finds no record for it ("none")
    return f"{local}@{ascii_domain}"


# -- pyspf's DNS, through the shared resolver ---------------------------------------------
#
# pyspf looks names up through its module-level ``DNSLookup(name, qtype, strict, timeout)``
# function, which returns ``[((name, type), value), ...]`` and raises ``spf.TempError`` when
# DNS cannot answer. We install one that, inside a check_host() of this plugin (a _Replay in
# the context), answers from what the async resolver already fetched and otherwise records
# the name and stops pyspf with _Miss; _check_async() then awaits the recorded names and runs
# pyspf again. pyspf's evaluation is deterministic given the answers, so every round repeats
# the previous one up to the next unknown name. Outside a check (pyspf called directly, from
# a thread) it looks up with a blocking dnspython resolver with the shared one's settings.

MAX_ROUNDS = 200
"""pyspf runs per check at most: above what RFC 7208's limits allow (10 mechanisms that
look up, 10 MX/PTR hosts each, 2 void lookups, the exp= text), so only a bug ends here."""


class _Miss(BaseException):
    """Raised inside pyspf for a name whose answer is not at hand yet.

    A BaseException so that pyspf's ``except TempError/PermError/Exception`` clauses let it
    through. Its two bare ``except:`` clauses (the exp= lookup, ptr validation) can swallow
    it; that is harmless because the name was recorded first and the round is replayed.
    """


Answer = list[Any] | str
"""What one lookup gave pyspf: its records (``[]``: none), or the text of a TempError."""

_CACHE = "spf"
"""The resolver's derived cache of pyspf-ready answers, per (name, type), until the DNS
answer expires. Only real answers (records, or none of that type) are kept; a name that does
not exist is left to the resolver's own cache, and a failure (timeout, SERVFAIL) never is."""


_RESULTS = "spf-results"
"""The resolver's derived cache of check_host() results by (IP, sender, HELO), each until the
first DNS answer it read expires (see the module's docstring)."""

_KEPT_RESULTS = frozenset({"pass", "softfail", "neutral", "none", "permerror"})
"""The results that may be kept: not ``temperror`` (DNS may answer next time) nor ``fail``
(RFC 7208 6.2: its explanation may expand ``%{t}``, the time of the check)."""


@dataclass(slots=True)
class _Replay:
    """The answers of one check_host(), and the names the current round still needs."""

    cache: TTLCache[tuple[str, str], list[Any]]
    known: dict[tuple[str, str], Answer] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)
    deadline: float = math.inf
    """When the first answer read expires (``time.monotonic()``); -inf once an answer was read
    whose expiry is not known (a name that does not exist, a failure): nothing to keep."""

    def lookup(self, name: str, qtype: str) -> list[Any]:
        key = (name.lower().rstrip("."), qtype)
        answer = self.known.get(key)
        if answer is None:
            entry = self.cache.entry(key)
            if entry is None:
                self.missing.append(key)
                raise _Miss(key)
            answer = self.known[key] = entry[0]
            self.deadline = min(self.deadline, entry[1])
        if isinstance(answer, str):
            raise pyspf.TempError(answer)
        # pyspf keys its own per-check cache by the name it asked for.
        return [((name, rtype), value) for (_, rtype), value in answer]


_replay: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar("spf_replay", default=None)


async def _check_async(resolver: Resolver, ip: str, sender: str, helo: str, limit: float) -> tuple[str, str]:
    """pyspf's RFC 7208 check on the loop, its DNS answered by the shared async resolver."""
    results: TTLCache[tuple[str, str, str], tuple[str, str]] = resolver.derived_cache(_RESULTS)
    replay = _Replay(resolver.derived_cache(_CACHE))
    for _ in range(MAX_ROUNDS):
        token = _replay.set(replay)
        try:
            result, explanation = pyspf.check2(i=ip, s=sender, h=helo, timeout=limit, querytime=limit)
        except _Miss:
            result = explanation = ""
        finally:
            _replay.reset(token)
        if not replay.missing:
            outcome = str(result), str(explanation)
            if outcome[0] in _KEPT_RESULTS:
                results.put_until((ip, sender, helo), outcome, replay.deadline)
            return outcome
        wanted = list(dict.fromkeys(replay.missing))
        replay.missing.clear()
        fetched = await asyncio.gather(*(_fetch(resolver, name, qtype) for name, qtype in wanted))
        for key, (answer, deadline) in zip(wanted, fetched, strict=True):
            replay.known[key] = answer
            replay.deadline = min(replay.deadline, deadline)
    return "temperror", f"SPF Temporary Error: more than {MAX_ROUNDS} rounds of DNS lookups"


async def _fetch(resolver: Resolver, name: str, qtype: str) -> tuple[Answer, float]:
    """One lookup for pyspf through the async resolver; cached until the answer expires.
    With when that is (``time.monotonic()``; -inf when not known: nothing derived is kept)."""
    try:
        answer = await resolver.answer(name, qtype)
    except dns.exception.DNSException as exc:
        failure = _failure(name, qtype, exc)
        return ([] if failure is None else failure), -math.inf
    records = _records(name, qtype, answer)
    deadline = time.monotonic() + (float(answer.expiration) - time.time())
    resolver.derived_cache(_CACHE).put_until((name, qtype), records, deadline)
    return records, deadline


def _failure(name: str, qtype: str, exc: dns.exception.DNSException) -> str | None:
    """What a failed lookup is to pyspf: None for no records, else the TempError text."""
    if isinstance(exc, (dns.resolver.NXDOMAIN, *_NO_SUCH_NAME)):
        return None  # a name DNS cannot even carry does not exist
    if isinstance(exc, dns.exception.Timeout):
        return f"DNS timeout looking up {qtype} {name}"
    if isinstance(exc, dns.resolver.NoNameservers):
        if _cname_loop(exc):
            return None  # permanent: as pyspf treats a loop it finds itself (RFC 7208 5.5/7 case)
        return f"DNS server failure looking up {qtype} {name}"
    return f"DNS error looking up {qtype} {name}: {type(exc).__name__}"


_NO_SUCH_NAME = (
    dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.BadEscape,
    dns.name.IDNAException,
)


def _dns_lookup(name: str, qtype: str, strict: object = True, timeout: float | None = None) -> list[Any]:
    """pyspf's DNSLookup: from the replay of a check_host(), else blocking (see above)."""
    replay = _replay.get()
    if replay is not None:
        return replay.lookup(name, qtype)
    resolver = get_resolver().sync_resolver()
    lifetime = float(resolver.lifetime)
    if timeout is not None and timeout > 0:
        lifetime = max(min(lifetime, float(timeout)), 0.01)
    try:
        answer = resolver.resolve(name, qtype, search=False, raise_on_no_answer=False, lifetime=lifetime)
    except dns.exception.DNSException as exc:
        failure = _failure(name, qtype, exc)
        if failure is None:
            return []
        raise pyspf.TempError(failure) from None
    return _records(name, qtype, answer)


def _records(name: str, qtype: str, answer: dns.resolver.Answer) -> list[Any]:
    """A dnspython answer as pyspf's DNSLookup returns it."""
    if answer.rrset is None:
        # No records of the type. If the name is an alias, tell pyspf, which follows CNAMEs
        # itself (with its loop and chain-length limits) when the server did not.
        if answer.canonical_name != answer.qname:
            return [((name, "CNAME"), _host(answer.canonical_name))]
        return []
    found: list[Any] = []
    for rdata in answer:
        value: Any
        if qtype in ("A", "AAAA"):
            value = rdata.address
        elif qtype == "MX":
            value = (rdata.preference, _host(rdata.exchange))
        elif qtype == "PTR":
            value = _host(rdata.target)
        elif qtype in ("TXT", "SPF"):
            value = tuple(rdata.strings)
        else:
            continue
        found.append(((name, qtype), value))
    return found


def _cname_loop(exc: dns.resolver.NoNameservers) -> bool:
    """True when every server answered, but with a CNAME chain that loops (or is too long)."""
    errors = exc.kwargs.get("errors") or []
    return bool(errors) and all(isinstance(e[3], dns.message.ChainTooLong) for e in errors)


def _host(name: dns.name.Name) -> str:
    """A domain name as pyspf wants it: no final dot; the root (null MX, RFC 7505) as ''."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


pyspf.DNSLookup = _dns_lookup
