"""Every first-party plugin refuses a bad setting at load time, located by file:line:key.

``smtpproxy check-config`` builds every plugin, so what a plugin's ``Settings`` validators or its
constructor (``SettingsError``) refuse never reaches a message. One bad value per plugin, run
through the real command; plus ``plugin_paths:`` for ``use: module:Class`` next to the config.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from smtpproxy import PluginSettings, SettingsError
from smtpproxy.config import ConfigError, load_config
from smtpproxy.pytest_plugin import make_plugin
from smtpproxy.registry import build_chain

EXE = [sys.executable, "-m", "smtpproxy"]

# (plugin entry point, settings block, expected "line:col: key: message" after the file name)
BAD_SETTINGS = [
    ("headers", 'add:\n  X-Ok: "{client_ip}"\n  X-Bad: "from {client}"',
     r":6:\d+: plugins\[0\]\.settings\.add\.X-Bad: unknown placeholder \{client\}"),
    ("headers", 'add:\n  X-Bad: "{helo.upper}"',
     r":5:\d+: plugins\[0\]\.settings\.add\.X-Bad: unknown placeholder \{helo\.upper\}"),
    ("headers", 'add:\n  X-Bad: "{client_ip"',
     r":5:\d+: plugins\[0\]\.settings\.add\.X-Bad: not a valid template"),
    ("headers", 'add:\n  "Bad Name": "x"',
     r":5:\d+: plugins\[0\]\.settings\.add\[\"Bad Name\"\]: header name may only contain"),
    ("headers", 'remove: ["X-Ok", "Bad:Name"]',
     r":4:\d+: plugins\[0\]\.settings\.remove: .*header name may only contain"),
    ("spf", 'reject_text: "SPF {nope}"',
     r":4:\d+: plugins\[0\]\.settings\.reject_text: .*unknown placeholder \{nope\}"),
    ("dkim_verify", 'require_valid_for: ["not a domain"]',
     r":4:\d+: plugins\[0\]\.settings\.require_valid_for"),
    ("dkim_sign", "keys:\n  - {domain: example.com, selector: s1, key_file: missing.pem}",
     r":5:\d+: plugins\[0\]\.settings\.keys\[0\]\.key_file: .*missing\.pem"),
    ("arc", "seal: {domain: example.com, selector: s1, key_file: missing.pem, authserv_id: mx.example.com}",
     r":4:\d+: plugins\[0\]\.settings\.seal\.key_file: .*missing\.pem"),
    ("dmarc", 'reject_text: "DMARC {nope}"',
     r":4:\d+: plugins\[0\]\.settings\.reject_text: .*\{nope\}"),
    ("auth_results", 'authserv_id: "mx.example.com; x"',
     r":4:\d+: plugins\[0\]\.settings\.authserv_id: "),
    ("ratelimit", 'rules:\n  - {name: r1, key: client_ip, what: messages, limit: 5, window: 60, text: "{nope}"}',
     r":5:\d+: plugins\[0\]\.settings\.rules\[0\]\.text: .*\{nope\}"),
    ("greylist", 'skip_recipients: ["[unclosed"]',
     r":4:\d+: plugins\[0\]\.settings\.skip_recipients: "),
    ("dnsbl", 'lists:\n  - {zone: "not a zone!"}',
     r":5:\d+: plugins\[0\]\.settings\.lists\[0\]\.zone: "),
    ("access", 'client:\n  deny:\n    rules: ["999.1.2.3"]',
     r":6:\d+: plugins\[0\]\.settings\.client\.deny\.rules: .*999\.1\.2\.3"),
    ("lists", "allow_action: skip",
     r":4:\d+: plugins\[0\]\.settings\.allow_action: "),
    ("rewrite", 'add_headers: {X-Tag: "{nope}"}',
     r":4:\d+: plugins\[0\]\.settings\.add_headers: .*\{nope\}"),
    ("score", 'rules:\n  - {name: r1, score: 1, match: {header: {name: Subject, regex: "(unclosed"}}}',
     r":5:\d+: plugins\[0\]\.settings\.rules\[0\]\.match\.header\.regex: "),
    ("spamd", "port: 0",
     r":4:\d+: plugins\[0\]\.settings\.port: "),
    ("rspamd", 'url: "ftp://127.0.0.1/"',
     r":4:\d+: plugins\[0\]\.settings\.url: "),
    ("iprev", "on_fail: drop",
     r":4:\d+: plugins\[0\]\.settings\.on_fail: "),
    ("clamav", 'servers: ["unix:/run/clamav/clamd.ctl", "clamd.example:0"]',
     r":4:\d+: plugins\[0\]\.settings\.servers: .*the port must be 1\.\.65535"),
    ("clamav", 'reject_text: "Virus {virus}"',
     r":4:\d+: plugins\[0\]\.settings\.reject_text: .*unknown placeholder \{virus\}"),
    ("attachments", "rules:\n  executable: {action: bounce}",
     r":5:\d+: plugins\[0\]\.settings\.rules\.executable\.action: "),
    ("attachments", 'reject_text: "{filename} refused ({nope})"',
     r":4:\d+: plugins\[0\]\.settings\.reject_text: .*unknown placeholder \{nope\}"),
]


def _config(tmp_path: Path, name: str, settings: str) -> Path:
    body = textwrap.indent(settings, " " * 6)
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(f"plugins:\n  - name: {name}\n    settings:\n{body}\n")
    return path


@pytest.mark.parametrize(("name", "settings", "expected"), BAD_SETTINGS,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_SETTINGS)])
def test_check_config_refuses_a_bad_plugin_setting_at_file_line_key(
    tmp_path: Path, name: str, settings: str, expected: str
) -> None:
    config = _config(tmp_path, name, settings)
    result = subprocess.run([*EXE, "check-config", "-c", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert re.search(re.escape(str(config)) + expected, result.stderr), result.stderr


def test_every_first_party_plugin_has_a_bad_setting_case() -> None:
    from importlib.metadata import entry_points

    first_party = {ep.name for ep in entry_points(group="smtpproxy.plugins")
                   if ep.value.startswith("smtpproxy_plugins.")}
    assert first_party <= {case[0] for case in BAD_SETTINGS}


def test_headers_placeholders_that_exist_pass(tmp_path: Path) -> None:
    config = _config(tmp_path, "headers", 'add: {X-Seen: "{client_ip} {helo} {session_id} {transaction_id} {{x}}"}')
    result = subprocess.run([*EXE, "check-config", "-c", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


class Picky:
    """A third-party plugin using the constructor hook: SettingsError points below settings:."""

    from pydantic import BaseModel

    class Settings(BaseModel):
        zones: dict[str, list[str]]

    def __init__(self, settings: Settings):
        for zone, servers in settings.zones.items():
            for index, server in enumerate(servers):
                if not server.endswith("."):
                    raise SettingsError("must be a fully qualified name ending in '.'",
                                        key=("zones", zone, index))


def test_a_constructor_settings_error_is_located_at_its_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  - name: picky\n    use: test_plugin_settings:Picky\n    settings:\n"
                    "      zones:\n        a.example: [ns1.example., ns2.example]\n")
    config, source = load_config(path)
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    [problem] = caught.value.problems
    assert (problem.line, problem.key) == (6, 'plugins[0].settings.zones["a.example"][1]')
    assert "fully qualified" in problem.message


class Crashing:
    """A constructor that fails with something other than a settings error."""

    def __init__(self) -> None:
        raise OSError(13, "Permission denied", "/etc/site/table.db")


def test_any_constructor_failure_is_a_located_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  - name: headers\n  - name: crashing\n    use: test_plugin_settings:Crashing\n")
    config, source = load_config(path)
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    [problem] = caught.value.problems
    assert (problem.line, problem.key) == (3, "plugins[1]")
    assert "could not be built: PermissionError: [Errno 13] Permission denied: '/etc/site/table.db'" in problem.message


MODULE = '''
from smtpproxy import Verdict, hookimpl


class Local:
    @hookimpl
    def rcpt_to(self, recipient):
        return Verdict.reject("local plugin says no") if recipient.address.local == "nobody" else None
'''


def _local_plugin_config(tmp_path: Path, plugin_paths: str) -> Path:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "local_filters16.py").write_text(MODULE)
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(f"{plugin_paths}plugins:\n  - name: local\n    use: local_filters16:Local\n")
    return config


def test_plugin_paths_finds_a_module_next_to_the_config(tmp_path: Path) -> None:
    config = _local_plugin_config(tmp_path, "plugin_paths: [site]\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    check = subprocess.run([*EXE, "check-config", "-c", str(config)], capture_output=True, text=True,
                           timeout=60, cwd=elsewhere)
    assert check.returncode == 0, check.stderr
    message = elsewhere / "m.eml"
    message.write_bytes(b"From: a@example.org\r\nSubject: t\r\n\r\nhi\r\n")
    trace = subprocess.run([*EXE, "test-message", "-c", str(config), "--from", "a@example.org",
                            "--rcpt", "nobody@localhost", str(message)], capture_output=True, text=True,
                           timeout=60, cwd=elsewhere)
    assert trace.returncode == 3, (trace.stdout, trace.stderr)  # rejected by the local plugin
    assert "local plugin says no" in trace.stdout


def test_without_plugin_paths_the_module_is_not_found(tmp_path: Path) -> None:
    config = _local_plugin_config(tmp_path, "")
    check = subprocess.run([*EXE, "check-config", "-c", str(config)], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert check.returncode == 2
    assert re.search(r"smtpproxy\.yaml:3:\d+: plugins\[0\]\.use: cannot import 'local_filters16'", check.stderr)


def test_plugin_paths_must_exist(tmp_path: Path) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("plugin_paths: [nowhere]\n")
    check = subprocess.run([*EXE, "check-config", "-c", str(config)], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert check.returncode == 2
    assert re.search(r"smtpproxy\.yaml:1:\d+: plugin_paths\[0\]: directory not found", check.stderr), check.stderr


# -- PluginSettings: unknown keys are refused, with the near miss ------------------------------


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _settings_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """The model and every model reachable through its fields' annotations."""
    seen: list[type[BaseModel]] = []
    stack = [root]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            stack.extend(_models_in(info.annotation))
    return seen


def _first_party_and_example_plugins() -> list[tuple[str, type]]:
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group="smtpproxy.plugins"), key=lambda e: e.name):
        if ep.value.startswith(("smtpproxy_plugins.", "smtpproxy_example_")):
            found.append((ep.name, ep.load()))
    return found


PLUGIN_CLASSES = _first_party_and_example_plugins()


@pytest.mark.parametrize(("name", "cls"), PLUGIN_CLASSES, ids=[n for n, _ in PLUGIN_CLASSES])
def test_every_first_party_and_example_settings_model_derives_from_plugin_settings(name: str, cls: type) -> None:
    settings = getattr(cls, "Settings", None)
    if settings is None:
        return
    plain = [m.__qualname__ for m in _settings_models(settings) if not issubclass(m, PluginSettings)]
    assert plain == [], f"{name}: settings models not derived from smtpproxy.PluginSettings"


def test_the_walk_sees_the_examples_and_nested_models() -> None:
    names = {name for name, _ in PLUGIN_CLASSES}
    assert {"roles_inside_only", "tenant_routing", "dnsbl", "access"} <= names
    dnsbl = dict(PLUGIN_CLASSES)["dnsbl"]
    assert len(_settings_models(dnsbl.Settings)) >= 3  # Settings, the list entries, ReturnCode


# (plugin, settings block with a misspelt key, "line:col: key: message" expected)
MISSPELT = [
    ("spamd", "prot: 1783", r":4:7: plugins\[0\]\.settings\.prot: unknown key \(did you mean 'port'\?\)"),
    ("greylist", "dealy: 60", r":4:7: plugins\[0\]\.settings\.dealy: unknown key \(did you mean 'delay'\?\)"),
    ("dnsbl", "lists:\n  - {zone: bl.test, actoin: reject}",
     r":5:\d+: plugins\[0\]\.settings\.lists\[0\]\.actoin: unknown key \(did you mean 'action'\?\)"),
    ("access", "client:\n  deny:\n    rule: [192.0.2.1]",
     r":6:\d+: plugins\[0\]\.settings\.client\.deny\.rule: unknown key \(did you mean 'rules'\?\)"),
]


@pytest.mark.parametrize(("name", "settings", "expected"), MISSPELT, ids=[c[0] for c in MISSPELT])
def test_a_misspelt_first_party_setting_is_refused_with_the_near_miss(
    tmp_path: Path, name: str, settings: str, expected: str
) -> None:
    path = _config(tmp_path, name, settings)
    config, source = load_config(path)
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(re.escape(str(path)) + expected, lines[0]), lines


class Scored:
    """A third-party plugin on the public base, with a required key."""

    class Settings(PluginSettings):
        score: float
        reply: str = "no"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


class PlainForbid:
    """A plugin written before PluginSettings: a plain BaseModel with extra="forbid"."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        score: float = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


@pytest.mark.parametrize("target", ["Scored", "PlainForbid"])
def test_a_third_party_typo_names_the_near_miss_once(tmp_path: Path, target: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"plugins:\n  - name: mine\n    use: test_plugin_settings:{target}\n    settings:\n"
                    "      scor: 5\n")
    config, source = load_config(path)
    with pytest.raises(ConfigError) as caught:
        build_chain(config.plugins, source)
    # Scored's missing required 'score' is the same mistake: not reported a second time.
    assert str(caught.value) == f"{path}:5:7: plugins[0].settings.scor: unknown key (did you mean 'score'?)"


def test_make_plugin_names_the_near_miss_too() -> None:
    with pytest.raises(ConfigError) as caught:
        make_plugin(Scored, scor=5)
    assert str(caught.value) == "<settings>: plugins[0].settings.scor: unknown key (did you mean 'score'?)"
    assert make_plugin(Scored, score=5).settings.score == 5  # type: ignore[attr-defined]


def test_plugin_settings_are_immutable() -> None:
    settings = Scored.Settings(score=1)
    with pytest.raises(ValidationError):
        settings.score = 2  # type: ignore[misc]
