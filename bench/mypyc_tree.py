"""A copy of a commit with its hot modules compiled by mypyc: what a compiled core would gain.

Issue 31's remaining targets left "a compiled core" as an open question. mypyc (part of mypy,
which the test extra installs) compiles type-annotated modules to C extensions without a rewrite;
this builds such a tree, for the pair scripts to measure against the same commit uncompiled:

    python bench/mypyc_tree.py /tmp/compiled                 # HEAD; --commit REV for another
    python bench/postfix_pairs.py --before /tmp/compiled --system proxy --rounds 12
    python bench/sink_pairs.py --before /tmp/compiled --reuse --rounds 10

A is then the compiled tree. The 2026-12-07 14:30 section of bench/README.md has the results.

What mypyc does not take as the code is written, changed in the copy only (and :data:`PATCHES`
fails loudly when a line it changes is gone):

- string literals with lone surrogates (two patterns): built with ``chr()`` instead;
- classes whose instances are made or changed behind their constructor's back
  (``object.__new__`` in ``Address._checked``, ``__class__ =`` in ``adopt()``) or that need a
  Python class's ``__init__`` conventions (``InboundSMTP`` calls
  ``StreamReaderProtocol.__init__``): kept as Python classes (``native_class=False``), with their
  methods compiled.

Not compiled: ``message.py`` (mypyc 2.x fails on ``Message`` as a Python class, and as a native
one its ``Message.__new__`` shortcut does not work) and ``eventlog.py`` (``_EventName`` is a
``str`` subclass). Needs a C compiler and the Python headers; takes about two minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES = [
    "smtpproxy/addresses.py", "smtpproxy/datareader.py", "smtpproxy/replywire.py",
    "smtpproxy/inbound.py", "smtpproxy/conversation.py", "smtpproxy/session.py",
    "smtpproxy/outcome.py", "smtpproxy/verdicts.py", "smtpproxy/disposal.py",
    "smtpproxy/delivery/pipelining.py", "smtpproxy/delivery/stream.py",
    "smtpproxy/delivery/smtp.py", "smtpproxy/delivery/upstream.py",
    "smtpproxy/delivery/handover.py", "smtpproxy/delivery/identity.py",
]

_PYTHON_CLASS = "from mypy_extensions import mypyc_attr\n@mypyc_attr(native_class=False)\n"

PATCHES: dict[str, list[tuple[str, str]]] = {
    "smtpproxy/addresses.py": [
        ('re.compile("[\\ud800-\\udfff]")', 're.compile("[" + chr(0xD800) + "-" + chr(0xDFFF) + "]")'),
        ("@dataclass(frozen=True, slots=True)\nclass Address:",
         _PYTHON_CLASS + "@dataclass(frozen=True, slots=True)\nclass Address:"),
    ],
    "smtpproxy/delivery/upstream.py": [
        ('re.compile("[\\udc80-\\udcff]")', 're.compile("[" + chr(0xDC80) + "-" + chr(0xDCFF) + "]")'),
    ],
    "smtpproxy/inbound.py": [
        ("\nclass InboundSMTP(CommandServer):", "\n" + _PYTHON_CLASS + "class InboundSMTP(CommandServer):"),
    ],
    "smtpproxy/delivery/pipelining.py": [
        ("\nclass PipeliningProtocol(SMTPProtocol):",
         "\n" + _PYTHON_CLASS + "class PipeliningProtocol(SMTPProtocol):"),
    ],
}

# What the build needs of [tool.mypy] (its overrides: libraries without type information),
# in a file of its own: the build must not read pyproject.toml, whose license table the
# setuptools mypyc drives refuses.
MYPY_INI = """[mypy]
python_version = 3.11
ignore_missing_imports = True
"""


def patch(tree: Path) -> None:
    for name, changes in PATCHES.items():
        path = tree / name
        text = path.read_text(encoding="utf-8")
        for old, new in changes:
            if text.count(old) != 1:
                raise SystemExit(f"mypyc_tree: {name}: expected one {old!r}; update PATCHES")
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("output", type=Path, help="a new directory for the compiled tree")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args(argv)
    out = args.output.resolve()
    if out.exists():
        raise SystemExit(f"mypyc_tree: {out} exists")
    git = subprocess.run(["git", "-C", str(ROOT), "archive", args.commit], capture_output=True)
    if git.returncode != 0:
        raise SystemExit(f"mypyc_tree: git archive {args.commit}: {git.stderr.decode().strip()}")
    out.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=git.stdout, check=True)
    patch(out)
    pyproject = out / "pyproject.toml"
    hidden = out / "pyproject.toml.hidden"
    pyproject.rename(hidden)
    (out / "mypy.ini").write_text(MYPY_INI, encoding="utf-8")
    try:
        subprocess.run([sys.executable, "-m", "mypyc", *MODULES], cwd=out, check=True)
    finally:
        hidden.rename(pyproject)
        shutil.rmtree(out / "build", ignore_errors=True)
    built = sorted(p.relative_to(out) for p in out.glob("smtpproxy/**/*.so"))
    print(f"{len(built)} compiled modules in {out}")
    return 0 if len(built) == len(MODULES) else 1


if __name__ == "__main__":
    sys.exit(main())
