"""The pytest plugin shipped for plugin authors, used the way they use it: a test file of
their own in a fresh directory, run by pytest in a subprocess with only the installed
entry point providing the fixtures (no conftest)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

AUTHOR_TESTS = '''
import pytest
from pydantic import BaseModel
from smtpproxy import Verdict, hookimpl
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
'''


def _run(pytester: pytest.Pytester, mode: str) -> pytest.RunResult:
    mark = "pytest.mark.asyncio" if mode == "strict" else "lambda f: f"
    pytester.makepyfile(test_author=AUTHOR_TESTS.format(mark=mark))
    pytester.makeini(f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_fixtures_work_for_a_plugin_author(pytester: pytest.Pytester, mode: str) -> None:
    result = _run(pytester, mode)
    result.assert_outcomes(passed=6)


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
