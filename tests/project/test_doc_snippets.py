"""Every command line and configuration snippet in README.md and docs/ is one the code accepts.

- each ``smtpproxy ...`` line of a shell block parses with the real argument parser, and each
  inline ``smtpproxy ...`` names a real subcommand and real options; ``--help`` works for
  every subcommand;
- each YAML block that is an smtpproxy configuration passes ``smtpproxy check-config``, with
  the files it names made real in a sandbox (``/etc/`` mapped into it, keys generated) and
  the environment variables it reads set. Only plugins the page itself invents (a package
  the reader writes) may be missing, and they are listed here by name.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from smtpproxy import cli
from smtpproxy.config import Config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`(smtpproxy [^`]+)`")
SHELL = {"sh", "bash", "shell", "console"}

# Plugin packages a page asks the reader to write; a snippet may name them without them existing.
INVENTED = {"mypackage", "mycompany", "smtpproxy_exchange", "block_executables", "subjects"}
# YAML blocks that configure something else (Prometheus).
FOREIGN = {"scrape_configs"}
ENVIRONMENT = {"UPSTREAM_HOST": "127.0.0.1", "REDIS_URL": "redis://127.0.0.1:6379/0",
               "RATELIMIT_REDIS_URL": "redis://127.0.0.1:6379/1", "LDAP_PASSWORD": "secret"}


def _where(page: Path, text: str, pos: int) -> str:
    return f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, pos) + 1}"


def _blocks(kinds: set[str]) -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) in kinds:
                found.append((_where(page, text, match.start()), match.group(1), match.group(2)))
    return found


def _command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for where, _, body in _blocks(SHELL):
        for line in body.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\||;|\|", line):
                try:
                    words = shlex.split(command, comments=True)
                except ValueError:
                    continue
                if words and (words[0] == "smtpproxy" or words[0].endswith("/bin/smtpproxy")):
                    lines.append((where, words[1:]))
    return lines


COMMANDS = _command_lines()
YAML_BLOCKS = [(where, body) for where, _, body in _blocks({"yaml", "yml"}) if "--8<--" not in body]


def test_the_pages_have_commands_and_configs() -> None:
    assert len(COMMANDS) >= 20
    assert len(YAML_BLOCKS) >= 40


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w} {' '.join(a)[:40]}" for w, a in COMMANDS])
def test_every_command_line_parses(where: str, argv: list[str]) -> None:
    try:
        args = cli._parse(argv)
    except SystemExit as exc:
        if exc.code == 0 and argv in (["--version"], ["--help"]):
            return  # argparse's own actions: they print and exit 0
        pytest.fail(f"{where}: smtpproxy {' '.join(argv)} does not parse (exit {exc.code})")
    assert args.command


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_subcommands() -> list[list[str]]:
    out = []
    for name, sub in _subparsers(cli._parser()).items():
        out.append([name])
        out.extend([name, inner] for inner in _subparsers(sub))
    return out


@pytest.mark.parametrize("words", _all_subcommands(), ids=" ".join)
def test_every_subcommand_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli._parse([*words, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: smtpproxy {' '.join(words)}")


def _inline_mentions() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in INLINE.finditer(text):
            found.append((_where(page, text, match.start()), shlex.split(match.group(1))[1:]))
    return found


@pytest.mark.parametrize(("where", "words"), _inline_mentions(), ids=lambda v: str(v)[:50])
def test_every_inline_command_names_real_subcommands_and_options(where: str, words: list[str]) -> None:
    parser = cli._parser()
    if words in (["--version"], ["--help"]):
        assert words[0] in {opt for action in parser._actions for opt in action.option_strings}
        return
    subcommands = _subparsers(parser)
    assert words and words[0] in subcommands, f"{where}: no subcommand {words[:1]}"
    sub = subcommands[words[0]]
    inner = _subparsers(sub)
    if inner and len(words) > 1 and not words[1].startswith("-"):
        for alternative in words[1].split("|"):  # `quarantine list|show|release`
            assert alternative in inner, f"{where}: no subcommand {words[0]} {alternative}"
        sub = inner[words[1].split("|")[0]]
    known = {opt for action in sub._actions for opt in action.option_strings}
    for word in words:
        if word.startswith("-") and word != "-":
            assert word.split("=")[0] in known, f"{where}: smtpproxy {words[0]} has no option {word}"


def _materialise(data: Any, sandbox: Path, key: str = "", parent: dict[str, Any] | None = None) -> None:
    """Create every file or directory the snippet names, with content the loader accepts."""
    if isinstance(data, dict):
        for k, v in data.items():
            _materialise(v, sandbox, k, data)
        return
    if isinstance(data, list):
        for item in data:
            _materialise(item, sandbox, key, parent)
        return
    files = {"key_file", "file", "ca_file", "cert", "key", "plugin_paths", "users_file", "keys", "users"}
    if parent is not None and "base_url" in parent:
        files.add("template")  # digest.template (elsewhere a template is text)
    if not isinstance(data, str) or key not in files:
        return
    if key == "key" and not (parent and "cert" in parent):
        return  # "key:" of a ratelimit rule is not a file
    path = Path(data) if Path(data).is_absolute() else sandbox / data
    path.parent.mkdir(parents=True, exist_ok=True)
    if key == "plugin_paths":
        path.mkdir(exist_ok=True)
    elif key == "key_file" and parent and parent.get("algorithm") == "ed25519-sha256":
        path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif key == "key_file":
        path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif key == "ca_file":
        trustme.CA().cert_pem.write_to_path(str(path))
    elif key == "users":  # console.users: the web console's accounts
        path.write_text(f"root:{bcrypt.hashpw(b'x', bcrypt.gensalt(rounds=4)).decode()}:admin\n")
    elif key == "users_file":
        path.write_text(f"alice:{bcrypt.hashpw(b'x', bcrypt.gensalt(rounds=4)).decode()}\n")
    elif key in {"cert", "key"}:
        issued = trustme.CA().issue_cert("mx1.example.com")
        (issued.cert_chain_pems[0] if key == "cert" else issued.private_key_pem).write_to_path(str(path))
    elif key == "keys":
        path.write_text("0" * 64)  # a digest link key
    else:
        path.write_text("# made by tests/project/test_doc_snippets.py\n")


@pytest.mark.parametrize(("where", "body"), YAML_BLOCKS, ids=[w for w, _ in YAML_BLOCKS])
def test_every_config_snippet_passes_check_config(
    where: str, body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(body)
    assert isinstance(data, dict), f"{where}: not a YAML mapping"
    if set(data) & FOREIGN:
        return
    unknown = set(data) - set(Config.model_fields)
    assert not unknown, f"{where}: not smtpproxy configuration keys: {sorted(unknown)}"
    text = body.replace("/etc/", f"{tmp_path}/etc/")  # the snippet's /etc/ lives in the sandbox
    _materialise(yaml.safe_load(text), tmp_path)
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(text)
    code = cli.main(["check-config", "-c", str(config)])
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines()[1:] if line.strip()]
    missing = [re.search(r"(?:cannot import|no installed plugin named) '(\w+)", p) for p in problems]
    invented = [p for p, m in zip(problems, missing, strict=True) if m is not None and m.group(1) in INVENTED]
    assert code == 0 or (code == 2 and problems and problems == invented), f"{where}:\n{err}"


def test_every_first_party_plugin_is_named_in_the_readme_and_has_a_docs_page() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="smtpproxy.plugins") if ep.value.startswith("smtpproxy_plugins.")}
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "plugins").glob("*.md"))
    readme = (ROOT / "README.md").read_text()
    assert sorted(n for n in names if not re.search(rf"- name: {n}\b", pages)) == []
    assert sorted(n for n in names if f"`{n}`" not in readme) == []


def test_the_plugin_guides_settings_typo_example_prints_what_the_page_says(tmp_path: Path) -> None:
    """docs/plugins.md's complete plugin, its configuration with ``phrase:`` for ``phrases:``,
    and ``smtpproxy check-config``'s output: exactly the page's text block."""
    import os
    import subprocess
    import sys

    page = (ROOT / "docs" / "plugins.md").read_text()
    section = page.split("## A complete plugin", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n# mycompany/filters\.py\n(.*?)^```", section, re.S | re.M)
    config = re.search(r"```yaml\n(.*?)^```", section, re.S | re.M)
    said = re.search(r"With `phrase:` written for\s+`phrases:` in the configuration above:\n+```text\n(.*?)^```",
                     section, re.S | re.M)
    assert code and config and said, "docs/plugins.md: the example's code, YAML or output block moved"
    (tmp_path / "mycompany").mkdir()
    (tmp_path / "mycompany" / "__init__.py").write_text("")
    (tmp_path / "mycompany" / "filters.py").write_text(code.group(1))
    assert "phrases:" in config.group(1)
    (tmp_path / "smtpproxy.yaml").write_text(config.group(1).replace("phrases:", "phrase:"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c", "smtpproxy.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert run.returncode == 2
    assert run.stderr == said.group(1)
    # and as written (phrases:), it loads
    (tmp_path / "smtpproxy.yaml").write_text(config.group(1))
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c", "smtpproxy.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
