"""dmarc: DMARC (RFC 7489) for the RFC5322.From domain, from what SPF and DKIM recorded.

    plugins:
      - name: spf
      - name: dkim_verify
      - name: arc
      - name: dmarc                 # after spf and dkim_verify: it reads their results
        settings:
          policy_actions: {reject: reject, quarantine: quarantine, none: continue}
          temperror: tempfail
      - name: auth_results
        settings: {authserv_id: mx.example.com}

The plugin does no SPF or DKIM checking of its own. At ``data`` it reads the checks that the
``spf`` and ``dkim_verify`` plugins recorded on the transaction (``smtpproxy.authresults``),
so it must come after them in the plugin list. Anything earlier in the list that records an
``spf`` or ``dkim`` check counts the same way.

1. The author domains: every address of every ``From:`` field, each with a domain name.
   RFC 7489 section 6.6.1: "The case of a syntactically valid multi-valued RFC5322.From
   field presents a particular challenge. The process in this case is to apply the DMARC
   check using each of those domains found in the RFC5322.From field as the Author Domain
   and apply the most strict policy selected among the checks that fail." Steps 2 to 4 run
   for each domain (at most ``max_authors``) and the strictest outcome is the result: a
   failure whose policy rejects, then a temperror, a quarantining failure, a permerror, a
   failure under p=none, none, and pass only if every domain passes. With
   ``multiple_authors: refuse`` more than one address is ``permerror`` instead. No From field,
   an unparsable one, an empty one or an address without a valid domain is ``permerror``;
   those take the ``invalid_from`` action.
2. Policy discovery (section 6.6.3): the TXT records at ``_dmarc.<From domain>``; if there is
   none, those at ``_dmarc.<organizational domain>``. The organizational domain comes from
   the Public Suffix List of the ``publicsuffixlist`` package. Records that do not start with
   ``v=DMARC1`` are ignored. Several DMARC records mean no policy (``none``). A DNS failure
   is ``temperror``.
3. Identifier alignment (section 3.1): SPF counts when a ``pass`` was recorded for the
   RFC5321.MailFrom identity (``smtp.mailfrom``, or ``smtp.helo`` for a null sender) and its
   domain aligns with the From domain. DKIM counts when any signature passed with an aligned
   ``header.d``. Relaxed alignment (``adkim=r``/``aspf=r``, the default) means the same
   organizational domain; strict means the same name.
4. ``pass`` if either aligns, else ``fail``. On ``fail`` the policy is ``p=``, or ``sp=``
   (``np=`` for a name that does not exist, RFC 9091) when the record was found at the
   organizational domain for a subdomain. ``pct=`` samples: a message outside the sample
   gets the next weaker policy (reject becomes quarantine, quarantine becomes none),
   section 6.6.4. If no identifier passed but an aligned one had a ``temperror`` and the
   policy would quarantine or reject, the result is ``temperror`` instead of ``fail``, so a
   DNS hiccup at the sender makes the client retry instead of losing mail.

The result is recorded as ``AuthCheck("dmarc", result, reason="p=... dis=...",
properties={"header.from": domain})``; ``policy_actions`` maps the domain's policy to what
this proxy does (so a domain's ``p=reject`` can be quarantined or scored instead).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.errors import InvalidHeaderDefect
from email.headerregistry import HeaderRegistry
from functools import cache, lru_cache
from typing import Literal

import dns.exception
import dns.name
import dns.resolver
from publicsuffixlist import PublicSuffixList
from pydantic import Field, field_validator

from smtpproxy import (
    AuthCheck,
    DNSTemporaryError,
    EventLog,
    Message,
    PluginSettings,
    Session,
    Transaction,
    Verdict,
    get_resolver,
    hookimpl,
)
from smtpproxy import auth_checks as checks
from smtpproxy import record_auth_check as record

from ._policy import ActionSpec, verdict_for
from .dkim import partial_body_checks

__all__ = ["DMARC", "DMARCRecord", "Evaluation", "organizational_domain", "parse_record"]

log = EventLog(__name__)

Policy = Literal["none", "quarantine", "reject"]
Result = Literal["pass", "fail", "none", "temperror", "permerror"]

_POLICIES: dict[str, Policy] = {"none": "none", "quarantine": "quarantine", "reject": "reject"}
_WEAKER: dict[Policy, Policy] = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_ASCII_DOMAIN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+")
_IDNA = dns.name.IDNA_2008_Practical if dns.name.have_idna_2008 else dns.name.IDNA_2003_Practical
_TEXT_FIELDS = {"domain": "example.org", "policy": "reject"}


# -- domains -------------------------------------------------------------------------------


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def normalize_domain(domain: str) -> str | None:
    """Lower-case ASCII (A-label) form of a domain name, or None if it is not one."""
    name = domain.strip().rstrip(".")
    if not name or name.startswith("["):
        return None
    try:
        ascii_name = dns.name.from_unicode(name, idna_codec=_IDNA).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    return ascii_name if _ASCII_DOMAIN.fullmatch(ascii_name) else None


@lru_cache(maxsize=4096)  # a pure function of a name of at most 253 octets
def organizational_domain(domain: str) -> str:
    """RFC 7489 section 3.2 with the Public Suffix List: one label below the public suffix.

    A name that is itself a public suffix (or unknown to the list's rules) is its own
    organizational domain.
    """
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment: strict is the same name, relaxed the same organizational domain."""
    ident = identifier.lower().rstrip(".")
    if ident == from_domain:
        return True
    return mode != "s" and organizational_domain(ident) == organizational_domain(from_domain)


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    """A parsed DMARC policy record. Invalid optional tags take their defaults."""

    p: Policy | None
    """None when the p= tag is missing or invalid (see :attr:`problem`)."""
    sp: Policy | None = None
    np: Policy | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    problem: str = ""
    """Why the record cannot be applied as published (an invalid p= or sp=), or ""."""


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())


def parse_record(text: str) -> DMARCRecord | None:
    """Parse one TXT record; None if it is not a DMARC record (not starting with v=DMARC1).

    Unknown tags are ignored; a syntactically invalid ``pct``, ``adkim``, ``aspf`` or ``np``
    falls back to its default (RFC 7489 section 6.3). A missing or invalid ``p`` or an
    invalid ``sp`` is handled as section 6.6.3 says: if a valid ``rua`` URI is present the
    record acts as ``p=none``, otherwise :attr:`DMARCRecord.problem` says why it is unusable.
    """
    parts = [part.strip(" \t") for part in text.split(";")]
    tags: dict[str, str] = {}
    for index, part in enumerate(parts):
        name, eq, value = part.partition("=")
        name, value = name.strip(" \t").lower(), value.strip(" \t")
        if index == 0:
            if not eq or name != "v" or value != "DMARC1":
                return None
            continue
        if not part or not eq or not name:
            continue  # an empty part (e.g. a trailing ";") or a syntax error: ignored
        tags.setdefault(name, value)

    def policy(tag: str) -> Policy | None:
        return _POLICIES.get(tags[tag].lower()) if tag in tags else None

    p, sp, np = policy("p"), policy("sp"), policy("np")
    problem = ""
    if p is None:
        problem = "invalid p= tag" if "p" in tags else "no p= tag"
    elif "sp" in tags and sp is None:
        problem = "invalid sp= tag"
    rua = _uris(tags.get("rua", ""))
    if problem and any(_URI.fullmatch(u.partition("!")[0]) for u in rua):
        p, sp, problem = "none", None, ""
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isascii() and pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DMARCRecord(
        p=p, sp=sp, np=np, pct=pct,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        rua=rua, ruf=_uris(tags.get("ruf", "")), problem=problem,
    )


# -- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What DMARC concluded for one message."""

    result: Result
    domain: str = ""
    """The RFC5322.From domain (A-label, lower case); "" when there is no usable one."""
    policy: Policy | None = None
    """The published policy that applies (p=, sp= or np=), when a record was found."""
    disposition: Policy = "none"
    """What the policy asks for this message after pct= sampling (RFC 7489 section 7.2 "dis")."""
    record_domain: str = ""
    """Where the record was found: the From domain or its organizational domain."""
    sampled_out: bool = False
    """True when pct= exempted this message and the next weaker policy applied."""
    detail: str = ""
    """Human-readable explanation for logs."""
    authors: tuple[str, ...] = ()
    """Every author domain when the From field(s) named more than one; () for one."""

    @property
    def reason(self) -> str:
        """The short reason recorded with the result, e.g. ``p=reject dis=reject``."""
        if self.policy is None:  # no record applied: say why, without DNS error details
            return "DNS lookup of the DMARC record failed" if self.result == "temperror" else self.detail
        return f"p={self.policy} dis={self.disposition}"


def author_domains(message: Message, *, several: bool = True) -> tuple[list[str], str]:
    """The RFC5322.From domains (A-labels, in order, without duplicates), or ([], why).

    Every address of every From field counts: RFC 5322 allows one field with several
    addresses, and a second From field is what Postfix delivers too, so ignoring it would let
    a forged author hide. ``several=False`` refuses more than one field or address.
    """
    values = message.get_all("From")
    if not values:
        return [], "no From field"
    if not several and len(values) > 1:
        return [], f"{len(values)} From fields"
    domains: list[str] = []
    count = 0
    for value in values:
        parse = _from_field if len(value) <= _CACHED_FROM_LENGTH else _from_field.__wrapped__
        found, why = parse(value)
        if why:
            return [], why
        count += len(found)
        for domain in found:
            if domain not in domains:
                domains.append(domain)
    if not several and count > 1:
        return [], f"{count} addresses in the From field"
    return domains, ""


_CACHED_FROM_LENGTH = 998
"""From values up to one line long are parsed once per distinct value (bounded memory)."""


@lru_cache(maxsize=4096)
def _from_field(value: str) -> tuple[tuple[str, ...], str]:
    """The domain of each address of one From field value, or ((), why): the stdlib parser
    costs more than the rest of DMARC together, and the same authors write again and again."""
    try:
        header = HeaderRegistry()("From", value)
        addresses = header.addresses  # type: ignore[attr-defined]
    except Exception as exc:  # the stdlib parser raises assorted errors on garbage
        return (), f"unparsable From field ({type(exc).__name__})"
    if any(isinstance(d, InvalidHeaderDefect) for d in header.defects):
        return (), "invalid From field"
    if not addresses:
        return (), "0 addresses in the From field"
    found = []
    for address in addresses:
        domain = normalize_domain(address.domain or "")
        if domain is None or not address.username:
            return (), "From address without a valid domain"
        found.append(domain)
    return tuple(found), ""


def from_domain(message: Message) -> tuple[str | None, str]:
    """The RFC5322.From domain, or (None, why) unless there is exactly one From address."""
    domains, why = author_domains(message, several=False)
    return (domains[0], "") if domains else (None, why)


_RECORDS = "dmarc"
"""The resolver's derived cache of parsed DMARC records by ``_dmarc.<domain>``, until the DNS
answer expires (a name without TXT records too; NXDOMAIN is the resolver cache's business)."""


async def _dmarc_records(domain: str) -> list[DMARCRecord]:
    name = f"_dmarc.{domain}"
    if len(name) > 253:
        return []
    resolver = get_resolver()
    cache = resolver.derived_cache(_RECORDS)
    cached: list[DMARCRecord] | None = cache.get(name)
    if cached is not None:
        return cached
    try:
        answer = await resolver.answer(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.name.EmptyLabel):
        return []
    except dns.exception.DNSException as exc:
        raise DNSTemporaryError(f"TXT {name}: {type(exc).__name__}: {exc}") from exc
    found = []
    for rdata in answer.rrset or ():
        parsed = parse_record(b"".join(rdata.strings).decode("utf-8", errors="replace"))
        if parsed is not None:
            found.append(parsed)
    cache.put(name, found, float(answer.expiration))
    return found


async def _exists(domain: str) -> bool:
    """RFC 9091: a name exists unless A, AAAA and MX all give NXDOMAIN or no data."""
    resolver = get_resolver()
    for rdtype in ("A", "AAAA", "MX"):
        if await resolver.query(domain, rdtype):
            return True
    return False


def _identity_domain(value: str) -> str:
    return value.rpartition("@")[2].strip().rstrip(".").lower()


#: How strict an evaluation's outcome is, for choosing among several author domains: a
#: failure whose policy rejects, then a temperror (which may hide one), then the rest.
def _strictness(ev: Evaluation) -> int:
    if ev.result == "fail":
        return {"reject": 6, "quarantine": 4, "none": 2}[ev.disposition]
    return {"temperror": 5, "permerror": 3, "none": 1, "pass": 0}[ev.result]


async def evaluate(
    transaction: Transaction, message: Message, rng: Callable[[], float] = random.random,
    *, align_partial_body: bool = False, several_authors: bool = True, max_authors: int = 5,
) -> Evaluation:
    """Run DMARC on a message with the SPF and DKIM checks recorded on the transaction.

    With several author domains (RFC 7489 section 6.6.1: "apply the DMARC check using each
    of those domains found in the RFC5322.From field as the Author Domain and apply the most
    strict policy selected among the checks that fail") each is evaluated and the strictest
    outcome is returned (see ``_strictness``); its ``authors`` names them all.
    ``several_authors=False`` makes more than one From address a permerror instead, and more
    than ``max_authors`` domains is always one (a DoS guard, as DMARCbis advises).

    A DKIM pass whose ``l=`` leaves part of the body unsigned (``dkim_verify`` with
    ``partial_body: pass``) does not align unless ``align_partial_body``: the author domain
    must not vouch for text an attacker appended.
    """
    domains, why = author_domains(message, several=several_authors)
    if not domains:
        return Evaluation("permerror", detail=why)
    if len(domains) > max_authors:
        return Evaluation("permerror",
                          detail=f"{len(domains)} author domains (at most {max_authors} evaluated)")
    results = [await _evaluate_domain(transaction, d, rng, align_partial_body) for d in domains]
    strictest = max(results, key=_strictness)  # the first of equals: From order
    if len(domains) == 1:
        return strictest
    return replace(strictest, authors=tuple(domains),
                   detail=f"{strictest.detail}; strictest of {len(domains)} author domains")


async def _evaluate_domain(
    transaction: Transaction, domain: str, rng: Callable[[], float], align_partial_body: bool
) -> Evaluation:
    """DMARC for one author domain."""
    try:
        records = await _dmarc_records(domain)
        record_domain = domain
        org = organizational_domain(domain)
        if not records and org != domain:
            records = await _dmarc_records(org)
            record_domain = org
    except DNSTemporaryError as exc:
        return Evaluation("temperror", domain, detail=f"DNS: {exc}")
    if not records:
        return Evaluation("none", domain, detail="no DMARC record")
    if len(records) > 1:
        return Evaluation("none", domain, record_domain=record_domain,
                          detail=f"{len(records)} DMARC records at _dmarc.{record_domain}")
    rec = records[0]
    if rec.problem or rec.p is None:
        return Evaluation("permerror", domain, record_domain=record_domain,
                          detail=f"DMARC record at _dmarc.{record_domain}: {rec.problem}")

    spf_pass = spf_temp = dkim_pass = dkim_temp = False
    null_sender = transaction.envelope.sender.is_null
    for check in checks(transaction, "spf"):
        identity = check.properties.get("smtp.mailfrom")
        if identity is None and null_sender:  # RFC 7208 2.4: the HELO stands in for <>
            identity = check.properties.get("smtp.helo")
        if identity and aligned(_identity_domain(identity), domain, rec.aspf):
            spf_pass |= check.result == "pass"
            spf_temp |= check.result == "temperror"
    partial = partial_body_checks(transaction)
    for check in checks(transaction, "dkim"):
        if not align_partial_body and any(check is p for p in partial):
            continue
        d = check.properties.get("header.d")
        if d and aligned(d, domain, rec.adkim):
            dkim_pass |= check.result == "pass"
            dkim_temp |= check.result == "temperror"

    policy: Policy = rec.p if record_domain == domain else (rec.sp or rec.p)
    if spf_pass or dkim_pass:
        how = " and ".join(n for n, ok in (("SPF", spf_pass), ("DKIM", dkim_pass)) if ok)
        return Evaluation("pass", domain, policy, "none", record_domain, detail=f"aligned {how} pass")
    if record_domain != domain and rec.np is not None:
        try:
            if not await _exists(domain):
                policy = rec.np
        except DNSTemporaryError as exc:
            log.info("dmarc_np_unknown", domain=domain, error=str(exc), note="using sp=/p=")
    if policy != "none" and (spf_temp or dkim_temp):
        return Evaluation("temperror", domain, policy, "none", record_domain,
                          detail="no aligned pass, and an aligned SPF or DKIM check had a temperror")
    disposition, sampled_out = policy, False
    if rec.pct < 100 and not rng() * 100 < rec.pct:
        disposition, sampled_out = _WEAKER[policy], True
    detail = "no aligned SPF or DKIM pass" + (f" (pct={rec.pct}: not sampled)" if sampled_out else "")
    return Evaluation("fail", domain, policy, disposition, record_domain, sampled_out, detail)


# -- the plugin ----------------------------------------------------------------------------


class PolicyActions(PluginSettings):
    """What this proxy does with a failing message, per policy the sender's domain publishes."""

    reject: ActionSpec = Field(
        default="reject", description="What to do with a failing message whose domain publishes p=reject."
    )
    quarantine: ActionSpec = Field(
        default="quarantine",
        description="What to do with a failing message whose domain publishes p=quarantine "
        "(or p=reject, for a message pct= left out of the sample).",
    )
    none: ActionSpec = Field(
        default="continue", description="What to do with a failing message whose domain publishes p=none."
    )


class DMARC:
    """DMARC verification and policy at ``data``; place it after ``spf`` and ``dkim_verify``."""

    PolicyActions = PolicyActions

    class Settings(PluginSettings):
        policy_actions: PolicyActions = Field(
            default_factory=PolicyActions,
            description="Action per published policy when DMARC fails: continue, reject, tempfail, "
            "quarantine, or a number (continue and add that score).",
        )
        temperror: ActionSpec = Field(
            default="tempfail", description="Action when DNS could not be queried (result temperror)."
        )
        permerror: ActionSpec = Field(
            default="continue",
            description="Action when the domain's DMARC record is unusable (result permerror).",
        )
        invalid_from: ActionSpec = Field(
            default="reject",
            description="Action when the message has no From field, one that cannot be parsed or "
            "holds no address, an address without a valid domain, more than max_authors author "
            "domains, or (with multiple_authors: refuse) more than one From address (result permerror).",
        )
        multiple_authors: Literal["evaluate", "refuse"] = Field(
            default="evaluate",
            description="Several From addresses (in one field or several): evaluate each author "
            "domain and apply the strictest result (RFC 7489 section 6.6.1), or refuse them as "
            "invalid_from.",
        )
        max_authors: int = Field(
            default=5, strict=True, ge=1, le=50,
            description="Most author domains evaluated; a message with more is invalid_from (DoS guard).",
        )
        reject_text: str = Field(
            default="DMARC policy of {domain} rejects this message (p={policy})",
            description="Reply text (550 5.7.1) when a DMARC failure is rejected; {domain} and {policy} "
            "are filled in.",
        )
        tempfail_text: str = Field(
            default="DMARC policy of {domain} could not be checked, try again later",
            description="Reply text (451 4.7.1) for a tempfail; {domain} and {policy} are filled in.",
        )
        permerror_text: str = Field(
            default="DMARC record of {domain} is invalid",
            description="Reply text (550 5.7.1) when permerror is set to reject.",
        )
        invalid_from_text: str = Field(
            default="Message must have a From field with valid author addresses",
            description="Reply text (550 5.7.1) when invalid_from is set to reject.",
        )
        align_partial_body: bool = Field(
            default=False,
            description="Let a DKIM pass align although its l= leaves part of the body unsigned "
            "(only possible with dkim_verify's partial_body: pass).",
        )
        skip_authenticated: bool = Field(
            default=True, description="Do not check messages from clients that authenticated (submission)."
        )

        @field_validator("reject_text", "tempfail_text", "permerror_text", "invalid_from_text")
        @classmethod
        def _known_fields(cls, value: str) -> str:
            try:
                value.format_map(_TEXT_FIELDS)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"only {{domain}} and {{policy}} may be used: {exc}") from None
            return value

    def __init__(self, settings: Settings | None = None, *, rng: Callable[[], float] = random.random):
        """``rng`` returns a float in [0, 1) for pct= sampling; tests pass a fixed one."""
        self.settings = settings or self.Settings()
        self.rng = rng
        self._warned_order = False

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        if self.settings.skip_authenticated and session.auth_user is not None:
            return None
        if not checks(transaction, "dkim") and not self._warned_order:
            self._warned_order = True  # dkim_verify records every message, even unsigned ones
            log.warning("dmarc_misordered", reason="no DKIM result recorded",
                        note="dkim_verify (and spf) must come before dmarc in the plugins list")
        ev = await evaluate(transaction, message, self.rng,
                            align_partial_body=self.settings.align_partial_body,
                            several_authors=self.settings.multiple_authors == "evaluate",
                            max_authors=self.settings.max_authors)
        properties = {"header.from": ev.domain} if ev.domain else {}
        record(transaction, AuthCheck("dmarc", ev.result, reason=ev.reason, properties=properties))
        log_reason = f"dmarc={ev.result} header.from={ev.domain or '-'} {ev.reason}".rstrip()
        if ev.authors:
            log_reason += f" authors={','.join(ev.authors)}"
        if ev.detail and ev.detail != ev.reason:
            log_reason += f" ({ev.detail})"
        tags: tuple[str, ...] = (f"dmarc:{ev.result}",)
        if ev.policy is not None:
            tags += (f"dmarc:p={ev.policy}",)
        if ev.sampled_out:
            tags += ("dmarc:sampled-out",)

        s = self.settings
        texts = {"domain": ev.domain or "the sender", "policy": ev.policy or "none"}
        reject_text, tempfail_text = s.reject_text, s.tempfail_text
        if ev.result in ("pass", "none"):
            action: ActionSpec = "continue"
        elif ev.result == "temperror":
            action = s.temperror
        elif ev.result == "permerror" and not ev.domain:
            action, reject_text = s.invalid_from, s.invalid_from_text
        elif ev.result == "permerror":
            action, reject_text = s.permerror, s.permerror_text
        else:
            action = getattr(s.policy_actions, ev.disposition)
        refuses = action in ("reject", "tempfail")  # the reply texts only where a reply is sent
        verdict = verdict_for(
            action,
            reject_text=reject_text.format_map(texts) if refuses else "",
            tempfail_text=tempfail_text.format_map(texts) if refuses else "",
            reason=log_reason,
            tags=tags,
        )
        return verdict  # verdict_for put the tags on it, whatever the action
