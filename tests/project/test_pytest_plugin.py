"""The pytest plugin shipped for plugin authors, used the way they use it: a test file of
their own in a fresh directory, run by pytest in a subprocess with only the installed
entry point providing the fixtures (no conftest)."""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

AUTHOR_TESTS = '''
import pytest
from pydantic import BaseModel
from smtpproxy import Verdict, get_resolver, hookimpl
from smtpproxy.config import ConfigError
from smtpproxy.pytest_plugin import make_plugin, recipient

MARK = {mark}


class NoRoles:
    """The plugin under test: role addresses take no outside mail; tags every message."""

    class Settings(BaseModel):
        roles: list[str] = ["abuse", "noc"]

    def __init__(self, settings):
        self.roles = set(settings.roles)

    @hookimpl
    def rcpt_to(self, session, recipient):
        if recipient.address.local.lower() in self.roles and session.auth_user is None:
            return Verdict.reject("Role address", code=550, enhanced="5.7.1")

    @hookimpl
    def data(self, session, message):
        message.add_header("X-Checked", session.client.ip)
        return Verdict.cont(score=1.0, tags=("checked",))


def test_session_and_one_hook(smtpproxy_session):
    plugin = make_plugin(NoRoles, roles=["postmaster"])
    outside = smtpproxy_session(client_ip="203.0.113.9")
    verdict = plugin.rcpt_to(outside, recipient("postmaster@example.org"))
    assert verdict.reply.code == 550
    inside = smtpproxy_session(auth_user="alice", sender="a@example.org", recipients=["b@example.org"])
    assert plugin.rcpt_to(inside, recipient("postmaster@example.org")) is None
    assert [r.address.text for r in inside.transaction.envelope.recipients] == ["b@example.org"]


def test_settings_are_validated():
    with pytest.raises(ConfigError):
        make_plugin(NoRoles, roles="not a list")


def test_message_factory(smtpproxy_message):
    message = smtpproxy_message("Body\\n", subject="Hi", headers={{"X-A": "1"}})
    assert message.get("Subject") == "Hi" and message.get("X-A") == "1"
    assert message.raw.endswith(b"\\r\\n\\r\\nBody\\r\\n")


@MARK
async def test_run_through_the_phases(smtpproxy_run, smtpproxy_message):
    plugin = make_plugin(NoRoles)
    trace = await smtpproxy_run(plugin, smtpproxy_message(), sender="a@example.org",
                                recipients=["abuse@example.org", "bob@example.org"])
    assert trace.decision == "delivered"
    assert trace.refused_recipients == [("abuse@example.org", "550 5.7.1 Role address", "no_roles")]
    assert trace.headers_added == [("X-Checked", "192.0.2.1")]
    assert trace.score == 1.0 and trace.tags == ["checked"]
    refused = await smtpproxy_run([plugin], recipients=["noc@example.org"])
    assert refused.decision == "rejected" and refused.decided_by == "no_roles"


@MARK
async def test_real_proxy(smtpproxy_proxy, smtpproxy_message):
    proxy = await smtpproxy_proxy(make_plugin(NoRoles))
    reply = await proxy.send("a@sender.test", ["abuse@rcpt.test", "bob@rcpt.test"], smtpproxy_message(),
                             client_ip="198.51.100.4")
    assert reply.ok and reply.stage == "end", reply
    assert reply.rcpt_replies["abuse@rcpt.test"][0] == 550
    [got] = proxy.received
    assert got.sender == "a@sender.test" and got.recipients == ["bob@rcpt.test"]
    assert got.message.get("X-Checked") == "198.51.100.4"
    refused = await proxy.send("a@sender.test", ["noc@rcpt.test"], b"Subject: x\\n\\nbody\\n")
    assert refused.code == 550 and refused.stage == "rcpt"
    assert len(proxy.received) == 1


@MARK
async def test_proxy_with_config_and_own_upstream(smtpproxy_proxy, smtpproxy_upstream):
    other = await smtpproxy_upstream()
    proxy = await smtpproxy_proxy(plugins=[{{"name": "headers", "settings": {{"add": {{"X-Via": "test"}}}}}}],
                                  delivery={{"type": "smtp", "host": "127.0.0.1", "port": other.port, "tls": "none"}})
    reply = await proxy.send("a@sender.test", ["bob@rcpt.test"], "Subject: s\\n\\nhi\\n")
    assert reply.ok, reply
    assert proxy.received == []  # no default upstream: the config named its own
    assert other.received[0].message.get("X-Via") == "test"


class Listed:
    """A plugin that does DNS: refuses clients listed in bl.test, through the shared resolver."""

    @hookimpl
    async def connect(self, session):
        name = ".".join(reversed(session.client.ip.split("."))) + ".bl.test"
        if await get_resolver().a(name):
            return Verdict.reject("listed", code=554, enhanced="5.7.1")


@MARK
async def test_dns_zones(smtpproxy_dns, smtpproxy_run, smtpproxy_proxy, smtpproxy_message):
    smtpproxy_dns.add("9.113.0.203.bl.test. 300 IN A 127.0.0.2")
    listed = await smtpproxy_run(Listed(), client_ip="203.0.113.9")
    assert listed.decision == "rejected" and listed.decided_by == "listed"
    clean = await smtpproxy_run(Listed(), client_ip="203.0.113.10")
    assert clean.decision == "delivered"
    assert ("10.113.0.203.bl.test", "A") in smtpproxy_dns.queries
    proxy = await smtpproxy_proxy(Listed(), dns=smtpproxy_dns.dns_section())
    refused = await proxy.send("a@sender.test", ["bob@rcpt.test"], smtpproxy_message(), client_ip="203.0.113.9")
    assert refused.code == 554 and refused.stage == "connect", refused
'''


def _run(pytester: pytest.Pytester, mode: str) -> pytest.RunResult:
    mark = "pytest.mark.asyncio" if mode == "strict" else "lambda f: f"
    pytester.makepyfile(test_author=AUTHOR_TESTS.format(mark=mark))
    pytester.makeini(f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_fixtures_work_for_a_plugin_author(pytester: pytest.Pytester, mode: str) -> None:
    result = _run(pytester, mode)
    result.assert_outcomes(passed=7)


def test_a_failing_author_assertion_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_wrong='''
from smtpproxy import Verdict, hookimpl

class Rejects:
    @hookimpl
    def mail_from(self):
        return Verdict.reject("no")

async def test_wrong(smtpproxy_run):
    trace = await smtpproxy_run(Rejects())
    assert trace.decision == "delivered"
''')
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 'rejected' == 'delivered'*"])


async def test_make_plugin_names_a_plugin_by_its_entry_point_as_production_does() -> None:
    from smtpproxy_plugins.dnsbl import DNSBL
    from smtpproxy_plugins.headers import AddHeaders

    from smtpproxy.pytest_plugin import entry_point_name, make_plugin, run_plugins

    assert entry_point_name(DNSBL) == "dnsbl"  # the snake-cased class would be "d_n_s_b_l"
    assert entry_point_name(AddHeaders) == "headers"
    trace = await run_plugins(make_plugin(AddHeaders, add={"X-A": "1"}))
    assert trace.steps_for("headers") and not trace.steps_for("add_headers")
    assert entry_point_name(type(trace)) is None  # not a plugin: named after its class


def test_the_dns_fixture_puts_the_previous_resolver_back(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_dns="""
import smtpproxy

before = smtpproxy.get_resolver()

def test_uses_zones(smtpproxy_dns):
    assert smtpproxy.get_resolver() is not before
    assert smtpproxy.get_resolver().port == smtpproxy_dns.port

def test_after():
    assert smtpproxy.get_resolver() is before
""")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower()  # type: ignore[union-attr]
            for r in requirements}


def test_the_plugin_test_extra_is_exactly_what_the_fixtures_import_beyond_the_core() -> None:
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extra = _requirement_names(project["optional-dependencies"]["plugin-test"])
    modules: set[str] = set()
    for name in ("pytest_plugin.py", "zoneserver.py"):
        for node in ast.walk(ast.parse((root / "smtpproxy" / name).read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"smtpproxy", "__future__"}
    owners = packages_distributions()
    needed = {re.sub(r"[-_.]+", "-", owners[m][0]).lower() for m in third_party}
    assert needed - core == extra
    assert extra <= _requirement_names(project["optional-dependencies"]["test"])


def test_the_dns_example_of_the_testing_guide_passes(pytester: pytest.Pytester) -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "testing-plugins.md").read_text()
    section = page.split("### A plugin that does DNS", 1)[1]
    code = re.search(r"```python\n(.*?)^```", section, re.S | re.M)
    assert code is not None
    pytester.makepyfile(test_guide=code.group(1))
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
