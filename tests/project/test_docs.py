"""The documentation says what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


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


# -- the docs site ---------------------------------------------------------------------------


def test_verdict_reference_is_generated_from_docstrings() -> None:
    generated = subprocess.run(
        [sys.executable, "docs/gen_verdicts.py"], cwd=ROOT, capture_output=True, text=True,
    )
    assert generated.returncode == 0, generated.stderr
    assert (ROOT / "docs" / "verdicts.md").read_text() == generated.stdout, (
        "docs/verdicts.md is stale: python docs/gen_verdicts.py > docs/verdicts.md"
    )


def test_docs_site_builds_strict_with_every_page_in_the_nav(tmp_path: Path) -> None:
    import os

    import yaml

    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    # --strict only warns about pages left out of the nav when told to; check it directly.
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav: object) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, list):
            return set().union(*(pages(item) for item in nav))
        if isinstance(nav, dict):
            return set().union(*(pages(value) for value in nav.values()))
        return set()

    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - pages(site["nav"]) == set(), "pages missing from the nav in mkdocs.yml"
    assert (tmp_path / "site" / "tutorial" / "index.html").exists()


def _titled_blocks(page: str) -> dict[str, str]:
    """Code blocks written as ```lang title="name" in a docs page, by title."""
    import re

    return {title: body for title, body in re.findall(r'```\w+ title="([^"]+)"\n(.*?)```', page, re.S)}


async def test_tutorial_plugin_runs_in_a_real_proxy_session(tmp_path: Path) -> None:
    """Every file of docs/tutorial.md, run as the page says (only the port is made free)."""
    import asyncio
    import os
    import re
    import tomllib

    import yaml

    from smtpproxy.config import load_config
    from smtpproxy.server import ProxyServer
    from tests.conftest import maildir_messages, port_of

    page = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = _titled_blocks(page)
    assert "touch src/acme_filters/__init__.py" in page
    for title in ("pyproject.toml", "src/acme_filters/attachments.py", "try.yaml", "try_it.py",
                  "tests/plugins/test_attachments.py"):
        (tmp_path / title).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / title).write_text(blocks[title])
    (tmp_path / "src" / "acme_filters" / "__init__.py").write_text("")

    # What `pip install -e .` would register: the entry point names the class.
    entry_points = tomllib.loads(blocks["pyproject.toml"])["project"]["entry-points"]["smtpproxy.plugins"]
    config_data = yaml.safe_load(blocks["try.yaml"])
    assert config_data["listeners"][0]["port"] == 2525
    config_data["listeners"][0]["port"] = 0
    for spec in config_data["plugins"]:
        spec.setdefault("use", entry_points[spec["name"]])
    (tmp_path / "try.yaml").write_text(yaml.safe_dump(config_data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(ROOT)])}

    # Step 4: check-config says what the page says.
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    check = await asyncio.to_thread(run, "-m", "smtpproxy", "check-config", "-c", "try.yaml")
    assert check.returncode == 0, check.stderr
    assert check.stdout == blocks["check-config output"]

    # Step 5: a real proxy built from try.yaml (chain via the registry), real smtplib client.
    sys.path.insert(0, str(tmp_path / "src"))
    try:
        config, source = load_config(tmp_path / "try.yaml")
        server = ProxyServer(config, source)
        await server.start()
        try:
            script = blocks["try_it.py"].replace("2525", str(port_of(server)))
            (tmp_path / "try_it.py").write_text(script)
            client = await asyncio.create_subprocess_exec(
                sys.executable, "try_it.py", cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(client.communicate(), 30)
        finally:
            await server.stop(grace=1)
    finally:
        sys.path.remove(str(tmp_path / "src"))
        for name in [m for m in sys.modules if m == "acme_filters" or m.startswith("acme_filters.")]:
            del sys.modules[name]
    assert client.returncode == 0, err.decode()
    assert out.decode() == blocks["try_it.py output"]
    delivered = maildir_messages(tmp_path / "mail")
    assert len(delivered) == 1 and b"Subject: Here is report.pdf" in delivered[0]
    assert re.search(rb'filename="?report\.pdf', delivered[0])

    # Step 6: the reader's own tests pass.
    tests = await asyncio.to_thread(run, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout


async def test_exchange_guide_config_writes_the_received_field(tmp_path: Path) -> None:
    """The Exchange page's configuration loads, and behind client_identity: none the proxy's
    own Received: field names the real client (upstream: a real aiosmtpd sink)."""
    import re
    from email.utils import parsedate_to_datetime

    import yaml

    from smtpproxy.config import load_config
    from smtpproxy.server import ProxyServer
    from tests.conftest import Talk, port_of, start_sink

    guide = (ROOT / "docs" / "deploy-exchange.md").read_text()
    full = next(b for b in re.findall(r"```yaml\n(.*?)```", guide, re.S) if b.startswith("hostname:"))
    data = yaml.safe_load(full)
    assert data["delivery"]["client_identity"] == "none" and data["delivery"]["rcpt_mode"] == "relay"
    assert data["received_header"] == "auto"

    sink = await start_sink()
    data["listeners"] = [{"address": "127.0.0.1", "port": 0}]
    data["relay"]["domains"] = ["example.com"]
    data["delivery"].update(host="127.0.0.1", port=sink.port, tls="none")
    data["delivery"].pop("tls_hostname")
    data["plugins"] = []  # the mail-auth plugins need DNS; their own tests cover them
    (tmp_path / "smtpproxy.yaml").write_text(yaml.safe_dump(data))
    config, source = load_config(tmp_path / "smtpproxy.yaml")
    server = ProxyServer(config, source)
    await server.start()
    try:
        talk = await Talk.open(port_of(server))
        code, _ = await talk.hello("mail.client.test")
        assert code == 250
        code, text = await talk.send_message(
            "alice@client.test", ["bob@example.com"], b"Subject: hi\r\n\r\nHello\r\n")
        assert code == 250, text
        await talk.close()
    finally:
        await server.stop(grace=1)
        sink.server.close()
    [received] = sink.messages
    head = received.content.split(b"\r\nSubject: hi", 1)[0].decode()
    match = re.fullmatch(
        r"Received: from mail\.client\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
        r"\tby mx1\.example\.com \(smtpproxy\) with ESMTP id [0-9a-f]+\.1\r\n"
        r"\tfor <bob@example\.com>; (.+)", head)
    assert match, head
    assert parsedate_to_datetime(match.group(1)).tzinfo is not None
