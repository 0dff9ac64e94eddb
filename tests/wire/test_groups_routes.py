"""A policy group's `route:`: its recipients go to that route's upstreams instead of their
domain's, in both rcpt modes, and the route is part of the transaction key (452 4.5.3 for a
recipient of the same domain but another group's route)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpproxy.config import ConfigError, load_config
from smtpproxy.server import ProxyServer
from tests.conftest import Sink, Talk, make_config, port_of, start_sink


@pytest.mark.parametrize("rcpt_mode", ["at_data", "relay"])
async def test_a_groups_recipients_take_the_groups_route(tmp_path: Path, sink: Sink, rcpt_mode: str) -> None:
    archive = await start_sink()
    delivery = {"type": "smtp", "upstreams": [{"host": "127.0.0.1", "port": sink.port}], "tls": "none",
                "rcpt_mode": rcpt_mode,
                "routes": [{"name": "archive", "domains": ["archive.test"],
                            "upstreams": [{"host": "127.0.0.1", "port": archive.port}]}]}
    config = make_config(tmp_path, relay={"domains": ["one.test"]}, delivery=delivery,
                         policies=[{"name": "legal", "recipients": ["legal@one.test"], "route": "archive"}])
    server = ProxyServer(config)
    await server.start()
    try:
        client = await Talk.open(port_of(server))
        await client.hello()
        assert (await client.send_message("a@src.test", ["legal@one.test"], b"Subject: 1\r\n\r\nx\r\n"))[0] == 250
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<bob@one.test>"))[0] == 250
        code, text = await client.cmd("RCPT TO:<legal@one.test>")  # same domain, the group's route
        assert (code, text[:5]) == (452, "4.5.3")
        assert (await client.cmd("DATA"))[0] == 354
        client.send(b"Subject: 2\r\n\r\nx\r\n.\r\n")
        assert (await client.reply())[0] == 250
        await client.cmd("QUIT")
        await client.close()
    finally:
        await server.stop(grace=1)
        archive.server.close()
    assert [m.recipients for m in archive.messages] == [["legal@one.test"]]
    assert [m.recipients for m in sink.messages] == [["bob@one.test"]]


def test_a_groups_route_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "smtpproxy.yaml"
    path.write_text("""\
delivery:
  type: smtp
  host: 127.0.0.1
  routes:
    - {name: archive, domains: [archive.test], upstreams: [{host: 127.0.0.2}]}
    - {name: archive, domains: [b.test], upstreams: [{host: 127.0.0.3}]}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).endswith("6:8: delivery.routes[1].name: route name 'archive' is already used "
                                    "by routes[0]")
    path.write_text("""\
delivery:
  type: smtp
  host: 127.0.0.1
  routes:
    - {name: archive, domains: [archive.test], upstreams: [{host: 127.0.0.2}]}
policies:
  - name: legal
    recipients: [legal@one.test]
    route: archiv
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "9:5: policies[0].route: no route named 'archiv' in delivery.routes (default, archive)" in str(info.value)
