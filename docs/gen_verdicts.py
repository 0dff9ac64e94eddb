"""Generate docs/verdicts.md from the docstrings of the plugin API (the one source).

Covers what a hook returns (``smtpproxy/verdicts.py``) and what it reads and records
(``smtpproxy/session.py``, ``smtpproxy/message.py``, ``smtpproxy/addresses.py``).
Run ``python docs/gen_verdicts.py > docs/verdicts.md``; a test keeps the page in step.

Attribute docstrings (a string right after ``x: int = 0`` or ``self.x = ...``) are not
kept at run time, so they are read from the source with :mod:`ast`.
"""

from __future__ import annotations

import ast
import enum
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

from rest2md import rest_to_markdown

from smtpproxy import addresses, message, session, verdicts


def doc(obj: object) -> str:
    return rest_to_markdown(inspect.cleandoc(inspect.getdoc(obj) or ""))


def attributes(cls: type) -> list[tuple[str, str, str]]:
    """(name, type, doc) of the attributes a class declares, in source order.

    Class-body annotations (dataclasses, enums) and ``self.x = ...`` in ``__init__`` both
    count; a docstring is the string literal right under the assignment. An unannotated
    ``self.x = x`` takes the type of the ``__init__`` parameter ``x``.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    found: dict[str, tuple[str, str]] = {}

    def docstring(node: ast.stmt | None) -> str:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            return rest_to_markdown(inspect.cleandoc(node.value.value))
        return ""

    def scan(body: list[ast.stmt], params: dict[str, str] | None) -> None:
        for stmt, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(stmt, ast.AnnAssign):
                targets, kind = [stmt.target], ast.unparse(stmt.annotation)
            elif isinstance(stmt, ast.Assign):
                targets, kind = stmt.targets, ""
            else:
                continue
            for target in targets:
                if params is None and isinstance(target, ast.Name):
                    name = target.id
                elif (params is not None and isinstance(target, ast.Attribute)
                      and isinstance(target.value, ast.Name) and target.value.id == "self"):
                    name = target.attr
                    kind = kind or _value_type(stmt.value, params)
                else:
                    continue
                if not name.startswith("_") and name not in found:
                    found[name] = (kind, docstring(after))

    scan(class_def.body, None)
    for stmt in class_def.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
            params = {a.arg: ast.unparse(a.annotation) for a in (*stmt.args.args, *stmt.args.kwonlyargs)
                      if a.annotation is not None}
            scan(stmt.body, params)
    return [(name, kind, text) for name, (kind, text) in found.items()
            if name not in {"__slots__", "__all__"}]


def _value_type(value: ast.expr | None, params: dict[str, str]) -> str:
    """The obvious type of ``self.x = <value>``: a parameter's, a literal's or a constructor's."""
    if isinstance(value, ast.Name):
        return params.get(value.id, "")
    if isinstance(value, ast.Constant) and value.value is not None:
        return type(value.value).__name__
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id[:1].isupper():
        return value.func.id
    return ""


def _public_members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_") or name in {"Settings"}:
            continue
        if isinstance(member, (property, classmethod, staticmethod)) or inspect.isfunction(member):
            yield name, member


def _signature(name: str, func: Callable[..., Any], *, drop_first: bool) -> str:
    """``name(a: int = 1, *, b: str = 'x') -> T``; annotations are strings (postponed), defaults repr."""
    sig = inspect.signature(func)
    parts: list[str] = []
    star_done = False
    for param in list(sig.parameters.values())[1 if drop_first else 0:]:
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done = star_done or param.kind in (param.KEYWORD_ONLY, param.VAR_POSITIONAL)
        text = param.name if param.kind is not param.VAR_POSITIONAL else f"*{param.name}"
        if param.annotation is not param.empty:
            text += f": {param.annotation}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    returns = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"{name}({', '.join(parts)}){returns}"


def render_class(cls: type, *, heading: str = "###") -> list[str]:
    out = [f"{heading} `{cls.__name__}`", "", doc(cls), ""]
    declared = attributes(cls)
    if issubclass(cls, enum.Enum):
        docs = {name: text for name, _, text in declared}
        out += ["| member | value | meaning |", "| --- | --- | --- |"]
        for member in cls:
            out.append(f"| `{member.name}` | `{member.value!r}` | {docs.get(member.name, '')} |")
        out.append("")
    elif declared:
        out += ["| attribute | type | meaning |", "| --- | --- | --- |"]
        out += [f"| `{name}` | {f'`{kind}`' if kind else ''} | {text} |" for name, kind, text in declared]
        out.append("")
    for name, member in _public_members(cls):
        if isinstance(member, property):
            assert member.fget is not None
            returns = inspect.signature(member.fget).return_annotation
            kind = f" → `{returns}`".replace("'", "") if returns is not inspect.Signature.empty else ""
            out += [f"- **`{name}`** (property){kind}: {doc(member.fget) or '—'}"]
        elif isinstance(member, classmethod):
            out += [f"- **`{cls.__name__}.{_signature(name, member.__func__, drop_first=True)}`**: "
                    f"{doc(member.__func__) or '—'}"]
        elif isinstance(member, staticmethod):
            out += [f"- **`{cls.__name__}.{_signature(name, member.__func__, drop_first=False)}`**: "
                    f"{doc(member.__func__) or '—'}"]
        else:
            out += [f"- **`{_signature(name, member, drop_first=True)}`**: {doc(member) or '—'}"]
    if out[-1] != "":
        out.append("")
    return [_indent_continuations(line) for line in out]


def _indent_continuations(line: str) -> str:
    """Keep multi-paragraph docstrings inside their list item (4 spaces) or table cell."""
    if line.startswith("- **"):
        return re.sub(r"\n +(?=\n)", "\n", line.replace("\n", "\n    "))
    if line.startswith("| "):
        return line.replace("\n\n", "<br><br>").replace("\n", " ")
    return line


def render() -> str:
    out = [
        "# Verdict reference",
        "",
        "<!-- Generated by docs/gen_verdicts.py from the docstrings in smtpproxy/verdicts.py, "
        "session.py, message.py and addresses.py. Do not edit. -->",
        "",
        "Everything here is importable from the top level: `from smtpproxy import Verdict, "
        "Action, Session, ...`. How each verdict acts in each phase (connect, helo, mail_from, "
        "rcpt_to, data) is tabled in [Writing plugins](plugins.md#verdicts); the hooks and their "
        "arguments are in the [hook reference](hooks.md).",
        "",
        "## What a hook returns",
        "",
        doc(verdicts),
        "",
    ]
    for cls in (verdicts.Verdict, verdicts.Action, verdicts.Reply):
        out += render_class(cls)
    out += [
        "## What the chain records",
        "",
        "Every hook call becomes an `Outcome` in `session.results` (connect, helo) or "
        "`transaction.results` (the rest); the end of each message is a `Decision`.",
        "",
    ]
    for cls in (session.Outcome, session.Results, session.Decision):
        out += render_class(cls)
    out += ["## What a hook reads", "", doc(session), ""]
    for cls in (session.Session, session.Client, session.TLSInfo, session.Transaction,
                session.Envelope, session.Recipient, session.EnvelopeChange, addresses.Address):
        out += render_class(cls)
    out += ["## The message", "", doc(message), ""]
    for cls in (message.Message, message.Change, message.HeaderError):
        out += render_class(cls)
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
