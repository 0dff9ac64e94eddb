"""Policy groups in the Postfix policy service: each recipient's rcpt_to phase runs on its
group's chain, and a recipient whose group has another data policy gets 452 4.5.3 (Postfix's
client then sends it in a new transaction), as in the proxy and the milter."""

from __future__ import annotations

import asyncio
from pathlib import Path

from smtpproxy.policy.server import PolicyServer
from tests.conftest import make_config
from tests.wire.test_policy import Client, request

PLUGINS = [
    {"name": "judge", "use": "tests.unit.test_groups:Judge", "settings": {"score": 1.0}},
    {"name": "gate", "use": "tests.unit.test_groups:Gate"},
]
POLICIES = [
    {"name": "lists", "recipients": ["lists.test"], "plugins": {"gate": {"settings": {"refuse": ["x@lists.test"]}}}},
    {"name": "strict", "recipients": ["strict.test"], "plugins": {"judge": {"settings": {"score": 9.0}}}},
]


async def test_groups_in_the_policy_service(tmp_path: Path) -> None:
    config = make_config(tmp_path, policy={"listen": "inet:127.0.0.1:0", "message_plugins": "warn"},
                         plugins=PLUGINS, policies=POLICIES)
    server = PolicyServer(config)
    await server.start()
    try:
        address = server.address
        assert isinstance(address, tuple)
        client = Client(*await asyncio.open_connection(*address))
        assert await client.ask(request(recipient="bob@plain.test")) == "DUNNO"
        assert await client.ask(request(recipient="y@lists.test")) == "DUNNO"
        assert await client.ask(request(recipient="x@lists.test")) == "550 5.7.1 gated"
        assert await client.ask(request(recipient="carol@strict.test")) == (
            "452 4.5.3 Recipients under another policy must be sent in a new transaction")
        # Postfix's client sends carol again: a new transaction (another instance) takes her.
        assert await client.ask(request(recipient="carol@strict.test", instance="a2.1.1")) == "DUNNO"
        client.close()
    finally:
        await server.stop(grace=1)


def test_a_message_plugin_a_group_turns_on_is_named_by_check_config(tmp_path: Path) -> None:
    from smtpproxy.policy.applicability import message_plugins
    from smtpproxy.registry import build_chain

    config = make_config(tmp_path, plugins=[{"name": "score", "enabled": False}, PLUGINS[1]],
                         policies=[{"name": "spam", "recipients": ["spam.test"],
                                    "plugins": {"score": {"enabled": True}}}])
    found = message_plugins(build_chain(config.plugins, None, policies=config.policies))
    assert found.only_message == ("score",)
