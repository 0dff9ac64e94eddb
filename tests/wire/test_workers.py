"""``workers: N``: a supervisor and N proxy processes sharing one port, as a user runs it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.config import ConfigError, load_config
from tests.daemons import LogLines, free_port

MESSAGE = b"From: a@sender.test\r\nSubject: workers\r\n\r\nHello.\r\n"


class Supervisor:
    def __init__(self, config: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                                     stderr=subprocess.PIPE, cwd=config.parent)
        assert self.proc.stderr is not None
        self.log = LogLines(self.proc.stderr)

    def worker_pids(self, count: int) -> dict[int, int]:
        """worker index -> pid, from the next ``count`` listening lines."""
        pids = {}
        for _ in range(count):
            line = self.log.wait_line(r"event=listening ")
            match = re.search(r"worker=(\d+) pid=(\d+)", line)
            assert match, line
            pids[int(match.group(1))] = int(match.group(2))
        return pids


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, int]]:
    port = free_port()
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        f"listeners:\n  - address: 127.0.0.1\n    port: {port}\n"
        "workers: 2\nhostname: workers.test\npid_file: smtpproxy.pid\n"
        "delivery:\n  type: maildir\n  path: mail\n"
        "limits:\n  max_sessions_per_ip: 100\n"  # the burst below is 40 connections from one address
    )
    sup = Supervisor(config)
    try:
        yield sup, port
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()


def send(port: int, count: int) -> None:
    for _ in range(count):  # a new connection each time: the kernel spreads them
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("a@sender.test", ["bob@localhost"], MESSAGE) == {}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_workers_share_the_port_reload_restart_and_stop_together(
    supervisor: tuple[Supervisor, int], tmp_path: Path
) -> None:
    sup, port = supervisor
    pids = sup.worker_pids(2)
    assert sorted(pids) == [0, 1] and sup.proc.pid not in pids.values()
    sup.log.wait_line(r"event=workers_ready workers=2")
    assert int((tmp_path / "smtpproxy.pid").read_text()) == sup.proc.pid  # the supervisor's

    send(port, 20)
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 20

    sup.proc.send_signal(signal.SIGHUP)  # forwarded: every worker reloads
    reloaded = [sup.log.wait_line(r"event=reload ") for _ in range(2)]  # one line per worker
    assert len(reloaded) == 2 and all("result=ok" in line for line in reloaded)

    os.kill(pids[1], signal.SIGKILL)  # a worker dies: the supervisor starts another
    sup.log.wait_line(r"event=worker_died .*worker=1")
    new_pids = sup.worker_pids(1)
    assert list(new_pids) == [1] and new_pids[1] != pids[1]
    send(port, 4)

    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(timeout=30) == 0
    assert not alive(pids[0]) and not alive(new_pids[1])
    assert not (tmp_path / "smtpproxy.pid").exists()


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("listeners:\n  - address: 127.0.0.1\n    port: 0\nworkers: 4\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(config))
    assert "workers" in str(error.value) and "listeners[0] has port 0" in str(error.value)


def test_connections_queued_while_a_worker_dies_are_all_greeted(
    supervisor: tuple[Supervisor, int],
) -> None:
    """A burst of connections while one worker is stuck and then SIGKILLed: none is lost.

    With one SO_REUSEPORT socket per worker the kernel hashes about half of the burst onto
    the stuck worker's own accept queue, and resets them when that process dies. With the
    listening socket opened once by the supervisor and shared, the live worker accepts them.
    """
    sup, port = supervisor
    pids = sup.worker_pids(2)
    sup.log.wait_line(r"event=workers_ready workers=2")
    os.kill(pids[1], signal.SIGSTOP)  # busy or dying: accepts nothing from now on
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pids[1]}/stat").read_text().split()[2] != "T" and time.monotonic() < deadline:
        time.sleep(0.01)  # until it is really stopped (not mid-accept on the other core)
    try:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    finally:
        os.kill(pids[1], signal.SIGKILL)
    greeted, lost = 0, []
    for client in clients:
        with client:
            try:
                banner = client.makefile("rb").readline()
            except OSError as exc:
                lost.append(repr(exc))
                continue
            if banner.startswith(b"220"):
                greeted += 1
            else:
                lost.append(repr(banner))
    assert lost == [] and greeted == 40
    sup.log.wait_line(r"event=worker_died .*worker=1")
    assert list(sup.worker_pids(1)) == [1]  # and the supervisor restarted it
    send(port, 4)


def test_a_reload_while_a_worker_restarts_does_not_kill_it(supervisor: tuple[Supervisor, int]) -> None:
    """SIGHUP forwarded to a worker still starting (no handler yet) would end it (default action).

    The supervisor holds the reload until the worker says it listens, then passes it on.
    """
    sup, port = supervisor
    pids = sup.worker_pids(2)
    sup.log.wait_line(r"event=workers_ready workers=2")
    os.kill(pids[1], signal.SIGKILL)
    sup.log.wait_line(r"event=worker_died .*worker=1")
    since = len(sup.log.lines)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # reloads all through the restart delay and the start
        sup.proc.send_signal(signal.SIGHUP)
        with contextlib.suppress(AssertionError):  # keep reading: a full pipe would stall them
            sup.log.wait_line(r"event=worker_started worker=1", timeout=0.02)
            break
    restart = "".join(sup.log.lines[since:])
    assert "worker_restart_failed" not in restart and "event=worker_started worker=1" in restart
    send(port, 4)


def test_workers_end_when_the_supervisor_is_killed(supervisor: tuple[Supervisor, int]) -> None:
    """A SIGKILLed supervisor cannot stop its workers: they get SIGTERM from the kernel and
    exit, instead of holding the inherited listening socket so that no new supervisor can bind."""
    sup, port = supervisor
    pids = sup.worker_pids(2)
    sup.log.wait_line(r"event=workers_ready workers=2")
    sup.proc.kill()
    sup.proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll until they exited
    assert not any(alive(pid) for pid in pids.values())
    with socket.socket() as again:  # and the port is free again
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_a_busy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    """The supervisor binds the listening sockets itself now, so it reports a busy port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "smtpproxy.yaml"
        config.write_text(f"listeners:\n  - address: 127.0.0.1\n    port: {port}\nworkers: 2\n"
                          "delivery:\n  type: maildir\n  path: mail\n")
        done = subprocess.run([sys.executable, "-m", "smtpproxy", "run", "-c", str(config)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert f"cannot start: listeners[0]: cannot listen on 127.0.0.1:{port}" in done.stderr
    # and the line a log pipeline (and the journal, as an error) sees, as without workers
    assert f"level=error event=startup_failed error=\"listeners[0]: cannot listen on 127.0.0.1:{port}" in done.stderr


def test_workers_auto_is_one_per_usable_core(tmp_path: Path) -> None:
    """``workers: auto`` follows the process's CPU affinity (what a cgroup/taskset leaves it)."""
    from smtpproxy.config import MAX_WORKERS, cpu_count

    config = tmp_path / "smtpproxy.yaml"
    config.write_text("listeners:\n  - address: 127.0.0.1\n    port: 2525\nworkers: auto\n")
    loaded, _ = load_config(str(config))
    assert loaded.workers == "auto"
    assert loaded.worker_count == cpu_count() == min(len(os.sched_getaffinity(0)), MAX_WORKERS)


@pytest.mark.parametrize("value", ["0", "65", "auto2", "'2'", "2.5"])
def test_workers_refuses_what_is_neither_a_count_nor_auto(tmp_path: Path, value: str) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(f"listeners:\n  - address: 127.0.0.1\n    port: 2525\nworkers: {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(config))
    assert "workers" in str(error.value) and "'auto'" in str(error.value)


def test_workers_auto_needs_fixed_ports_whatever_the_core_count(tmp_path: Path) -> None:
    config = tmp_path / "smtpproxy.yaml"
    config.write_text("listeners:\n  - address: 127.0.0.1\n    port: 0\nworkers: auto\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(config))
    assert "workers: auto needs a fixed port" in str(error.value)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_workers_auto_starts_one_worker_per_core_of_its_affinity(tmp_path: Path) -> None:
    """Pinned to two cores, ``smtpproxy run`` with ``workers: auto`` supervises two workers."""
    port = free_port()
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        f"listeners:\n  - address: 127.0.0.1\n    port: {port}\n"
        "workers: auto\nhostname: workers.test\ndelivery:\n  type: maildir\n  path: mail\n"
    )
    two = sorted(os.sched_getaffinity(0))[:2]
    pinned = (f"import os, runpy, sys; os.sched_setaffinity(0, {two!r}); "
              f"sys.argv = ['smtpproxy', 'run', '-c', {str(config)!r}]; "
              "runpy.run_module('smtpproxy', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", pinned], stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stderr is not None
    log = LogLines(proc.stderr)
    try:
        log.wait_line(r"event=workers_ready workers=2")
        send(port, 2)
        assert len(list((tmp_path / "mail" / "new").iterdir())) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
