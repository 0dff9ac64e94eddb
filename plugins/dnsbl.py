"""dnsbl: DNS blocklists (and allow-lists) for the client IP, the sender domain and body URLs.

    plugins:
      - name: dnsbl
        settings:
          lists:
            - zone: zen.spamhaus.org
              returns:
                127.0.0.2: SBL
                127.0.0.4/30: {name: XBL, action: reject}
                127.0.0.10/31: {name: PBL, action: 3.0}
          domain_lists: [{zone: dbl.spamhaus.org}]
          allow_lists: [{zone: list.dnswl.org}]

The client IP is looked up zen-style (``7.2.0.192.zen.example`` for 192.0.2.7; an IPv6
address as 32 reversed nibbles) at ``connect`` (or at the first ``RCPT TO`` with
``check_at: rcpt``), the MAIL FROM domain in ``domain_lists`` at ``mail_from`` and the host
names of ``http(s)://`` URLs in the text parts of the message in ``uri_lists`` at ``data``.
An A record in 127.0.0.0/8 is a listing; 127.255.255.0/24 (Spamhaus's "query refused"
codes) counts as a DNS error, as does a timeout or SERVFAIL: the ``temperror`` action,
``continue`` by default. All lists of a phase are queried concurrently through the shared
resolver (``smtpproxy.dns``); each hit is tagged ``dnsbl:<zone>``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

import dns.exception
import dns.name
from pydantic import Field, field_validator, model_validator

from smtpproxy import (
    Action,
    Address,
    DNSTemporaryError,
    EventLog,
    Message,
    Network,
    PluginSettings,
    Recipient,
    Session,
    Verdict,
    get_resolver,
    hookimpl,
    ip_in_networks,
)

from ._policy import ActionSpec, check_reply_template, verdict_for

__all__ = ["DNSBL", "DomainList", "IPList", "ReturnCode", "query_name"]

log = EventLog(__name__)

_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
_REFUSED = ipaddress.IPv4Network("127.255.255.0/24")  # Spamhaus: public resolver, over quota, ...
_LOCAL = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
              "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10")
]
_PLACEHOLDERS = {"ip": "192.0.2.1", "zone": "bl.example", "name": "bl.example", "code": "127.0.0.2",
                 "domain": "example.com"}
_SEVERITY = {Action.REJECT: 3, Action.TEMPFAIL: 2, Action.QUARANTINE: 1}
_URL = re.compile(r"""(?i)\bhttps?://(?:[^\s/@?#"'<>]*@)?([^\s/:?#"'<>\\\[\]]+)""")
_ZONE = re.compile(
    r"^(?=.{1,200}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?$"
)


def _check_template(value: str) -> str:
    return check_reply_template(value, _PLACEHOLDERS)


def _check_zone(value: str) -> str:
    zone = value.strip().rstrip(".").lower()
    if not _ZONE.match(zone):
        raise ValueError(f"{value!r} is not a DNS zone name (e.g. zen.spamhaus.org)")
    return zone


class ReturnCode(PluginSettings):
    """What one return code (or range) of a list means; unset fields take the list's."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Short name (e.g. SBL), shown as {name} and tagged dnsbl:<zone>:<name>.")
    action: ActionSpec | None = Field(default=None, description="Action for this code (default: the list's).")
    text: str | None = Field(default=None, description="Reply text for this code (default: the list's).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value)


class _ListBase(PluginSettings):
    zone: str = Field(description="The list's DNS zone, e.g. zen.spamhaus.org.")
    action: ActionSpec = Field(
        default="reject",
        description="On a hit: reject, tempfail, quarantine, continue, or a number (add that score).",
    )
    returns: dict[ipaddress.IPv4Network, ReturnCode] = Field(
        default={},
        description=(
            "Return codes (127.0.0.2) or ranges (127.0.0.4/30) with their own name, action and text. "
            "Codes not listed here get the list's action."
        ),
    )

    @field_validator("zone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("returns", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, code in value.items():
            try:
                net = ipaddress.IPv4Network(str(key), strict=True)
            except ValueError as exc:
                raise ValueError(f"return code {key!r} is not an IPv4 address or range: {exc}") from None
            if not net.subnet_of(_LISTED):
                raise ValueError(f"return code {key!r} is outside 127.0.0.0/8")
            out[net] = code
        return out

    def lookup(self, codes: list[str]) -> list[tuple[str, ReturnCode | None]]:
        found: list[tuple[str, ReturnCode | None]] = []
        for code in codes:
            addr = ipaddress.IPv4Address(code)
            match = next((rc for net, rc in self.returns.items() if addr in net), None)
            found.append((code, match))
        return found


class IPList(_ListBase):
    """A blocklist of client addresses."""

    text: str = Field(
        default="Service unavailable; client [{ip}] blocked using {zone}",
        description="Reply text on a hit. Placeholders: {ip}, {zone}, {name} (code name, or zone), {code}.",
    )

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return _check_template(value)


class DomainList(_ListBase):
    """A blocklist of domain names (RHSBL or URIBL)."""

    text: str = Field(
        default="Domain {domain} is listed in {zone}",
        description="Reply text on a hit. Placeholders: {domain}, {zone}, {name}, {code}, {ip} (the client).",
    )

    @field_validator("text")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return _check_template(value)


class AllowList(PluginSettings):
    """An allow-list (DNSWL) of client addresses."""

    zone: str = Field(description="The allow-list's DNS zone, e.g. list.dnswl.org.")

    @field_validator("zone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        return _check_zone(value)


def query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone``: reversed octets, or reversed nibbles for IPv6."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = str(addr).split(".")
    else:
        labels = list(addr.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone


@dataclass(frozen=True, slots=True)
class _Answer:
    """One list's answer: the return codes (empty: not listed), or an error."""

    codes: list[str]
    error: str | None = None


async def _lookup(name: str) -> _Answer:
    try:
        records = await get_resolver().a(name)
    except DNSTemporaryError as exc:
        return _Answer([], str(exc))
    codes = [c for c in records if ipaddress.IPv4Address(c) in _LISTED]
    refused = [c for c in codes if ipaddress.IPv4Address(c) in _REFUSED]
    if refused:
        return _Answer([], f"{name}: the list refused the query ({', '.join(refused)})")
    return _Answer(codes)


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".").lower()
    if not domain or domain.startswith("["):
        return None
    try:
        return dns.name.from_unicode(domain).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


class DNSBL:
    """DNS blocklists for the client IP (connect or RCPT), the sender domain (MAIL) and URLs (DATA)."""

    class Settings(PluginSettings):
        lists: list[IPList] = Field(default=[], description="Blocklists of client IP addresses (DNSBL).")
        domain_lists: list[DomainList] = Field(
            default=[], description="Blocklists of domains (RHSBL), checked for the MAIL FROM domain."
        )
        uri_lists: list[DomainList] = Field(
            default=[], description="Blocklists of domains (URIBL), checked for URL host names in the body."
        )
        allow_lists: list[AllowList] = Field(
            default=[],
            description=(
                "Allow-lists (DNSWL) of client addresses, checked with the IP lists: a hit accepts the "
                "phase (Verdict.accept) and skips this plugin's other checks for the session."
            ),
        )
        check_at: Literal["connect", "rcpt"] = Field(
            default="connect",
            description="When the client IP is checked: at connect, or at each RCPT TO (looked up once).",
        )
        pass_recipients: list[str] = Field(
            default=["postmaster", "abuse"],
            description="With check_at rcpt: local parts (any domain) never refused by the IP lists.",
        )
        temperror: ActionSpec = Field(
            default="continue",
            description="When a list does not answer (timeout, SERVFAIL, refused query): the action.",
        )
        tempfail_text: str = Field(
            default="Service temporarily unavailable; blocklist {zone} did not answer",
            description="Reply text for a temperror tempfail. Placeholders as for the list texts.",
        )
        max_uri_domains: int = Field(
            default=20, strict=True, ge=1, le=200,
            description="The most distinct URL host names looked up per message.",
        )
        skip_networks: list[Network] = Field(
            default=[], description="Client networks never checked (your own relays)."
        )
        skip_local: bool = Field(
            default=True, strict=True,
            description="Never check loopback, RFC 1918, CGNAT, link-local and ULA clients.",
        )
        skip_authenticated: bool = Field(
            default=True, strict=True,
            description="Do not check clients that authenticated (SMTP AUTH) at RCPT, MAIL and DATA.",
        )

        @field_validator("tempfail_text")
        @classmethod
        def _valid_template(cls, value: str) -> str:
            return _check_template(value)

        @model_validator(mode="after")
        def _something_to_do(self) -> DNSBL.Settings:
            if not (self.lists or self.domain_lists or self.uri_lists or self.allow_lists):
                raise ValueError("give at least one of lists, domain_lists, uri_lists, allow_lists")
            return self

    def __init__(self, settings: Settings):
        self.settings = settings

    # -- the hooks ---------------------------------------------------------------------

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        if self.settings.check_at != "connect":
            return None
        return await self._ip_verdict(session)

    @hookimpl
    async def rcpt_to(self, session: Session, recipient: Recipient) -> Verdict | None:
        if self.settings.check_at != "rcpt":
            return None
        local = recipient.address.local.lower()
        if local in (p.lower() for p in self.settings.pass_recipients):
            return None
        return await self._ip_verdict(session)

    @hookimpl
    async def mail_from(self, session: Session, sender: Address) -> Verdict | None:
        if not self.settings.domain_lists or sender.is_null or self._skip(session, later=True):
            return None
        domain = _ascii_domain(sender.domain)
        if domain is None:
            return None
        return await self._domain_verdict(session, self.settings.domain_lists, [domain])

    @hookimpl
    async def data(self, session: Session, message: Message) -> Verdict | None:
        if not self.settings.uri_lists or self._skip(session, later=True):
            return None
        domains = _url_domains(message, self.settings.max_uri_domains)
        if not domains:
            return None
        return await self._domain_verdict(session, self.settings.uri_lists, domains)

    # -- checks ------------------------------------------------------------------------

    def _state(self, session: Session) -> dict[str, Any]:
        state: dict[str, Any] = session.notes.setdefault("dnsbl", {})
        return state

    def _skip(self, session: Session, *, later: bool = False) -> bool:
        if later and self._state(session).get("allowed"):
            return True
        if later and self.settings.skip_authenticated and session.auth_user is not None:
            return True
        ip = session.client.ip
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return True
        if self.settings.skip_local and ip_in_networks(ip, _LOCAL):
            return True
        return bool(self.settings.skip_networks) and ip_in_networks(ip, self.settings.skip_networks)

    async def _ip_verdict(self, session: Session) -> Verdict | None:
        state = self._state(session)
        if state.get("allowed"):  # check_at rcpt: every later RCPT of an allow-listed client
            return Verdict.accept(f"client allow-listed in {state['allowed']}")
        if "ip_verdict" in state:  # check_at rcpt: looked up once per session
            cached: Verdict | None = state["ip_verdict"]
            return cached
        if self._skip(session, later=self.settings.check_at == "rcpt"):
            return None
        verdict = await self._check_ip(session)
        state["ip_verdict"] = verdict
        return verdict

    async def _check_ip(self, session: Session) -> Verdict | None:
        ip = session.client.ip
        allow = self.settings.allow_lists
        blocks = self.settings.lists
        answers = await asyncio.gather(
            *(_lookup(query_name(ip, a.zone)) for a in allow),
            *(_lookup(query_name(ip, b.zone)) for b in blocks),
        )
        for entry, answer in zip(allow, answers[: len(allow)], strict=True):
            if answer.error is not None:
                log.warning("dnswl_error", zone=entry.zone, ip=ip, error=answer.error)
            elif answer.codes:
                log.info("dnswl", zone=entry.zone, ip=ip, codes=answer.codes)
                self._state(session)["allowed"] = entry.zone
                return Verdict.accept(f"client {ip} allow-listed in {entry.zone}")
        verdicts = []
        for block, answer in zip(blocks, answers[len(allow):], strict=True):
            values = {"ip": ip, "zone": block.zone, "name": block.zone, "code": "", "domain": ""}
            verdicts.append(self._verdict(block, answer, values, f"client {ip}"))
        return _combine([v for v in verdicts if v is not None])

    async def _domain_verdict(
        self, session: Session, lists: list[DomainList], domains: list[str]
    ) -> Verdict | None:
        pairs = [(entry, domain) for domain in domains for entry in lists]
        answers = await asyncio.gather(*(_lookup(f"{domain}.{entry.zone}") for entry, domain in pairs))
        verdicts = []
        for (entry, domain), answer in zip(pairs, answers, strict=True):
            values = {"ip": session.client.ip, "zone": entry.zone, "name": entry.zone, "code": "",
                      "domain": domain}
            verdicts.append(self._verdict(entry, answer, values, f"domain {domain}"))
        return _combine([v for v in verdicts if v is not None])

    def _verdict(self, entry: IPList | DomainList, answer: _Answer, values: dict[str, str],
                 what: str) -> Verdict | None:
        tag = f"dnsbl:{entry.zone}"
        kind, _, subject = what.partition(" ")  # "ip 192.0.2.1" or "domain example.com": a field
        if answer.error is not None:
            log.warning("dnsbl_error", zone=entry.zone, **{kind: subject}, error=answer.error)
            return verdict_for(
                self.settings.temperror,
                reject_text=self.settings.tempfail_text.format_map(values),
                tempfail_text=self.settings.tempfail_text.format_map(values),
                reason=f"{entry.zone} did not answer for {what}: {answer.error}",
                tags=(f"{tag}:temperror",),
            )
        if not answer.codes:
            return None
        verdicts = []
        for code, rc in entry.lookup(answer.codes):
            name = rc.name if rc is not None else entry.zone
            action = rc.action if rc is not None and rc.action is not None else entry.action
            text = rc.text if rc is not None and rc.text is not None else entry.text
            shown = {**values, "name": name, "code": code}
            tags = (tag, f"{tag}:{rc.name}") if rc is not None else (tag,)
            log.info("dnsbl", zone=entry.zone, **{kind: subject}, code=code, name=name)
            verdict = verdict_for(
                action,
                reject_text=text.format_map(shown),
                tempfail_text=text.format_map(shown),
                reason=f"{what} listed in {entry.zone} ({code} {name})",
                tags=tags,
            )
            if verdict is not None:
                verdicts.append(verdict)
        return _combine(verdicts)


def _combine(verdicts: list[Verdict]) -> Verdict | None:
    """The most severe verdict, carrying every score, tag and reason."""
    if not verdicts:
        return None
    if len(verdicts) == 1:
        return verdicts[0]
    worst = max(verdicts, key=lambda v: _SEVERITY.get(v.action, 0))
    tags = tuple(dict.fromkeys(t for v in verdicts for t in v.tags))
    return replace(
        worst,
        score=sum(v.score for v in verdicts),
        tags=tags,
        reason="; ".join(v.reason for v in verdicts if v.reason),
    )


def _url_domains(message: Message, limit: int) -> list[str]:
    """Distinct host names of http(s) URLs in the message's text parts, at most ``limit``."""
    found: dict[str, None] = {}
    for part in message.email.walk():
        if part.get_content_maintype() != "text" or part.is_multipart():
            continue
        try:
            text = part.get_content()
        except (LookupError, ValueError, AssertionError):
            payload = part.get_payload(decode=True)
            text = payload.decode("latin-1") if isinstance(payload, bytes) else ""
        if not isinstance(text, str):
            continue
        for match in _URL.finditer(text):
            host = match.group(1).rstrip(".")
            try:
                ipaddress.ip_address(host)
                continue  # IP literals are not domain list material
            except ValueError:
                pass
            domain = _ascii_domain(host)
            if domain is None or "." not in domain:
                continue
            found.setdefault(domain, None)
            if len(found) >= limit:
                return list(found)
    return list(found)
