"""Several proxies behind a real load balancer (docs/deploy-cluster.md), on real parts.

Debian's HAProxy in TCP mode sends PROXY v2 to two ``smtpproxy run`` processes and checks
their /readyz; the two share one Redis (rate limits, greylisting) and one quarantine
directory, and deliver to one capturing upstream. Clients connect from 127.0.0.5, an address
neither HAProxy nor the proxies use, so the original client is visible at each hop.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Sink, Talk
from tests.haproxy import DOC, HAProxy, documented_config, start_haproxy
from tests.postfix_instance import PostfixFactory
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer

EXE = [sys.executable, "-m", "smtpproxy"]
CLIENT = "127.0.0.5"


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    health_port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log())
            if match is not None:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} in its log:\n{self.log()}")
            time.sleep(0.02)

    def events(self, name: str) -> list[str]:
        return re.findall(rf"^.* event={name} .*$", self.log(), re.M)

    async def stop(self) -> None:
        """SIGTERM; waited for off the event loop, which serves the upstream they say QUIT to."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    balancer: HAProxy
    nodes: list[Node]
    sink: Sink
    workdir: Path
    delivery: str
    plugins: str
    started: list[Node]

    def replace(self, index: int, stamp: str) -> Node:
        """A new process for a stopped node, on its ports, stamping its mail ``stamp``."""
        old = self.nodes[index]
        config = node_config(self.workdir, old.name, self.delivery, self.plugins, stamp=stamp,
                             port=old.port, health_port=old.health_port)
        node = start_node(self.workdir, old.name, config, log_name=stamp)
        self.started.append(node)
        self.nodes[index] = node
        return node

    async def connect(self, source: str = CLIENT) -> Talk:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.balancer.port, local_addr=(source, 0))
        return Talk(reader, writer)


def node_config(tmp_path: Path, name: str, delivery: str, plugins: str, extra: str = "", *,
                stamp: str | None = None, port: int = 0, health_port: int = 0,
                ready_cache: float = 5) -> Path:
    path = tmp_path / f"{stamp or name}.yaml"
    path.write_text(
        f"listeners:\n  - address: 127.0.0.1\n    port: {port}\n    proxy_protocol: true\n"
        "    proxy_protocol_from: [127.0.0.1/32]\n"
        f"hostname: {name}.cluster.test\n"
        "relay:\n  domains: [dest.test]\n"
        + delivery +
        "quarantine:\n  path: quarantine\n"
        + extra.replace("NODE", name) +
        f"metrics:\n  enabled: true\n  address: 127.0.0.1\n  port: {health_port}\n  ready_cache: {ready_cache}\n"
        "plugins:\n"
        f"  - name: headers\n    settings:\n      add: {{X-Seen-Client: '{{client_ip}}', X-Seen-By: {stamp or name}}}\n"
        + plugins
    )
    return path


def start_node(tmp_path: Path, name: str, config: Path, log_name: str | None = None) -> Node:
    """``smtpproxy run`` with ``config``, once it listens (SMTP and metrics)."""
    log_path = tmp_path / f"{log_name or name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=log, cwd=tmp_path,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    node = Node(name, process, log_path)
    try:
        node.port = int(node.wait_for(r"event=listening address=\S+ port=(\d+)").group(1))
        node.health_port = int(node.wait_for(r"event=metrics_listening address=\S+ port=(\d+)").group(1))
    except Exception:
        process.kill()
        process.wait()
        raise
    return node


@pytest.fixture
async def cluster_factory(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Cluster]]:
    started: list[Node] = []
    balancers: list[HAProxy] = []

    def start(plugins: str = "", delivery: str | None = None, extra: str = "",
              ready_cache: float = 5) -> Cluster:
        """Two proxies (node1, node2) with ``plugins`` after a headers stamp, HAProxy in front;
        they deliver to the capturing ``sink`` unless ``delivery`` (a YAML section) says otherwise.
        ``extra``: more top-level YAML, NODE replaced by each node's name."""
        if delivery is None:
            delivery = f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {sink.port}\n"
        nodes = []
        for name in ("node1", "node2"):
            node = start_node(tmp_path, name, node_config(tmp_path, name, delivery, plugins, extra,
                                                          ready_cache=ready_cache))
            started.append(node)
            nodes.append(node)
        balancer = start_haproxy(tmp_path, {n.name: (n.port, n.health_port) for n in nodes})
        balancers.append(balancer)
        return Cluster(balancer, nodes, sink, tmp_path, delivery, plugins, started)

    yield start
    for balancer in balancers:
        balancer.stop()
    await asyncio.gather(*(node.stop() for node in started))


MESSAGE = b"From: a@src.test\r\nTo: x@dest.test\r\nMessage-ID: <%s@src.test>\r\nSubject: %s\r\n\r\nhello\r\n"


def seen_by(content: bytes) -> str:
    match = re.search(rb"^X-Seen-By: (\S+)\r$", content, re.M)
    assert match is not None, content
    return match.group(1).decode()


async def test_the_client_address_reaches_plugins_logs_and_upstream_through_both_hops(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory("")
    for n in range(2):
        client = await cluster.connect()
        code, text = await client.greeting()
        assert code == 220 and text.startswith(f"node{n + 1}.cluster.test")  # round robin
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.send_message("a@src.test", ["x@dest.test"], MESSAGE % (b"m%d" % n, b"hi")))[0] == 250
        assert (await client.cmd("QUIT"))[0] == 221
        await client.close()
    received = cluster.sink.messages
    assert sorted(seen_by(m.content) for m in received) == ["node1", "node2"]
    assert all(b"\r\nX-Seen-Client: 127.0.0.5\r\n" in b"\r\n" + m.content for m in received)
    for node in cluster.nodes:
        [connect] = node.events("connect")
        assert f"client={CLIENT} " in connect, connect


async def test_a_proxy_header_from_anyone_but_the_balancer_is_refused(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory("")
    node = cluster.nodes[0]
    forged = b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 25\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, local_addr=("127.0.0.7", 0))
    writer.write(forged)
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed with the header unread: a reset
        answer = b""
    assert answer == b""  # closed without a banner
    writer.close()
    assert node.wait_for(r"event=proxy_refused .*127\.0\.0\.7")
    assert "203.0.113.9" not in "".join(n.log() for n in cluster.nodes).replace(forged.decode(), "")


RATELIMIT = """\
  - name: ratelimit
    settings:
      backend: {backend}
      redis_url: {url}
      rules:
        - {{name: per-client, key: client_ip, what: messages, limit: 5, window: 600}}
"""


async def _burst(cluster: Cluster, count: int) -> list[int]:
    async def one(n: int) -> int:
        client = await cluster.connect()
        try:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
            assert (await client.cmd("RCPT TO:<x@dest.test>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            client.send(MESSAGE % (b"r%d" % n, b"burst") + b".\r\n")
            return (await client.reply())[0]
        finally:
            await client.close()

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_a_shared_redis_rate_limit_holds_at_n_across_both_proxies(
    cluster_factory: Callable[..., Cluster], redis_server: RedisServer,
) -> None:
    cluster = cluster_factory(RATELIMIT.format(backend="redis", url=redis_server.url))
    codes = await _burst(cluster, 16)
    assert codes.count(250) == 5, codes
    assert codes.count(451) == 11, codes
    assert all(len(node.events("connect")) == 8 for node in cluster.nodes)  # both took their share


async def test_without_redis_each_proxy_counts_alone(cluster_factory: Callable[..., Cluster]) -> None:
    """Why the shared backend matters: with memory counters the limit is N per proxy."""
    cluster = cluster_factory(RATELIMIT.format(backend="memory", url="null"))
    codes = await _burst(cluster, 16)
    assert codes.count(250) == 10, codes


GREYLIST = """\
  - name: greylist
    settings:
      backend: redis
      redis_url: {url}
      delay: 0
"""


async def test_a_greylist_triplet_seen_by_one_proxy_is_honoured_by_the_other(
    cluster_factory: Callable[..., Cluster], redis_server: RedisServer,
) -> None:
    cluster = cluster_factory(GREYLIST.format(url=redis_server.url))
    replies = []
    for _ in range(2):  # round robin: the retry goes to the other node (which one starts is HAProxy's)
        client = await cluster.connect()
        await client.hello()
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        replies.append((await client.cmd("RCPT TO:<x@dest.test>"))[0])
        await client.close()
    assert replies == [451, 250]
    saw_new = [n for n in cluster.nodes if re.search(r"event=greylist .*status=new", n.log())]
    saw_passed = [n for n in cluster.nodes if re.search(r"event=greylist .*status=passed", n.log())]
    assert len(saw_new) == 1 and len(saw_passed) == 1
    first, second = saw_new[0], saw_passed[0]
    assert first is not second  # the node that never saw the first attempt let the retry pass
    assert "status=new" not in "\n".join(second.events("greylist"))


async def test_sigkill_of_one_proxy_under_load_loses_no_acknowledged_message(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory("")
    total, clients = 40, 4
    acknowledged: set[bytes] = set()
    attempts: dict[bytes, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(b"k%d" % n)
    killed = asyncio.Event()

    async def sender() -> None:
        while not queue.empty():
            key = queue.get_nowait()
            attempts[key] = attempts.get(key, 0) + 1
            try:
                client = await cluster.connect()
                try:
                    await client.hello()
                    code, _ = await client.send_message("a@src.test", ["x@dest.test"], MESSAGE % (key, b"load"))
                finally:
                    await client.close()
            except (ConnectionError, AssertionError, TimeoutError, OSError):
                code = 0
            if code == 250:
                acknowledged.add(key)
            elif attempts[key] < 10:
                queue.put_nowait(key)  # as an MTA would: try again later
            if len(acknowledged) >= total // 4 and not killed.is_set():
                killed.set()
                cluster.nodes[0].process.send_signal(signal.SIGKILL)

    await asyncio.gather(*(sender() for _ in range(clients)))
    assert killed.is_set()
    delivered = {re.search(rb"Message-ID: <(\w+)@", m.content).group(1)  # type: ignore[union-attr]
                 for m in cluster.sink.messages}
    assert acknowledged <= delivered  # nothing acknowledged was lost
    assert len(acknowledged) == total  # every message got through in the end
    after = [seen_by(m.content) for m in cluster.sink.messages[len(cluster.sink.messages) // 2:]]
    assert "node2" in after
    cluster.balancer.wait_status({"node1": "DOWN", "node2": "UP"})


QUARANTINE = """\
  - name: access
    settings:
      sender:
        deny: {rules: ["*@bad.example"]}
        action: quarantine
"""


async def _cli(*args: str) -> tuple[int, str]:
    """The smtpproxy command, without blocking the loop that runs the upstream."""
    process = await asyncio.create_subprocess_exec(*EXE, *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_the_shared_quarantine_is_listed_and_released_from_any_instance(
    cluster_factory: Callable[..., Cluster], tmp_path: Path,
) -> None:
    cluster = cluster_factory(QUARANTINE)
    for n in range(2):  # one through each proxy
        client = await cluster.connect()
        await client.hello()
        assert (await client.send_message("s@bad.example", ["x@dest.test"], MESSAGE % (b"q%d" % n, b"q")))[0] == 250
        await client.close()
    assert cluster.sink.messages == []
    code, listing = await _cli("quarantine", "list", "-c", str(tmp_path / "node1.yaml"))
    assert code == 0, listing
    ids = re.findall(r"^(\S+-\w+\.\d+)\s", listing, re.M)
    assert len(ids) == 2, listing
    code, released = await _cli("quarantine", "release", *ids, "-c", str(tmp_path / "node2.yaml"))
    assert code == 0, released
    assert sorted(seen_by(m.content) for m in cluster.sink.messages) == ["node1", "node2"]
    code, listing = await _cli("quarantine", "list", "-c", str(tmp_path / "node1.yaml"))
    assert listing.startswith("quarantine is empty")


async def test_two_proxies_share_one_postgresql_store_and_release_per_recipient_from_the_other(
    cluster_factory: Callable[..., Cluster], postfix_factory: PostfixFactory,
    postgres_server: PostgresServer, tmp_path: Path,
) -> None:
    """The store in a cluster: each node keeps what it quarantines in the shared PostgreSQL;
    the other node lists it, releases it for bob only (into the real Postfix's Maildir),
    alice's copy stays held, and bob's cannot be released twice. Both record history."""
    postfix = postfix_factory()
    url = postgres_server.url(postgres_server.create_database())
    cluster = cluster_factory(QUARANTINE, delivery=(
        f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {postfix.port}\n  tls: none\n"),
        extra=f"store:\n  postgresql: '{url}'\n  node: NODE\nhistory:\n  flush_interval: 0.1\n")
    for n in range(2):  # one through each proxy
        client = await cluster.connect()
        await client.hello()
        code, _ = await client.send_message("s@bad.example", ["bob@dest.test", "alice@dest.test"],
                                            MESSAGE % (b"q%d" % n, b"held"))
        assert code == 250
        await client.close()
    config = {n.name: str(tmp_path / f"{n.name}.yaml") for n in cluster.nodes}
    code, listing = await _cli("quarantine", "list", "--sender", "s@bad.example", "-c", config["node1"])
    assert code == 0, listing
    kept = dict(re.findall(r"^(\d{8}T\d{6}-[\w.]+)\s+\S+ \S+\s+(node\d)\s", listing, re.M))
    assert sorted(kept.values()) == ["node1", "node2"], listing
    for qid, node in kept.items():
        other = config["node2" if node == "node1" else "node1"]
        code, out = await _cli("quarantine", "release", qid, "--recipient", "bob@dest.test", "-c", other)
        assert code == 0 and f"{qid}: released for bob@dest.test to " in out, out
        code, out = await _cli("quarantine", "release", qid, "--recipient", "bob@dest.test", "-c", other)
        assert code == 1 and "already released for bob@dest.test" in out, out
    stored = await asyncio.to_thread(postfix.wait_for_messages, "bob", 2)
    assert sorted(email.message_from_bytes(m)["X-Seen-By"] for m in stored) == ["node1", "node2"]
    assert postfix.messages("alice") == []
    code, listing = await _cli("quarantine", "list", "--recipient", "alice@dest.test", "-c", config["node2"])
    assert code == 0 and listing.count("alice@dest.test") == 2, listing
    code, out = await _cli("history", "export", "--decision", "quarantined", "-c", config["node2"])
    assert code == 0 and sorted(re.findall(r'"node": "(node\d)"', out)) == ["node1", "node2"], out


async def test_the_upstream_sees_the_original_client_through_xclient(
    cluster_factory: Callable[..., Cluster], postfix_factory: PostfixFactory,
) -> None:
    """A real Postfix behind both hops: XCLIENT carries the client HAProxy saw, not a proxy's."""
    postfix = postfix_factory()
    cluster = cluster_factory("", delivery=(
        f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {postfix.port}\n  tls: none\n"
        "  client_identity: xclient\n"))
    for n in range(2):
        client = await cluster.connect()
        await client.hello("mail.client.example")
        code, text = await client.send_message("a@src.test", ["bob@dest.test"], MESSAGE % (b"x%d" % n, b"x"))
        assert code == 250 and "queued as" in text, text
        await client.close()
    stored = await asyncio.to_thread(postfix.wait_for_messages, "bob", 2)
    parsed = [email.message_from_bytes(m) for m in stored]
    assert sorted(p["X-Seen-By"] for p in parsed) == ["node1", "node2"]
    for p in parsed:
        received = p.get_all("Received")[0]
        assert "[127.0.0.5]" in received and "mail.client.example" in received, received
    await asyncio.to_thread(postfix.wait_for_log, r"client=\S*\[127\.0\.0\.5\]")


def test_the_documented_haproxy_config_is_valid_and_outlasts_the_proxys_own_timeouts() -> None:
    """HAProxy must not cut a working session: its inactivity timeouts are above every silence
    the proxy allows a client (idle, inside DATA) and the 10 minutes a client waits for the
    reply to the end of data (RFC 5321 4.5.3.2.6). The docs once said 5m "at least
    limits.command_timeout", a key that does not exist."""
    from smtpproxy.config import Limits, SmtpDeliveryConfig

    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed: apt-get install haproxy")
    config = documented_config()
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as file:
        file.write(config)
        file.flush()
        check = subprocess.run([binary, "-c", "-f", file.name], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    timeouts = {name: float(value) * units[unit] for name, value, unit
                in re.findall(r"^\s*timeout (\w+) (\d+)(ms|s|m|h)\b", config, re.M)}
    limits = Limits()
    silences = [limits.idle_timeout, limits.data_timeout, 600.0,
                SmtpDeliveryConfig.model_fields["data_timeout"].default]
    assert timeouts["client"] > max(silences), timeouts
    assert timeouts["server"] > max(silences), timeouts
    assert "limits.data_timeout" in config and "command_timeout" not in config
    assert re.search(r"^\s*stats socket /run/haproxy/admin\.sock .*level admin", config, re.M)


async def test_an_upstream_outage_keeps_both_proxies_in_the_balancer_and_clients_hear_451(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """Readiness used to follow the shared upstream: one outage drained every proxy and
    HAProxy closed the clients' connections without a word. Now both stay in and answer."""
    cluster = cluster_factory("", ready_cache=0.2)
    cluster.sink.server.close()  # the upstream both proxies share goes away
    for node in cluster.nodes:  # each proxy's probe has seen it (ready_cache 0.2 s)
        deadline = time.monotonic() + 30
        while b"delivery unusable" not in (body := await _readyz(node))[1]:
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
        assert body[0] == 200
    cluster.balancer.wait_status({"node1": "UP", "node2": "UP"}, exact=True)
    for _ in range(2):  # both proxies (round robin) answer, and defer the mail
        client = await cluster.connect()
        code, text = await client.greeting()
        assert code == 220, text
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        assert await client.cmd("RCPT TO:<x@dest.test>") == (
            451, "4.4.1 Upstream mail server not reachable, try again later")
        assert (await client.cmd("QUIT"))[0] == 221
        await client.close()
    assert cluster.balancer.server_status() == {"node1": "UP", "node2": "UP"}, cluster.balancer.admin("show stat")
    assert all(node.events("upstream_down") for node in cluster.nodes)


async def _readyz(node: Node) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.health_port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


def _rolling_upgrade_functions(socket_path: Path) -> str:
    """The shell functions of docs/deploy-cluster.md's "Rolling upgrades", on the test's socket."""
    [functions] = [b for b in re.findall(r"^```sh\n(.*?)^```", DOC.read_text(), re.M | re.S) if "drain()" in b]
    assert functions.count("/run/haproxy/admin.sock") == 1
    return str(functions).replace("/run/haproxy/admin.sock", str(socket_path))


async def test_a_rolling_upgrade_as_documented_serves_every_client_and_loses_nothing(
    cluster_factory: Callable[..., Cluster],
) -> None:
    """docs/deploy-cluster.md's procedure, its shell functions run as written (socat, curl):
    drain a node, stop it (SIGTERM), start its new version, undrain it; then the other,
    while four clients send mail throughout."""
    if shutil.which("socat") is None or shutil.which("curl") is None:
        pytest.skip("the documented procedure needs socat and curl: apt-get install socat curl")
    cluster = cluster_factory("")
    functions = _rolling_upgrade_functions(cluster.balancer.socket_path)
    acknowledged: set[bytes] = set()
    failures: list[tuple[bytes, str]] = []
    done = asyncio.Event()
    counter = iter(range(1_000_000))
    phase = ["start"]

    async def sender() -> None:
        while not done.is_set():
            key = b"u%d" % next(counter)
            try:
                client = await cluster.connect()
                try:
                    await client.hello()
                    code, text = await client.send_message("a@src.test", ["x@dest.test"],
                                                           MESSAGE % (key, b"upgrade"))
                finally:
                    await client.close()
            except (ConnectionError, AssertionError, TimeoutError, OSError) as exc:
                code, text = 0, repr(exc)
            if code == 250:
                acknowledged.add(key)
            else:
                failures.append((key, f"{code} {text} phase={phase[0]} status={cluster.balancer.server_status()}"))

    async def shell(command: str) -> None:
        process = await asyncio.create_subprocess_exec("bash", "-c", f"set -e\n{functions}\n{command}")
        assert await asyncio.wait_for(process.wait(), 120) == 0, command

    senders = [asyncio.create_task(sender()) for _ in range(4)]
    try:
        for index, name in enumerate(("node1", "node2")):
            before = len(acknowledged)
            phase[0] = f"draining {name}"
            await shell(f"drain {name}")
            phase[0] = f"drained {name}"
            assert cluster.balancer.server_status()[name] == "DRAIN"
            await cluster.nodes[index].stop()  # systemctl stop: SIGTERM, waited for
            assert cluster.nodes[index].process.returncode == 0
            phase[0] = f"stopped {name}"
            node = await asyncio.to_thread(cluster.replace, index, f"{name}-v2")
            phase[0] = f"restarted {name}"
            await shell(f"undrain {name} http://127.0.0.1:{node.health_port}/readyz")
            phase[0] = f"undrained {name}"
            await asyncio.to_thread(cluster.balancer.wait_status, {name: "UP"})
            phase[0] = f"up {name}"
            await _until(lambda before=before: len(acknowledged) >= before + 10)  # mail flowed while it was out
        stamped = len(cluster.sink.messages)
        await _until(lambda: len(cluster.sink.messages) >= stamped + 8)  # and after
    finally:
        done.set()
        await asyncio.gather(*senders)
    delivered = [m.content for m in cluster.sink.messages]
    keys = {re.search(rb"Message-ID: <(\w+)@", m).group(1) for m in delivered}  # type: ignore[union-attr]
    assert acknowledged <= keys  # nothing acknowledged was lost
    assert failures == []  # and no client saw an error: a drained node gets no new sessions
    assert {seen_by(m) for m in delivered[stamped:]} == {"node1-v2", "node2-v2"}  # the new versions serve
    assert {seen_by(m) for m in delivered} >= {"node1", "node2", "node1-v2", "node2-v2"}
