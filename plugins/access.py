"""access: allow and deny lists by client IP, HELO name, sender and recipient.

    plugins:
      - name: access
        settings:
          client:
            allow: {rules: [10.0.0.0/8]}
            deny: {file: access/deny-ips.txt}
          sender:
            deny: {rules: ["*@spammer.example", "/^bulk-.*@/i"]}

Each list kind is checked in its own phase: ``client`` at connect, ``helo`` at HELO/EHLO,
``sender`` at MAIL FROM and ``recipient`` at each RCPT TO. The allow list is checked first:
a match returns ``Verdict.accept()``, which skips the later plugins *of that phase only*.
A deny match gets the list's ``action`` (reject by default). Entries are exact values
(case-insensitive), wildcards (``*`` for any run of characters: ``*@example.com``,
``*.example.com``) or regular expressions written ``/.../`` or ``/.../i`` (searched, not
anchored). Client entries are IP addresses or CIDR networks.

Entries come from the YAML (``rules:``) and/or a file (``file:``, one entry a line, ``#``
comments, relative to the configuration file). A file is re-read when it changes (its mtime,
size or inode), checked at most once per second; a file that no longer parses keeps the
previous good list, and the error is logged.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from smtpproxy import (
    Address,
    EventLog,
    IPNetwork,
    PluginSettings,
    Recipient,
    Session,
    Verdict,
    hookimpl,
    ip_in_networks,
)

from ._policy import ActionSpec, verdict_for

__all__ = ["Access", "Matcher", "compile_entries"]

log = EventLog(__name__)

Kind = Literal["client", "helo", "sender", "recipient"]

CHECK_INTERVAL = 1.0
"""Seconds between two checks of a list file's mtime (at most one stat per interval)."""

_REGEX = re.compile(r"/(?P<pattern>.*)/(?P<flags>i?)", re.DOTALL)

DEFAULT_TEXTS: dict[str, str] = {
    "client": "Access denied",
    "helo": "HELO rejected: Access denied",
    "sender": "Sender address rejected: Access denied",
    "recipient": "Recipient address rejected: Access denied",
}


# -- matching ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled list: networks (client lists) or exact values and patterns (the others)."""

    networks: tuple[IPNetwork, ...] = ()
    exact: frozenset[str] = frozenset()
    patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()

    def match(self, value: str, *, is_ip: bool = False) -> str | None:
        """The entry that matches ``value`` (for logs), or None."""
        if is_ip:
            for net in self.networks:
                if ip_in_networks(value, (net,)):
                    return str(net)
            return None
        if value.lower() in self.exact:
            return value.lower()
        for entry, pattern in self.patterns:
            if pattern.search(value):
                return entry
        return None

    def __len__(self) -> int:
        return len(self.networks) + len(self.exact) + len(self.patterns)


def compile_entries(entries: list[str], kind: Kind, where: str = "") -> Matcher:
    """Compile list entries for ``kind``; ValueError names the first bad one."""
    networks: list[IPNetwork] = []
    exact: set[str] = set()
    patterns: list[tuple[str, re.Pattern[str]]] = []
    for raw in entries:
        entry = raw.strip()
        at = f"{where}{entry!r}"
        if not entry:
            raise ValueError(f"{at}: empty entry")
        if kind == "client":
            try:
                networks.append(ipaddress.ip_network(entry, strict=True))
            except ValueError as exc:
                raise ValueError(f"{at}: not an IP address or CIDR network ({exc})") from None
            continue
        regex = _REGEX.fullmatch(entry)
        if regex is not None and len(entry) > 2:
            flags = re.IGNORECASE if regex.group("flags") else 0
            try:
                patterns.append((entry, re.compile(regex.group("pattern"), flags)))
            except re.error as exc:
                raise ValueError(f"{at}: bad regular expression: {exc}") from None
        elif "*" in entry:
            glob = ".*".join(re.escape(part) for part in entry.split("*"))
            patterns.append((entry, re.compile(rf"\A{glob}\Z", re.IGNORECASE | re.DOTALL)))
        else:
            exact.add(entry.lower())
    return Matcher(tuple(networks), frozenset(exact), tuple(patterns))


def read_entries(path: Path) -> list[str]:
    """The entries of a list file: one a line, blank lines and ``#`` comments ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


class ListFile:
    """A list file, re-read when it changes (checked at most once per CHECK_INTERVAL)."""

    def __init__(self, path: Path, kind: Kind, matcher: Matcher):
        self.path = path
        self.kind = kind
        self.matcher = matcher
        self._stamp = _stamp(path)
        self._checked = time.monotonic()

    def current(self) -> Matcher:
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL:
            return self.matcher
        self._checked = now
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            log.error("access_file_error", file=self.path, error=repr(exc), note="keeping the previous list")
            return self.matcher
        if stamp == self._stamp:
            return self.matcher
        self._stamp = stamp  # a broken file is reported once, not at every check
        try:
            self.matcher = compile_entries(read_entries(self.path), self.kind, f"{self.path}: ")
        except (OSError, UnicodeError, ValueError) as exc:
            log.error("access_file_error", file=self.path, error=str(exc), note="keeping the previous list")
        else:
            log.info("access_file_reloaded", file=self.path, entries=len(self.matcher))
        return self.matcher


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# -- settings ----------------------------------------------------------------------------


class EntryList(PluginSettings):
    """One allow or deny list: entries from the YAML and/or from a file."""

    KIND: ClassVar[Kind] = "sender"  # how entries are read: names (helo, sender, recipient)

    rules: list[str] = Field(
        default=[],
        description=(
            "Entries: exact values (case-insensitive), wildcards with * (*@example.com, "
            "*.example.com), or regular expressions /.../ or /.../i. Client lists take IP "
            "addresses and CIDR networks."
        ),
    )
    file: Path | None = Field(
        default=None,
        description=(
            "A file of more entries, one a line, # comments; relative to the configuration file. "
            "Re-read when it changes (checked at most once per second)."
        ),
    )

    @field_validator("rules")
    @classmethod
    def _valid_rules(cls, value: list[str]) -> list[str]:
        compile_entries(value, cls.KIND)
        return value

    @field_validator("file")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        path = value if value.is_absolute() or base is None else Path(base) / value
        path = path.absolute()
        try:
            entries = read_entries(path)
        except (OSError, UnicodeError) as exc:
            raise ValueError(f"cannot read list file {path}: {exc}") from None
        compile_entries(entries, cls.KIND, f"{path}: ")
        return path


class NetworkList(EntryList):
    """An allow or deny list of client IP addresses and CIDR networks."""

    KIND: ClassVar[Kind] = "client"


class KindSettings(PluginSettings):
    """The allow and deny lists of one kind, and what a deny does."""

    allow: EntryList = Field(
        default_factory=EntryList,
        description="Matches are accepted for this phase: the later plugins of the phase are skipped.",
    )
    deny: EntryList = Field(default_factory=EntryList, description="Matches get the deny action.")
    action: ActionSpec = Field(
        default="reject",
        description="What a deny match does: reject, tempfail, quarantine, continue, or a score.",
    )
    reply: str | None = Field(
        default=None,
        description=(
            "Reply text for a reject or tempfail; default 'Access denied' (client), "
            "'HELO rejected: Access denied', 'Sender address rejected: Access denied', "
            "'Recipient address rejected: Access denied'."
        ),
    )

    @field_validator("reply")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(ord(c) < 32 or ord(c) == 127 for c in value)):
            raise ValueError("must be a non-empty line without control characters (it becomes an SMTP reply)")
        return value


class ClientSettings(KindSettings):
    """The allow and deny lists of client addresses, and what a deny does."""

    allow: NetworkList = Field(
        default_factory=NetworkList,
        description="Matches are accepted at connect: the later connect plugins are skipped.",
    )
    deny: NetworkList = Field(default_factory=NetworkList, description="Matches get the deny action.")


class Access:
    """Allow and deny lists by client IP/network, HELO name, sender and recipient."""

    class Settings(PluginSettings):
        client: ClientSettings = Field(
            default_factory=ClientSettings,
            description="Lists of client IP addresses and CIDR networks, checked at connect.",
        )
        helo: KindSettings = Field(
            default_factory=KindSettings, description="Lists of HELO/EHLO names, checked at HELO/EHLO."
        )
        sender: KindSettings = Field(
            default_factory=KindSettings,
            description="Lists of envelope senders, checked at MAIL FROM (the null sender is <>).",
        )
        recipient: KindSettings = Field(
            default_factory=KindSettings,
            description="Lists of envelope recipients, checked at each RCPT TO (per recipient).",
        )

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        self._lists: dict[tuple[str, str], tuple[Matcher, ListFile | None]] = {}
        for kind in ("client", "helo", "sender", "recipient"):
            lists: KindSettings = getattr(self.settings, kind)
            for which in ("allow", "deny"):
                spec: EntryList = getattr(lists, which)
                inline = compile_entries(spec.rules, kind)
                loaded = None
                if spec.file is not None:
                    matcher = compile_entries(read_entries(spec.file), kind, f"{spec.file}: ")
                    loaded = ListFile(spec.file, kind, matcher)
                self._lists[kind, which] = (inline, loaded)

    def _match(self, kind: Kind, which: str, value: str) -> str | None:
        inline, loaded = self._lists[kind, which]
        is_ip = kind == "client"
        found = inline.match(value, is_ip=is_ip)
        if found is None and loaded is not None:
            found = loaded.current().match(value, is_ip=is_ip)
        return found

    def check(self, kind: Kind, value: str) -> Verdict | None:
        """The verdict for ``value`` against the ``kind`` lists (what the hooks return)."""
        entry = self._match(kind, "allow", value)
        if entry is not None:
            log.info("access", kind=kind, value=value, allow=entry)
            return Verdict.accept(reason=f"{kind} {value!r} allowed by {entry!r}")
        entry = self._match(kind, "deny", value)
        if entry is None:
            return None
        log.info("access", kind=kind, value=value, deny=entry)
        lists: KindSettings = getattr(self.settings, kind)
        text = lists.reply or DEFAULT_TEXTS[kind]
        return verdict_for(
            lists.action, reject_text=text, tempfail_text=text,
            reason=f"{kind} {value!r} denied by {entry!r}", tags=(f"access:{kind}:deny",),
        )

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        return self.check("client", session.client.ip)

    @hookimpl
    async def helo(self, hostname: str) -> Verdict | None:
        return self.check("helo", hostname)

    @hookimpl
    async def mail_from(self, sender: Address) -> Verdict | None:
        return self.check("sender", "<>" if sender.is_null else sender.text)

    @hookimpl
    async def rcpt_to(self, recipient: Recipient) -> Verdict | None:
        return self.check("recipient", recipient.address.text)
