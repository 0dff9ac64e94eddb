"""A `table:` selector whose backend is down: the recipient gets 451 4.3.0 (the client retries),
never the default group; a static group before it still answers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from smtpproxy.server import ProxyServer
from tests.conftest import Talk, make_config, port_of
from tests.daemons import free_port


async def test_a_selector_table_that_is_down_tempfails_the_recipient(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.session")
    down = free_port()  # nothing listens there: the Redis is down
    config = make_config(
        tmp_path, relay={"domains": ["shop.test", "uni.test"]},
        tables={"staff": {"type": "redis", "url": f"redis://127.0.0.1:{down}/0", "timeout": 0.5}},
        policies=[{"name": "shop", "recipients": ["shop.test"]},
                  {"name": "uni", "recipients": ["table:staff"]}],
    )
    server = ProxyServer(config)
    await server.start()
    try:
        client = await Talk.open(port_of(server))
        await client.hello()
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<anna@shop.test>"))[0] == 250  # the static group first
        code, text = await client.cmd("RCPT TO:<carol@uni.test>")
        assert (code, text) == (451, "4.3.0 Recipient policy lookup failed, please try again later")
        await client.cmd("QUIT")
        await client.close()
    finally:
        await server.stop(grace=1)
    failed = [r.smtpproxy_fields for r in caplog.records  # type: ignore[attr-defined]
              if r.msg == "rcpt_to" and r.smtpproxy_fields.get("verdict") == "group_lookup_failed"]  # type: ignore[attr-defined]
    assert [f["recipient"] for f in failed] == ["carol@uni.test"]
    assert "staff" in failed[0]["error"]
