"""The processes of the benchmark: the sink, the shared DNS and Redis, and each system under test.

Every system is a separate process tree listening on a free loopback port and forwarding to
the same ``smtp-sink``. ``start()`` returns once the system answers ``220`` (polled, no fixed
sleeps); ``stop()`` ends exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
HOST = "127.0.0.1"
HARAKA_VERSION = "3.3.4"
READY_TIMEOUT = 60.0
HUGE_LIMIT = 120 * 1024 * 1024  # message size limit for every system (the huge scenario)
SESSIONS = 20000  # session limits, above the idle scenario's 10,000


class SystemError_(Exception):
    """A process of the benchmark could not be started or died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, proc: subprocess.Popen[bytes] | None, what: str, log: Path | None = None,
                banner: bytes = b"220") -> None:
    """Poll until something on *port* greets with *banner*; fail if *proc* exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise SystemError_(f"{what} exited with status {proc.returncode} before it was ready\n{tail}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(512).startswith(banner):
                    return
        except OSError:
            pass
        time.sleep(0.05)  # poll interval, not a wait for readiness
    raise SystemError_(f"{what} did not answer on port {port} within {READY_TIMEOUT:.0f} s")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start *argv* in its own process group, output to *log*."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM the process group we started, SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# --------------------------------------------------------------------------- shared services


@dataclass
class Sink:
    """Postfix's smtp-sink: accepts everything, costs little, never the bottleneck."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.port = free_port()
        argv = [binary]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        # -C: no XCLIENT, so smtpproxy sends XFORWARD per message (the costlier identity path).
        argv += ["-C", f"{HOST}:{self.port}", "4096"]
        self.proc = spawn(argv, self.workdir / "sink.log")
        wait_banner(self.port, self.proc, "smtp-sink", self.workdir / "sink.log")

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class PostfixUpstream:
    """A private, real Postfix (tests/postfix_instance.py) in the sink's place: it queues every
    message (cleanup writes and syncs a queue file) and delivers it to ``discard:``.

    With ``--upstream postfix`` the ``direct`` row is "Postfix alone" and the smtpproxy rows
    are "smtpproxy in front of that Postfix" (XCLIENT passes the client on): what the proxy
    costs a Postfix site, as seen by the sending client.
    """

    workdir: Path
    port: int = 0
    instance: Any = None

    def start(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.postfix_instance import PostfixInstance, _make_root, require_postfix

        require_postfix()
        self.port = free_port()
        self.instance = PostfixInstance(
            root=_make_root(), port=self.port, domain="bench.test", users=("rcpt",),
            extra_main_cf={
                "virtual_transport": "discard:bench",  # accepted, queued, then dropped
                "smtpd_client_connection_count_limit": "0",  # smtp-source -s 100 is one client
                "smtpd_client_connection_rate_limit": "0",
                "smtpd_client_message_rate_limit": "0",
                "default_process_limit": "200",  # room for 100 sessions plus the proxy's pool
                "message_size_limit": str(HUGE_LIMIT),
            })
        self.instance.start()

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()
            shutil.rmtree(self.instance.root, ignore_errors=True)


@dataclass
class DnsZone:
    """tests/dns_server.py's authoritative server in a child process (see dnszone.py)."""

    workdir: Path
    records: list[str]
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    delay: str | None = None
    """``MIN-MAX`` ms before each answer (dnszone.py --delay), None: at once."""

    def start(self) -> None:
        zonefile = self.workdir / "bench.zone"
        zonefile.write_text("\n".join(self.records) + "\n", encoding="ascii")
        delay = ["--delay", self.delay] if self.delay else []
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "dnszone.py"), str(zonefile), *delay],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise SystemError_(f"the DNS server did not start (said {line!r})")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        stop_process(self.proc)


@dataclass
class Redis:
    """A private redis-server for the rate limits of both chains (smtpproxy's and Haraka's)."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemError_("redis-server is not installed (apt-get install redis-server); "
                               "the chain systems need it for their rate limits")
        self.port = free_port()
        self.proc = spawn([binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                           "--appendonly", "no", "--dir", str(self.workdir)], self.workdir / "redis.log")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemError_("redis-server exited: " + (self.workdir / "redis.log").read_text()[-1000:])
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise SystemError_("redis-server did not answer PING")

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Services:
    sink: Sink | PostfixUpstream
    dns: DnsZone
    redis: Redis | None
    workdir: Path
    proxy_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Merged into smtpproxy's sections (``{"limits": {"max_sessions": 50}}``): run.py's
    --max-sessions and --dns-cache-size."""


# --------------------------------------------------------------------------- systems under test


@dataclass
class System:
    """One system under test. ``pid`` is the root of the tree whose CPU and memory are measured."""

    name: str
    services: Services
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dir: Path = field(default_factory=Path)
    description: str = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.dir = self.services.workdir / self.name
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.proc = self.launch()
        if self.proc is not None:
            wait_banner(self.port, self.proc, self.name, self.dir / "log")

    def launch(self) -> subprocess.Popen[bytes] | None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log_tail(self) -> str:
        log = self.dir / "log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


class Direct(System):
    """No system: the load goes straight to the sink (the ceiling)."""

    description = "smtp-sink itself (the ceiling)"

    def start(self) -> None:
        self.port = self.services.sink.port

    def launch(self) -> None:
        return None


class Baseline(System):
    description = "bench/baseline_forwarder.py: aiosmtpd -> aiosmtplib, new upstream connection per message"

    def __init__(self, name: str, services: Services, uvloop: bool = False) -> None:
        super().__init__(name, services)
        self.uvloop = uvloop

    def launch(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(BENCH / "baseline_forwarder.py"), str(self.port),
                str(self.services.sink.port)] + (["--uvloop"] if self.uvloop else [])
        return spawn(argv, self.dir / "log")


class SmtpProxy(System):
    """smtpproxy via its CLI, SMTP delivery to the sink, ``tls: none``: this checkout, or with
    ``root`` another one (``--before DIR``: the ``@before`` rows)."""

    def __init__(self, name: str, services: Services, *, chain: bool = False, loop: str = "default",
                 workers: int | str = 1, root: Path = ROOT) -> None:
        super().__init__(name, services)
        self.chain = chain
        self.loop = loop
        self.workers = workers
        self.root = root
        self.before = root != ROOT
        # uvloop became a dependency, and the default loop, with smtpproxy/eventloop.py (issue
        # 15): a checkout from before ran on asyncio's loop by default, one since on uvloop.
        self.asyncio_by_default = self.before and not (root / "smtpproxy" / "eventloop.py").exists()
        loop_text = {"default": ", default event loop", "asyncio": ", asyncio",
                     "uvloop": ", uvloop"}[loop]
        if self.asyncio_by_default and loop == "default":
            loop_text = ", asyncio (the default install had no uvloop)"
        self.description = ("smtpproxy, default chain (spf, dkim_verify, dmarc, auth_results, "
                            "ratelimit/redis, score)"
                            if chain else "smtpproxy, no plugins") + loop_text + (
                            f", workers: {workers}" if workers != 1 else "") + (
                            f", checkout {root}" if self.before else "")

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "hostname": "proxy.bench",
            "listeners": [{"address": HOST, "port": self.port}],
            "delivery": {"type": "smtp", "host": HOST, "port": self.services.sink.port, "tls": "none"},
            "relay": {"domains": ["bench.test"], "networks": []},
            "limits": {"max_sessions": SESSIONS, "max_sessions_per_ip": SESSIONS,
                       "max_message_size": HUGE_LIMIT},
            "quarantine": {"path": str(self.dir / "quarantine")},
            "logging": {"level": "warning"},
        }
        if self.loop != "default":
            config["event_loop"] = self.loop
        elif self.asyncio_by_default:  # what that checkout's default install ran on
            config["event_loop"] = "asyncio"
        workers = self.workers
        if workers == "auto" and self.before:  # not a valid setting there yet
            workers = os.cpu_count() or 1
        if workers != 1:
            config["workers"] = workers
        if self.chain:
            assert self.services.redis is not None
            config["dns"] = {"nameservers": [HOST], "port": self.services.dns.port, "timeout": 5}
            config["plugins"] = [
                {"name": "spf"},
                {"name": "dkim_verify"},
                {"name": "dmarc"},
                # Haraka writes Authentication-Results by default; so does this chain.
                {"name": "auth_results", "settings": {"authserv_id": "proxy.bench"}},
                {"name": "ratelimit", "settings": {
                    "backend": "redis", "redis_url": f"redis://{HOST}:{self.services.redis.port}/0",
                    "rules": [
                        {"name": "conn-per-ip", "key": "client_ip", "what": "connections",
                         "limit": 10_000_000, "window": 60},
                        {"name": "rcpt-per-sender", "key": "sender", "what": "recipients",
                         "limit": 10_000_000, "window": 60},
                    ]}},
                {"name": "score", "settings": {"tag": 5.0, "reject": 15.0, "rules": [
                    {"name": "SPF_FAIL", "score": 4.0, "match": {"tag": "spf:fail"}},
                    {"name": "SUBJ_PILLS", "score": 3.0,
                     "match": {"header": {"name": "Subject", "regex": "cheap pills"}}},
                ]}},
            ]
        for section, values in self.services.proxy_settings.items():
            config[section] = {**config.get(section, {}), **values}
        return config

    def launch(self) -> subprocess.Popen[bytes]:
        plugins = self.root / "smtpproxy_plugins"
        if self.before and not plugins.exists():
            # The other checkout's plugins must win over the installed (editable) ones: its
            # bench/_smtpproxy.py puts its root first on sys.path, so a link there does it.
            plugins.symlink_to("plugins")
        path = self.dir / "smtpproxy.yaml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False), encoding="utf-8")
        return spawn([sys.executable, str(self.root / "bench" / "_smtpproxy.py"), "run", "-c", str(path)],
                     self.dir / "log")


def install_haraka(version: str = HARAKA_VERSION) -> Path:
    """``npm install Haraka@version`` into bench/.cache/haraka-<version> once; its haraka.js."""
    home = CACHE / f"haraka-{version}"
    script = home / "node_modules" / "Haraka" / "haraka.js"
    if script.exists():
        return script
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise SystemError_("node and npm are needed for the Haraka rows (apt-get install nodejs npm)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "package.json").write_text('{"name": "haraka-bench", "private": true}\n')
    print(f"installing Haraka {version} from the npm registry into {home} (once)...", flush=True)
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"Haraka@{version}"],
                          cwd=home, capture_output=True, text=True)
    if done.returncode != 0 or not script.exists():
        said = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemError_(f"npm install Haraka@{version} failed:\n{said}")
    return script


# A bench-only Haraka plugin: point Node's resolver at the benchmark's DNS server, and (chain
# mode) make loopback clients count as public, because Haraka's spf plugin skips private IPs
# and would otherwise do no work at all.
_HARAKA_BENCH_PLUGIN = """\
'use strict'
const dns = require('node:dns')
exports.register = function () {
  const servers = ['127.0.0.1:%(port)d']
  dns.setServers(servers)
  dns.promises.setServers(servers)
}
exports.hook_connect_init = function (next, connection) {
  if (%(public)s) connection.remote.is_private = false
  next()
}
"""


class Haraka(System):
    """Haraka from npm, one process (smtp.ini ``nodes`` unset), ``queue/smtp_forward`` to the sink."""

    def __init__(self, name: str, services: Services, chain: bool = False, nodes: str = "",
                 version: str = HARAKA_VERSION) -> None:
        super().__init__(name, services)
        self.chain = chain
        self.nodes = nodes
        self.version = version
        self.description = (f"Haraka {version}" + (", spf + dkim verify + limit/redis" if chain
                                                  else ", smtp_forward only")
                            + (f", nodes={nodes}" if nodes else ""))

    def launch(self) -> subprocess.Popen[bytes]:
        script = install_haraka(self.version)
        home = self.dir / "haraka"
        config = home / "config"
        shutil.copytree(script.parent / "config", config, dirs_exist_ok=True)
        (home / "plugins").mkdir(exist_ok=True)
        (home / "plugins" / "bench_setup.js").write_text(_HARAKA_BENCH_PLUGIN % {
            "port": self.services.dns.port, "public": "true" if self.chain else "false"})
        smtp_ini = f"listen={HOST}:{self.port}\ninactivity_timeout=600\n"
        if self.nodes:
            smtp_ini += f"nodes={self.nodes}\n"
        (config / "smtp.ini").write_text(smtp_ini)
        (config / "log.ini").write_text("[main]\nlevel=warn\n")
        (config / "host_list").write_text("bench.test\n")
        (config / "smtp_forward.ini").write_text(
            f"host={HOST}\nport={self.services.sink.port}\nenable_outbound=false\n")
        connection_ini = (config / "connection.ini").read_text()
        (config / "connection.ini").write_text(
            connection_ini.replace("bytes=26214400", f"bytes={HUGE_LIMIT}"))
        plugins = ["bench_setup"]
        if self.chain:
            assert self.services.redis is not None
            plugins += ["spf", "dkim", "limit"]
            redis = f"host={HOST}\nport={self.services.redis.port}\n"
            (config / "redis.ini").write_text(f"[server]\n{redis}")
            (config / "limit.ini").write_text(
                f"[main]\n[redis]\n{redis}db=4\n[concurrency]\nmax={SESSIONS}\n"
                "[rate_conn]\ndefault=10000000/1m\n[rate_rcpt_sender]\ndefault=10000000/1m\n")
        plugins += ["rcpt_to.in_host_list", "queue/smtp_forward"]
        (config / "plugins").write_text("\n".join(plugins) + "\n")
        return spawn(["node", str(script), "-c", str(home)], self.dir / "log", cwd=home)


SYSTEM_NAMES = ["direct", "baseline", "baseline-uvloop", "smtpproxy", "smtpproxy-asyncio",
                "smtpproxy-uvloop", "smtpproxy-workers", "smtpproxy-chain", "smtpproxy-chain-asyncio",
                "smtpproxy-chain-uvloop", "smtpproxy-chain-workers", "haraka", "haraka-chain"]
"""Every system; ``smtpproxy*`` ones also as ``NAME@before`` (the checkout given by --before)."""
DEFAULT_SYSTEMS = ["direct", "baseline", "smtpproxy", "smtpproxy-asyncio", "smtpproxy-workers",
                   "smtpproxy-chain", "haraka", "haraka-chain"]
"""What runs without --systems. ``smtpproxy`` is the default install (event_loop: auto, which is
uvloop where it installs); ``-asyncio`` forces asyncio's loop; ``-workers`` is ``workers: auto``
(also with the chain: ``smtpproxy-chain-workers``)."""


def make_system(name: str, services: Services, haraka_nodes: str = "", before: Path | None = None) -> System:
    base, _, tag = name.partition("@")
    if tag and (tag != "before" or before is None or not base.startswith("smtpproxy")):
        raise ValueError(f"{name!r}: only smtpproxy rows take @before, and only with --before DIR")
    if base == "direct":
        return Direct(name, services)
    if base.startswith("baseline"):
        return Baseline(name, services, uvloop=base.endswith("uvloop"))
    if base.startswith("smtpproxy"):
        loop = "asyncio" if base.endswith("asyncio") else "uvloop" if base.endswith("uvloop") else "default"
        return SmtpProxy(name, services, chain="-chain" in base, loop=loop,
                         workers="auto" if base.endswith("workers") else 1,
                         root=before if tag else ROOT)
    if name.startswith("haraka"):
        return Haraka(name, services, chain=name.endswith("chain"), nodes=haraka_nodes)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}")
