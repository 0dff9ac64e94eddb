"""attachments: rules on what is attached, that renamed, encoded or nested files cannot dodge.

    plugins:
      - name: attachments
        settings:
          rules:
            html: {action: 3.0}             # score HTML attachments instead of quarantining them
            encrypted_archive: {action: reject}

At DATA the message is walked in a worker thread (``run_blocking``) with bounds on parts,
depth, decoded size and time (``_mime_tree``). Every leaf part that is an attachment is
checked by each of its file names (``_attachment_names``), by what it really is (libmagic,
``_content_types``), as an Office document (oletools, msoffcrypto-tool) and as an archive
(``_archives``, nested). Each hit is a finding of one rule, and each rule has an action:
``reject``, ``tempfail``, ``quarantine``, ``strip`` (replace the part by a short text
notice), ``continue`` or a number (a score). docs/plugins/attachments.md has the rules,
their defaults, the replies and the log lines.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from smtpproxy import EventLog, Message, PluginSettings, Transaction, Verdict, hookimpl, run_blocking

from ._archives import ArchiveLimits, Budget, kind_of, listing
from ._attachment_names import candidates, clean
from ._content_types import detect, is_office, office_check, same_type, type_of_name
from ._mime_tree import Limits, Part, ScanTimeout, walk
from ._policy import check_reply_template, verdict_for

__all__ = ["RULES", "Attachments", "Finding", "Report", "scan"]

log = EventLog(__name__)

RuleAction = Literal["continue", "reject", "tempfail", "quarantine", "strip"] | Annotated[
    float, Field(allow_inf_nan=False)
]

RULES: dict[str, str] = {
    "executable": "executable file",
    "disk_image": "disk image",
    "shortcut": "Windows shortcut",
    "onenote": "OneNote file",
    "html": "HTML file",
    "svg": "SVG image",
    "office_macros": "Office document with macros",
    "encrypted_office": "encrypted Office document",
    "encrypted_archive": "encrypted archive",
    "deceptive_name": "deceptive file name",
    "type_mismatch": "content does not match its declared type",
    "archive_bomb": "archive over the size limits",
    "malformed": "malformed MIME structure",
    "too_complex": "message too complex to check",
}
"""Every rule, with the words the reply and the notice use for it."""

_PLACEHOLDERS = {"filename": '"invoice.pdf.exe"', "what": "executable file", "rule": "executable"}
MAX_FINDINGS = 50  # kept per message: enough to explain, bounded for the log line


class Rule(PluginSettings):
    action: RuleAction = Field(description="reject, tempfail, quarantine, strip, continue, or a score.")
    extensions: list[str] = Field(
        default=[], description="File name extensions (without the dot; compared case-folded)."
    )
    types: list[str] = Field(default=[], description="Content types as libmagic names them.")

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, value: list[str]) -> list[str]:
        for ext in value:
            if not ext or "." in ext or not ext.isprintable():
                raise ValueError(f"{ext!r}: an extension is a non-empty name without dots")
        return [ext.casefold() for ext in value]


def _rule(action: RuleAction, extensions: Iterable[str] = (), types_: Iterable[str] = ()) -> Rule:
    return Rule(action=action, extensions=list(extensions), types=list(types_))


class Rules(PluginSettings):
    """One entry per rule. A rule not written keeps its defaults, and so does each key of a
    rule that is written without it (``html: {action: 3.0}`` keeps the HTML extensions)."""

    @model_validator(mode="before")
    @classmethod
    def _keep_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = {}
        for key, value in data.items():
            known = cls.model_fields.get(key)
            if known is not None and isinstance(value, dict) and isinstance(known.default, Rule):
                merged[key] = {**known.default.model_dump(), **value}
            else:
                merged[key] = value
        return merged

    executable: Rule = _rule("reject", (
        "exe", "com", "scr", "pif", "cpl", "bat", "cmd", "msi", "msp", "mst", "msc", "dll", "sys", "drv",
        "ocx", "jar", "js", "jse", "vbs", "vbe", "vb", "wsf", "wsh", "wsc", "ws", "hta", "ps1", "ps1xml",
        "psc1", "psd1", "psm1", "reg", "inf", "scf", "sct", "chm", "hlp", "appx", "appxbundle", "msix",
        "msixbundle", "application", "appref-ms", "gadget", "xll", "xbap", "iqy", "slk", "apk", "app",
        "pkg", "sh", "command", "elf", "run",
    ), (
        "application/vnd.microsoft.portable-executable", "application/x-dosexec", "application/x-msdownload",
        "application/x-executable", "application/x-sharedlib", "application/x-pie-executable",
        "application/x-mach-binary", "application/x-msi", "application/x-ms-installer",
        "application/java-archive", "text/x-shellscript", "text/x-msdos-batch",
    ))
    disk_image: Rule = _rule("reject", ("iso", "img", "vhd", "vhdx", "vmdk", "dmg", "udf"), (
        "application/x-iso9660-image", "application/x-virtualbox-vhd", "application/x-virtualbox-vhdx",
        "application/x-qemu-disk", "application/x-vmdk", "application/x-apple-diskimage",
    ))
    shortcut: Rule = _rule("reject", ("lnk", "url", "library-ms", "searchconnector-ms", "settingcontent-ms"),
                           ("application/x-ms-shortcut",))
    onenote: Rule = _rule("reject", ("one", "onepkg", "onetoc2"),
                          ("application/onenote", "application/msonenote"))
    html: Rule = _rule("quarantine", ("htm", "html", "shtml", "xhtml", "mht", "mhtml"), ("text/html",))
    svg: Rule = _rule("quarantine", ("svg", "svgz"), ("image/svg+xml",))
    office_macros: Rule = _rule("reject")
    encrypted_office: Rule = _rule("quarantine")
    encrypted_archive: Rule = _rule("quarantine")
    deceptive_name: Rule = _rule("reject")
    type_mismatch: Rule = _rule(2.0)
    archive_bomb: Rule = _rule("reject")
    malformed: Rule = _rule(2.0)
    too_complex: Rule = _rule("reject")


class ArchiveSettings(PluginSettings):
    max_depth: int = Field(default=3, strict=True, ge=0, le=10,
                           description="Archives inside archives are listed this deep (0: none is opened).")
    max_entries: int = Field(default=1000, strict=True, ge=1,
                             description="Entries in all the message's archives together.")
    max_size: int = Field(default=100 * 1024 * 1024, strict=True, ge=1,
                          description="Bytes, uncompressed, of all the message's archive entries together.")
    max_ratio: float = Field(default=100.0, gt=1, allow_inf_nan=False,
                             description="Uncompressed over compressed size of one entry of 1 MiB or more.")
    max_read: int = Field(default=16 * 1024 * 1024, strict=True, ge=1024,
                          description="Bytes of one entry read into memory to check it (larger: by name).")


class AttachmentSettings(PluginSettings):
    rules: Rules = Field(default=Rules(), description="The action (and extensions and types) of each rule.")
    archives: ArchiveSettings = Field(default=ArchiveSettings(), description="Limits for listing archives.")
    max_parts: int = Field(default=1000, strict=True, ge=1,
                           description="MIME parts walked; more is too_complex.")
    max_depth: int = Field(
        default=20, strict=True, ge=1, le=200,
        description="MIME nesting (multipart, message/rfc822) walked; deeper is too_complex.",
    )
    max_decoded_size: int = Field(default=64 * 1024 * 1024, strict=True, ge=1024,
                                  description="Bytes of decoded part content; more is too_complex.")
    timeout: float = Field(
        default=8, gt=0, allow_inf_nan=False,
        description="Seconds the scan may take, then on_timeout; keep it below the plugin's chain timeout.",
    )
    on_timeout: Literal["continue", "reject", "tempfail", "quarantine"] | Annotated[
        float, Field(allow_inf_nan=False)] = Field(
        default="tempfail", description="When the scan runs out of time: tempfail, reject, quarantine, "
        "continue, or a score.")
    reject_text: str = Field(
        default="Message refused: attachment {filename} is not allowed ({what})",
        description="Reply for a reject; placeholders {filename}, {what}, {rule}.",
    )
    tempfail_text: str = Field(
        default="Attachment check did not finish, try again later",
        description="Reply for a tempfail (a rule's, or on_timeout's); same placeholders.",
    )
    notice: str = Field(
        default="The attachment {filename} was removed by the mail filter: {what}.",
        description="The text that replaces a stripped part; same placeholders.",
    )

    @field_validator("reject_text", "tempfail_text", "notice")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_reply_template(value, _PLACEHOLDERS)


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    part: Part | None  # the MIME leaf it was found in (None: the structure as a whole)
    filename: str  # as sent, or "" when the part has none
    detail: str

    @property
    def label(self) -> str:
        """The file as a reply may name it: printable ASCII, quoted, short."""
        if not self.filename:
            return f"part {self.part.number or '1'}" if self.part is not None else "(message)"
        text = "".join(c if " " <= c <= "~" and c != '"' else "?" for c in self.filename)
        return '"' + (text if len(text) <= 80 else text[:77] + "...") + '"'


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    parts: int = 0
    timed_out: bool = False
    _seen: set[tuple[str, str, str, str]] = field(default_factory=set)

    def add(self, finding: Finding) -> None:
        number = finding.part.number if finding.part is not None else "-"
        key = (finding.rule, number, finding.filename, finding.detail)
        if len(self.findings) < MAX_FINDINGS and key not in self._seen:
            self._seen.add(key)
            self.findings.append(finding)


class _Scan:
    """One message's checks, in the worker thread."""

    def __init__(self, settings: AttachmentSettings, limits: Limits) -> None:
        self.settings = settings
        self.rules = settings.rules
        self.limits = limits
        self.archive_limits = ArchiveLimits(**settings.archives.model_dump())
        self.budget = Budget(settings.archives.max_entries, settings.archives.max_size)
        self.report = Report()

    def part(self, part: Part) -> None:
        names = candidates(part.headers)
        attached = bool(names) or part.disposition == "attachment" or not (
            part.content_type.startswith("text/") or part.content_type.startswith("multipart/"))
        if attached:
            self.item(part, names, part.payload, part.content_type, 0)

    def item(self, part: Part, names: list[str], data: bytes | None, declared: str, level: int) -> None:
        self.limits.check_time()
        shown = names[0] if names else ""
        cleaned = [clean(name) for name in names]
        for name in cleaned:
            if name.tricks:
                self.hit("deceptive_name", part, name.sent, ", ".join(name.tricks))
            for rule in ("executable", "disk_image", "shortcut", "onenote", "html", "svg"):
                if name.extension and name.extension in getattr(self.rules, rule).extensions:
                    self.hit(rule, part, name.sent, f"extension .{name.extension}")
                    if len(name.extensions) >= 2:
                        self.hit("deceptive_name", part, name.sent,
                                 "double extension ." + ".".join(name.extensions[-2:]))
        if data is None:
            return
        detected = detect(data)
        named = any(name.extension for name in cleaned)
        for rule in ("executable", "disk_image", "shortcut", "onenote", "html", "svg"):
            if rule in ("html", "svg") and named:
                continue  # opened by its extension's program, not a browser (HTML saved as .xls)
            if detected in getattr(self.rules, rule).types:
                self.hit(rule, part, shown, f"content is {detected}")
        if not same_type(declared, detected):
            self.hit("type_mismatch", part, shown, f"declared {declared}, content is {detected}")
        for name in cleaned:
            promised = type_of_name(name.extension)
            if promised and not same_type(promised, detected):
                self.hit("type_mismatch", part, name.sent, f"name says {promised}, content is {detected}")
        extension = cleaned[0].extension if cleaned else ""
        if is_office(detected, extension):
            office = office_check(data, shown)
            if office.encrypted:
                self.hit("encrypted_office", part, shown, "password-protected")
            if office.macros:
                self.hit("office_macros", part, shown, "VBA or Excel 4 macros")
            if office.unreadable:
                self.hit("malformed", part, shown, office.unreadable)
            return
        kind = kind_of(detected)
        if kind is not None:
            self.archive(part, kind, data, shown, level + 1)

    def archive(self, part: Part, kind: str, data: bytes, shown: str, level: int) -> None:
        if level > self.archive_limits.max_depth:
            if self.archive_limits.max_depth > 0:
                self.hit("archive_bomb", part, shown,
                         f"archives nested more than {self.archive_limits.max_depth} deep")
            return
        if self.budget.entries < 0 or self.budget.size < 0:
            return  # the message's archive budget is spent and archive_bomb already found
        found = listing(kind, data, shown, limits=self.archive_limits, budget=self.budget, scan=self.limits)
        if found.encrypted:
            self.hit("encrypted_archive", part, shown, f"{kind} with encrypted file names")
        if found.unreadable:
            self.hit("malformed", part, shown, found.unreadable)
        for entry in found.entries:
            if entry.encrypted:
                self.hit("encrypted_archive", part, shown, f"{kind} entry {entry.name!r} is encrypted")
            inside = f"{shown or 'archive'}/{entry.name}" if entry.name else ""
            self.item(part, [inside] if inside else [], entry.data, "", level)
        if found.bomb:
            self.hit("archive_bomb", part, shown, found.bomb)

    def hit(self, rule: str, part: Part | None, filename: str, detail: str) -> None:
        self.report.add(Finding(rule, part, filename, detail))


def scan(raw: bytes, settings: AttachmentSettings, stop: threading.Event | None = None) -> Report:
    """Every finding in ``raw``; blocking (run it in a worker). Never raises for any input."""
    limits = Limits(settings.max_parts, settings.max_depth, settings.max_decoded_size,
                    time.monotonic() + settings.timeout, stop)
    checks = _Scan(settings, limits)
    report = checks.report
    try:
        tree = walk(raw, limits)
        report.parts = len(tree.parts)
        if tree.too_complex:
            checks.hit("too_complex", None, "", tree.too_complex)
        for problem in tree.malformed:
            checks.hit("malformed", None, "", problem)
        for part in tree.parts:
            checks.part(part)
    except ScanTimeout:
        report.timed_out = True
    except RecursionError:  # a library recursing on hostile nesting: the structure is the problem
        checks.hit("too_complex", None, "", "nesting too deep for the parser")
    return report


class Attachments:
    """The plugin: scan in a worker, then one verdict from the findings and the rules' actions."""

    Settings = AttachmentSettings

    def __init__(self, settings: AttachmentSettings) -> None:
        self.settings = settings

    def action(self, rule: str) -> RuleAction:
        action: RuleAction = getattr(self.settings.rules, rule).action
        return action

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> Verdict | None:
        raw = message.raw
        stop = threading.Event()
        try:
            async with asyncio.timeout(self.settings.timeout + 0.5):  # the scan's own deadline first
                report = await run_blocking(scan, raw, self.settings, stop)
        except TimeoutError:
            report = Report(timed_out=True)
        finally:
            stop.set()  # a scan still running stops at its next checkpoint
        return self.decide(transaction, message, report)

    def decide(self, transaction: Transaction, message: Message, report: Report) -> Verdict | None:
        s = self.settings
        refused = any(self.action(f.rule) == "reject" for f in report.findings)
        if report.timed_out and not refused:  # what was found before time ran out may decide
            log.warning("attachments", tx=transaction.id, result="timeout", action=s.on_timeout,
                        seconds=s.timeout)
            verdict = verdict_for(
                s.on_timeout, reject_text=s.reject_text.format_map(_values(None)),
                tempfail_text=s.tempfail_text.format_map(_values(None)),
                reason=f"attachment scan took more than {s.timeout} s", tags=("attachments:timeout",),
            )
            return verdict
        if not report.findings:
            log.debug("attachments", tx=transaction.id, result="clean", parts=report.parts)
            return None
        by_action: dict[str, list[Finding]] = {}
        score = 0.0
        scored: set[str] = set()
        for finding in report.findings:
            action = self.action(finding.rule)
            if action == "strip" and not _strippable(finding):
                action = "reject"  # nothing to cut out: the message as a whole must go
            if isinstance(action, float | int):
                if finding.rule not in scored:
                    scored.add(finding.rule)
                    score += float(action)
                continue
            by_action.setdefault(action, []).append(finding)
        rules = sorted({f.rule for f in report.findings})
        tags = tuple(f"attachments:{rule}" for rule in rules)
        reason = "attachments: " + "; ".join(
            f"{f.rule} {f.label}: {f.detail}" for f in report.findings[:10])
        for action in ("reject", "tempfail", "quarantine"):
            if action in by_action:
                first = by_action[action][0]
                verdict = verdict_for(
                    "reject" if action == "reject" else "tempfail" if action == "tempfail" else "quarantine",
                    reject_text=s.reject_text.format_map(_values(first)),
                    tempfail_text=s.tempfail_text.format_map(_values(first)), reason=reason, tags=tags,
                )
                assert verdict is not None
                self._log(transaction, action, report, rules=rules, score=score)
                return verdict
        if "strip" in by_action:
            stripped = _strip(message, by_action["strip"], s.notice)
            self._log(transaction, "strip", report, rules=rules, score=score, stripped=stripped)
            return Verdict.cont(score=score, reason=reason, tags=(*tags, "attachments:stripped"))
        self._log(transaction, "continue", report, rules=rules, score=score)
        return Verdict.cont(score=score, reason=reason, tags=tags)

    def _log(self, transaction: Transaction, action: str, report: Report, *, rules: list[str], score: float,
             stripped: int = 0) -> None:
        files = sorted({f.filename for f in report.findings if f.filename})
        extra: dict[str, object] = {"stripped": stripped} if stripped else {}
        log.info("attachments", tx=transaction.id, result=action, rules=rules, files=files[:10],
                 score=round(score, 3), parts=report.parts, **extra,
                 detail=f"{report.findings[0].rule}: {report.findings[0].detail}")


def _values(finding: Finding | None) -> dict[str, str]:
    if finding is None:
        return {"filename": "(message)", "what": "scan time limit", "rule": "timeout"}
    return {"filename": finding.label, "what": RULES[finding.rule], "rule": finding.rule}


def _strippable(finding: Finding) -> bool:
    part = finding.part
    return part is not None and part.span is not None and part.number != ""


def _strip(message: Message, findings: list[Finding], notice: str) -> int:
    """Replace each finding's part by a text/plain notice; every other byte stays. Returns parts cut."""
    raw = message.raw
    body_offset = len(raw) - len(message.body)
    spans: dict[tuple[int, int], Finding] = {}
    for finding in findings:
        assert finding.part is not None and finding.part.span is not None
        spans.setdefault(finding.part.span, finding)
    pieces: list[bytes] = []
    pos = body_offset
    for (start, end), finding in sorted(spans.items()):
        if start < pos:  # inside a part already replaced (cannot happen for leaves; be safe)
            continue
        text = notice.format_map(_values(finding))
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
        pieces += [raw[pos:start], b"Content-Type: text/plain; charset=us-ascii\r\n"
                   b"Content-Disposition: inline\r\nContent-Transfer-Encoding: 7bit\r\n\r\n",
                   text.encode("ascii")]
        pos = end
    pieces.append(raw[pos:])
    message.replace_body(b"".join(pieces))
    return len(spans)
