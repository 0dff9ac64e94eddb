"""Policy groups in the milter: a recipient of another group's data policy is tempfailed at RCPT
(452 4.5.3, the MTA's client sends it again), and its own transaction gets its own policy."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpproxy.milter import codec
from smtpproxy.milter.server import MilterServer
from tests.conftest import make_config
from tests.wire.test_milter import BODY, HEADERS, FakeMTA, accepted_after_progress

PLUGINS = [
    {"name": "judge", "use": "tests.unit.test_groups:Judge", "settings": {"score": 6.0}},
    {"name": "gate", "use": "tests.unit.test_groups:Gate"},  # rcpt_to only
    {"name": "score", "settings": {"tag": 5.0, "reject": 100.0}},
]
POLICIES = [
    {"name": "strict", "recipients": ["strict.test"], "plugins": {"score": {"settings": {"reject": 5.0}}}},
    {"name": "lists", "recipients": ["lists.test"], "plugins": {"gate": {"settings": {"refuse": ["x@lists.test"]}}}},
]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[MilterServer]:
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"}, plugins=PLUGINS, policies=POLICIES)
    milter = MilterServer(config)  # the chains from the configuration, groups included
    await milter.start()
    yield milter
    await milter.stop(grace=1)


async def test_an_incompatible_group_is_tempfailed_per_recipient(server: MilterServer) -> None:
    mta = await FakeMTA.open(server)
    await mta.start()
    # No plugin answers HELO or MAIL: the MTA waits for neither (SMFIP_NR_HELO, NR_MAIL).
    assert await mta.event(codec.Helo("client.test")) == []
    assert await mta.event(codec.Mail(("<alice@sender.test>",)), i="Q1") == []
    assert await mta.event(codec.Rcpt(("<bob@plain.test>",))) == [codec.Continue()]
    # Only the rcpt_to settings differ: same transaction; that group's own rcpt_to rule applies.
    assert await mta.event(codec.Rcpt(("<y@lists.test>",))) == [codec.Continue()]
    assert await mta.event(codec.Rcpt(("<x@lists.test>",))) == [codec.ReplyCode("550 5.7.1 gated")]
    assert await mta.event(codec.Rcpt(("<carol@strict.test>",))) == [
        codec.ReplyCode("452 4.5.3 Recipients under another policy must be sent in a new transaction")]
    responses = await mta.content(HEADERS, BODY)
    assert isinstance(responses[-1], codec.Accept | codec.Continue)  # score 6: under the global 100
    # The MTA's client sends the deferred recipient again: its group's threshold (5) rejects.
    assert await mta.event(codec.Mail(("<alice@sender.test>",)), i="Q2") == []
    assert await mta.event(codec.Rcpt(("<carol@strict.test>",))) == [codec.Continue()]
    responses = await mta.content(HEADERS, BODY)
    final = responses[-1]
    assert isinstance(final, codec.ReplyCode) and final.text.startswith("550 5.7.1 Message rejected as spam")
    await mta.close()


async def test_a_slow_group_only_data_plugin_keeps_the_mta_waiting_with_progress(tmp_path: Path) -> None:
    # The default chain has no data plugin; the group's does, and is slow: SMFIR_PROGRESS must
    # keep the MTA waiting as it does for a global data plugin.
    plugins = [{"name": "slow_data", "use": "tests.wire.test_milter:SlowData", "enabled": False}]
    policies = [{"name": "scanned", "recipients": ["scanned.test"], "plugins": {"slow_data": {"enabled": True}}}]
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0", "progress_interval": 0.1},
                         plugins=plugins, policies=policies)
    milter = MilterServer(config)
    await milter.start()
    try:
        mta = await FakeMTA.open(milter)
        await mta.start()
        await mta.envelope("<alice@sender.test>", "<bob@scanned.test>")
        await accepted_after_progress(mta)
        await mta.close()
    finally:
        await milter.stop(grace=1)


async def test_a_listeners_group_without_the_daemon_port_macro_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Postfix's default milter_connect_macros has {daemon_addr} but not {daemon_port}: without
    # it no session matches a group's listeners, and the recipients silently get another
    # group's rules. Said once, at the first connection that lacks it.
    caplog.set_level(logging.INFO)
    policies = [{"name": "submission", "listeners": [587], "plugins": {"score": {"settings": {"reject": 5.0}}}}]
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"}, plugins=PLUGINS, policies=policies)
    milter = MilterServer(config)
    await milter.start()
    try:
        for _ in range(2):
            mta = await FakeMTA.open(milter)
            await mta.start()
            await mta.passes(codec.Helo("client.test"))
            await mta.close()
        mta = await FakeMTA.open(milter)
        await mta.start(daemon_port="587")
        await mta.close()
    finally:
        await milter.stop(grace=1)
    warned = [r for r in caplog.records if r.getMessage() == "milter_daemon_port_missing"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "{daemon_port}" in warned[0].smtpproxy_fields["note"]  # type: ignore[attr-defined]


async def test_a_daemon_port_that_is_no_number_is_no_port(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # "²" passes str.isdigit() but int() refuses it: the connection goes on, with no port.
    caplog.set_level(logging.INFO)
    config = make_config(tmp_path, milter={"listen": "inet:127.0.0.1:0"}, plugins=PLUGINS)
    milter = MilterServer(config)
    await milter.start()
    try:
        mta = await FakeMTA.open(milter)
        await mta.start(daemon_port="\u00b2")
        await mta.passes(codec.Helo("client.test"))
        await mta.close()
    finally:
        await milter.stop(grace=1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
