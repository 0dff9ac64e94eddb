"""What users run (issue 31): a private, real Postfix receiving from smtp-source, with each filter.

    python bench/postfix_rows.py                  # every row, 1 KB and 100 KB, c10 and c100, median of 3
    python bench/postfix_rows.py --quick          # 200 messages per figure, one run
    python bench/postfix_rows.py --systems postfix milter --sizes 1k --concurrency 10

Rows (each its own private Postfix, tests/postfix_instance.py, queueing to ``discard:``):

* ``postfix``: Postfix alone;
* ``milter`` / ``milter-chain``: ``smtpproxy milter`` over ``inet:`` (docs/deploy-milter.md),
  no plugins / spf + dkim_verify + dmarc + auth_results;
* ``milter-unix``: ``milter`` over a Unix socket (``unix:``), for an MTA on the same host;
* ``floor``: bench/milter_floor.py over ``inet:``, the least a Python milter on uvloop does
  per message (the protocol's frames and three answers, nothing else): what is not ours to cut;
* ``rspamd-auth`` / ``rspamd``: Debian's rspamd, its proxy worker in milter mode in front of
  its normal worker (Debian's layout), with a settings rule enabling only the spf, dkim and
  dmarc groups / with its default modules (minus fuzzy_check, which needs the internet);
* ``proxy`` / ``proxy-chain``: ``smtpproxy run`` in front of the same kind of Postfix, XCLIENT
  on (client_identity: auto), no plugins / the same four plugins;
* ``proxy-history``: ``proxy`` with an SQLite ``store:``, so history records every decision
  (in batches, its defaults): what history costs;
* ``proxy-xforward``: ``proxy`` with ``client_identity: xforward`` (pooled upstream connections,
  XFORWARD with MAIL) instead of XCLIENT (a new upstream connection per message);
* ``proxy-floor`` / ``proxy-floor-xforward``: bench/proxy_floor.py, the least a Python relay
  on uvloop does per message on the same wire as ``proxy`` / ``proxy-xforward``: what is not
  ours to cut.

Every filter logs at its default (info) level to a file, answers DNS from the same loopback
server (bench/dnszone.py), and sees the same DKIM-signed message whose SPF and DMARC pass.
CPU is counted per process tree, Postfix's (master and every daemon it spawned, reaped ones
included) apart from the filter's, per message. smtp-source opens a new connection per
message (what an MX sees). Results: bench/results/postfix-rows.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import systems
from bench.run import Signed, smtp_source
from bench.systems import HOST, DnsZone, free_port, spawn, stop_process

RESULTS = systems.BENCH / "results"
SYSTEMS = ["postfix", "milter", "milter-chain", "milter-unix", "floor", "rspamd-auth", "rspamd", "proxy",
           "proxy-chain", "proxy-history", "proxy-xforward", "proxy-floor", "proxy-floor-xforward"]
SIZES = {"1k": 1024, "100k": 100 * 1024}
CHAIN = [{"name": "spf"}, {"name": "dkim_verify"}, {"name": "dmarc"},
         {"name": "auth_results", "settings": {"authserv_id": "filter.bench"}}]


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of *pid* and its descendants, including children they already reaped."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def wait_listening(port: int | Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    """Poll until *port* (or the Unix socket at that path) accepts a connection (a milter
    sends no banner)."""
    deadline = time.monotonic() + systems.READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise systems.SystemError_(f"{what} exited ({proc.returncode}):\n"
                                       + log.read_text(errors="replace")[-2000:])
        with contextlib.suppress(OSError):
            if isinstance(port, Path):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(port))
            else:
                socket.create_connection((HOST, port), timeout=1).close()
            return
        time.sleep(0.05)  # poll interval, not a wait for readiness
    raise systems.SystemError_(f"{what} did not listen on {port}")


# --------------------------------------------------------------------------- the filters


@dataclass
class Filter:
    """A filter process tree: a milter Postfix calls, or a proxy in front of Postfix."""

    name: str
    workdir: Path
    dns_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    kind: str = "milter"  # milter | proxy | none
    socket: Path | None = None
    """A Unix socket the milter listens on instead of :attr:`port`."""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def smtpproxy_argv(root: Path | None) -> list[str]:
    """bench/_smtpproxy.py of this checkout, or of *root* (``--before DIR``: the @before rows)."""
    root = root or systems.ROOT
    plugins = root / "smtpproxy_plugins"
    if root != systems.ROOT and not plugins.exists():
        plugins.symlink_to("plugins")  # its plugins win over the installed (editable) ones
    return [sys.executable, str(root / "bench" / "_smtpproxy.py")]


def smtpproxy_milter(name: str, workdir: Path, dns_port: int, root: Path | None = None) -> Filter:
    chain = name.partition("@")[0].endswith("-chain")
    unix = name.partition("@")[0].endswith("-unix")
    f = Filter(name, workdir, dns_port, free_port(), kind="milter",
               socket=workdir / "milter.sock" if unix else None,
               description=f"smtpproxy milter ({'unix:' if unix else 'inet:'}), "
                           + ("spf + dkim_verify + dmarc + auth_results" if chain else "no plugins"))
    config: dict[str, Any] = {
        "milter": {"listen": f"unix:{f.socket}", "socket_mode": "0666"} if f.socket else
                  {"listen": f"inet:{HOST}:{f.port}"},
        "limits": {"max_sessions": systems.SESSIONS, "max_message_size": systems.HUGE_LIMIT},
        "dns": {"nameservers": [HOST], "port": dns_port, "timeout": 5},
        "quarantine": {"path": str(workdir / "quarantine")},
    }
    if chain:
        config["plugins"] = CHAIN
    path = workdir / "smtpproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = workdir / "log"
    f.proc = spawn([*smtpproxy_argv(root), "milter", "-c", str(path)], log)
    wait_listening(f.socket or f.port, f.proc, name, log)
    return f


def floor_milter(name: str, workdir: Path, dns_port: int) -> Filter:
    """bench/milter_floor.py: the protocol and nothing else (the ``floor`` row)."""
    f = Filter(name, workdir, dns_port, free_port(), kind="milter",
               description="bench/milter_floor.py (inet:): the milter protocol's frames and answers only")
    log = workdir / "log"
    script = Path(__file__).resolve().parent / "milter_floor.py"
    f.proc = spawn([sys.executable, str(script), str(f.port)], log)
    wait_listening(f.port, f.proc, name, log)
    return f


def floor_proxy(name: str, workdir: Path, dns_port: int, upstream: int) -> Filter:
    """bench/proxy_floor.py: the proxy's wire and nothing else (the ``proxy-floor*`` rows)."""
    identity = "xforward" if name.endswith("-xforward") else "xclient"
    f = Filter(name, workdir, dns_port, free_port(), kind="proxy",
               description=f"bench/proxy_floor.py -> Postfix ({identity.upper()}): the proxy's wire only")
    log = workdir / "log"
    script = Path(__file__).resolve().parent / "proxy_floor.py"
    f.proc = spawn([sys.executable, str(script), str(f.port), str(upstream), "--identity", identity], log)
    systems.wait_banner(f.port, f.proc, name, log)
    return f


def smtpproxy_proxy(name: str, workdir: Path, dns_port: int, upstream: int,
                    root: Path | None = None) -> Filter:
    chain = name.partition("@")[0].endswith("-chain")
    history = name.partition("@")[0].endswith("-history")
    xforward = name.partition("@")[0].endswith("-xforward")
    f = Filter(name, workdir, dns_port, free_port(), kind="proxy",
               description=f"smtpproxy run -> Postfix ({'XFORWARD' if xforward else 'XCLIENT'}), " + (
                   "spf + dkim_verify + dmarc + auth_results" if chain else "no plugins") + (
                   ", history in an SQLite store" if history else ""))
    config: dict[str, Any] = {
        "hostname": "proxy.bench",
        "listeners": [{"address": HOST, "port": f.port}],
        "delivery": {"type": "smtp", "host": HOST, "port": upstream, "tls": "none"},
        "relay": {"domains": ["bench.test"], "networks": []},
        "limits": {"max_sessions": systems.SESSIONS, "max_sessions_per_ip": systems.SESSIONS,
                   "max_message_size": systems.HUGE_LIMIT},
        "quarantine": {"path": str(workdir / "quarantine")},
        "dns": {"nameservers": [HOST], "port": dns_port, "timeout": 5},
    }
    if chain:
        config["plugins"] = CHAIN
    if history:  # every decision recorded, in batches (history's defaults)
        config["store"] = {"sqlite": str(workdir / "store.sqlite")}
    if xforward:  # pooled upstream connections; Postfix learns the client for its logs only
        config["delivery"]["client_identity"] = "xforward"
    path = workdir / "smtpproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = workdir / "log"
    f.proc = spawn([*smtpproxy_argv(root), "run", "-c", str(path)], log)
    systems.wait_banner(f.port, f.proc, name, log)
    return f


def rspamd_milter(name: str, workdir: Path, dns_port: int) -> Filter:
    """Debian's rspamd from /etc/rspamd with a local config directory of its own (as
    tests/plugins/test_rspamd.py starts it), the proxy worker in milter mode on a free port."""
    binary = shutil.which("rspamd")
    if binary is None:
        raise systems.SystemError_("rspamd is not installed (apt-get install rspamd)")
    only_auth = name == "rspamd-auth"
    workdir.chmod(0o755)
    dbdir = workdir / "db"
    dbdir.mkdir(mode=0o755)
    override, local = workdir / "override.d", workdir / "local.d"
    override.mkdir(mode=0o755)
    local.mkdir(mode=0o755)
    tld = workdir / "tld.dat"  # the full public-suffix list takes ~14 s to compile
    tld.write_text("com\nnet\norg\ntest\nexample\n")
    f = Filter(name, workdir, dns_port, free_port(), kind="milter",
               description="rspamd 3.4 proxy worker (milter) -> normal worker, " + (
                   "only the spf, dkim and dmarc groups" if only_auth else "default modules"))
    normal = free_port()
    (override / "worker-normal.inc").write_text(f'bind_socket = "{HOST}:{normal}";\ncount = 1;\n')
    (override / "worker-controller.inc").write_text(f'bind_socket = "{HOST}:{free_port()}";\ncount = 1;\n')
    (override / "worker-proxy.inc").write_text(
        f'milter = yes;\ntimeout = 120s;\ncount = 1;\nbind_socket = "{HOST}:{f.port}";\n'
        f'upstream "local" {{\n  default = yes;\n  hosts = "{HOST}:{normal}";\n}}\n')
    (override / "logging.inc").write_text(f'type = "file";\nfilename = "{workdir}/rspamd.log";\n'
                                          'level = "info";\n')
    # Loopback clients are "local" to rspamd, which skips SPF/DKIM/DMARC for them by default.
    (local / "options.inc").write_text(
        f'url_tld = "{tld}";\nlocal_addrs = [];\n'
        f'dns {{\n  nameserver = ["{HOST}:{dns_port}"];\n  timeout = 5s;\n  retransmits = 1;\n}}\n')
    for module in ("spf", "dkim", "dmarc"):
        (local / f"{module}.conf").write_text("check_local = true;\ncheck_authed = true;\n")
    (local / "fuzzy_check.conf").write_text("enabled = false;\n")  # its servers are on the internet
    if only_auth:
        (local / "settings.conf").write_text(
            'only_auth {\n  priority = high;\n  ip = ["127.0.0.0/8", "0.0.0.0/0"];\n'
            '  apply {\n    groups_enabled = ["spf", "dkim", "dmarc", "policies"];\n  }\n}\n')
    confdir = Path("/etc/rspamd")
    argv = [binary, "-f", "-c", str(confdir / "rspamd.conf"),
            "--var", f"CONFDIR={confdir}", "--var", f"LOCAL_CONFDIR={workdir}",
            "--var", f"DBDIR={dbdir}", "--var", f"RUNDIR={workdir}", "--var", f"LOGDIR={workdir}"]
    if os.geteuid() == 0:
        entry = pwd.getpwnam("_rspamd")
        os.chown(dbdir, entry.pw_uid, entry.pw_gid)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        argv += ["-u", "_rspamd", "-g", grp.getgrgid(entry.pw_gid).gr_name]
    log = workdir / "out.log"
    f.proc = spawn(argv, log, cwd=workdir)
    wait_listening(f.port, f.proc, name, log)
    return f


# --------------------------------------------------------------------------- Postfix


@contextlib.contextmanager
def postfix(milter: Filter | None) -> Iterator[Any]:
    from tests.postfix_instance import PostfixInstance, _make_root, require_postfix

    require_postfix()
    extra = {
        "virtual_transport": "discard:bench",  # accepted, queued (fsync), then dropped
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "smtpd_client_message_rate_limit": "0",
        "default_process_limit": "200",
        "message_size_limit": str(systems.HUGE_LIMIT),
    }
    if milter is not None:
        where = f"unix:{milter.socket}" if milter.socket else f"inet:{HOST}:{milter.port}"
        extra |= {"smtpd_milters": where, "milter_protocol": "6",
                  "milter_default_action": "tempfail", "milter_command_timeout": "30s"}
    instance = PostfixInstance(root=_make_root(), port=free_port(), domain="bench.test",
                               users=("rcpt",), extra_main_cf=extra)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(instance.root, ignore_errors=True)


# --------------------------------------------------------------------------- one row


def measure(name: str, base: Path, dns_port: int, *, msgfiles: dict[str, Path], sizes: list[str],
            concurrency: list[int], messages: dict[str, int], repeat: int,
            before: Path | None = None, profile: bool = False, reuse: bool = False) -> dict[str, Any]:
    workdir = base / name
    root = before if name.endswith("@before") else None
    workdir.mkdir()
    filt: Filter | None = None
    out: dict[str, Any] = {}
    try:
        if name == "floor":
            filt = floor_milter(name, workdir, dns_port)
        elif name.startswith("milter"):
            filt = smtpproxy_milter(name, workdir, dns_port, root)
        elif name.startswith("rspamd"):
            filt = rspamd_milter(name, workdir, dns_port)
        with postfix(filt if filt is not None and filt.kind == "milter" else None) as mta:
            if name.startswith("proxy-floor"):
                filt = floor_proxy(name, workdir, dns_port, mta.port)
            elif name.startswith("proxy"):
                filt = smtpproxy_proxy(name, workdir, dns_port, mta.port, root)
            target = filt.port if filt is not None and filt.kind == "proxy" else mta.port
            mta_pid = mta._process.pid
            out["description"] = (filt.description if filt else "Postfix alone") + (
                f", checkout {root}" if root else "")
            for size in sizes:
                for conc in concurrency:
                    count = max(messages[size], conc)
                    # Warm-up: processes spawned, DNS cached, plugins' first use; not measured.
                    smtp_source(target, conc, max(2 * conc, 40), msgfiles[size], reuse=reuse)
                    rates, pcpu, fcpu = [], [], []
                    spy = start_profile(filt, f"{name}-{size}-c{conc}") if profile else None
                    for _ in range(repeat):
                        p0, f0 = tree_cpu(mta_pid), tree_cpu(filt.pid if filt else None)
                        seconds = smtp_source(target, conc, count, msgfiles[size], reuse=reuse)
                        p1, f1 = tree_cpu(mta_pid), tree_cpu(filt.pid if filt else None)
                        rates.append(count / seconds)
                        pcpu.append((p1 - p0) / count * 1000)
                        fcpu.append((f1 - f0) / count * 1000)
                    if spy is not None:
                        stop_profile(*spy)
                    out[f"{size}-c{conc}"] = {
                        "messages": count, "msgs_per_s": statistics.median(rates),
                        "postfix_cpu_ms": statistics.median(pcpu),
                        "filter_cpu_ms": statistics.median(fcpu) if filt else None,
                        "load_avg": os.getloadavg()[0],
                        "runs": {"msgs_per_s": rates, "postfix_cpu_ms": pcpu, "filter_cpu_ms": fcpu},
                    }
                    print(f"[{time.strftime('%H:%M:%S')}] {name:<12} {size:>4} c{conc:<3} "
                          f"{out[f'{size}-c{conc}']['msgs_per_s']:7.0f} msg/s  postfix "
                          f"{statistics.median(pcpu):5.2f} ms  filter "
                          f"{statistics.median(fcpu):5.2f} ms  load {os.getloadavg()[0]:.1f}", flush=True)
    except Exception as exc:  # one failed row must not lose the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{name}: failed: {out['error'][:2000]}", file=sys.stderr)
    finally:
        if filt is not None:
            filt.stop()
    return out


def start_profile(filt: Filter | None, stem: str) -> tuple[subprocess.Popen[str], Path] | None:
    """py-spy (the [bench] extra) on an smtpproxy filter while the measured runs load it."""
    if filt is None or not filt.name.startswith(("milter", "proxy")):
        return None
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        raise systems.SystemError_("py-spy is not installed (pip install -e '.[bench]')")
    out = RESULTS / f"profile-postfix-{stem.replace('@', '-')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([pyspy, "record", "--pid", str(filt.pid), "--format", "raw", "--rate", "200",
                            "--output", str(out), "--nonblocking"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # py-spy attaches
    return spy, out


def stop_profile(spy: subprocess.Popen[str], out: Path) -> None:
    spy.send_signal(2)
    said = spy.communicate(timeout=60)[0]
    if not out.exists():
        raise systems.SystemError_(f"py-spy wrote nothing: {said[-800:]}")
    from bench.run import top_frames

    top = top_frames(out, 30)
    out.with_name(out.stem + "-top.txt").write_text(top + "\n")
    print(top, flush=True)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['timestamp']} UTC, {report['cpus']} CPUs, load average "
             f"{report['load_before']:.1f} before the run (a shared machine); smtp-source, "
             + ("each connection sending many messages (-d)" if report.get("reuse")
                else "a new connection per message")
             + f"; medians of {report['repeat']}.", ""]
    for scenario in report["scenarios"]:
        size, conc = scenario.split("-c")
        lines += [f"#### {SIZES[size] // 1024} KB messages, concurrency {conc}", "",
                  "| system | msg/s | Postfix CPU ms/msg | filter CPU ms/msg | total CPU ms/msg | load |",
                  "|---|--:|--:|--:|--:|--:|"]
        for name, rows in report["results"].items():
            r = rows.get(scenario)
            if r is None:
                lines.append(f"| {name} | failed: {rows.get('error', '?')[:90]} |||||")
                continue
            fcpu = r["filter_cpu_ms"]
            total = r["postfix_cpu_ms"] + (fcpu or 0)
            lines.append(f"| {name} | {r['msgs_per_s']:,.0f} | {r['postfix_cpu_ms']:.2f} | "
                         f"{'-' if fcpu is None else f'{fcpu:.2f}'} | {total:.2f} | {r['load_avg']:.1f} |")
        lines.append("")
    lines.append("Rows: " + "; ".join(f"`{n}`: {rows.get('description', '?')}"
                                      for n, rows in report["results"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, metavar="SYSTEM",
                        help=f"rows (default all: {' '.join(SYSTEMS)}); milter*/proxy* also as "
                             "NAME@before with --before")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="another checkout (git archive of an older commit) for the NAME@before "
                             "rows, measured in the same run")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on the smtpproxy rows during the measured runs (their CPU "
                             "figures then include py-spy's sampling); bench/results/profile-postfix-*")
    parser.add_argument("--reuse", action="store_true",
                        help="smtp-source sends many messages per connection (-d), as an MTA with a "
                             "connection cache does, instead of one")
    parser.add_argument("--quick", action="store_true", help="200 messages per figure, one run")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs per figure (default 3, 1 with --quick)")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per run (default 1,000 at 1 KB and 300 at 100 KB; 200 with --quick)")
    parser.add_argument("--output", default=str(RESULTS / "postfix-rows"))
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="work in DIR and keep it (the filters' logs), instead of a temporary one")
    args = parser.parse_args(argv)
    for name in args.systems:
        base_name, at, tag = name.partition("@")
        if base_name not in SYSTEMS or (at and (tag != "before" or args.before is None
                                                or not base_name.startswith(("milter", "proxy"))
                                                or base_name.startswith("proxy-floor"))):
            parser.error(f"unknown row {name!r}: choose from {', '.join(SYSTEMS)} "
                         "(milter*/proxy* also NAME@before, with --before DIR)")
    if args.before is not None:
        args.before = args.before.resolve()
    if os.geteuid() != 0:
        print("error: a private Postfix master must be started as root", file=sys.stderr)
        return 1
    repeat = args.repeat or (1 if args.quick else 3)
    messages = {size: args.messages or (200 if args.quick else 1000 if size == "1k" else 300)
                for size in SIZES}
    signed = Signed.create()
    report: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0], "repeat": repeat, "reuse": args.reuse,
        "scenarios": [f"{s}-c{c}" for s in args.sizes for c in args.concurrency], "results": {},
    }
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True)
            base = args.keep.resolve()
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpproxy-bench-")))
        base.chmod(0o755)  # rspamd's workers run as _rspamd
        msgfiles = {}
        for size in args.sizes:
            msgfiles[size] = base / f"message-{size}.eml"
            # smtp-source -F appends CRLF to each line itself: give it LF lines.
            msgfiles[size].write_bytes(signed.message(SIZES[size]).replace(b"\r\n", b"\n"))
        dns = DnsZone(base, signed.zone)
        dns.start()
        try:
            for name in args.systems:
                report["results"][name] = measure(name, base, dns.port, msgfiles=msgfiles, sizes=args.sizes,
                                                  concurrency=args.concurrency, messages=messages,
                                                  repeat=repeat, before=args.before,
                                                  profile=args.profile, reuse=args.reuse)
        finally:
            dns.stop()
    text = markdown(report)
    print(text)
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(text + "\n")
    return 1 if any("error" in rows for rows in report["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
