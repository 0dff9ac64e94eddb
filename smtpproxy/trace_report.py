"""``smtpproxy test-message``: traces rendered for people (aligned text) and programs (JSON).

Kept apart from :mod:`smtpproxy.tracer` so the driver stays about SMTP semantics and this
module about files, layout and exit codes.

Exit codes for one message: 0 delivered (would be handed to delivery), 3 rejected, 4 tempfailed,
5 discarded, 6 quarantined; 2 bad usage (unreadable file, bad address, no .eml in a
directory) or configuration; 1 a plugin's ``startup`` failed. For a directory: 0 when
every file was traced (whatever the decisions), 1 when a file could not be read.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from smtpproxy.chain import ENVELOPE_CHANGE_LABELS
from smtpproxy.config import Config, ConfigSource
from smtpproxy.outcome import PROXY
from smtpproxy.startup import StartupError
from smtpproxy.tracer import DISPOSITIONS, Trace, TraceInputError, Tracer

__all__ = [
    "EXIT_CODES",
    "TraceRequest",
    "TracedFile",
    "render_json",
    "render_summary",
    "render_summary_json",
    "render_text",
    "trace_command",
]

EXIT_CODES = {"delivered": 0, "rejected": 3, "tempfailed": 4, "discarded": 5, "quarantined": 6}
EXIT_RUNTIME = 1
EXIT_USAGE = 2

_HEADINGS = ("plugin", "action", "score", "ms", "reply / reason")


@dataclass(frozen=True, slots=True)
class TracedFile:
    """One file of a directory run: its trace, or why it could not be traced."""

    path: str
    trace: Trace | None
    error: str | None = None


def _score(value: float) -> str:
    return f"{value:+g}" if value else ""


def _one_line(text: str) -> str:
    return " | ".join(text.splitlines())


def render_text(trace: Trace, label: str = "") -> str:
    """A readable report: the session, each phase's plugins in aligned columns, changes, decision."""
    out: list[str] = []
    tls = "TLS" if trace.tls else "no TLS"
    auth = f"authenticated as {trace.auth_user}" if trace.auth_user else "not authenticated"
    port = f":{trace.client_port}" if trace.client_port else ""
    if label:
        out.append(f"message   {label} ({trace.size} bytes)")
    out.append(f"client    {trace.client_ip}{port}, HELO {trace.helo}, {tls}, {auth}")
    out.append(f"envelope  <{trace.sender}> -> " + ", ".join(f"<{r}>" for r in trace.recipients))

    rows = [
        (s.plugin, _action(s.action, s.shadow), _score(s.score),
         f"{s.duration_ms:.1f}" if s.plugin != PROXY else "")
        for s in trace.steps
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_HEADINGS[:4])]

    def row(cells: Sequence[str], detail: str) -> str:
        plugin, action, score, ms = cells
        line = (f"    {plugin:<{widths[0]}}  {action:<{widths[1]}}  {score:>{widths[2]}}"
                f"  {ms:>{widths[3]}}  {detail}")
        return line.rstrip()

    for phase in trace.phases:
        out.append("")
        subject = f"  {phase.subject}" if phase.subject else ""
        if not phase.steps:
            if phase.outcome == "discard":
                out.append(f"{phase.phase}{subject}  (not run: discarded in an earlier phase)")
            else:
                out.append(f"{phase.phase}{subject}  (no plugin implements this hook)")
            continue
        out.append(f"{phase.phase}{subject}")
        out.append(row(_HEADINGS[:4], _HEADINGS[4]))
        for step in phase.steps:
            details = []
            if step.reply:
                details.append(_one_line(step.reply))
            if step.reason and (not step.reply or step.reason not in step.reply):
                details.append(step.reason)
            if step.tags:
                details.append("tags " + ",".join(step.tags))
            if step.error:
                details.append(f"ERROR {step.error}")
            out.append(row(
                (step.plugin, _action(step.action, step.shadow), _score(step.score),
                 f"{step.duration_ms:.1f}" if step.plugin != PROXY else ""),
                "; ".join(details),
            ))
            indent = " " * (4 + sum(widths) + 8) + ("undone: " if step.shadow else "")
            out.extend(f"{indent}{change}" for change in step.changes)
        last = phase.steps[-1]
        if phase.outcome != "continue" and (phase.reply != last.reply or phase.outcome != last.action):
            out.append(f"    => {phase.outcome}" + (f": {_one_line(phase.reply)}" if phase.reply else ""))

    if trace.headers_added or trace.headers_removed or trace.body_replaced:
        out.append("")
        out.append("message changes")
        out.extend(f"    + {name}: {value}" for name, value in trace.headers_added)
        out.extend(f"    - {name}: {value}" for name, value in trace.headers_removed)
        if trace.body_replaced:
            out.append("    body replaced")
    if trace.envelope_changes:
        out.append("")
        out.append("envelope changes")
        out.extend(f"    {ENVELOPE_CHANGE_LABELS.get(op, op)} <{address}>  (by {plugin})"
                   for op, address, plugin in trace.envelope_changes)
    if trace.groups:
        out.append("")
        out.append("policy groups")
        out.extend(f"    <{rcpt}>  {group}  ({why})" for rcpt, group, why in trace.groups)
    if trace.refused_recipients:
        out.append("")
        out.append("refused recipients")
        out.extend(f"    <{rcpt}>  {_one_line(reply)}  (by {by})"
                   for rcpt, reply, by in trace.refused_recipients)
    if trace.routes:
        out.append("")
        out.append("would deliver")
        out.extend(f"    {route.name} -> {route.destination}: "
                   + ", ".join(f"<{r}>" for r in route.recipients) for route in trace.routes)
    if trace.notes:
        out.append("")
        out.append("notes")
        out.extend(f"    {note}" for note in trace.notes)

    out.append("")
    by = trace.decided_by
    if trace.decision == "delivered":
        by = f"{by} (no plugin objected; the upstream's answer would decide)"
    out.append(f"decision  {trace.decision.upper()}  {_one_line(trace.reply)}")
    details = [f"by {by}"]
    if trace.reason:
        details.append(f"reason: {trace.reason}")
    details.append(f"score {trace.score:g}")
    if trace.tags:
        details.append("tags " + ",".join(trace.tags))
    details.append(f"{trace.duration_ms:.1f} ms")
    out.append("          " + "; ".join(details))
    if trace.shadowed:
        out.append(f"shadow    would be {trace.would.upper()}  {_one_line(trace.would_reply or trace.reply)}")
        details = [f"by {trace.would_by}"]
        if trace.would_reason:
            details.append(f"reason: {trace.would_reason}")
        details.append(f"shadow score {trace.shadow_score:g}")
        details.append("shadowed (enforce: false): " + ", ".join(trace.shadowed))
        out.append("          " + "; ".join(details))
    return "\n".join(out) + "\n"


def _action(action: str, shadow: bool) -> str:
    """A step's action; a shadowed plugin's is what it would have done (``shadow:reject``)."""
    return f"shadow:{action}" if shadow else action


def render_json(trace: Trace, label: str = "") -> str:
    data = trace.to_dict()
    if label:
        data = {"file": label, **data}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def render_summary(files: Sequence[TracedFile]) -> str:
    """The directory report: one row per file, then the count of each decision."""
    headings = ("file", "decision", "score", "decided by", "reply")
    rows = []
    for f in files:
        if f.trace is None:
            rows.append((f.path, "error", "", "", f.error or ""))
        else:
            t = f.trace
            rows.append((f.path, t.decision, f"{t.score:g}", t.decided_by, _one_line(t.reply)))
    widths = [max([len(headings[i]), *(len(r[i]) for r in rows)]) for i in range(4)]
    lines = []
    for cells in (headings, *rows):
        lines.append(
            f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}  "
            f"{cells[3]:<{widths[3]}}  {cells[4]}".rstrip()
        )
    counts = Counter(r[1] for r in rows)
    order = [*DISPOSITIONS, "error"]
    parts = [f"{counts[k]} {k}" for k in order if counts[k]]
    lines.append("")
    lines.append(f"{len(rows)} message(s): " + (", ".join(parts) or "none"))
    return "\n".join(lines) + "\n"


def render_summary_json(files: Sequence[TracedFile]) -> str:
    data = []
    for f in files:
        if f.trace is None:
            data.append({"file": f.path, "error": f.error})
        else:
            data.append({"file": f.path, **f.trace.to_dict()})
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """What ``test-message`` was told about the (imagined) client and envelope."""

    sender: str
    recipients: list[str]
    client_ip: str
    client_port: int
    helo: str
    auth_user: str | None
    tls: bool


def trace_command(config: Config, source: ConfigSource | None, path: str, envelope: TraceRequest, *,
                 as_json: bool) -> int:
    """The ``test-message`` command: trace a file, or every ``*.eml`` of a directory."""
    target = Path(path)
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() == ".eml" and p.is_file())
        if not files:
            print(f"smtpproxy: {path}: no *.eml files in this directory", file=sys.stderr)
            return EXIT_USAGE
    else:
        files = [target]
        try:
            target.read_bytes()
        except OSError as exc:
            print(f"smtpproxy: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return asyncio.run(_run(config, source, files, envelope, as_json=as_json,
                                directory=target.is_dir()))
    except TraceInputError as exc:
        print(f"smtpproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"smtpproxy: cannot start the plugins: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


async def _run(config: Config, source: ConfigSource | None, files: list[Path], envelope: TraceRequest, *,
               as_json: bool, directory: bool) -> int:
    traced: list[TracedFile] = []
    async with Tracer.from_config(config, source) as tracer:
        for index, file in enumerate(files, 1):
            label = str(file)
            try:
                raw = await asyncio.to_thread(file.read_bytes)
            except OSError as exc:
                traced.append(TracedFile(label, None, f"cannot read: {exc.strerror or exc}"))
                print(f"[{index}/{len(files)}] {file.name}: cannot read", file=sys.stderr)
                continue
            trace = await tracer.trace(
                raw, sender=envelope.sender, recipients=envelope.recipients,
                client_ip=envelope.client_ip, client_port=envelope.client_port, helo=envelope.helo,
                auth_user=envelope.auth_user, tls=envelope.tls,
            )
            traced.append(TracedFile(label, trace))
            if directory:
                print(f"[{index}/{len(files)}] {file.name}: {trace.decision} (score {trace.score:g}, "
                      f"by {trace.decided_by})", file=sys.stderr, flush=True)
    if directory:
        sys.stdout.write(render_summary_json(traced) if as_json else render_summary(traced))
        return EXIT_RUNTIME if any(f.trace is None for f in traced) else 0
    only = traced[0]
    if only.trace is None:
        print(f"smtpproxy: {only.path}: {only.error}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render_json(only.trace, only.path) if as_json else render_text(only.trace, only.path))
    return EXIT_CODES[only.trace.decision]
