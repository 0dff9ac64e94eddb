"""The ``smtpproxy`` command as a user runs it: a real process, real sockets, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import smtpproxy
from smtpproxy.versions import LOG_FORMAT_VERSION
from tests.daemons import LogLines

EXE = [sys.executable, "-m", "smtpproxy"]
MESSAGE = b"From: a@sender.test\r\nTo: bob@localhost\r\nSubject: cli\r\n\r\nHello from the CLI test.\r\n"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


class Running:
    """A proxy process; ``port`` comes from its own 'listening' log line."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        assert proc.stderr is not None
        self._lines = LogLines(proc.stderr)
        self.log = self._lines.lines
        line = self._lines.wait_line(r"event=listening address=\S+ port=(\d+)")
        match = re.search(r"port=(\d+)", line)
        assert match is not None
        self.port = int(match.group(1))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        self.log.append(err)
        return "".join(self.log)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "hostname: cli.test\n"
        "delivery:\n  type: maildir\n  path: mail\n"
    )
    proc = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        yield Running(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_delivers_to_maildir_and_stops_on_sigterm(running: Running, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        code, banner = client.ehlo("client.test")
        assert code == 250 and banner.startswith(b"cli.test")
        refused = client.sendmail("a@sender.test", ["bob@localhost"], MESSAGE)
        assert refused == {}
    delivered = list((tmp_path / "mail" / "new").iterdir())  # paths relative to the config file
    assert len(delivered) == 1
    assert delivered[0].read_bytes().endswith(MESSAGE)
    log = running.stop()
    assert running.proc.returncode == 0
    # one structured line per session event, each with the session id
    sids = set(re.findall(r"event=(?:connect|helo|mail_from|rcpt_to|message|disconnect) sid=(\w+)", log))
    assert len(sids) == 1, log
    assert re.search(r"event=message sid=\w+ tx=\S+ sender=a@sender.test recipients=bob@localhost "
                     r"size=\d+ decision=delivered reply=\"250 2.0.0\"", log), log
    assert "event=shutdown" in log
    # the listening line says which version wrote the log, and in which log format
    assert re.search(rf"event=listening .* version={re.escape(smtpproxy.__version__)} "
                     rf"log_format={re.escape(LOG_FORMAT_VERSION)}\n", log), log


def test_embedded_default_quick_start(tmp_path: Path) -> None:
    """``smtpproxy run`` with no config: 127.0.0.1:2525 into ./mail, as the README says."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2525)) == 0:
            pytest.skip("port 2525 is in use on this machine")
    proc = subprocess.Popen([*EXE, "run"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        running = Running(proc)
        assert running.port == 2525
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            assert client.sendmail("a@sender.test", ["bob@localhost"], MESSAGE) == {}
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@sender.test", ["victim@example.com"], MESSAGE)  # not an open relay
        assert len(list((tmp_path / "mail" / "new").iterdir())) == 1
        running.stop()
        assert proc.returncode == 0
        # Its history is in ./smtpproxy.db, and the commands without -c read it.
        history = subprocess.run([*EXE, "history", "export"], capture_output=True, text=True,
                                 timeout=60, cwd=tmp_path)
        assert history.returncode == 0, history.stderr
        [entry] = [json.loads(line) for line in history.stdout.splitlines()]
        assert (entry["sender"], entry["recipients"], entry["decision"]) == (
            "a@sender.test", ["bob@localhost"], "delivered")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == (f"smtpproxy {smtpproxy.__version__} (plugin API {smtpproxy.PLUGIN_API_VERSION}, "
                             f"log format {LOG_FORMAT_VERSION})\n")
    assert re.fullmatch(r"\d+\.\d+\.\d+", smtpproxy.__version__)


def test_a_listing_into_a_closed_pipe_ends_quietly() -> None:
    """`smtpproxy plugins | head -1`: the reader has gone before the listing is written; the
    command ends without a BrokenPipeError traceback (as a Unix tool does)."""
    proc = subprocess.Popen([*EXE, "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the child has imported its plugins and written a line
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_plugins_lists_first_party_plugins_with_their_hooks() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0
    assert re.search(r"^headers\s+smtpproxy_plugins\.headers:AddHeaders \[smtpproxy\]$", result.stdout, re.M)
    assert re.search(r"^\s+hooks: data$", result.stdout, re.M)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listeners:\n  - address: 127.0.0.1\n     port: 25\n", r"broken\.yaml:3:\d+: YAML syntax error"),
        ("limits:\n  max_sesions: 5\n", r"broken\.yaml:2:3: limits\.max_sesions: unknown key \(did you mean 'max_sessions'\?\)"),
        ("listeners:\n  - port: lots\n", r"broken\.yaml:2:\d+: listeners\[0\]\.port: "),
        ("plugins:\n  - name: nosuchplugin\n", r"broken\.yaml:2:\d+: plugins\[0\]\.name: no installed plugin named 'nosuchplugin'"),
        ("plugins:\n  - name: x\n    use: nosuchmodule.sub:Thing\n", r"broken\.yaml:3:\d+: plugins\[0\]\.use: cannot import 'nosuchmodule\.sub'"),
        ("plugins:\n  - name: headers\n    settings:\n      add: {X-A: b}\n      typo: 1\n", r"broken\.yaml:5:7: plugins\[0\]\.settings\.typo: unknown key"),
        ("plugins:\n  - name: headers\n    settings:\n      add: [1, 2]\n", r"broken\.yaml:4:\d+: plugins\[0\]\.settings\.add: "),
    ],
)
def test_check_config_names_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    result = run_cli("check-config", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert re.search(expected, result.stderr), result.stderr


def test_check_config_accepts_the_shipped_example() -> None:
    example = Path(__file__).parents[2] / "config" / "smtpproxy.yaml"
    env = dict(os.environ, UPSTREAM_HOST="127.0.0.1")
    result = subprocess.run([*EXE, "check-config", "-c", str(example)], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_run_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(tmp_path, f"listeners:\n  - address: 127.0.0.1\n    port: {port}\n")
        result = run_cli("run", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_run_on_the_configured_event_loop_forwards_upstream(tmp_path: Path, choice: str) -> None:
    """Both loops carry a message to a real upstream (the streamed DATA path included)."""
    import asyncio

    from tests.conftest import start_sink

    pytest.importorskip(choice)
    sink = await start_sink()
    config = write(tmp_path, (
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        f"event_loop: {choice}\nhostname: cli.test\n"
        f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {sink.port}\n  tls: none\n"
    ))
    proc = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True,  # noqa: ASYNC220 - Popen returns at once
                            cwd=tmp_path)
    try:
        running = await asyncio.to_thread(Running, proc)
        assert f"loop={choice}" in "".join(running.log)
        big = MESSAGE + b"x" * 998 + b"\r\n" + b".leading dot\r\n" * 2000

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
                return client.sendmail("a@sender.test", ["bob@localhost"], big)

        assert await asyncio.to_thread(send) == {}
        # the sink is told nothing about the client: received_header auto adds our trace field
        content = sink.messages[0].content
        assert content.startswith(b"Received: from ") and content.endswith(b"\r\n" + big)
        await asyncio.to_thread(running.stop)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.server.close()


def test_run_refuses_uvloop_when_it_is_not_installed(tmp_path: Path) -> None:
    config = write(tmp_path, "listeners:\n  - address: 127.0.0.1\n    port: 0\nevent_loop: uvloop\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no-uvloop")}
    hide = tmp_path / "no-uvloop" / "uvloop"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    result = subprocess.run([*EXE, "run", "-c", str(config)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "pip install uvloop" in result.stderr


def test_uvloop_is_a_default_dependency_where_it_installs() -> None:
    """``pip install smtpproxy`` brings uvloop on CPython/Linux/macOS, without any extra."""
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    uvloop = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "uvloop"]
    assert len(uvloop) == 1 and uvloop[0].marker is not None
    marker = uvloop[0].marker
    env = default_environment()
    for platform_name, implementation, wanted in [
        ("linux", "CPython", True), ("darwin", "CPython", True),
        ("win32", "CPython", False), ("linux", "PyPy", False),
    ]:
        here = {**env, "sys_platform": platform_name, "platform_python_implementation": implementation,
                "extra": ""}
        assert marker.evaluate(here) is wanted, (platform_name, implementation)


def test_run_takes_uvloop_by_default(tmp_path: Path) -> None:
    """No event_loop in the file: ``auto``, which runs on uvloop where it is installed."""
    pytest.importorskip("uvloop")
    config = write(tmp_path, "listeners:\n  - address: 127.0.0.1\n    port: 0\nhostname: cli.test\n")
    proc = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        running = Running(proc)
        assert any("loop=uvloop" in line for line in running.log), running.log
        running.stop()
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
