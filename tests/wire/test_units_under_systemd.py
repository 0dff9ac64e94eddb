"""The shipped units (config/*.service) under a real systemd as process 1 (tests/systemd_pid1.py),
installed as docs/operations.md installs them. The shipped configuration starts. The proxy runs
as the user ``smtpproxy`` with port 25 through its one capability, is active only once it said
READY=1, delivers, logs each line at its priority, reloads and refuses a bad reload, serves its
process metrics through the sandbox, and stops. A held event loop is killed by systemd's
watchdog and restarted, with ``workers:`` a held worker by the supervisor's. A big message is
spooled and quarantined, and the digest unit mails its digest. A proxy that cannot start says
why and comes up once it can. The milter, the policy service (also on Unix sockets Postfix's
user reaches, as the deploy pages make them) and the web pages start, answer through their
sandbox and stop."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.systemd_pid1 import PY, ROOT, Pid1

PROXY_CONFIG = """\
listeners:
  - address: 127.0.0.1
    port: 25
hostname: units.test
delivery:
  type: maildir
  path: /var/spool/smtpproxy/mail
metrics:
  enabled: true
  port: 9125
{plugins}"""

SEND = """
import smtplib
with smtplib.SMTP("127.0.0.1", 25, timeout=20) as client:
    print(client.ehlo("client.test")[0])
    print(client.sendmail("a@sender.test", [{rcpt!r}], b"Subject: units\\r\\n\\r\\nHello.\\r\\n") or "sent")
"""

BLOCK = """
import smtplib, socket
client = smtplib.SMTP("127.0.0.1", 25, timeout=30)
client.ehlo("client.test")
client.mail("a@sender.test")
try:
    client.rcpt("block@units.test")
except (smtplib.SMTPServerDisconnected, ConnectionError, socket.timeout):
    pass
"""
"""A client whose RCPT makes tests/blocking_plugin.py hold the event loop for 60 s."""


def _start_with_a_blocking_plugin(pid1: Pid1, more: str, *, extra: str) -> None:
    """The proxy unit (drop-in *extra*) with tests/blocking_plugin.py, which holds the loop for
    60 s at the RCPT of ``block@`` (BLOCK), and *more* configuration; started and active."""
    source = Path(__file__).resolve().parents[1] / "blocking_plugin.py"
    pid1.write("/opt/smtpproxy/packages/blocking_plugin.py", source.read_text())
    pid1.configure(PROXY_CONFIG.format(plugins=more + textwrap.dedent("""\
        plugins:
          - name: blocking
            use: blocking_plugin:Blocking
            timeout: 1
            settings: {seconds: 60}
        """)))
    pid1.install_unit("smtpproxy.service", extra=extra)
    pid1.systemctl("restart", "smtpproxy.service")
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"})


def _lines(pid1: Pid1, unit: str, pattern: str) -> list[dict[str, object]]:
    return [e for e in pid1.journal(unit) if re.search(pattern, str(e.get("MESSAGE", "")))]


def test_the_shipped_configuration_starts_under_the_shipped_unit(pid1: Pid1) -> None:
    """config/smtpproxy.yaml installed as docs/operations.md says (0640, the spool and the
    quarantine directory made for the user): it checks, starts, greets as its hostname."""
    pid1.configure((ROOT / "config" / "smtpproxy.yaml").read_text())
    pid1.install_unit("smtpproxy.service")
    pid1.systemctl("restart", "smtpproxy.service")
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"})
    greeting = pid1.python("import smtplib; c = smtplib.SMTP('127.0.0.1', 25, timeout=10); "
                           "print(c.ehlo('client.test')[1].decode().splitlines()[0]); c.quit()")
    assert greeting.strip() == "mx1.example.com"
    assert pid1.run("test", "-f", "/var/spool/smtpproxy/store.db", check=False).returncode == 0
    pid1.systemctl("stop", "smtpproxy.service")
    assert pid1.show("smtpproxy.service", "Result")["Result"] == "success"


def test_the_proxy_unit_starts_delivers_reloads_and_stops(pid1: Pid1) -> None:
    pid1.configure(PROXY_CONFIG.format(plugins=""))
    pid1.install_unit("smtpproxy.service")
    pid1.systemctl("start", "smtpproxy.service")  # Type=notify: returns once READY=1 came
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"})
    main = pid1.show("smtpproxy.service", "MainPID")["MainPID"]
    status = pid1.run("cat", f"/proc/{main}/status").stdout
    assert re.search(r"^Uid:\s+990\s", status, re.M), status  # the user smtpproxy, not root
    assert re.search(r"^CapEff:\s+0000000000000400$", status, re.M), status  # CAP_NET_BIND_SERVICE only

    assert pid1.python(SEND.format(rcpt="bob@units.test")).split() == ["250", "sent"]
    assert pid1.run("ls", "/var/spool/smtpproxy/mail/new").stdout.strip()

    # each line at its own priority, the prefix taken off by journald
    listening = _lines(pid1, "smtpproxy.service", r"event=listening ")[-1]
    assert listening["PRIORITY"] == "6" and str(listening["MESSAGE"]).startswith("ts="), listening
    [message] = _lines(pid1, "smtpproxy.service", r"event=message .*decision=delivered")
    assert message["PRIORITY"] == "6"
    # LogRateLimitBurst=, as process 1 hands it to journald
    burst = pid1.run("readlink", "/run/systemd/units/log-rate-limit-burst:smtpproxy.service").stdout
    assert burst.strip() == "1000000"

    # the process metrics, read through ProtectProc=invisible and ProcSubset=pid
    metrics = pid1.python("import urllib.request; print(urllib.request.urlopen("
                          "'http://127.0.0.1:9125/metrics', timeout=10).read().decode())")
    assert re.search(r"^process_start_time_seconds \d", metrics, re.M), metrics[:2000]
    assert re.search(r"^process_open_fds \d", metrics, re.M)

    pid1.systemctl("reload", "smtpproxy.service")
    assert _lines(pid1, "smtpproxy.service", r"event=reload result=ok")
    # a bad file: ExecReload's check refuses it, nothing is signalled, the proxy runs on
    pid1.configure(PROXY_CONFIG.format(plugins="plugins: 3\n"))
    refused = pid1.systemctl("reload", "smtpproxy.service", check=False)
    assert refused.returncode != 0
    assert pid1.show("smtpproxy.service", "MainPID", "ActiveState") == {"MainPID": main, "ActiveState": "active"}
    assert "smtpproxy.yaml:" in pid1.journal_text("smtpproxy.service")  # where the file is wrong
    pid1.configure(PROXY_CONFIG.format(plugins=""))

    pid1.systemctl("stop", "smtpproxy.service")
    pid1.wait_for("smtpproxy.service", {"ActiveState": "inactive"})
    assert _lines(pid1, "smtpproxy.service", r"event=shutdown")
    assert pid1.show("smtpproxy.service", "NRestarts", "Result") == {"NRestarts": "0", "Result": "success"}


def test_a_held_event_loop_is_killed_by_the_watchdog_and_restarted(pid1: Pid1) -> None:
    _start_with_a_blocking_plugin(pid1, "", extra="WatchdogSec=2s\nRestartSec=1")
    before = pid1.show("smtpproxy.service", "MainPID", "NRestarts")

    # the client's RCPT holds the loop for 60 s; the watchdog (2 s) ends it long before
    pid1.python(BLOCK, timeout=60)
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running",
                                        "NRestarts": str(int(before["NRestarts"]) + 1)})
    assert pid1.show("smtpproxy.service", "MainPID")["MainPID"] != before["MainPID"]
    text = pid1.journal_text("smtpproxy.service")  # systemd's own lines on the unit too
    assert re.search(r"smtpproxy.service: Watchdog timeout", text), text[-3000:]
    # faulthandler's stack names the plugin's line that held the loop
    assert re.search(r'File ".*blocking_plugin.py", line \d+ in rcpt_to', text), text[-3000:]
    pid1.systemctl("stop", "smtpproxy.service")


def _ask(milter: str | None = None, policy: str | None = None) -> str:
    """A client of the milter and the policy service at these addresses (``host:port``, or a
    Unix socket's path), as an MTA opens: SMFIC_OPTNEG (version 6, every action, no step
    skipped), whose answer is one too; a policy request at RCPT. Prints each answer."""
    return textwrap.dedent(f"""
        import socket, struct
        def connect(where):
            if where.startswith("/"):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(where)
                return s
            host, port = where.rsplit(":", 1)
            return socket.create_connection((host, int(port)), timeout=10)
        if {milter!r}:
            s = connect({milter!r})
            s.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1ff, 0))
            print(s.recv(5)[4:5].decode())
        if {policy!r}:
            s = connect({policy!r})
            s.sendall(b"request=smtpd_access_policy\\nprotocol_state=RCPT\\nclient_address=192.0.2.7\\n"
                      b"sender=a@sender.test\\nrecipient=b@units.test\\ninstance=1\\n\\n")
            print(s.recv(100).decode().strip())
        """)


@pytest.mark.parametrize(("unit", "listen", "ask"), [
    ("smtpproxy-milter.service", "milter: {listen: 'inet:127.0.0.1:8891'}", _ask(milter="127.0.0.1:8891")),
    ("smtpproxy-policy.service", "policy: {listen: 'inet:127.0.0.1:10040'}", _ask(policy="127.0.0.1:10040")),
])
def test_the_milter_and_policy_units_start_answer_and_stop(pid1: Pid1, unit: str, listen: str, ask: str) -> None:
    """... and serve their metrics, the process metrics included, through the sandbox."""
    pid1.configure(listen + "\nmetrics: {enabled: true, milter_port: 9127, policy_port: 9127}\n")
    pid1.install_unit(unit)
    pid1.systemctl("start", unit)
    pid1.wait_for(unit, {"ActiveState": "active", "SubState": "running"})
    answer = pid1.python(ask).strip()
    assert answer == ("O" if "milter" in unit else "action=DUNNO"), answer
    metrics = pid1.python("import urllib.request; print(urllib.request.urlopen("
                          "'http://127.0.0.1:9127/metrics', timeout=10).read().decode())")
    assert re.search(r"^smtpproxy_sessions_total 1\.0$", metrics, re.M), metrics[:2000]
    assert re.search(r"^process_start_time_seconds \d", metrics, re.M), metrics[:2000]
    pid1.systemctl("stop", unit)
    assert pid1.show(unit, "ActiveState", "Result", "NRestarts") == {
        "ActiveState": "inactive", "Result": "success", "NRestarts": "0"}
    assert _lines(pid1, unit, r"event=listening ")[0]["PRIORITY"] == "6"


POSTFIX_SIDE = _ask(milter="/var/spool/postfix/smtpproxy/milter.sock", policy="/var/spool/postfix/smtpproxy/policy.sock")
"""What Postfix's smtpd (the user ``postfix``) does with the two Unix sockets: connect and ask."""


def test_unix_sockets_in_postfixs_spool_as_the_deploy_pages_make_them(pid1: Pid1) -> None:
    """docs/deploy-milter.md and deploy-policy.md: a directory for the sockets under Postfix's
    queue directory, ``install -d -o smtpproxy -g postfix -m 2750``, and the units' drop-in
    ``ReadWritePaths=`` for it. Postfix's user reaches both sockets (its group is the
    directory's; socket_mode 0660), and a unit killed by the watchdog takes its socket back."""
    pid1.run("sh", "-c", "mount -t tmpfs tmpfs /var/spool/postfix && "  # the namespaces' own
             "install -d -o smtpproxy -g postfix -m 2750 /var/spool/postfix/smtpproxy")
    for unit, section in (("smtpproxy-milter.service", "milter: {listen: 'unix:/var/spool/postfix/smtpproxy/milter.sock'}"),
                          ("smtpproxy-policy.service", "policy: {listen: 'unix:/var/spool/postfix/smtpproxy/policy.sock'}")):
        name = unit.removesuffix(".service").removeprefix("smtpproxy-")
        pid1.configure(section + "\n", f"/etc/smtpproxy/{name}.yaml")
        pid1.write(f"/run/systemd/system/{unit}", (ROOT / "config" / unit).read_text().replace(
            "/etc/smtpproxy/smtpproxy.yaml", f"/etc/smtpproxy/{name}.yaml"))
        pid1.install_unit(unit, extra="ReadWritePaths=/var/spool/postfix/smtpproxy", copy=False)
        pid1.systemctl("restart", unit)
        pid1.wait_for(unit, {"ActiveState": "active", "SubState": "running"})
    postfix = ("setpriv", "--reuid=postfix", "--regid=postfix", "--init-groups",
               "env", f"LD_LIBRARY_PATH={PY}/lib", f"{PY}/bin/python3", "-c", POSTFIX_SIDE)
    assert pid1.run(*postfix).stdout.split() == ["O", "action=DUNNO"]

    # SIGABRT, as the watchdog sends it: restarted, the stale socket file replaced
    main = pid1.show("smtpproxy-milter.service", "MainPID")["MainPID"]
    pid1.run("kill", "-ABRT", main)
    pid1.wait_for("smtpproxy-milter.service", {"ActiveState": "active", "SubState": "running", "NRestarts": "1"})
    assert pid1.run(*postfix).stdout.split() == ["O", "action=DUNNO"]
    for unit in ("smtpproxy-milter.service", "smtpproxy-policy.service"):
        pid1.systemctl("stop", unit)
    assert pid1.run("ls", "-A", "/var/spool/postfix/smtpproxy").stdout.strip() == ""  # sockets removed


def test_the_proxy_unit_with_workers(pid1: Pid1) -> None:
    """``workers: 2``: the supervisor says READY=1 once both workers listen, watches them
    through sockets in its private /tmp, and each worker serves its own process metrics."""
    pid1.configure(PROXY_CONFIG.format(plugins="workers: 2\n"))
    pid1.install_unit("smtpproxy.service")
    pid1.systemctl("restart", "smtpproxy.service")
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"})
    invocation = pid1.show("smtpproxy.service", "InvocationID")["InvocationID"]
    assert _lines(pid1, "smtpproxy.service", r"event=workers_ready")
    assert not _lines(pid1, "smtpproxy.service", r"event=worker_watchdog_unavailable")
    for rcpt in ("one@units.test", "two@units.test", "three@units.test"):
        assert pid1.python(SEND.format(rcpt=rcpt)).split() == ["250", "sent"]
    for port in (9125, 9126):
        metrics = pid1.python(f"import urllib.request; print(urllib.request.urlopen("
                              f"'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())")
        assert re.search(r"^process_start_time_seconds \d", metrics, re.M), port
    pid1.systemctl("reload", "smtpproxy.service")
    pid1.systemctl("stop", "smtpproxy.service")
    assert pid1.show("smtpproxy.service", "ActiveState", "Result", "NRestarts") == {
        "ActiveState": "inactive", "Result": "success", "NRestarts": "0"}
    ours = [e for e in pid1.journal("smtpproxy.service") if e.get("_SYSTEMD_INVOCATION_ID") == invocation]
    assert _lines(pid1, "smtpproxy.service", r"event=workers_stopping")
    assert ours and not [e for e in ours if int(str(e["PRIORITY"])) <= 4], ours  # no warning, no error


def test_a_held_worker_is_killed_by_the_supervisors_watchdog(pid1: Pid1) -> None:
    """With ``workers:`` systemd watches the supervisor, and the supervisor each worker, through
    sockets in the unit's private /tmp: a worker whose loop a plugin holds gets SIGABRT and is
    started again; the service itself never misses systemd's watchdog, nor restarts."""
    _start_with_a_blocking_plugin(pid1, "workers: 2\n", extra="WatchdogSec=2s")
    before = pid1.show("smtpproxy.service", "MainPID", "NRestarts", "InvocationID")
    pid1.python(BLOCK, timeout=60)

    def started() -> int:  # worker_started lines of this run of the service: 2, then the restart
        return len([e for e in _lines(pid1, "smtpproxy.service", r"event=worker_started ")
                    if e.get("_SYSTEMD_INVOCATION_ID") == before["InvocationID"]])

    deadline = time.monotonic() + 30
    while started() < 3:
        assert time.monotonic() < deadline, pid1.journal_text("smtpproxy.service")[-3000:]
        time.sleep(0.2)
    [watchdog] = _lines(pid1, "smtpproxy.service", r"event=worker_watchdog .*action=SIGABRT")
    assert watchdog["PRIORITY"] == "3"
    assert pid1.show("smtpproxy.service", "MainPID", "NRestarts", "InvocationID", "ActiveState") == {
        **before, "ActiveState": "active"}
    assert re.search(r'File ".*blocking_plugin.py", line \d+ in rcpt_to', pid1.journal_text("smtpproxy.service"))
    assert pid1.python(SEND.format(rcpt="after@units.test")).split() == ["250", "sent"]
    pid1.systemctl("stop", "smtpproxy.service")


def test_a_quarantined_big_message_and_its_digest_through_the_sandbox(pid1: Pid1) -> None:
    """The proxy spools a 2 MB message in its private /tmp, the score plugin quarantines it
    into the SQLite store under /var/spool/smtpproxy, and the digest unit (a oneshot, as its
    timer starts it) mails the recipient a digest with its release link."""
    pid1.configure("k" * 64, "/etc/smtpproxy/link.key")
    pid1.configure(PROXY_CONFIG.format(plugins=textwrap.dedent("""\
        store: {sqlite: /var/spool/smtpproxy/store.db}
        limits: {spool_threshold: 65536}
        digest:
          keys: [/etc/smtpproxy/link.key]
          base_url: https://quarantine.units.test
          domains: [units.test]
        plugins:
          - name: score
            settings:
              quarantine: 5.0
              rules:
                - {name: HOLD_ME, score: 10.0, match: {header: {name: Subject, regex: "hold me"}}}
        """)))
    pid1.install_unit("smtpproxy.service")
    pid1.install_unit("smtpproxy-digest.service")
    pid1.systemctl("restart", "smtpproxy.service")
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"})
    sent = pid1.python("""
import smtplib
body = b"".join(b"line %07d of a message big enough to be spooled\\r\\n" % i for i in range(40000))
with smtplib.SMTP("127.0.0.1", 25, timeout=30) as client:
    print(client.sendmail("a@sender.test", ["carol@units.test"], b"Subject: hold me\\r\\n\\r\\n" + body) or "sent")
""", timeout=60)
    assert sent.strip() == "sent"
    [line] = _lines(pid1, "smtpproxy.service", r"event=message .*recipients=carol@units.test")
    assert re.search(r"decision=quarantined .*size=\d{7}|size=\d{7} .*decision=quarantined", str(line["MESSAGE"]))

    pid1.systemctl("start", "smtpproxy-digest.service")  # Type=oneshot: returns when it ended
    assert pid1.show("smtpproxy-digest.service", "Result", "ExecMainStatus") == {
        "Result": "success", "ExecMainStatus": "0"}, pid1.journal_text("smtpproxy-digest.service")
    digests = pid1.run("sh", "-c", "grep -l 'quarantine.units.test' /var/spool/smtpproxy/mail/new/*").stdout
    assert digests.strip(), pid1.journal_text("smtpproxy-digest.service")
    pid1.systemctl("stop", "smtpproxy.service")


def test_the_web_unit_serves_through_its_sandbox(pid1: Pid1) -> None:
    from tests.console_server import ACCOUNTS

    pid1.configure("k" * 64, "/etc/smtpproxy/link.key")
    pid1.configure(ACCOUNTS, "/etc/smtpproxy/accounts")
    pid1.configure(textwrap.dedent("""\
        delivery: {type: maildir, path: /var/spool/smtpproxy/mail}
        store: {sqlite: /var/spool/smtpproxy/store.db}
        digest: {keys: [/etc/smtpproxy/link.key], port: 8025}
        console: {users: /etc/smtpproxy/accounts, secure_cookie: false}
        metrics: {enabled: true, web_port: 9155}
        """))
    pid1.install_unit("smtpproxy-web.service")
    pid1.systemctl("start", "smtpproxy-web.service")
    pid1.wait_for("smtpproxy-web.service", {"ActiveState": "active", "SubState": "running"})
    page = pid1.python("import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8025/console/login',"
                       " timeout=10); print(r.status, 'password' in r.read().decode())")
    assert page.split() == ["200", "True"], page
    metrics = pid1.python("import urllib.request; print(urllib.request.urlopen("
                          "'http://127.0.0.1:9155/metrics', timeout=10).read().decode())")
    assert re.search(r"^process_start_time_seconds \d", metrics, re.M), metrics[:2000]
    pid1.systemctl("stop", "smtpproxy-web.service")
    assert pid1.show("smtpproxy-web.service", "ActiveState", "Result", "NRestarts") == {
        "ActiveState": "inactive", "Result": "success", "NRestarts": "0"}


def test_nothing_that_acts_on_the_machine_can_start(pid1: Pid1) -> None:
    """After the other tests: what sysinit.target would run against this machine's /tmp, /etc
    and kernel is masked in the namespaces, and never started."""
    from tests.systemd_pid1 import MASKED

    for unit in MASKED:
        assert pid1.show(unit, "LoadState", "ActiveState") == {"LoadState": "masked", "ActiveState": "inactive"}
    assert pid1.systemctl("start", "systemd-tmpfiles-setup.service", check=False).returncode != 0


def test_a_proxy_that_cannot_start_says_why_and_starts_once_it_can(pid1: Pid1) -> None:
    """Port 25 taken: the start fails (Type=notify: no READY=1) with the reason at PRIORITY 3,
    and Restart=on-failure tries again every RestartSec= (2 s: under systemd's default start
    limit of 5 in 10 s, so it never gives up), so the proxy comes up by itself once it can."""
    pid1.configure(PROXY_CONFIG.format(plugins=""))
    pid1.install_unit("smtpproxy.service")
    holder = subprocess.Popen(["nsenter", "-t", str(pid1.pid), "-n", sys.executable, "-c",
                               "import socket, time; s = socket.create_server(('127.0.0.1', 25)); "
                               "print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert pid1.systemctl("restart", "smtpproxy.service", check=False).returncode != 0
        pid1.wait_for("smtpproxy.service", {"NRestarts": "2"}, timeout=30)
    finally:
        holder.kill()
        holder.wait()
    pid1.wait_for("smtpproxy.service", {"ActiveState": "active", "SubState": "running"}, timeout=30)
    failed = _lines(pid1, "smtpproxy.service", r"event=startup_failed .*127.0.0.1:25")
    assert failed and {e["PRIORITY"] for e in failed} == {"3"}, pid1.journal_text("smtpproxy.service")[-2000:]
    assert pid1.python(SEND.format(rcpt="late@units.test")).split() == ["250", "sent"]
    pid1.systemctl("stop", "smtpproxy.service")
