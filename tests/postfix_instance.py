"""A private, throwaway Postfix for tests: the real upstream MTA behind the proxy.

Why a real Postfix: the proxy's job is to sit in front of an MTA, and the MTA's actual behaviour
(XCLIENT, STARTTLS, RCPT-time rejection, asynchronous delivery, outages) is what the proxy must
get right. A fake upstream only checks what its author thought of.

How it is isolated from the machine's own Postfix:

* every path Postfix writes to (config, queue, data, Maildirs, log) lives under one temporary
  ``root``; ``/etc/postfix`` is read by nothing but ``postconf -d`` and is never changed;
* the master is started with ``postfix -c ROOT/etc start-fg``. A non-default config directory
  only has to be listed in ``alternate_config_directories`` for the *set-gid* commands
  (postdrop, postqueue); ``postfix``/``master`` run by root take ``-c`` as it is. ``start-fg``
  keeps the master in our process tree instead of daemonizing it, and this process becomes a
  child subreaper, so that the master and its daemons are all reaped by us on ``stop`` (PID 1
  on a VM or in a container does not always reap orphans);
* master.cf has exactly one ``inet`` service, ``127.0.0.1:PORT``, on a free port: nothing listens
  on port 25 and nothing but loopback is touched;
* nothing can leave: no ``mydestination``, ``reject_unauth_destination`` at RCPT, and every
  transport other than ``virtual`` is ``error:``; DNS is off everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from tests.daemons import free_port

#: Where Debian puts the administrative commands; also searched when PATH lacks the sbin dirs
#: (a non-login root shell, some CI runners).
_SBIN_PATH = "/usr/sbin:/sbin:/usr/local/sbin"

_T = TypeVar("_T")

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

_SKIP_REASON = "Postfix is not installed: apt-get install postfix"

#: What Debian's /usr/lib/postfix/configure-instance.sh copies into the queue directory for
#: chrooted daemons (those that exist here), relative to / and to the queue directory.
_CHROOT_FILES = ("etc/localtime", "etc/services", "etc/resolv.conf", "etc/hosts", "etc/host.conf",
                 "etc/nsswitch.conf")

#: Queue directories that hold messages not yet delivered (maildrop: not yet picked up).
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

#: Services the instance needs besides its one smtpd listener. Same columns as Debian's stock
#: master.cf, except that nothing is chrooted: a chroot would need copies of /etc files inside
#: the temporary queue directory, and buys nothing in a test. Only smtpd can be chrooted
#: (``chroot_smtpd``), for what depends on it: paths that smtpd opens, such as a milter's or a
#: policy service's Unix socket.
_INTERNAL_SERVICES = """\
# service  type       private unpriv chroot wakeup maxproc command
pickup     unix       n       -      n      60     1       pickup
cleanup    unix       n       -      n      -      0       cleanup
qmgr       unix       n       -      n      300    1       qmgr
tlsmgr     unix       -       -      n      1000?  1       tlsmgr
rewrite    unix       -       -      n      -      -       trivial-rewrite
bounce     unix       -       -      n      -      0       bounce
defer      unix       -       -      n      -      0       bounce
trace      unix       -       -      n      -      0       bounce
verify     unix       -       -      n      -      1       verify
flush      unix       n       -      n      1000?  0       flush
proxymap   unix       -       -      n      -      -       proxymap
proxywrite unix       -       -      n      -      1       proxymap
smtp       unix       -       -      n      -      -       smtp
relay      unix       -       -      n      -      -       smtp
showq      unix       n       -      n      -      -       showq
error      unix       -       -      n      -      -       error
retry      unix       -       -      n      -      -       error
discard    unix       -       -      n      -      -       discard
local      unix       -       n      n      -      -       local
virtual    unix       -       n      n      -      -       virtual
lmtp       unix       -       -      n      -      -       lmtp
anvil      unix       -       -      n      -      1       anvil
scache     unix       -       -      n      -      1       scache
postlog    unix-dgram n       -      n      -      1       postlogd
"""


def _find(command: str) -> str | None:
    """Locate a Postfix command on PATH or in the sbin directories."""
    search = os.pathsep.join(filter(None, [os.environ.get("PATH", ""), _SBIN_PATH]))
    return shutil.which(command, path=search)


def postfix_commands() -> tuple[str, str, Path] | None:
    """``(postfix, postconf, master)`` paths, or None when Postfix is not (fully) installed."""
    postfix, postconf = _find("postfix"), _find("postconf")
    if postfix is None or postconf is None:
        return None
    try:
        daemon_dir = subprocess.run(
            [postconf, "-dh", "daemon_directory"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    master = Path(daemon_dir) / "master"
    if not master.is_file():
        return None
    return postfix, postconf, master


def require_postfix() -> None:
    """Skip the calling test when Postfix is not installed, and only then.

    Everything else (not root, a bad config, a start-up failure) is a real failure, so that CI,
    where .ci/run installs Postfix, cannot silently skip these tests.
    """
    if postfix_commands() is None:
        pytest.skip(_SKIP_REASON)


def _traversable(path: Path) -> bool:
    """Whether every directory from / down to ``path`` is searchable by other users.

    The Postfix daemons drop to the ``postfix`` user, which must reach the queue and the
    Maildirs; pytest's own tmp_path sits under a 0700 directory, hence the check.
    """
    return all(directory.stat().st_mode & 0o001 for directory in [path, *path.parents])


def _make_root() -> Path:
    """A fresh root-owned 0755 directory that the ``postfix`` user can traverse into."""
    base = Path(tempfile.gettempdir())
    if not _traversable(base):
        base = Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
    root.chmod(0o755)
    return root


def _become_subreaper() -> None:
    """Make this process adopt orphaned descendants, so that it can reap them.

    On SIGTERM the master signals its daemons and exits without waiting for them; they are
    orphaned, and a PID 1 that does not reap (as in some containers and VMs) leaves them as
    zombies forever. As a child subreaper (Linux prctl), this process adopts them instead and
    ``_session_pids`` reaps them. Harmless elsewhere: it only changes who reaps orphans.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, session id)`` of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ...": comm may contain spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])


def _session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (the master and its daemons); reaps adopted zombies.

    The master makes itself a session leader, so its session is exactly the instance's process
    tree, including daemons that outlive the master for a moment after SIGTERM.
    """
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        status = _proc_stat(pid)
        if status is None or status[1] != sid:
            continue
        if status[0] != "Z":
            live.append(pid)
            continue
        with contextlib.suppress(ChildProcessError):  # not ours to reap
            os.waitpid(pid, os.WNOHANG)
    return live


def _maildir_order(path: Path) -> tuple[int, int, int, str]:
    """Sort key for delivery order: Postfix names Maildir files ``SECONDS.V..I..M<MICROS>.HOST``."""
    match = re.match(r"(\d+)\.V[0-9a-f]+I[0-9a-f]+M(\d+)\.", path.name)
    if match:
        return int(match[1]), int(match[2]), 0, path.name
    return 0, 0, path.stat().st_mtime_ns, path.name


def _poll(what: str, check: Callable[[], _T | None], timeout: float, describe: Callable[[], str]) -> _T:
    """Call ``check`` until it returns something other than None; fail with context on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{describe()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass
class PostfixInstance:
    """One private Postfix: smtpd on 127.0.0.1:``port``, Maildirs for ``users`` at ``domain``.

    ``start``/``stop`` may be called repeatedly on the same root and port (an upstream outage in
    the middle of a test); queued mail and delivered Maildirs survive a restart.
    """

    root: Path
    port: int
    domain: str = "dest.test"
    users: tuple[str, ...] = ("bob", "alice", "carol")
    tls_cert: Path | None = None
    xclient_hosts: str = "127.0.0.0/8"
    extra_main_cf: dict[str, str] = field(default_factory=dict)
    """More main.cf settings (e.g. ``smtpd_milters``); they override the defaults above."""
    chroot_smtpd: bool = False
    """Run smtpd chrooted to the queue directory, as Debian's stock master.cf does, with the
    files Debian copies there (``_CHROOT_FILES``)."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _master_pid: int | None = field(default=None, init=False, repr=False)

    # -- layout --------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        """main.cf, master.cf, the mailbox map and the TLS key: ``postfix -c`` points here."""
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        """``queue_directory``: the spool, with the master's pid file in ``pid/``."""
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        """``data_directory``: the master lock and TLS caches."""
        return self.root / "data"

    @property
    def mail_dir(self) -> Path:
        """``virtual_mailbox_base``: ``<user>/new/`` holds delivered messages."""
        return self.root / "mail"

    @property
    def log_file(self) -> Path:
        """``maillog_file``, written by postlogd (no syslog involved)."""
        return self.root / "maillog"

    @property
    def output_file(self) -> Path:
        """stdout/stderr of the ``postfix start-fg`` process, for start-up diagnostics."""
        return self.root / "postfix.out"

    # -- configuration -------------------------------------------------------------------

    def _main_cf(self, uid: int, gid: int) -> str:
        """main.cf; each setting says why it is there."""
        no_relay = "error:5.7.1 no relaying from the test Postfix"
        settings: list[tuple[str, str]] = [
            # Current defaults without "backwards-compatible default setting" warnings.
            ("compatibility_level", "3.6"),
            # Everything it writes is under root. config_directory comes from -c / MAIL_CONFIG.
            ("queue_directory", str(self.queue_dir)),
            ("data_directory", str(self.data_dir)),
            ("maillog_file", str(self.log_file)),
            ("maillog_file_prefixes", str(self.root)),  # default allows only /var, /dev/stdout
            # Identity: fixed names, so replies and headers are predictable and need no DNS.
            ("myhostname", "postfix.test"),
            ("mydomain", "postfix.test"),
            ("myorigin", "$myhostname"),
            ("smtpd_banner", "$myhostname ESMTP"),
            # Loopback only, IPv4 only; the one listener is defined in master.cf.
            ("inet_interfaces", "127.0.0.1"),
            ("inet_protocols", "ipv4"),
            ("mynetworks", "127.0.0.0/8"),
            # Receive for `domain` only, into Maildirs, via virtual(8).
            ("mydestination", ""),
            ("relay_domains", ""),
            ("relayhost", ""),
            ("virtual_mailbox_domains", self.domain),
            ("virtual_mailbox_base", str(self.mail_dir)),
            # texthash: read directly, no postmap step.
            ("virtual_mailbox_maps", f"texthash:{self.config_dir / 'vmailbox'}"),
            ("virtual_alias_maps", ""),
            ("virtual_uid_maps", f"static:{uid}"),
            ("virtual_gid_maps", f"static:{gid}"),
            # virtual(8) refuses uids below this (default 100); the mail owner's uid is a
            # system uid that Debian normally allocates from 100 up, but be sure.
            ("virtual_minimum_uid", str(min(uid, 100))),
            ("virtual_transport", "virtual"),
            # Nothing ever leaves: refused at RCPT, and every other transport bounces.
            ("smtpd_relay_restrictions", "reject_unauth_destination"),
            ("smtpd_recipient_restrictions", ""),
            ("smtpd_reject_unlisted_recipient", "yes"),
            ("default_transport", no_relay),
            ("relay_transport", no_relay),
            ("local_transport", "error:5.1.1 no local delivery in the test Postfix"),
            ("alias_maps", ""),
            ("alias_database", ""),
            ("local_recipient_maps", ""),
            ("biff", "no"),
            # The proxy forwards client identity with XCLIENT / XFORWARD.
            ("smtpd_authorized_xclient_hosts", self.xclient_hosts),
            ("smtpd_authorized_xforward_hosts", self.xclient_hosts),
            # No DNS anywhere: offline, and no lookup delays.
            ("smtpd_peername_lookup", "no"),
            ("smtp_dns_support_level", "disabled"),
            ("smtp_host_lookup", "native"),
            ("lmtp_host_lookup", "native"),
            # Fast tests: no tarpit after errors, quick retries of anything deferred.
            ("smtpd_error_sleep_time", "0s"),
            ("in_flow_delay", "0s"),
            ("queue_run_delay", "1s"),
            ("minimal_backoff_time", "1s"),
            ("maximal_backoff_time", "5s"),
            ("smtpd_tls_loglevel", "1"),
        ]
        if self.tls_cert is None:
            settings.append(("smtpd_tls_security_level", "none"))
        else:
            settings += [
                ("smtpd_tls_security_level", "may"),
                ("smtpd_tls_chain_files", str(self.config_dir / "smtpd.pem")),
            ]
        merged = dict(settings) | self.extra_main_cf  # a name given twice: the extra one, in place
        return "".join(f"{name} = {value}\n" for name, value in merged.items())

    def _master_cf(self) -> str:
        """master.cf: one loopback smtpd on our port, plus the internal services."""
        chroot = "y" if self.chroot_smtpd else "n"
        smtpd = f"127.0.0.1:{self.port} inet n - {chroot} - - smtpd\n"
        return _INTERNAL_SERVICES + smtpd

    def _write_config(self) -> None:
        """(Re)write the configuration and create the directories Postfix does not create."""
        owner = pwd.getpwnam(self._postconf("mail_owner"))
        uid, gid = owner.pw_uid, owner.pw_gid
        self.config_dir.mkdir(mode=0o755, exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, uid, gid)
        # Maildirs are owned by the mail owner: virtual(8) delivers as virtual_uid_maps.
        self.mail_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_dir, uid, gid)
        if self.chroot_smtpd:
            for name in _CHROOT_FILES:
                if Path("/", name).is_file():
                    copy = self.queue_dir / name
                    copy.parent.mkdir(mode=0o755, exist_ok=True)
                    shutil.copyfile(Path("/", name), copy)
                    copy.chmod(0o644)
        (self.config_dir / "main.cf").write_text(self._main_cf(uid, gid))
        (self.config_dir / "master.cf").write_text(self._master_cf())
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{user}@{self.domain} {user}/\n" for user in self.users)  # "/": Maildir
        )
        if self.tls_cert is not None:
            pem = self.config_dir / "smtpd.pem"
            pem.touch(mode=0o600)
            pem.write_bytes(self.tls_cert.read_bytes())
        # Postfix will not read a config file or table modified in the current second: it polls
        # (0.3 s at a time) until the mtime is in the past, in case an editor is still writing.
        # Backdating what we just wrote turns a ~2 s start into ~0.3 s.
        past = time.time() - 10
        for path in self.config_dir.iterdir():
            os.utime(path, (past, past))

    # -- running -------------------------------------------------------------------------

    @staticmethod
    def _commands() -> tuple[str, str, Path]:
        """The Postfix commands, or a skip (only reachable if Postfix vanished mid-run)."""
        commands = postfix_commands()
        if commands is None:
            pytest.skip(_SKIP_REASON)
        return commands

    def _postconf(self, name: str) -> str:
        """A built-in default (``postconf -dh``): never reads /etc/postfix/main.cf."""
        _, postconf, _ = self._commands()
        result = subprocess.run(
            [postconf, "-dh", name], capture_output=True, text=True, timeout=30, check=True
        )
        return result.stdout.strip()

    def _env(self) -> dict[str, str]:
        """Our environment plus the sbin dirs (postfix-script runs postconf, postsuper...)."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(filter(None, [env.get("PATH", ""), _SBIN_PATH]))
        env["MAIL_CONFIG"] = str(self.config_dir)
        env.pop("MAIL_DEBUG", None)
        return env

    def is_running(self) -> bool:
        """Whether this instance's master (or any daemon it started) is still alive."""
        if self._process is not None and self._process.poll() is None:
            return True
        master = self._master_pid if self._master_pid is not None else self._running_master()
        return master is not None and bool(_session_pids(master))

    def start(self) -> None:
        """Start the master and return once smtpd has answered 220 on the port.

        ``postfix start-fg`` runs the usual integrity checks and creates the queue directories
        (post-install create-missing) inside ``queue_directory``, then runs the master in the
        foreground as our grandchild. No fixed sleeps: the port is polled.
        """
        if self.is_running():
            return
        if os.geteuid() != 0:
            raise RuntimeError("a Postfix master must be started as root")
        postfix, _, _ = self._commands()
        self._check_port_is_free()
        self._write_config()
        _become_subreaper()
        with self.output_file.open("ab") as out:
            self._process = subprocess.Popen(
                [postfix, "-c", str(self.config_dir), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C in the terminal is pytest's, not the MTA's
            )
        try:
            _poll(f"Postfix to answer 220 on 127.0.0.1:{self.port}", self._ready, 30, self._diagnostics)
        except BaseException:
            self.stop()
            raise

    def _check_port_is_free(self) -> None:
        """Fail clearly if something else listens on the port.

        The master's own fatal "bind ...: Address already in use" goes to postlogd, which is
        not running yet at that point, so without this check the error would be invisible.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the master does
            try:
                sock.bind(("127.0.0.1", self.port))
            except OSError as error:
                raise RuntimeError(f"cannot start Postfix: 127.0.0.1:{self.port} is in use ({error})") from error

    def _ready(self) -> bool | None:
        """True once the banner arrives; raises if the master died during start-up."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(
                f"postfix start-fg exited with status {self._process.returncode}\n" + self._diagnostics()
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                banner = sock.makefile("rb").readline()
                sock.sendall(b"QUIT\r\n")
        except OSError:
            return None
        if not banner.startswith(b"220"):
            raise RuntimeError(f"unexpected banner {banner!r}\n" + self._diagnostics())
        pid_file = self.queue_dir / "pid" / "master.pid"
        self._master_pid = int(pid_file.read_text().split()[0])
        return True

    def stop(self) -> None:
        """Stop the master and every daemon it started; idempotent.

        SIGTERM makes the master pass the signal on to its children and exit (what ``postfix
        abort`` does; ``postfix stop`` would also poll with 1 s sleeps). We then wait until no
        process of its session is left, so that a following ``start`` on the same port and root
        cannot collide with leftovers; anything that does not exit in time is SIGKILLed.
        """
        master = self._master_pid if self._master_pid is not None else self._running_master()
        if master is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGTERM)

        def stopped() -> bool | None:
            wrapper_done = self._process is None or self._process.poll() is not None
            return (wrapper_done and (master is None or not _session_pids(master))) or None

        try:
            _poll("Postfix to exit", stopped, 10, self._diagnostics)
        except TimeoutError:
            for pid in _session_pids(master) if master is not None else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self._process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
            _poll("Postfix to exit after SIGKILL", stopped, 10, self._diagnostics)
        if self._process is not None:
            self._process.wait()
            self._process = None
        self._master_pid = None

    def _running_master(self) -> int | None:
        """The pid in ``master.pid`` if that process is still this instance's master.

        Used when ``start`` failed before it learnt the pid. The check on the working directory
        (the master chdirs to its queue directory) keeps a stale pid file from making us signal
        an unrelated process that reused the pid.
        """
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError, IndexError):
            return None
        return pid if cwd == self.queue_dir and _proc_stat(pid) is not None else None

    # -- observing -----------------------------------------------------------------------

    def messages(self, user: str) -> list[bytes]:
        """Messages delivered to ``user`` (Maildir ``new/``), oldest first, as stored (LF ends)."""
        new = self.mail_dir / user / "new"
        if not new.is_dir():
            return []
        return [path.read_bytes() for path in sorted(new.iterdir(), key=_maildir_order)]

    def wait_for_messages(self, user: str, count: int, timeout: float = 20) -> list[bytes]:
        """Poll until ``user`` has at least ``count`` messages: Postfix delivers after its 250."""

        def check() -> list[bytes] | None:
            found = self.messages(user)
            return found if len(found) >= count else None

        return _poll(f"{count} message(s) for {user}", check, timeout, self._diagnostics)

    def log(self) -> str:
        """The instance's own mail log (``maillog_file``)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Poll the log until the regex ``pattern`` matches (searched with re.MULTILINE)."""
        compiled = re.compile(pattern, re.MULTILINE)
        return _poll(f"log line /{pattern}/", lambda: compiled.search(self.log()), timeout, self._diagnostics)

    def roots(self, daemon: str) -> set[Path]:
        """The root directories (``/proc/PID/root``) of this instance's live ``daemon`` processes:
        the queue directory for a chrooted one, ``/`` otherwise."""
        master = self._master_pid if self._master_pid is not None else self._running_master()
        found = set()
        for pid in _session_pids(master) if master is not None else []:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == daemon:
                    found.add(Path(os.readlink(f"/proc/{pid}/root")))
        return found

    def flush(self) -> None:
        """``postfix flush``: try what is deferred now, as an admin would, not at its retry time."""
        commands = postfix_commands()
        assert commands is not None
        subprocess.run([commands[0], "-c", str(self.config_dir), "flush"], check=True, capture_output=True,
                       timeout=30)

    def queue_is_empty(self) -> bool:
        """Whether no message waits in any queue (all delivered or bounced)."""
        return not any(
            path.is_file()
            for queue in _QUEUES
            if (self.queue_dir / queue).is_dir()
            for path in (self.queue_dir / queue).rglob("*")
        )

    def _diagnostics(self) -> str:
        """The tail of the log and of the start-up output, for failure messages."""
        try:
            output = self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            output = ""
        log_tail = "\n".join(self.log().splitlines()[-40:])
        return f"--- {self.log_file} (tail) ---\n{log_tail}\n--- {self.output_file} ---\n{output}"


class PostfixFactory(Protocol):
    """What the ``postfix_factory`` fixture yields: build and start one instance."""

    def __call__(
        self,
        *,
        domain: str = ...,
        users: tuple[str, ...] = ...,
        tls_cert: Path | None = ...,
        xclient_hosts: str = ...,
        port: int | None = ...,
        start: bool = ...,
        main_cf: dict[str, str] | None = ...,
        chroot_smtpd: bool = ...,
    ) -> PostfixInstance: ...


@pytest.fixture
def postfix_factory() -> Iterator[PostfixFactory]:
    """Create and start private Postfix instances; all are stopped and removed at teardown.

    Import it into a test module or a conftest as
    ``from tests.postfix_instance import postfix_factory as postfix_factory  # noqa: PLC0414``
    (the self-alias marks a re-export, so ruff does not flag the same-named test parameters). The log of every instance is printed at teardown, which pytest shows only for a
    failed test. Set SMTPPROXY_KEEP_POSTFIX=1 to keep the root directories for inspection.
    """
    require_postfix()
    instances: list[PostfixInstance] = []

    def create(
        *,
        domain: str = "dest.test",
        users: tuple[str, ...] = ("bob", "alice", "carol"),
        tls_cert: Path | None = None,
        xclient_hosts: str = "127.0.0.0/8",
        port: int | None = None,
        start: bool = True,
        main_cf: dict[str, str] | None = None,
        chroot_smtpd: bool = False,
    ) -> PostfixInstance:
        if port is None:
            port = free_port()
            while port in {other.port for other in instances}:  # released ports can come back
                port = free_port()
        instance = PostfixInstance(
            root=_make_root(),
            port=port,
            domain=domain,
            users=users,
            tls_cert=tls_cert,
            xclient_hosts=xclient_hosts,
            extra_main_cf=dict(main_cf or {}),
            chroot_smtpd=chroot_smtpd,
        )
        instances.append(instance)
        if start:
            instance.start()
        return instance

    try:
        yield create
    finally:
        errors: list[Exception] = []
        for instance in instances:
            try:  # one instance failing to stop must not leave the others running
                instance.stop()
            except Exception as error:
                errors.append(error)
        for instance in instances:
            print(f"=== Postfix on port {instance.port}, root {instance.root} ===\n{instance.log()}")
            if not os.environ.get("SMTPPROXY_KEEP_POSTFIX"):
                shutil.rmtree(instance.root, ignore_errors=True)
        if errors:
            raise errors[0]
