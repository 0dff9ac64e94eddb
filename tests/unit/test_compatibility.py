"""What docs/compatibility.md promises: one version, written once; a plugin API version a
plugin can require, checked at load; deprecated aliases that warn and still work; a changelog
in Keep a Changelog form; and the page's own examples are what the code prints."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import smtpproxy
from smtpproxy.config import ConfigError, load_config
from smtpproxy.deprecation import DeprecatedAlias, Renamed, deprecated_names
from smtpproxy.pytest_plugin import make_plugin
from smtpproxy.registry import build_chain
from smtpproxy.versions import LOG_FORMAT_VERSION, PLUGIN_API_VERSION, PluginAPIError, check_plugin_api

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "compatibility.md").read_text()
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- one version, written once -----------------------------------------------------------------


def test_the_version_is_written_once_and_read_by_the_packaging() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "smtpproxy.versions.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", smtpproxy.__version__)
    assert version("smtpproxy") == smtpproxy.__version__


def test_no_code_or_packaging_file_repeats_the_version() -> None:
    literal = re.compile(rf"""["']{re.escape(smtpproxy.__version__)}["']""")
    files = [ROOT / "pyproject.toml", *(ROOT / "smtpproxy").rglob("*.py"), *(ROOT / "plugins").glob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    repeated = [str(f.relative_to(ROOT)) for f in files
                if f != ROOT / "smtpproxy" / "versions.py" and literal.search(f.read_text())]
    assert repeated == []


# -- the plugin API version ---------------------------------------------------------------------


def _plugin_config(tmp_path: Path, requires: str | None) -> Path:
    module = tmp_path / "mycompany_api.py"
    attribute = f"    requires_plugin_api = {requires!r}\n" if requires is not None else ""
    module.write_text(f"class SubjectBlocklist:\n{attribute}    pass\n")
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("plugin_paths: [.]\nplugins:\n  - name: subjects\n    use: mycompany_api:SubjectBlocklist\n")
    sys.modules.pop("mycompany_api", None)
    return config


def _load(config: Path) -> None:
    loaded, source = load_config(config)
    build_chain(loaded.plugins, source, plugin_paths=loaded.plugin_paths)


@pytest.mark.parametrize("requires", [None, PLUGIN_API_VERSION, PLUGIN_API_VERSION.split(".")[0] + ".0"])
def test_a_plugin_that_requires_the_present_api_or_less_loads(tmp_path: Path, requires: str | None) -> None:
    _load(_plugin_config(tmp_path, requires))


def _next(kind: str) -> str:
    major, minor = (int(n) for n in PLUGIN_API_VERSION.split("."))
    return {"minor": f"{major}.{minor + 1}", "major": f"{major + 1}.0", "older major": f"{major - 1}.9"}[kind]


@pytest.mark.parametrize("kind", ["minor", "major", "older major"])
def test_a_plugin_that_requires_another_api_is_refused_naming_both(tmp_path: Path, kind: str) -> None:
    required = _next(kind)
    config = _plugin_config(tmp_path, required)
    with pytest.raises(ConfigError) as caught:
        _load(config)
    assert str(caught.value) == (
        f"{config}:4:5: plugins[0].use: plugin 'subjects' (mycompany_api:SubjectBlocklist) requires plugin "
        f"API {required}; smtpproxy {smtpproxy.__version__} provides plugin API {PLUGIN_API_VERSION} (install "
        f"a version of the plugin made for API {PLUGIN_API_VERSION.split('.')[0]}.x, or an smtpproxy that "
        f"provides {required})"
    )


@pytest.mark.parametrize("requires", ["1", "1.0.0", "v1.0", 1.0])
def test_a_malformed_requirement_is_refused(requires: object) -> None:
    target = type("Odd", (), {"requires_plugin_api": requires})
    with pytest.raises(PluginAPIError, match=r"plugin 'odd' \(.*Odd\): requires_plugin_api must be"):
        check_plugin_api(target, "odd")


@given(st.one_of(st.text(max_size=12), st.from_regex(r"\A[0-9]{1,3}\.[0-9]{1,3}\Z"), st.integers(), st.none()))
def test_any_declaration_is_accepted_or_refused_with_the_plugin_named(requires: object) -> None:
    target = type("Any", (), {"requires_plugin_api": requires})
    try:
        check_plugin_api(target, "any")
    except PluginAPIError as exc:
        assert str(exc).startswith("plugin 'any' (")
    else:  # accepted: absent, or MAJOR.MINOR within the present API
        if requires is not None:
            assert isinstance(requires, str)
            major, minor = (int(n) for n in requires.split("."))
            present = [int(n) for n in PLUGIN_API_VERSION.split(".")]
            assert major == present[0] and minor <= present[1]


def test_check_config_refuses_it_too(tmp_path: Path) -> None:
    config = _plugin_config(tmp_path, _next("major"))
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2
    assert f"requires plugin API {_next('major')}; smtpproxy {smtpproxy.__version__}" in run.stderr


def test_make_plugin_refuses_it_too() -> None:
    class Future:
        requires_plugin_api = _next("minor")

    with pytest.raises(ConfigError, match=rf"requires plugin API {re.escape(_next('minor'))};"):
        make_plugin(Future)


class FutureAPI:
    """An installed plugin made for a plugin API this smtpproxy does not provide."""

    requires_plugin_api = _next("major")


def test_smtpproxy_plugins_shows_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    from smtpproxy import registry

    future = EntryPoint("future", "tests.unit.test_compatibility:FutureAPI", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [future])
    [listed] = registry.installed_plugins()
    assert listed.name == "future" and listed.error is not None
    assert listed.error.startswith(f"plugin 'future' (tests.unit.test_compatibility:FutureAPI) requires plugin API "
                                   f"{_next('major')}; smtpproxy {smtpproxy.__version__} provides")


def test_the_docs_error_example_is_what_check_config_prints(tmp_path: Path) -> None:
    [shown] = re.findall(r"```text\n(smtpproxy\.yaml:\d+:\d+: plugins\[0\]\.use: plugin 'subjects'.*)\n```", PAGE)
    module = tmp_path / "mycompany" / "filters.py"
    module.parent.mkdir()
    (module.parent / "__init__.py").write_text("")
    module.write_text('class SubjectBlocklist:\n    requires_plugin_api = "2.0"\n')
    (tmp_path / "smtpproxy.yaml").write_text(
        "plugins:\n  - name: subjects\n    use: mycompany.filters:SubjectBlocklist\n")
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c", "smtpproxy.yaml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.stderr.splitlines()[1:] == [shown]


def test_the_page_states_the_present_versions() -> None:
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "--version"], capture_output=True, text=True,
                         timeout=60)
    [said] = re.findall(r"```text\n(smtpproxy \d.*)\n```", PAGE)
    assert run.stdout == said + "\n"
    assert f"| the plugin API | {PLUGIN_API_VERSION} |" in PAGE
    assert f"| the log format | {LOG_FORMAT_VERSION} |" in PAGE
    assert f"| the package | {smtpproxy.__version__} |" in PAGE
    assert f"version={smtpproxy.__version__} log_format={LOG_FORMAT_VERSION}" in PAGE
    assert f'(`requires-python = "{PYPROJECT["project"]["requires-python"]}"`)' in PAGE


# -- deprecated aliases ----------------------------------------------------------------------------


def test_a_renamed_top_level_name_warns_and_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(smtpproxy._RENAMED, "OldVerdict", Renamed("Verdict", since="0.5.0", removed_in="0.6.0"))
    expected = ("smtpproxy.OldVerdict is deprecated since smtpproxy 0.5.0 and will be removed in 0.6.0; "
                "use smtpproxy.Verdict")
    with pytest.warns(DeprecationWarning, match=re.escape(expected)) as record:
        assert smtpproxy.OldVerdict is smtpproxy.Verdict
    assert record[0].filename == __file__  # attributed to the caller's line
    with pytest.warns(DeprecationWarning, match="OldVerdict"):
        from smtpproxy import OldVerdict
    assert OldVerdict is smtpproxy.Verdict


def test_a_missing_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'smtpproxy' has no attribute 'NoSuchName'"):
        smtpproxy.NoSuchName  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hasattr(smtpproxy, "Verdict")


def test_a_module_can_keep_its_own_old_names() -> None:
    import types

    module = types.ModuleType("example_mod")
    module.new_name = 42  # type: ignore[attr-defined]
    module.__getattr__ = deprecated_names("example_mod", {"old_name": Renamed("new_name", "1.1.0", "2.0.0")})  # type: ignore[method-assign]
    sys.modules["example_mod"] = module
    try:
        with pytest.warns(DeprecationWarning, match=r"example_mod\.old_name is deprecated since smtpproxy 1\.1\.0"):
            assert module.old_name == 42
    finally:
        del sys.modules["example_mod"]


def test_a_renamed_class_attribute_warns_and_reads_and_writes_the_new_one() -> None:
    class Thing:
        def __init__(self) -> None:
            self.limit = 5

        def describe(self) -> str:
            return f"limit {self.limit}"

        max_count = DeprecatedAlias("limit", since="0.2.0", removed_in="0.3.0")
        explain = DeprecatedAlias("describe", since="0.2.0", removed_in="0.3.0")

    thing = Thing()
    with pytest.warns(DeprecationWarning, match=r"Thing\.max_count is deprecated .* use .*Thing\.limit"):
        assert thing.max_count == 5
    with pytest.warns(DeprecationWarning):
        thing.max_count = 7
    assert thing.limit == 7
    with pytest.warns(DeprecationWarning, match=r"Thing\.explain"):
        assert thing.explain() == "limit 7"
    with pytest.warns(DeprecationWarning):
        assert Thing.explain is Thing.describe


def _deprecated_in_changelog() -> str:
    return "\n".join(re.findall(r"^### Deprecated\n(.*?)(?=^##)", CHANGELOG + "\n##", re.S | re.M))


def test_every_deprecated_alias_is_in_the_changelog() -> None:
    listed = _deprecated_in_changelog()
    assert [old for old in smtpproxy._RENAMED if f"`{old}`" not in listed] == []


def test_the_changelog_check_catches_an_unlisted_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(smtpproxy._RENAMED, "SurelyUnlisted", Renamed("Verdict", "0.5.0", "0.6.0"))
    with pytest.raises(AssertionError):
        test_every_deprecated_alias_is_in_the_changelog()


# -- the changelog ---------------------------------------------------------------------------------


def test_the_changelog_follows_keep_a_changelog() -> None:
    headings = re.findall(r"^## (.*)$", CHANGELOG, re.M)
    assert headings[0] == "[Unreleased]"
    for heading in headings[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", heading), heading
    versions = [tuple(int(n) for n in h[1:].split("]")[0].split(".")) for h in headings[1:]]
    assert versions == sorted(versions, reverse=True)  # newest first
    assert f"## [{smtpproxy.__version__}] - " in CHANGELOG  # the version the code carries
    kinds = set(re.findall(r"^### (.*)$", CHANGELOG, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
