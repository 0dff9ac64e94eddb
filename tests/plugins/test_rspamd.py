"""rspamd: the /checkv2 exchange against a real, private rspamd, and the verdicts through a real
proxy to a real sink, with the real ``score`` plugin after it.

The rspamd is started once for this module (``rspamd -f``, as ``_rspamd`` when the tests run as
root) from the shipped /etc/rspamd config, with a local config directory of its own
(``--var LOCAL_CONFDIR=...``, databases, pid and control socket in a temporary directory): the
normal worker and the controller on free loopback ports, the proxy worker disabled, DNS pointed
at a closed loopback port with a short timeout, RBL/SURBL/fuzzy off, Bayes on a private Redis, a controller password, a five-line TLD
list (compiling the full public-suffix list takes rspamd ~14 s), and a regexp rule
SMTPPROXY_TEST (20 points for the body text ``smtpproxy-spam-marker``). Readiness is polled with
``GET /ping`` (``pong``), never slept on. The tests skip, with the reason, only where rspamd (or
redis-server) is not installed (CI installs both).
"""

from __future__ import annotations

import asyncio
import grp
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from smtpproxy_plugins.rspamd import Rspamd, RspamdError, check, learn, parse_result
from smtpproxy_plugins.score import Score

from smtpproxy import Message
from tests.conftest import ProxyFactory, Sink, closed_port, port_of
from tests.daemons import free_port, stop_process
from tests.redis_server import start_redis
from tests.scanner_parts import CLEAN, MARKER, SPAM, Probe, header, scanner, score, send

# -- the private rspamd -----------------------------------------------------------------------


@dataclass
class RspamdServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    controller: int = 0

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                return answer.startswith(b"HTTP/1.1 200") and answer.rstrip().endswith(b"pong")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)


LEARN_PASSWORD = "learn-secret"
"""The controller's enable_password in the tests' rspamd (no address is trusted without one)."""


def _local_config(local: Path, normal: int, controller: int, tld: Path, redis_port: int) -> None:
    override, localdir = local / "override.d", local / "local.d"
    override.mkdir(mode=0o755)
    localdir.mkdir(mode=0o755)
    (override / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n')
    (override / "worker-controller.inc").write_text(
        f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\nsecure_ip = "192.0.2.1";\n'
        f'password = "read-secret";\nenable_password = "{LEARN_PASSWORD}";\n'
    )
    # Bayes (learning) keeps its statistics in a private Redis.
    (localdir / "classifier-bayes.conf").write_text(f'servers = "127.0.0.1:{redis_port}";\nmin_tokens = 5;\n')
    (override / "worker-proxy.inc").write_text(
        f'enabled = false;\ncount = 0;\nbind_socket = "127.0.0.1:{free_port()}";\n'
    )
    (override / "logging.inc").write_text('type = "console";\nlevel = "notice";\n')
    (localdir / "options.inc").write_text(
        f'url_tld = "{tld}";\n'
        f'dns {{\n  nameserver = ["127.0.0.1:{closed_port()}"];\n  timeout = 0.2s;\n  retransmits = 1;\n}}\n'
    )
    for module in ("rbl", "surbl", "emails", "fuzzy_check", "asn", "neural", "ratelimit", "greylist"):
        (localdir / f"{module}.conf").write_text("enabled = false;\n")
    (localdir / "regexp.conf").write_text(
        f'SMTPPROXY_TEST {{\n  re = "/{MARKER}/{{body}}";\n  score = 20.0;\n'
        '  description = "smtpproxy test marker";\n}\n'
    )


@pytest.fixture(scope="module")
def rspamd_server() -> Iterator[RspamdServer]:
    binary = shutil.which("rspamd") or next(
        (p for p in ("/usr/bin/rspamd", "/usr/local/bin/rspamd") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        pytest.skip("rspamd is not installed: apt-get install rspamd")
    confdir = Path("/etc/rspamd")
    if not (confdir / "rspamd.conf").is_file():
        pytest.skip("rspamd is installed but /etc/rspamd/rspamd.conf is missing")
    # Readable by the unprivileged user the workers switch to when started as root (pytest's
    # own tmp directories are private to root); the database directory is theirs.
    workdir = Path(tempfile.mkdtemp(prefix="smtpproxy-rspamd-"))
    workdir.chmod(0o755)
    dbdir = workdir / "db"
    dbdir.mkdir(mode=0o755)
    tld = workdir / "tld.dat"
    tld.write_text("com\nnet\norg\ntest\nexample\n")
    port, controller = free_port(), free_port()
    redis = start_redis(workdir)
    _local_config(workdir, port, controller, tld, redis.port)
    command = [binary, "-f", "-c", str(confdir / "rspamd.conf"),
               "--var", f"CONFDIR={confdir}", "--var", f"LOCAL_CONFDIR={workdir}",
               "--var", f"DBDIR={dbdir}", "--var", f"RUNDIR={workdir}", "--var", f"LOGDIR={workdir}"]
    if os.geteuid() == 0:
        user = next((u for u in ("_rspamd", "nobody") if _has_user(u)), None)
        if user is None:
            command.append("-i")
        else:
            entry = pwd.getpwnam(user)
            os.chown(dbdir, entry.pw_uid, entry.pw_gid)
            command += ["-u", user, "-g", grp.getgrgid(entry.pw_gid).gr_name]
    log = workdir / "rspamd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = RspamdServer(port, process, log, controller)
    deadline = time.monotonic() + 60
    while not server.ping():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            redis.stop()
            text = log.read_text(errors="replace")[-2000:]
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"rspamd did not start on port {port}:\n{text}")
        time.sleep(0.05)
    yield server
    server.stop()
    redis.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# -- helpers ------------------------------------------------------------------------------------


def rspamd(server_port: int, **settings: Any) -> Rspamd:
    return scanner(Rspamd, "rspamd", server_port, **settings)


# -- the exchange, against the real rspamd ---------------------------------------------------


async def test_checkv2_gets_score_action_and_symbols(rspamd_server: RspamdServer) -> None:
    result = await check("127.0.0.1", rspamd_server.port, SPAM,
                         headers={"IP": "127.0.0.1", "From": "alice@sender.test",
                                  "Rcpt": ["bob@dest.test", "carol@dest.test"]})
    assert result.score >= 20.0
    assert result.required_score > 0
    assert result.action == "reject"  # the shipped reject threshold is 15
    assert result.symbols["SMTPPROXY_TEST"] == 20.0
    assert "FROM_EQ_ENVFROM" in result.symbols  # the From header was read as the envelope sender
    assert result.ranked()[0] == "SMTPPROXY_TEST"
    clean = await check("127.0.0.1", rspamd_server.port, CLEAN, headers={"IP": "127.0.0.1"})
    assert clean.score < 6.0 and clean.action == "no action"
    assert "SMTPPROXY_TEST" not in clean.symbols


def _learned(server: RspamdServer) -> int:
    """How many messages rspamd has learned: ``learned`` of the controller's GET /stat."""
    with socket.create_connection(("127.0.0.1", server.controller), timeout=5) as sock:
        sock.sendall(f"GET /stat HTTP/1.1\r\nHost: x\r\nPassword: {LEARN_PASSWORD}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    learned = json.loads(answer.partition(b"\r\n\r\n")[2])["learned"]
    assert isinstance(learned, int)
    return learned


def _letter(n: int, text: str) -> bytes:
    return (
        "From: Mallory <mallory@offers.test>\r\nTo: Bob <bob@dest.test>\r\n"
        f"Subject: Letter {n}\r\nDate: Mon, 2 Jan 2023 10:00:00 +0000\r\n"
        f"Message-ID: <letter.{n}@offers.test>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{text}\r\n"
    ).encode()


PILLS = ("Cheap watches and pills, discount viagra casino bonus, claim your lottery prize "
         "today, wire the fee to unlock your inheritance millions now")
MINUTES = ("The minutes of the planning meeting are below: budget review moved to Thursday, "
           "the printer on the second floor is fixed, lunch order is in the kitchen")


async def test_learning_changes_what_rspamd_reports(rspamd_server: RspamdServer) -> None:
    """/learnspam and /learnham through the controller: rspamd's learned count goes up once per
    message, and a message learned before is answered 208 and reported as such."""
    plugin = rspamd(rspamd_server.port, controller_port=rspamd_server.controller,
                    controller_password=LEARN_PASSWORD)
    before = _learned(rspamd_server)
    spam = _letter(1, PILLS)
    assert await plugin.learn(Message(spam), "spam", "admin:alice") == "rspamd learned it as spam"
    assert await plugin.learn(Message(spam), "spam", "admin:alice") == "rspamd had already learned it as spam"
    assert await plugin.learn(Message(_letter(2, MINUTES)), "ham", "cli") == "rspamd learned it as ham"
    assert _learned(rspamd_server) == before + 2  # the second spam report learned nothing


async def test_learning_refused_is_a_clear_error(rspamd_server: RspamdServer) -> None:
    """A wrong controller password (or none) is rspamd's own refusal, never a crash."""
    for password in ("wrong", None):
        plugin = rspamd(rspamd_server.port, controller_port=rspamd_server.controller,
                        controller_password=password)
        with pytest.raises(RspamdError, match=r"controller answered HTTP 401 Unauthorized"):
            await plugin.learn(Message(_letter(4, PILLS)), "spam", "cli")
    with pytest.raises(RspamdError, match="cannot connect"):
        await learn("127.0.0.1", closed_port(), SPAM, "spam")
    with pytest.raises(RspamdError, match="spam or ham"):
        await learn("127.0.0.1", rspamd_server.controller, SPAM, "maybe")


async def test_nothing_listening_is_an_rspamd_error() -> None:
    with pytest.raises(RspamdError, match="cannot connect"):
        await check("127.0.0.1", closed_port(), CLEAN)


# -- through the proxy ------------------------------------------------------------------------


async def test_marker_scores_tags_and_score_plugin_rejects(
    rspamd_server: RspamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("rspamd")
    proxy = await proxy_factory(rspamd(rspamd_server.port), probe, score(reject=15), upstream=sink.port)
    code, text = await send(port_of(proxy), SPAM, ("bob@dest.test", "carol@dest.test"))
    assert code == 550
    assert re.fullmatch(r"5\.7\.1 Message rejected as spam \(score \d+\.\d\)", text), text
    assert sink.messages == []
    assert probe.score >= 20.0
    assert {"rspamd:reject", "rspamd:SMTPPROXY_TEST", "rspamd:FROM_EQ_ENVFROM"} <= probe.tags
    assert re.match(r"rspamd score \d+(\.\d+)? action=reject \(SMTPPROXY_TEST, ", probe.reasons[0]), probe.reasons


async def test_clean_message_is_delivered_with_optional_headers_and_no_spoofed_ones(
    rspamd_server: RspamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("rspamd")
    plugin = rspamd(rspamd_server.port, add_headers=True)
    proxy = await proxy_factory(plugin, probe, score(reject=15), upstream=sink.port)
    spoofed = b"X-Rspamd-Score: -100/15\r\nX-Rspamd-Symbols: NONE\r\n" + CLEAN
    assert await send(port_of(proxy), spoofed) == (250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    [value] = header(content, "X-Rspamd-Score")
    assert re.fullmatch(r"-?\d+(\.\d+)?/\d+(\.\d+)?", value) and not value.startswith("-100")
    [symbols] = header(content, "X-Rspamd-Symbols")
    assert symbols != "NONE" and "SMTPPROXY_TEST" not in symbols
    assert "rspamd:no_action" in probe.tags and probe.score < 6.0
    assert b"shall we meet at noon" in content


async def test_honour_action_rejects_on_rspamds_reject(
    rspamd_server: RspamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("rspamd")
    proxy = await proxy_factory(rspamd(rspamd_server.port, honour_action=True), probe, upstream=sink.port)
    assert await send(port_of(proxy), SPAM) == (550, "5.7.1 Message rejected as spam")
    assert sink.messages == []
    assert await send(port_of(proxy), CLEAN) == (250, "2.0.0 Ok: queued as SINK1")


async def test_score_factor_scales_rspamds_score(
    rspamd_server: RspamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("rspamd")
    proxy = await proxy_factory(rspamd(rspamd_server.port, score_factor=0.1), probe, score(reject=15),
                                upstream=sink.port)
    assert (await send(port_of(proxy), SPAM))[0] == 250  # about 2 points: under the threshold
    assert 2.0 <= probe.score < 15.0
    assert "rspamd:SMTPPROXY_TEST" in probe.tags


async def test_oversize_message_is_not_sent(
    rspamd_server: RspamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("rspamd")
    proxy = await proxy_factory(rspamd(rspamd_server.port, max_size=200), probe, score(reject=15),
                                upstream=sink.port)
    assert len(SPAM) > 200
    assert (await send(port_of(proxy), SPAM))[0] == 250
    assert probe.tags == {"rspamd:skipped"} and probe.score == 0.0
    assert "over max_size 200" in probe.reasons[0]


# -- what is sent, and rspamd's answers, against fake servers ---------------------------------


async def fake_rspamd(answer: bytes, seen: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        seen.append(head + await reader.readexactly(length))
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def http(status: str, body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        return (f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


SOFT = (b'{"score": 7.5, "required_score": 15, "action": "soft reject",'
        b' "symbols": {"R_SPF_DNSFAIL": {"name": "R_SPF_DNSFAIL", "score": 0},'
        b' "RATELIMITED": {"name": "RATELIMITED", "score": 7.5}}}')


async def test_envelope_is_sent_as_informational_headers(proxy_factory: ProxyFactory, sink: Sink) -> None:
    seen: list[bytes] = []
    server = await fake_rspamd(http("200 OK", SOFT, chunked=True), seen)
    try:
        probe = Probe("rspamd")
        proxy = await proxy_factory(rspamd(server.sockets[0].getsockname()[1]), probe, upstream=sink.port)
        assert (await send(port_of(proxy), CLEAN, ("bob@dest.test", "carol@dest.test")))[0] == 250
    finally:
        server.close()
    [request] = seen
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    assert {"IP: 127.0.0.1", "Helo: mail.sender.test", "From: alice@sender.test",
            "Rcpt: bob@dest.test", "Rcpt: carol@dest.test"} <= set(lines)
    assert any(line.startswith("Queue-Id: ") for line in lines)
    assert not any(line.startswith(("User:", "Password:")) for line in lines)
    assert body.endswith(CLEAN)
    assert probe.tags == {"rspamd:soft_reject", "rspamd:RATELIMITED", "rspamd:R_SPF_DNSFAIL"}
    assert probe.score == 7.5
    assert probe.reasons == ["rspamd score 7.5 action=soft_reject (RATELIMITED, R_SPF_DNSFAIL)"]


async def test_honour_action_tempfails_on_soft_reject(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await fake_rspamd(http("200 OK", SOFT), [])
    try:
        plugin = rspamd(1, url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/",
                        honour_action=True, password="secret")
        proxy = await proxy_factory(plugin, upstream=sink.port)
        assert await send(port_of(proxy), CLEAN) == (451, "4.7.1 Try again later")
        assert sink.messages == []
    finally:
        server.close()


async def test_http_error_and_bad_json_are_errors(proxy_factory: ProxyFactory, sink: Sink) -> None:
    for answer in (http("500 Internal Server Error", b'{"error": "boom"}'), http("200 OK", b"<html>"),
                   http("200 OK", b'{"score": 1, "action": "explode"}'), b"SPAMD/1.5 0 EX_OK\r\n\r\n"):
        server = await fake_rspamd(answer, [])
        try:
            proxy = await proxy_factory(rspamd(server.sockets[0].getsockname()[1], on_error="tempfail"),
                                        upstream=sink.port)
            assert (await send(port_of(proxy), CLEAN))[0] == 451, answer
        finally:
            server.close()


def test_parse_result_tolerates_missing_fields() -> None:
    result = parse_result(b'{"score": -1.5, "action": "no action"}')
    assert (result.score, result.required_score, result.symbols) == (-1.5, 0.0, {})
    with pytest.raises(RspamdError, match="score"):
        parse_result(b'{"action": "reject"}')
    with pytest.raises(RspamdError, match="boom"):
        parse_result(b'{"error": "boom"}')


# -- failures ---------------------------------------------------------------------------------


# (stopped and silent rspamd: tests/plugins/test_scanner_failures.py, shared with the other bridge)


# -- settings and registration ----------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = Rspamd.Settings()
    assert (s.host, s.port, s.timeout, s.on_error) == ("127.0.0.1", 11333, 8, "continue")
    assert s.score_factor == 1.0 and not s.add_headers and not s.honour_action and s.password is None
    assert s.endpoint() == ("127.0.0.1", 11333, "/checkv2")
    assert Rspamd.Settings(url="http://rspamd.internal:11333/r").endpoint() == ("rspamd.internal", 11333, "/r/checkv2")
    for bad in ({"on_error": "explode"}, {"password": "a\r\nX: y"}, {"port": 0}, {"timeout": 0},
                {"score_factor": float("nan")}, {"url": "https://x"}, {"url": "http://x:99999"},
                {"url": "http://x/?a=b"}, {"hots": "x"}, {"honour_action": "yes"}):
        with pytest.raises(ValidationError):
            Rspamd.Settings.model_validate(bad)
    for name, field in Rspamd.Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_docs_example_chain_is_valid(tmp_path: Path) -> None:
    from smtpproxy.config import load_config

    text = (Path(__file__).parents[2] / "docs" / "plugins" / "rspamd.md").read_text()
    block = re.findall(r"```yaml\n(.*?)```", text, re.S)[0]
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\ndelivery: {type: maildir, path: /tmp/m}\n" + block
    )
    config, _ = load_config(tmp_path / "smtpproxy.yaml")
    assert [p.name for p in config.plugins] == ["rspamd", "score"]
    settings = Rspamd.Settings.model_validate(config.plugins[0].settings)
    assert settings.add_headers and settings.on_error == "continue" and not settings.honour_action
    Score.Settings.model_validate(config.plugins[1].settings)


def test_entry_point_is_registered() -> None:
    [ep] = [e for e in importlib.metadata.entry_points(group="smtpproxy.plugins") if e.name == "rspamd"]
    assert ep.load() is Rspamd
