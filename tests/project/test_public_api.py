"""The first-party plugins and the examples use only the public plugin API.

The public API is what ``smtpproxy`` exports (``smtpproxy.__all__``) and docs/plugins.md
documents; tests of plugin packages may also use ``smtpproxy.pytest_plugin`` (documented in
docs/testing-plugins.md). The plugins in ``plugins/`` are the proof that it suffices: an
import of anything else from smtpproxy fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import smtpproxy
from smtpproxy import pytest_plugin

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "plugins").glob("*.py"), *(ROOT / "examples").rglob("*.py")])

PENDING: set[tuple[str, str]] = set()  # private names a plugin may still use: none


def violations(source: str, *, in_tests: bool) -> list[str]:
    """Every smtpproxy import in ``source`` that is not public, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("smtpproxy.") and not (
                    in_tests and alias.name == "smtpproxy.pytest_plugin"
                ):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            module = node.module
            if module != "smtpproxy" and not module.startswith("smtpproxy."):
                continue
            for alias in node.names:
                if module == "smtpproxy" and alias.name in smtpproxy.__all__:
                    continue
                if (in_tests and module == "smtpproxy.pytest_plugin"
                        and alias.name in pytest_plugin.__all__):
                    continue
                if (module, alias.name) in PENDING:
                    continue
                found.append(f"{node.lineno}: from {module} import {alias.name}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_and_examples_import_only_public_names(path: Path) -> None:
    in_tests = "tests" in path.relative_to(ROOT).parts
    assert violations(path.read_text(), in_tests=in_tests) == []


@pytest.mark.parametrize("line", [
    "from smtpproxy.chain import Chain",
    "from smtpproxy.eventlog import event",
    "from smtpproxy import _private",
    "import smtpproxy.dns",
    "from smtpproxy.pytest_plugin import make_plugin",
])
def test_the_check_catches_internal_imports(line: str) -> None:
    assert violations(line, in_tests=False) != []


def test_the_check_allows_the_public_names() -> None:
    assert violations("from smtpproxy import EventLog, get_resolver, AuthCheck, ip_in_networks\n"
                      "import smtpproxy\n", in_tests=False) == []
    assert violations("from smtpproxy.pytest_plugin import make_plugin", in_tests=True) == []


def test_every_public_name_is_documented_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    documented = set(re.findall(r"`(?:smtpproxy\.)?([A-Za-z_]\w*)", guide))
    missing = sorted(set(smtpproxy.__all__) - documented - {"__version__"})
    assert missing == []
