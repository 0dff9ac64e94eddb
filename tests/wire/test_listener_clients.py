"""Who may talk to the listeners that have no authentication of their own: the milter, the
policy service and the metrics endpoint take ``clients:`` (this host by default), and every
other host is turned away before it can say anything.

Tested as an attacker would come: from another address (127.0.0.2 here, which the tests'
``clients: [127.0.0.1/32]`` leaves out), trying what a stranger would try: a made-up milter
session or policy request that would count against rate limits and pass greylisting, and a
scrape of /metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smtpproxy import Session, Verdict, hookimpl
from smtpproxy.config import load_config
from smtpproxy.config.problems import ConfigError
from smtpproxy.health import MAX_CONNECTIONS
from smtpproxy.networks import LOOPBACK, peer_in_networks
from tests.conftest import ProxyFactory, chain_of, make_config
from tests.wire.test_milter import Factory, FakeMTA, milter  # noqa: F401 (fixture)
from tests.wire.test_policy import (
    Client,
    policy,  # noqa: F401 (fixture)
    request,
)
from tests.wire.test_policy import Start as PolicyStart

ONLY_THIS_ADDRESS = ["127.0.0.1/32"]
STRANGER = "127.0.0.2"


class Seen:
    """Records every session that reached the plugins."""

    name = "seen"

    def __init__(self) -> None:
        self.clients: list[str] = []

    @hookimpl
    def connect(self, session: Session) -> Verdict | None:
        self.clients.append(session.client.ip)
        return None


async def _open(address: object, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert isinstance(address, tuple)
    return await asyncio.open_connection(address[0], address[1], local_addr=(source, 0))


async def _closed_at_once(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionError:
        return True


def _logged(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.smtpproxy_fields for r in caplog.records if r.msg == name]  # type: ignore[attr-defined]


def test_the_default_is_this_host_whatever_its_address_family() -> None:
    assert peer_in_networks(("127.0.0.1", 4000), LOOPBACK)
    assert peer_in_networks(("127.9.9.9", 4000), LOOPBACK)
    assert peer_in_networks(("::1", 4000, 0, 0), LOOPBACK)
    assert peer_in_networks(("::ffff:127.0.0.1", 4000, 0, 0), LOOPBACK)  # a dual-stack listener's IPv4 client
    assert not peer_in_networks(("192.0.2.1", 4000), LOOPBACK)
    assert not peer_in_networks(("::ffff:192.0.2.1", 4000, 0, 0), LOOPBACK)
    assert not peer_in_networks(("2001:db8::1", 4000, 0, 0), LOOPBACK)
    assert not peer_in_networks(None, LOOPBACK)  # a connection gone before it was looked at
    assert not peer_in_networks("", LOOPBACK)


def test_every_unauthenticated_listener_defaults_to_this_host(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for section in (config.milter, config.policy, config.metrics):
        assert tuple(section.clients) == LOOPBACK


@pytest.mark.parametrize("section", ["milter", "policy", "metrics"])
def test_an_empty_list_is_refused_with_file_line_and_key(tmp_path: Path, section: str) -> None:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text(f"{section}:\n  clients: []\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert f"smtpproxy.yaml:2:3: {section}.clients: must list at least one network" in str(refused.value)


async def test_the_milter_closes_a_stranger_before_its_first_packet(
    milter: Factory, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    seen = Seen()
    server = await milter(seen, clients=ONLY_THIS_ADDRESS)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        stranger = FakeMTA(*await _open(server.address, STRANGER))
        stranger.send_raw(b"\x00\x00\x00\x0dO" + b"\x00" * 12)  # an OPTNEG it never gets to answer
        assert await _closed_at_once(stranger.reader)
    assert _logged(caplog, "milter_refused") == [
        {"peer": f"{STRANGER}:{stranger.writer.get_extra_info('sockname')[1]}", "reason": "client"}]
    mta = FakeMTA(*await _open(server.address, "127.0.0.1"))  # the MTA itself is served
    await mta.start(client="192.0.2.7")
    await mta.close()
    assert seen.clients == ["192.0.2.7"]


async def test_the_milter_listens_to_the_hosts_it_is_told(milter: Factory) -> None:  # noqa: F811
    server = await milter(clients=["127.0.0.2/32", "::1/128"])
    mta = FakeMTA(*await _open(server.address, STRANGER))
    await mta.negotiate()
    await mta.close()


async def test_a_milter_unix_socket_leaves_it_to_the_socket_permissions(tmp_path: Path) -> None:
    from smtpproxy.milter.server import MilterServer

    path = tmp_path / "milter.sock"
    config = make_config(tmp_path, milter={"listen": f"unix:{path}", "clients": ["192.0.2.0/24"]})
    server = MilterServer(config, chain=chain_of(timeout=1.0))
    await server.start()
    try:
        mta = FakeMTA(*await asyncio.open_unix_connection(str(path)))
        await mta.negotiate()
        await mta.close()
    finally:
        await server.stop(grace=1)


async def test_the_policy_service_closes_a_stranger_before_its_first_request(
    policy: PolicyStart, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    seen = Seen()
    server, _ = await policy(seen, clients=ONLY_THIS_ADDRESS)
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        stranger = Client(*await _open(server.address, STRANGER))
        stranger.writer.write(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                              b"client_address=192.0.2.9\n\n")
        assert await stranger.closed()
    assert [fields["reason"] for fields in _logged(caplog, "policy_refused")] == ["client"]
    assert seen.clients == []
    postfix = Client(*await _open(server.address, "127.0.0.1"))
    assert await postfix.ask(request("RCPT")) == "DUNNO"
    postfix.close()
    assert seen.clients == ["192.0.2.7"]


async def test_the_policy_service_listens_to_the_hosts_it_is_told(policy: PolicyStart) -> None:  # noqa: F811
    server, _ = await policy(clients=["127.0.0.0/30"])
    client = Client(*await _open(server.address, STRANGER))
    assert await client.ask(request("RCPT")) == "DUNNO"
    client.close()


async def _get(port: int, source: str, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return response


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_the_metrics_endpoint_answers_a_stranger_403(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture, path: str,
) -> None:
    server = await proxy_factory(metrics={"enabled": True, "port": 0, "clients": ONLY_THIS_ADDRESS})
    assert server.health is not None
    port = server.health.bound[1]
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        refused = await _get(port, STRANGER, path)
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n"), refused
    assert b"smtpproxy_" not in refused
    assert [fields["reason"] for fields in _logged(caplog, "metrics_refused")] == ["client"]
    assert (await _get(port, "127.0.0.1", path)).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_idle_connections_to_the_metrics_port_cannot_pile_up(
    proxy_factory: ProxyFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """Strangers that open connections and say nothing hold at most MAX_CONNECTIONS (each up
    to 5 s); one more is closed at once, and the port serves again once they are gone."""
    server = await proxy_factory(metrics={"enabled": True, "port": 0, "clients": ONLY_THIS_ADDRESS})
    assert server.health is not None
    address = ("127.0.0.1", server.health.bound[1])
    idle = [await _open(address, STRANGER) for _ in range(MAX_CONNECTIONS)]
    await asyncio.sleep(0.2)  # every one accepted and waiting for its request
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        reader, writer = await _open(address, "127.0.0.1")
        started = asyncio.get_running_loop().time()
        assert await _closed_at_once(reader)
        assert asyncio.get_running_loop().time() - started < 2  # not after the 5 s request timeout
        writer.close()
    assert [fields["reason"] for fields in _logged(caplog, "metrics_refused")] == ["busy"]
    for _, idle_writer in idle:
        idle_writer.close()
    await asyncio.sleep(0.2)
    assert (await _get(address[1], "127.0.0.1", "/healthz")).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_the_metrics_endpoint_listens_to_the_hosts_it_is_told(proxy_factory: ProxyFactory) -> None:
    server = await proxy_factory(metrics={"enabled": True, "port": 0, "clients": ["127.0.0.2/32"]})
    assert server.health is not None
    answer = await _get(server.health.bound[1], STRANGER, "/metrics")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"smtpproxy_" in answer
    assert ipaddress.ip_network("127.0.0.2/32") in server.config.metrics.clients


@pytest.mark.parametrize(("yaml_text", "warned"), [
    ("milter: {listen: 'inet:0.0.0.0:8890'}\n", "milter listens on inet:0.0.0.0:8890, but milter.clients"),
    ("policy: {listen: 'inet:[::]:10040'}\n", "policy listens on inet:[::]:10040, but policy.clients"),
    ("metrics: {enabled: true, address: 192.0.2.10}\n", "metrics listens on 192.0.2.10:9125, but metrics.clients"),
    ("milter: {listen: 'inet:0.0.0.0:8890', clients: [10.0.0.0/8]}\n", None),
    ("milter: {listen: 'inet:127.0.0.1:8890'}\nmetrics: {address: 0.0.0.0}\n", None),  # metrics off
])
def test_check_config_says_when_the_clients_shut_out_every_other_host(
    tmp_path: Path, yaml_text: str, warned: str | None,
) -> None:
    """The likely mistake: listening wider than before and forgetting to say who may connect."""
    import subprocess
    import sys

    (tmp_path / "smtpproxy.yaml").write_text(yaml_text)
    run = subprocess.run([sys.executable, "-m", "smtpproxy", "check-config", "-c", "smtpproxy.yaml"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    if warned is None:
        assert "warning" not in run.stderr
    else:
        assert f"smtpproxy: warning: {warned} lets only this host connect" in run.stderr


async def test_a_milter_on_every_address_with_the_default_clients_says_so_at_start(
    milter: Factory, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    with caplog.at_level(logging.INFO, logger="smtpproxy"):
        server = await milter(listen="inet:0.0.0.0:0")
    assert [fields["section"] for fields in _logged(caplog, "clients_only_this_host")] == ["milter"]
    port = server.address[1] if isinstance(server.address, tuple) else 0
    mta = FakeMTA(*await _open(("127.0.0.1", port), "127.0.0.1"))  # this host still is served
    await mta.negotiate()
    await mta.close()


@given(st.ip_addresses(), st.lists(st.ip_addresses().map(ipaddress.ip_network), max_size=3),
       st.booleans())
@example(ipaddress.IPv6Address("::ffff:0:0"), [ipaddress.IPv4Network("0.0.0.0/32")], False)  # found by CI
@example(ipaddress.IPv6Address("::ffff:127.0.0.1"), [], False)
def test_a_peer_is_let_in_exactly_when_its_address_is_in_a_listed_network(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    hosts: list[ipaddress.IPv4Network | ipaddress.IPv6Network], mapped: bool,
) -> None:
    """Against the plain definition, for IPv4 and IPv6, an IPv4 client also as a dual-stack
    listener reports it (``::ffff:a.b.c.d``), and widened networks (every prefix length)."""
    networks = [net.supernet(new_prefix=net.prefixlen // 2) for net in hosts] + hosts
    peer = f"::ffff:{address}" if mapped and address.version == 4 else str(address)
    # An IPv4-mapped IPv6 address is the IPv4 address it carries, however it arrives.
    mapped_from = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    effective = mapped_from or address
    expected = any(effective in net for net in networks if net.version == effective.version)
    assert peer_in_networks((peer, 25), networks) is expected
    assert peer_in_networks((peer, 25, 0, 0), LOOPBACK) is effective.is_loopback
