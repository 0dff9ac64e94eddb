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


def test_deploy_postfix_guide_config_is_valid_and_names_real_postfix_parameters(tmp_path: Path) -> None:
    import re
    import shutil

    from smtpproxy.config import load_config

    guide = (ROOT / "docs" / "deploy-postfix.md").read_text()
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", guide, re.S)
    full = next(b for b in yaml_blocks if b.startswith("hostname:"))
    (tmp_path / "smtpproxy.yaml").write_text(full)
    config, _ = load_config(tmp_path / "smtpproxy.yaml")
    assert config.delivery.type == "smtp" and config.delivery.client_identity == "xclient"
    assert config.delivery.rcpt_mode == "relay"
    params = set(re.findall(r"^(smtpd_\w+) =", guide, re.M))
    assert {"smtpd_authorized_xclient_hosts", "smtpd_tls_chain_files"} <= params
    if shutil.which("postconf") is None:
        return  # parameter names are checked wherever Postfix is installed (CI installs it)
    for name in sorted(params):
        known = subprocess.run(["postconf", "-d", name], capture_output=True, text=True)
        assert known.returncode == 0 and known.stdout.startswith(name), f"unknown Postfix parameter {name}"
