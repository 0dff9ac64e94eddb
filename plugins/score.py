"""score: a rule engine that adds points, marks spam and quarantines or rejects it, at DATA.

    plugins:
      - name: spf
      - name: score                     # after the checking plugins: it reads their scores and tags
        settings:
          tag: 5.0
          quarantine: 10.0
          reject: 15.0
          rules:
            - {name: SUBJ_PILLS, score: 3.0, match: {header: {name: Subject, regex: "cheap pills"}}}
            - {name: SPF_FAIL, score: 4.0, match: {tag: "spf:fail"}}

Each rule matches one thing: a header (unfolded value), the decoded text of the body (text/plain
and text/html without tags, never raw base64 or quoted-printable), the envelope (sender,
recipient, HELO name, client IP by regex or CIDR), a tag another plugin set, or an
authentication result recorded in :mod:`smtpproxy.authresults`. The total is every score the
plugins before it gave (connect, HELO and transaction phases) plus the score of every rule that
matched. Every hit is recorded as ``RULE=score``: in the verdict's reason (so in the results
record and the quarantine record), in the ``X-Spam-Status`` header and in one ``event=score``
log line.

Plugins in shadow mode (``enforce: false``) count apart: their points, and the rules that match
only on their tags, make a **shadow total**, what the total would have been had they enforced.
Thresholds apply to the enforced total only; the shadow total and what the thresholds would
have made of it are reported (``shadow_score`` and ``shadow_action`` in the log line, the
reason, and an ``X-Spam-Shadow-Score`` header) whenever a shadowed plugin ran.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import dataclass, replace
from email.header import decode_header, make_header
from email.message import EmailMessage
from html import unescape
from html.parser import HTMLParser
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from smtpproxy import (
    EventLog,
    Message,
    PluginSettings,
    Session,
    Transaction,
    Verdict,
    auth_checks,
    hookimpl,
    run_blocking,
)

__all__ = ["Score"]

log = EventLog(__name__)

Points = Annotated[float, Field(allow_inf_nan=False)]
Threshold = Annotated[float, Field(allow_inf_nan=False)] | None
_RULE_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_MAX_PARTS = 100  # text parts looked at per message


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


class _Strict(PluginSettings):
    """Unknown keys refused, values immutable (the plugin settings base)."""


class HeaderMatch(_Strict):
    name: str = Field(description="Header field name (case-insensitive); every occurrence is tried.")
    regex: str = Field(description="Searched in the unfolded value (and its RFC 2047 decoded form).")

    @field_validator("regex")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        return _check_regex(value)


class BodyMatch(_Strict):
    regex: str = Field(description="Searched in the decoded text of each text/plain and text/html part.")

    @field_validator("regex")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        return _check_regex(value)


class EnvelopeMatch(_Strict):
    sender: str | None = Field(default=None, description="Regex on the MAIL FROM address ('' for <>).")
    recipient: str | None = Field(default=None, description="Regex; matches if any recipient matches.")
    helo: str | None = Field(default=None, description="Regex on the HELO/EHLO name.")
    client_ip: str | None = Field(
        default=None, description="A network (CIDR, e.g. 192.0.2.0/24, or one address) or a regex."
    )

    @field_validator("sender", "recipient", "helo")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @field_validator("client_ip")
    @classmethod
    def _valid_ip(cls, value: str | None) -> str | None:
        if value is None or _as_network(value) is not None:
            return value
        return _check_regex(value)

    @model_validator(mode="after")
    def _something(self) -> EnvelopeMatch:
        if not any((self.sender, self.recipient, self.helo, self.client_ip)):
            raise ValueError("give at least one of sender, recipient, helo, client_ip")
        return self


class AuthMatch(_Strict):
    method: Literal["spf", "dkim", "dmarc", "arc", "iprev"]
    result: str = Field(description="e.g. fail, softfail, none, temperror (RFC 8601 vocabulary).")


class Match(_Strict):
    """Exactly one of the kinds."""

    header: HeaderMatch | None = None
    body: BodyMatch | None = None
    envelope: EnvelopeMatch | None = None
    tag: str | None = Field(default=None, description="A tag another plugin set, e.g. spf:fail.")
    auth: AuthMatch | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Match:
        given = [k for k in ("header", "body", "envelope", "tag", "auth") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of header, body, envelope, tag, auth"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class Rule(_Strict):
    name: str = Field(description="Shown in X-Spam-Status, the reason and the log: letters, digits, _.")
    score: Points = Field(description="Points added when the rule matches (may be negative).")
    match: Match
    ignore_case: bool | None = Field(
        default=None, description="Override the plugin-wide ignore_case for this rule's regexes."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _RULE_NAME.match(value):
            raise ValueError("rule names are 1-64 letters, digits or '_'")
        return value


def _as_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _fmt(value: float) -> str:
    return f"{value:.1f}"


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    patterns: dict[str, re.Pattern[str]]
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the rules look at, gathered once per message."""

    headers: list[tuple[str, str]]
    texts: list[str]
    sender: str
    recipients: list[str]
    helo: str
    client_ip: str
    tags: frozenset[str]
    auth: frozenset[tuple[str, str]]


class Score:
    """Sum the chain's scores and rule hits; mark, quarantine or reject by thresholds."""

    class Settings(PluginSettings):
        rules: list[Rule] = Field(default=[], description="The rules; every one is tried for every message.")
        tag: Threshold = Field(
            default=5.0, description="From this total on, X-Spam-Status says Yes (and subject_tag applies)."
        )
        quarantine: Threshold = Field(default=None, description="From this total on, quarantine the message.")
        reject: Threshold = Field(default=None, description="From this total on, reject it (550 5.7.1).")
        subject_tag: str | None = Field(
            default=None,
            description="Prefix the Subject with this (e.g. '[SPAM]') from the tag threshold on.",
        )
        add_headers: bool = Field(
            default=True, strict=True,
            description="Write X-Spam-Score and X-Spam-Status (incoming ones are removed either way).",
        )
        reject_text: str = Field(
            default="Message rejected as spam (score {score})",
            description="Reply text for a reject; {score} is the total with one decimal.",
        )
        ignore_case: bool = Field(default=True, strict=True, description="Regexes ignore case.")
        body_max_kb: int = Field(
            default=64, gt=0, le=10240, description="Decoded text looked at per part, in KiB."
        )

        @field_validator("rules")
        @classmethod
        def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
            seen: set[str] = set()
            for rule in rules:
                if rule.name in seen:
                    raise ValueError(f"rule name {rule.name!r} is used twice")
                seen.add(rule.name)
            return rules

        @field_validator("reject_text", "subject_tag")
        @classmethod
        def _one_line(cls, value: str | None) -> str | None:
            if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ValueError("must not contain control characters")
            return value

        @field_validator("reject_text")
        @classmethod
        def _template(cls, value: str) -> str:
            try:
                value.format(score="1.0")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"bad template ({exc}); the only placeholder is {{score}}") from None
            return value

        @model_validator(mode="after")
        def _ordered(self) -> Score.Settings:
            given = [(n, getattr(self, n)) for n in ("tag", "quarantine", "reject")]
            present = [(n, v) for n, v in given if v is not None]
            for (lo_name, lo), (hi_name, hi) in itertools.pairwise(present):
                if lo > hi:
                    raise ValueError(f"threshold {lo_name} ({lo}) is above {hi_name} ({hi})")
            return self

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        self.rules = [self._compile(rule) for rule in self.settings.rules]

    def _compile(self, rule: Rule) -> _Compiled:
        ignore_case = self.settings.ignore_case if rule.ignore_case is None else rule.ignore_case
        flags = re.IGNORECASE if ignore_case else 0
        m = rule.match
        sources: dict[str, str | None] = {}
        network = None
        if m.header is not None:
            sources["header"] = m.header.regex
        elif m.body is not None:
            sources["body"] = m.body.regex
        elif m.envelope is not None:
            env = m.envelope
            sources.update(sender=env.sender, recipient=env.recipient, helo=env.helo)
            if env.client_ip is not None:
                network = _as_network(env.client_ip)
                if network is None:
                    sources["client_ip"] = env.client_ip
        patterns = {k: re.compile(v, flags) for k, v in sources.items() if v is not None}
        return _Compiled(rule, patterns, network)

    # -- the hook ----------------------------------------------------------------------

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict:
        earlier = transaction.score  # the session's and the transaction's, so far
        if self._needs_body:  # MIME parsing and decoding: CPU work for a worker thread
            facts = await run_blocking(self._facts, session, transaction, message)
        else:  # headers and envelope only: cheaper here than a thread hand-off
            facts = self._facts(session, transaction, message)
        hits = [(c.rule.name, c.rule.score) for c in self.rules if self._matches(c, facts)]
        points = sum(score for _, score in hits)
        total = earlier + points
        s = self.settings
        is_spam = s.tag is not None and total >= s.tag
        trace = [f"{name}={score:g}" for name, score in hits]
        action = self._action(total)
        reason = (
            f"score {_fmt(total)} ({action}; plugins {_fmt(earlier)}, rules {_fmt(points)}): "
            + (" ".join(trace) or "no rule hits")
        )
        shadow: dict[str, object] = {}
        shadow_total: float | None = None
        if transaction.shadowed:
            shadow_total = self._shadow_total(session, transaction, facts)
            shadow_action = self._action(shadow_total)
            shadow = {"shadow_score": round(shadow_total, 2), "shadow_action": shadow_action}
            reason += f"; shadow {_fmt(shadow_total)} ({shadow_action})"
        log.info("score", tx=transaction.id, score=round(total, 2), earlier=round(earlier, 2),
                 rules=trace, spam=is_spam, action=action, **shadow)
        tags = ("score:spam",) if is_spam else ()
        if action == "reject":
            verdict = Verdict.reject(s.reject_text.format(score=_fmt(total)), code=550,
                                     enhanced="5.7.1", reason=reason)
            return replace(verdict, score=points, tags=tags)
        self._mark(message, total, is_spam, [name for name, _ in hits], shadow_total)
        if action == "quarantine":
            return replace(Verdict.quarantine(reason), score=points, tags=tags)
        return Verdict.cont(score=points, reason=reason, tags=tags)

    def _action(self, total: float) -> str:
        """What the thresholds make of a total: reject, quarantine or continue."""
        s = self.settings
        if s.reject is not None and total >= s.reject:
            return "reject"
        if s.quarantine is not None and total >= s.quarantine:
            return "quarantine"
        return "continue"

    def _shadow_total(self, session: Session, transaction: Transaction, facts: _Facts) -> float:
        """The total had shadowed plugins enforced: their points too, and the rules their tags
        would have matched."""
        shadow_tags = session.results.shadow_tags | transaction.results.shadow_tags
        seen = replace(facts, tags=facts.tags | shadow_tags)
        points = sum(c.rule.score for c in self.rules if self._matches(c, seen))
        return transaction.shadow_score + points

    def _mark(self, message: Message, total: float, is_spam: bool, names: list[str],
              shadow_total: float | None = None) -> None:
        # Whatever the settings, a client's own X-Spam-* verdict must not reach the mailbox.
        message.remove_header("X-Spam-Score")
        message.remove_header("X-Spam-Status")
        message.remove_header("X-Spam-Shadow-Score")
        if self.settings.add_headers:
            status = f"{'Yes' if is_spam else 'No'}, score={_fmt(total)} tests={','.join(names) or 'none'}"
            message.add_header("X-Spam-Status", status)
            message.add_header("X-Spam-Score", _fmt(total))
            if shadow_total is not None:
                message.add_header("X-Spam-Shadow-Score", _fmt(shadow_total))
        prefix = self.settings.subject_tag
        if is_spam and prefix:
            subject = message.get("Subject")
            if subject is None:
                message.add_header("Subject", prefix, prepend=False)
            elif not subject.startswith(prefix):
                message.replace_header("Subject", f"{prefix} {subject}")

    # -- matching ----------------------------------------------------------------------

    @property
    def _needs_body(self) -> bool:
        return any("body" in c.patterns for c in self.rules)

    def _facts(self, session: Session, transaction: Transaction, message: Message) -> _Facts:
        """Gathered in a worker thread when a body rule needs MIME parsing and decoding."""
        env = transaction.envelope
        return _Facts(
            headers=[(name.lower(), value) for name, value in message.headers],
            texts=_body_texts(message.email, self.settings.body_max_kb * 1024) if self._needs_body else [],
            sender=env.sender.text,
            recipients=[r.address.text for r in env.recipients],
            helo=session.helo or "",
            client_ip=session.client.ip,
            tags=frozenset(session.results.tags | transaction.results.tags),
            auth=frozenset((c.method, c.result) for c in auth_checks(transaction)),
        )

    def _matches(self, compiled: _Compiled, facts: _Facts) -> bool:
        m, p = compiled.rule.match, compiled.patterns
        if m.header is not None:
            wanted = m.header.name.lower()
            return any(
                any(p["header"].search(v) for v in _header_forms(value))
                for name, value in facts.headers if name == wanted
            )
        if m.body is not None:
            return any(p["body"].search(text) for text in facts.texts)
        if m.tag is not None:
            return m.tag in facts.tags
        if m.auth is not None:
            return (m.auth.method, m.auth.result.lower()) in facts.auth
        assert m.envelope is not None
        if "sender" in p and not p["sender"].search(facts.sender):
            return False
        if "recipient" in p and not any(p["recipient"].search(r) for r in facts.recipients):
            return False
        if "helo" in p and not p["helo"].search(facts.helo):
            return False
        if "client_ip" in p and not p["client_ip"].search(facts.client_ip):
            return False
        if compiled.network is not None:
            try:
                ip = ipaddress.ip_address(facts.client_ip)
            except ValueError:
                return False
            if ip.version != compiled.network.version or ip not in compiled.network:
                return False
        return True


def _header_forms(value: str) -> list[str]:
    """The unfolded value, and its RFC 2047 decoded form when it has encoded words."""
    if "=?" not in value:
        return [value]
    try:
        decoded = str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return [value]
    return [value, decoded] if decoded != value else [value]


def _body_texts(email: EmailMessage, limit: int) -> list[str]:
    """The decoded text of each text/plain and text/html part (HTML without tags), bounded."""
    texts: list[str] = []
    for part in email.walk():
        if len(texts) >= _MAX_PARTS:
            break
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload[: limit * 4].decode(charset, errors="replace")
        except LookupError:
            text = payload[: limit * 4].decode("utf-8", errors="replace")
        if ctype == "text/html":
            text = _strip_html(text[: limit * 4])
        texts.append(text[:limit])
    return texts


class _TextOnly(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in ("br", "p", "div", "tr", "li"):
            self.out.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(data)


def _strip_html(html: str) -> str:
    parser = _TextOnly()
    try:
        parser.feed(html)
        parser.close()
    except AssertionError:  # HTMLParser's own complaint about hopeless markup
        return unescape(re.sub(r"<[^>]*>", " ", html))
    return "".join(parser.out)
