"""The documentation says what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_configuration_reference_is_generated_from_the_models() -> None:
    generated = subprocess.run(
        [sys.executable, "docs/gen_configuration.py"], cwd=ROOT, capture_output=True, text=True,
    )
    assert generated.returncode == 0, generated.stderr
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generated.stdout, (
        "docs/configuration.md is stale: python docs/gen_configuration.py > docs/configuration.md"
    )


def test_readme_quick_start_commands_match_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && smtpproxy run" in readme
    assert "pip install -e '.[test]' && python -m pytest" in readme
    assert ci.rstrip().splitlines()[-1] == "python -m pytest"


def test_hook_reference_is_generated_from_hookspecs() -> None:
    generated = subprocess.run(
        [sys.executable, "docs/gen_hooks.py"], cwd=ROOT, capture_output=True, text=True,
    )
    assert generated.returncode == 0, generated.stderr
    assert (ROOT / "docs" / "hooks.md").read_text() == generated.stdout, (
        "docs/hooks.md is stale: python docs/gen_hooks.py > docs/hooks.md"
    )
