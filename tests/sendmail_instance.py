"""A private Sendmail for the milter tests: Debian's sendmail-bin, run as a daemon on a free
loopback port with a configuration made at test time by m4 from sendmail-cf, queueing only.

Debian's sendmail-bin cannot be installed beside Postfix (both are the mail-transport-agent),
so .ci/run unpacks the packages (``apt-get download`` and ``dpkg -x``) into
``.ci/cache/sendmail``; ``SMTPPROXY_SENDMAIL`` names another such directory, and a system
Sendmail (``/usr/libexec/sendmail/sendmail`` with ``/usr/share/sendmail/cf``) serves too.
Without any, or without m4, the tests skip with the reason.

Sendmail runs as root, from its own directory (queue, status file, aliases), never looks up
DNS (its service switch says hosts: files), and keeps every message in its queue
(``DeliveryMode=queueonly``): the tests read the queue files, where a milter's edits are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemons import free_port

__all__ = ["Queued", "SendmailInstance", "sendmail_commands", "sendmail_factory"]

_CHECKOUT = Path(__file__).resolve().parents[1]
_UNPACKED = ("usr/libexec/sendmail/sendmail", "usr/share/sendmail/cf")


def sendmail_commands() -> tuple[Path, Path] | None:
    """(the sendmail binary, sendmail-cf's cf directory), or None when there is none."""
    roots = [os.environ.get("SMTPPROXY_SENDMAIL"), str(_CHECKOUT / ".ci" / "cache" / "sendmail"), "/"]
    for root in filter(None, roots):
        binary, cf = (Path(root) / part for part in _UNPACKED)
        if binary.is_file() and (cf / "m4" / "cf.m4").is_file():
            return binary, cf
    return None


def _skip_reason() -> str | None:
    if sendmail_commands() is None:
        return ("needs Debian's Sendmail: apt-get download sendmail-bin sendmail-base sendmail-cf and "
                "dpkg -x each into .ci/cache/sendmail (as .ci/run does), or SMTPPROXY_SENDMAIL")
    if shutil.which("m4") is None:
        return "needs m4 (apt-get install m4) to make Sendmail's configuration"
    if os.geteuid() != 0:
        return "Sendmail's daemon runs as root"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare (Sendmail's own host name)"
    return None


def _named(command: list[str]) -> list[str]:
    """*command* in a UTS namespace of its own whose host name has a dot: for an unqualified
    one ("vm") that its service switch cannot qualify, Sendmail sleeps a minute at start."""
    return ["unshare", "--uts", "sh", "-c", 'hostname mx.sendmail.test && exec "$@"', "sh", *command]


@dataclass
class Queued:
    """One message in Sendmail's queue: its envelope and header fields as the queue file
    has them (``H`` lines, without Sendmail's ``?flags?``)."""

    sender: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class SendmailInstance:
    """Sendmail's daemon on 127.0.0.1:``port``, with one milter (``milter_port``)."""

    root: Path
    port: int
    milter_port: int
    milter_options: str = "F=T, T=S:10s;R:10s;E:5m"
    """INPUT_MAIL_FILTER's equates: F=T (tempfail when the filter fails) as docs/deploy-milter.md says."""
    mc: str = ""
    """More lines for the ``.mc`` file (``define(...)dnl``)."""
    process_id: int | None = field(default=None, init=False)

    def start(self) -> None:
        commands = sendmail_commands()
        assert commands is not None
        binary, cf = commands
        queue = self.root / "queue"
        queue.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("aliases", "statistics", "helpfile"):
            (self.root / name).touch()
        (self.root / "service.switch").write_text("hosts files\naliases files\n")
        mc = f"""divert(-1)
divert(0)dnl
include(`{cf}/m4/cf.m4')dnl
VERSIONID(`smtpproxy tests')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `mx.sendmail.test')dnl
define(`QUEUE_DIR', `{queue}')dnl
define(`confSTATUS_FILE', `{self.root}/statistics')dnl
define(`ALIAS_FILE', `{self.root}/aliases')dnl
define(`confHELP_FILE', `{self.root}/helpfile')dnl
define(`confPID_FILE', `{self.root}/sendmail.pid')dnl
define(`confSERVICE_SWITCH_FILE', `{self.root}/service.switch')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confDELIVERY_MODE', `queueonly')dnl
define(`confDEF_USER_ID', `root:root')dnl
define(`confRUN_AS_USER', `root:root')dnl
define(`confDONT_BLAME_SENDMAIL', `GroupReadableKeyFile,GroupWritableDirPathSafe,InsufficientEntropy')dnl
INPUT_MAIL_FILTER(`smtpproxy', `S=inet:{self.milter_port}@127.0.0.1, {self.milter_options}')dnl
{self.mc}FEATURE(`promiscuous_relay')dnl
FEATURE(`accept_unresolvable_domains')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
        made = subprocess.run(["m4"], input=mc, capture_output=True, text=True, check=True)
        (self.root / "sendmail.cf").write_text(made.stdout)
        # The daemon forks and keeps its standard files: they go to a file, not a pipe that
        # would never reach its end.
        daemon = [str(binary), "-C", str(self.root / "sendmail.cf"), "-bd",
                  f"-ODaemonPortOptions=Port={self.port},Addr=127.0.0.1,Name=MTA"]
        with (self.root / "sendmail.out").open("wb") as out:
            subprocess.run(_named(daemon), check=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           cwd=self.root, timeout=30)
        deadline = time.monotonic() + 30
        pid_file = self.root / "sendmail.pid"
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "Sendmail wrote no pid file"
            time.sleep(0.05)
        self.process_id = int(pid_file.read_text().split()[0])

    def stop(self) -> None:
        if self.process_id is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process_id, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.process_id, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.process_id = None

    def command(self, *args: str) -> str:
        """Run this Sendmail's binary with its configuration and *args*; its output."""
        commands = sendmail_commands()
        assert commands is not None
        done = subprocess.run(_named([str(commands[0]), "-C", str(self.root / "sendmail.cf"), *args]),
                              capture_output=True, text=True, timeout=30, cwd=self.root, check=True)
        return done.stdout + done.stderr

    def queued(self) -> list[Queued]:
        """The messages in the queue, oldest first."""
        return [queued for _, queued in self._read("qf")]

    def quarantined(self) -> list[tuple[str, Queued]]:
        """The quarantined messages (``hf`` files), oldest first, with their reason."""
        return self._read("hf")

    def _read(self, kind: str) -> list[tuple[str, Queued]]:
        found = []
        for qf in sorted((self.root / "queue").glob(kind + "*"), key=lambda p: p.stat().st_mtime_ns):
            lines = qf.read_bytes().decode("latin-1").split("\n")
            reason = next((line[1:] for line in lines if line.startswith("q")), "")
            sender, recipients, headers = "", [], []
            for line in lines:
                if line.startswith("S"):
                    sender = line[1:]
                elif line.startswith("R"):
                    recipients.append(line.rpartition(":")[2])
                elif line.startswith("H"):
                    text = line[1:]
                    if text.startswith("?"):  # ?flags? before the field
                        text = text[text.index("?", 1) + 1:]
                    name, _, value = text.partition(":")
                    headers.append((name, value.strip()))
                elif line.startswith(("\t", " ")) and headers:  # a folded field's next line
                    name, value = headers[-1]
                    headers[-1] = (name, value + " " + line.strip())
            body = (qf.parent / ("df" + qf.name[2:])).read_bytes()
            found.append((reason, Queued(sender, recipients, headers, body)))
        return found


@pytest.fixture
def sendmail_factory(tmp_path: Path) -> Iterator[Callable[..., SendmailInstance]]:
    """``start(milter_port, **options)``: a started :class:`SendmailInstance`, stopped after the test."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    started: list[SendmailInstance] = []

    def start(milter_port: int, **options: str) -> SendmailInstance:
        instance = SendmailInstance(tmp_path / f"sendmail{len(started)}", free_port(), milter_port, **options)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        instance.stop()
