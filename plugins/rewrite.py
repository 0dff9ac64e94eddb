"""rewrite: edit headers and rewrite envelope addresses, at DATA.

    plugins:
      - name: rewrite           # last in the list: the other plugins see the original message
        settings:
          strip_headers: [X-Internal-*]
          add_headers: {X-Received-From: "{client_ip} ({helo})"}
          subject_tag: "[EXTERNAL]"
          only_from_outside: true
          inside_networks: [10.0.0.0/8]
          sender: {map: {"*@old.example": "*@new.example"}}
          rewrite_headers: true

Order of work: strip headers, replace headers, add headers, tag the subject, then rewrite the
envelope sender and recipients (with ``Envelope.set_sender``/``remove_recipient``/
``add_recipient``, so every change is recorded) and, with ``rewrite_headers``, the same
addresses in From (sender rules) and To/Cc (recipient rules). Every rewritten address is
validated with ``Address.parse``; one that is not valid is not used (logged, address kept).
Supersedes ``headers`` for templated headers.
"""

from __future__ import annotations

import fnmatch
import re
import string
from email.utils import getaddresses

from pydantic import Field, field_validator, model_validator

from smtpproxy import (
    Address,
    EventLog,
    HeaderError,
    Message,
    Network,
    PluginSettings,
    Session,
    Transaction,
    hookimpl,
    ip_in_networks,
)

__all__ = ["AddressRules", "RegexRule", "Rewrite", "template_values"]

log = EventLog(__name__)

PLACEHOLDERS = ("client_ip", "client_name", "helo", "sender", "session_id", "transaction_id", "tls_version")
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")
_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(\d+))")


def _check_template(value: str) -> str:
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{name}}}; available: {known}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format spec or conversion")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


def _check_name(name: str) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a header field name")
    return name


def template_values(session: Session, transaction: Transaction) -> dict[str, str]:
    """What the placeholders stand for in this session and transaction."""
    sender = transaction.envelope.sender
    return {
        "client_ip": session.client.ip,
        "client_name": session.client.hostname or "unknown",
        "helo": session.helo or "unknown",
        "sender": "<>" if sender.is_null else sender.text,
        "session_id": session.id,
        "transaction_id": transaction.id,
        "tls_version": session.tls.version if session.tls else "none",
    }


class RegexRule(PluginSettings):
    """A regular-expression rewrite: the whole address must match ``pattern``."""

    pattern: re.Pattern[str] = Field(
        description="Python regular expression matched against the whole address (use (?i) to ignore case)."
    )
    replace: str = Field(description=r"The new address; \1 or \g<name> insert the pattern's groups.")

    @model_validator(mode="after")
    def _refs(self) -> RegexRule:
        groups, names = self.pattern.groups, self.pattern.groupindex
        for named, number in _GROUP_REF.findall(self.replace):
            ref = named or number
            ok = int(ref) <= groups if ref.isdigit() else ref in names
            if not ok:
                raise ValueError(f"replace refers to group {ref!r}, which the pattern does not have")
        return self


class AddressRules(PluginSettings):
    """How one kind of address (sender or recipients) is rewritten; the first rule that matches wins."""

    map: dict[str, str] = Field(
        default={},
        description=(
            "Exact addresses (case-insensitive) or whole domains: 'a@old.example': 'b@new.example', "
            "'*@old.example': '*@new.example' (keeps the local part) or '*@old.example': 'x@new.example'. "
            "Exact entries win over domains."
        ),
    )
    regex: list[RegexRule] = Field(
        default=[], description="Regular-expression rules, tried in order after map."
    )

    @field_validator("map")
    @classmethod
    def _valid_map(cls, value: dict[str, str]) -> dict[str, str]:
        for key, target in value.items():
            if "*" in key and not (key.startswith("*@") and "*" not in key[2:]):
                raise ValueError(f"{key!r}: a wildcard entry must be '*@domain'")
            domain_target = target.startswith("*@") and "*" not in target[2:]
            if "*" in target and not (domain_target and key.startswith("*@")):
                raise ValueError(f"{target!r}: '*@domain' can only replace a '*@domain' entry")
            try:
                Address.parse(target.replace("*@", "postmaster.x@", 1), allow_utf8=True)
            except ValueError as exc:
                raise ValueError(f"{target!r} is not a valid address: {exc}") from None
        return {k.lower(): v for k, v in value.items()}

    def apply(self, address: str) -> str | None:
        """The rewritten address text, or None when no rule matches (not yet validated)."""
        exact = self.map.get(address.lower())
        if exact is not None:
            return exact
        local, _, domain = address.rpartition("@")
        target = self.map.get(f"*@{domain.lower()}")
        if target is not None:
            return f"{local}@{target[2:]}" if target.startswith("*@") else target
        for rule in self.regex:
            m = rule.pattern.fullmatch(address)
            if m is not None:
                return m.expand(rule.replace)
        return None


class Rewrite:
    """Templated header edits, subject tagging and sender/recipient address rewriting."""

    class Settings(PluginSettings):
        strip_headers: list[str] = Field(
            default=[],
            description="Header fields removed from every message (case-insensitive; * wildcards: X-Int-*).",
        )
        replace_headers: dict[str, str] = Field(
            default={},
            description="Header fields set to a template value, replacing the first one (added if missing).",
        )
        add_headers: dict[str, str] = Field(
            default={},
            description=(
                "Header fields added at the top, values are templates: {client_ip}, {client_name}, "
                "{helo}, {sender}, {session_id}, {transaction_id}, {tls_version}."
            ),
        )
        subject_tag: str | None = Field(
            default=None,
            description="Text put before the Subject (e.g. [EXTERNAL]) unless the Subject already has it.",
        )
        only_from_outside: bool = Field(
            default=False, strict=True, description="Tag the subject only for clients not in inside_networks."
        )
        inside_networks: list[Network] = Field(
            default=[], description="Client networks that count as inside for only_from_outside."
        )
        sender: AddressRules = Field(
            default_factory=AddressRules, description="Rewrite rules for the envelope sender."
        )
        recipients: AddressRules = Field(
            default_factory=AddressRules, description="Rewrite rules for each envelope recipient."
        )
        rewrite_headers: bool = Field(
            default=False,
            strict=True,
            description="Also rewrite the addresses in From (sender rules) and To/Cc (recipient rules).",
        )

        @field_validator("add_headers", "replace_headers")
        @classmethod
        def _templates(cls, value: dict[str, str]) -> dict[str, str]:
            for name, template in value.items():
                _check_name(name)
                try:
                    _check_template(template)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
            return value

        @field_validator("strip_headers")
        @classmethod
        def _names(cls, value: list[str]) -> list[str]:
            for name in value:
                _check_name(name)
            return value

        @field_validator("subject_tag")
        @classmethod
        def _tag(cls, value: str | None) -> str | None:
            if value is not None and (not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)):
                raise ValueError("must be non-empty text without control characters")
            return value

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> None:
        s = self.settings
        if s.strip_headers:
            self._strip(message)
        values = template_values(session, transaction)
        for name, template in s.replace_headers.items():
            self._set(message, name, template.format_map(values), replace=True)
        for name, template in s.add_headers.items():
            self._set(message, name, template.format_map(values), replace=False)
        inside = s.only_from_outside and ip_in_networks(session.client.ip, s.inside_networks)
        if s.subject_tag and not inside:
            self._tag_subject(message, s.subject_tag)
        self._rewrite_addresses(transaction, message)

    # -- headers -------------------------------------------------------------------------

    def _tag_subject(self, message: Message, tag: str) -> None:
        subject = (message.get("Subject") or "").strip()
        if tag.lower() not in subject.lower():
            self._set(message, "Subject", f"{tag} {subject}" if subject else tag, replace=True)

    def _strip(self, message: Message) -> None:
        patterns = [p.lower() for p in self.settings.strip_headers]
        present = {name.lower() for name, _ in message.headers}
        for name in sorted(present):
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                message.remove_header(name)

    @staticmethod
    def _set(message: Message, name: str, value: str, *, replace: bool) -> None:
        try:
            if replace:
                message.replace_header(name, value)
            else:
                message.add_header(name, value)
        except HeaderError as exc:
            log.warning("rewrite_header_skipped", header=name, error=str(exc))

    # -- addresses -----------------------------------------------------------------------

    def _rewrite_addresses(self, transaction: Transaction, message: Message) -> None:
        s = self.settings
        envelope = transaction.envelope
        utf8 = envelope.smtputf8
        if not envelope.sender.is_null:
            new = self._new_address(s.sender, envelope.sender.text, utf8, "sender")
            if new is not None:
                log.info("rewrite", sender=envelope.sender.text, new=new.text)
                envelope.set_sender(new)
        for rcpt in list(envelope.recipients):
            new = self._new_address(s.recipients, rcpt.address.text, utf8, "recipient")
            if new is None:
                continue
            log.info("rewrite", recipient=rcpt.address.text, new=new.text)
            envelope.remove_recipient(rcpt.address)
            if all(r.address.text.lower() != new.text.lower() for r in envelope.recipients):
                envelope.add_recipient(new, rcpt.params)
        if not s.rewrite_headers:
            return
        self._rewrite_header(message, "From", s.sender, utf8)
        for name in ("To", "Cc"):
            self._rewrite_header(message, name, s.recipients, utf8)

    @staticmethod
    def _new_address(rules: AddressRules, old: str, utf8: bool, what: str) -> Address | None:
        text = rules.apply(old)
        if text is None or text == old:
            return None
        try:
            return Address.parse(text, allow_utf8=utf8)
        except ValueError as exc:
            log.warning("rewrite_skipped", **{what: old}, result=text, error=str(exc))
            return None

    def _rewrite_header(self, message: Message, name: str, rules: AddressRules, utf8: bool) -> None:
        values = message.get_all(name)
        if not values:
            return
        if len(values) > 1:
            log.warning("rewrite_header_skipped", header=name, reason=f"{len(values)} fields")
            return
        value = new_value = values[0]
        for _, addr in getaddresses([value]):
            if not addr or "@" not in addr:
                continue
            new = self._new_address(rules, addr, utf8, name.lower())
            if new is None:
                continue
            bounded = re.compile(rf"(?<![\w.+\-@]){re.escape(addr)}(?![\w.\-@])", re.IGNORECASE)
            new_value = bounded.sub(new.text.replace("\\", "\\\\"), new_value)
        if new_value != value:
            self._set(message, name, new_value, replace=True)
