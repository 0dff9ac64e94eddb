"""spamd: the SPAMC/SPAMD exchange against a real, private spamd (SpamAssassin), and the verdicts
through a real proxy to a real sink, with the real ``score`` plugin after it.

The spamd is started once for this module on a free loopback port with its own site config: a
local rule SMTPPROXY_TEST (20 points for the body text ``smtpproxy-spam-marker``), a Bayes database of its own (``--allow-tell``: learning) and no
network tests or user configs, so results do not depend on the shipped rules or on DNS.
Readiness is polled with ``PING`` (``SPAMD/1.5 0 PONG``), never slept on. The tests skip, with
the reason, only where spamd is not installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
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
from smtpproxy_plugins.score import Score
from smtpproxy_plugins.spamd import Spamd, SpamdError, check, tell

from smtpproxy import Message
from tests.conftest import ProxyFactory, Sink, closed_port, port_of
from tests.daemons import free_port, stop_process
from tests.scanner_parts import CLEAN, MARKER, SPAM, Probe, header, mail, scanner, score, send

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SITE_CONFIG = f"""\
use_bayes 1
bayes_auto_learn 0
bayes_path {{bayes}}/bayes
skip_rbl_checks 1
dns_available no
body SMTPPROXY_TEST /{MARKER}/
describe SMTPPROXY_TEST smtpproxy test marker
score SMTPPROXY_TEST 20.0
"""



# -- the private spamd ------------------------------------------------------------------------


@dataclass
class SpamdServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    bayes: Path

    def learned(self) -> dict[str, int]:
        """nspam and nham of the Bayes database, as sa-learn --dump magic reports them."""
        if not any(self.bayes.iterdir()):
            return {}  # nothing learned yet: sa-learn --dump fails on a database not made
        out = subprocess.run(["sa-learn", "--dbpath", str(self.bayes / "bayes"), "--dump", "magic"],
                             capture_output=True, text=True, check=True).stdout
        counts = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in ("nspam", "nham"):  # 0.000 0 1 0 non-token data: nspam
                counts[parts[-1]] = int(parts[2])
        return counts

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return sock.recv(64).startswith(b"SPAMD/1.5 0 PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def spamd_server() -> Iterator[SpamdServer]:
    binary = shutil.which("spamd") or next(
        (p for p in ("/usr/sbin/spamd", "/usr/local/sbin/spamd") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        pytest.skip("spamd is not installed: apt-get install spamd spamc")
    # Readable by the unprivileged user spamd switches to when started as root (pytest's own
    # tmp directories are private to root).
    workdir = Path(tempfile.mkdtemp(prefix="smtpproxy-spamd-"))
    workdir.chmod(0o755)
    site = workdir / "site"
    site.mkdir(mode=0o755)
    # The .pre files load the plugins (Check is required to scan at all); the rules are
    # the shipped default ones plus ours.
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site / pre.name)
    if not any(site.glob("*.pre")):
        (site / "init.pre").write_text("loadplugin Mail::SpamAssassin::Plugin::Check\n")
    bayes = workdir / "bayes"  # learning (TELL) writes here, as the user spamd runs as
    bayes.mkdir(mode=0o755)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(bayes, nobody.pw_uid, nobody.pw_gid)
    (site / "local.cf").write_text(SITE_CONFIG.replace("{bayes}", str(bayes)))
    port = free_port()
    command = [
        binary, f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1", f"--siteconfigpath={site}",
        "--nouser-config", "--max-children=2", "--allow-tell", "--syslog=stderr", f"--helper-home-dir={workdir}",
    ]
    if os.geteuid() == 0:
        command.append("--username=nobody")  # spamd refuses to keep running as root
    log = workdir / "spamd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = SpamdServer(port, process, log, bayes)
    deadline = time.monotonic() + 60
    while not server.ping():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            text = log.read_text(errors="replace")[-2000:]
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"spamd did not start on port {port}:\n{text}")
        time.sleep(0.05)
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------------


def spamd(server_port: int, **settings: Any) -> Spamd:
    return scanner(Spamd, "spamd", server_port, **settings)


# -- the protocol, against the real spamd ----------------------------------------------------


async def test_symbols_request_gets_score_threshold_and_rules(spamd_server: SpamdServer) -> None:
    result = await check("127.0.0.1", spamd_server.port, SPAM, user="bob")
    assert result.is_spam
    assert result.score >= 20.0
    assert result.threshold == 5.0
    assert "SMTPPROXY_TEST" in result.symbols
    clean = await check("127.0.0.1", spamd_server.port, CLEAN)
    assert not clean.is_spam and clean.score < 5.0
    assert "SMTPPROXY_TEST" not in clean.symbols


def _mail(n: int, body: str) -> bytes:
    return mail(body).replace(b"<20230102100000.1@sender.test>", f"<learn.{n}@sender.test>".encode())


async def test_tell_learns_spam_and_ham_into_the_bayes_database(spamd_server: SpamdServer) -> None:
    """What spamc -L spam|ham does: spamd says DidSet: local once, and the database counts it."""
    spam = _mail(1, f"Cheap pills {MARKER} buy now at the best price in town today")
    ham = _mail(2, "Hi Bob, the minutes of Tuesday's meeting are attached, see you Friday")
    assert spamd_server.learned().get("nspam", 0) == 0
    assert await tell("127.0.0.1", spamd_server.port, spam, "spam") is True
    assert await tell("127.0.0.1", spamd_server.port, spam, "spam") is False  # already learned
    plugin = spamd(spamd_server.port)
    assert await plugin.learn(Message(ham), "ham", "admin:alice") == "spamd learned it as ham"
    assert "already learned as ham" in await plugin.learn(Message(ham), "ham", "admin:alice")
    assert spamd_server.learned() == {"nspam": 1, "nham": 1}


async def test_tell_refused_by_spamd_is_a_clear_error() -> None:
    """A spamd started without --allow-tell answers EX_UNAVAILABLE: an error naming it."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPAMD/1.0 69 EX_UNAVAILABLE TELL commands are not enabled, set the --allow-tell "
                     b"switch.\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(SpamdError, match="69 EX_UNAVAILABLE TELL commands are not enabled"):
            await spamd(port).learn(Message(CLEAN), "spam", "cli")
    with pytest.raises(SpamdError, match="cannot connect"):
        await tell("127.0.0.1", closed_port(), CLEAN, "ham")
    with pytest.raises(SpamdError, match="spam or ham"):
        await tell("127.0.0.1", port, CLEAN, "forget")


async def test_nothing_listening_is_a_spamd_error() -> None:
    with pytest.raises(SpamdError, match="cannot connect"):
        await check("127.0.0.1", closed_port(), CLEAN)


# -- through the proxy ------------------------------------------------------------------------


async def test_marker_scores_tags_and_score_plugin_rejects(
    spamd_server: SpamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("spamd")
    proxy = await proxy_factory(spamd(spamd_server.port), probe, score(reject=15), upstream=sink.port)
    code, text = await send(port_of(proxy), SPAM)
    assert code == 550
    assert re.fullmatch(r"5\.7\.1 Message rejected as spam \(score \d+\.\d\)", text), text
    assert sink.messages == []
    assert probe.score >= 20.0
    assert {"spamd:spam", "spamd:SMTPPROXY_TEST"} <= probe.tags
    assert "spamd:ham" not in probe.tags
    assert probe.reasons[0].startswith("spamd score ") and "SMTPPROXY_TEST" in probe.reasons[0]


async def test_clean_message_is_delivered_with_optional_headers_and_no_spoofed_ones(
    spamd_server: SpamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("spamd")
    plugin = spamd(spamd_server.port, add_headers=True)
    proxy = await proxy_factory(plugin, probe, score(reject=15), upstream=sink.port)
    spoofed = b"X-Spam-Spamd-Score: -100/5\r\n" + CLEAN
    assert await send(port_of(proxy), spoofed) == (250, "2.0.0 Ok: queued as SINK1")
    content = sink.messages[0].content
    [value] = header(content, "X-Spam-Spamd-Score")
    assert re.fullmatch(r"-?\d+(\.\d+)?/5", value) and not value.startswith("-100")
    assert len(header(content, "X-Spam-Spamd-Symbols")) == 1
    assert "spamd:ham" in probe.tags and probe.score < 5.0
    assert b"shall we meet at noon" in content


async def test_score_factor_scales_spamds_score(
    spamd_server: SpamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("spamd")
    proxy = await proxy_factory(spamd(spamd_server.port, score_factor=0.1), probe, score(reject=15),
                                upstream=sink.port)
    assert (await send(port_of(proxy), SPAM))[0] == 250  # about 2 points: under the threshold
    assert 2.0 <= probe.score < 15.0
    assert "spamd:SMTPPROXY_TEST" in probe.tags


async def test_gtube_is_recognised(spamd_server: SpamdServer, proxy_factory: ProxyFactory, sink: Sink) -> None:
    probe = Probe("spamd")
    proxy = await proxy_factory(spamd(spamd_server.port), probe, upstream=sink.port)
    assert (await send(port_of(proxy), mail(GTUBE)))[0] == 250  # no score plugin: only scored
    assert {"spamd:spam", "spamd:GTUBE"} <= probe.tags
    assert probe.score >= 1000.0


async def test_oversize_message_is_not_sent(
    spamd_server: SpamdServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    probe = Probe("spamd")
    proxy = await proxy_factory(spamd(spamd_server.port, max_size=200), probe, score(reject=15),
                                upstream=sink.port)
    assert len(SPAM) > 200
    assert (await send(port_of(proxy), SPAM))[0] == 250
    assert probe.tags == {"spamd:skipped"} and probe.score == 0.0
    assert "over max_size 200" in probe.reasons[0]


# -- failures ---------------------------------------------------------------------------------


# (stopped and silent spamd: tests/plugins/test_scanner_failures.py, shared with the other bridge)


async def test_spamd_error_status_is_an_error(proxy_factory: ProxyFactory, sink: Sink) -> None:
    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refusing, "127.0.0.1", 0)
    try:
        proxy = await proxy_factory(spamd(server.sockets[0].getsockname()[1], on_error="tempfail"),
                                    upstream=sink.port)
        assert (await send(port_of(proxy), CLEAN))[0] == 451
    finally:
        server.close()


# -- settings and registration ----------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    s = Spamd.Settings()
    assert (s.host, s.port, s.timeout, s.max_size, s.on_error) == ("127.0.0.1", 783, 8, 512000, "continue")
    assert s.score_factor == 1.0 and not s.add_headers and s.user is None
    for bad in ({"on_error": "explode"}, {"user": "bob\r\nX: y"}, {"port": 0}, {"timeout": 0},
                {"score_factor": float("nan")}, {"hots": "x"}):
        with pytest.raises(ValidationError):
            Spamd.Settings.model_validate(bad)
    for name, field in Spamd.Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_docs_example_chain_is_valid(tmp_path: Path) -> None:
    from smtpproxy.config import load_config

    text = (Path(__file__).parents[2] / "docs" / "plugins" / "spamd.md").read_text()
    block = re.findall(r"```yaml\n(.*?)```", text, re.S)[0]
    (tmp_path / "smtpproxy.yaml").write_text(
        "listeners: [{port: 2525}]\ndelivery: {type: maildir, path: /tmp/m}\n" + block
    )
    config, _ = load_config(tmp_path / "smtpproxy.yaml")
    assert [p.name for p in config.plugins] == ["spamd", "score"]
    spamd_settings = Spamd.Settings.model_validate(config.plugins[0].settings)
    assert spamd_settings.add_headers and spamd_settings.on_error == "continue"
    Score.Settings.model_validate(config.plugins[1].settings)


def test_entry_point_is_registered() -> None:
    [ep] = [e for e in importlib.metadata.entry_points(group="smtpproxy.plugins") if e.name == "spamd"]
    assert ep.load() is Spamd
