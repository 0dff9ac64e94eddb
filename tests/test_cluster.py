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
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Sink, Talk
from tests.haproxy import HAProxy, start_haproxy
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

    async def connect(self, source: str = CLIENT) -> Talk:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.balancer.port, local_addr=(source, 0))
        return Talk(reader, writer)


def node_config(tmp_path: Path, name: str, delivery: str, plugins: str, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n    proxy_protocol: true\n"
        "    proxy_protocol_from: [127.0.0.1/32]\n"
        f"hostname: {name}.cluster.test\n"
        "relay:\n  domains: [dest.test]\n"
        + delivery +
        "quarantine:\n  path: quarantine\n"
        + extra.replace("NODE", name) +
        "metrics:\n  enabled: true\n  address: 127.0.0.1\n  port: 0\n"
        "plugins:\n"
        f"  - name: headers\n    settings:\n      add: {{X-Seen-Client: '{{client_ip}}', X-Seen-By: {name}}}\n"
        + plugins
    )
    return path


@pytest.fixture
async def cluster_factory(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Cluster]]:
    started: list[Node] = []
    balancers: list[HAProxy] = []

    def start(plugins: str = "", delivery: str | None = None, extra: str = "") -> Cluster:
        """Two proxies (node1, node2) with ``plugins`` after a headers stamp, HAProxy in front;
        they deliver to the capturing ``sink`` unless ``delivery`` (a YAML section) says otherwise.
        ``extra``: more top-level YAML, NODE replaced by each node's name."""
        if delivery is None:
            delivery = f"delivery:\n  type: smtp\n  host: 127.0.0.1\n  port: {sink.port}\n"
        nodes = []
        for name in ("node1", "node2"):
            config = node_config(tmp_path, name, delivery, plugins, extra)
            log_path = tmp_path / f"{name}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=log, cwd=tmp_path,
                                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
            node = Node(name, process, log_path)
            started.append(node)
            node.port = int(node.wait_for(r"event=listening address=\S+ port=(\d+)").group(1))
            node.health_port = int(node.wait_for(r"event=metrics_listening address=\S+ port=(\d+)").group(1))
            nodes.append(node)
        balancer = start_haproxy(tmp_path, {n.name: (n.port, n.health_port) for n in nodes})
        balancers.append(balancer)
        return Cluster(balancer, nodes, sink)

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
    for _ in range(2):  # round robin: the first attempt to node1, the retry to node2
        client = await cluster.connect()
        await client.hello()
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        replies.append((await client.cmd("RCPT TO:<x@dest.test>"))[0])
        await client.close()
    assert replies == [451, 250]
    first, second = cluster.nodes
    assert re.search(r"event=greylist .*status=new", first.log())
    assert re.search(r"event=greylist .*status=passed", second.log())
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
