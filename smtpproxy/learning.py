"""Reports of spam and not spam: the configured plugins' ``learn`` hook, on request.

``smtpproxy quarantine report`` and the console's "Spam" / "Not spam" buttons hand a kept
message to every plugin of the configured chain that implements ``learn`` (the rspamd and
spamd bridges teach their engine's Bayes classifier). The chain is built as the proxy builds
it, but only ``learn`` runs: no message passes through it. Each plugin's answer or error is
shown to whoever reported; an engine's error is never a crash, and never stops the others.

With ``policies:``, each recipient's policy group (chosen as at RCPT, :mod:`smtpproxy.recipientgroups`)
decides: its learners, with its settings (its own rspamd or spamd), learn the message for that
group's recipients. A learner instance two groups share (same plugin, same settings) learns
once, for the recipients of both. A group that cannot be told (a selector table down) is an
error and nothing learns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from smtpproxy.chain import Chain, RequestReply
from smtpproxy.config import Config
from smtpproxy.message import Message
from smtpproxy.recipientgroups import GroupUnknown, recipient_groups
from smtpproxy.registry import build_chain

__all__ = ["Learned", "Verdict", "learners", "report"]

Verdict = Literal["spam", "ham"]


@dataclass(frozen=True, slots=True)
class Learned:
    """What the plugins made of one report."""

    replies: list[RequestReply]
    problem: str | None = None
    """Why nothing was asked to learn (a recipient's policy group is unknown)."""

    @property
    def failed(self) -> bool:
        """Nothing learned it (no plugin learns, or every one failed)."""
        return self.problem is not None or not self.replies or all(r.error is not None for r in self.replies)

    def lines(self) -> list[str]:
        if self.problem is not None:
            return [f"nothing was taught: {self.problem}"]
        if not self.replies:
            return ["no plugin of the configured chain learns (rspamd and spamd do): nothing was taught"]
        return [f"{r.plugin}: {r.text or 'done'}" if r.error is None else f"{r.plugin}: FAILED: {r.error}"
                for r in self.replies]


def learners(config: Config) -> Chain:
    """The configured chain and its policy groups' chains, for their ``learn`` hooks
    (ConfigError when a plugin cannot be built)."""
    return build_chain(config.plugins, None, plugin_paths=config.plugin_paths, table_names=config.tables,
                       policies=config.policies)


async def report(chain: Chain, content: bytes, verdict: Verdict, reporter: str,
                 recipients: list[str], *, table_specs: Mapping[str, Any] | None = None,
                 client_ip: str = "") -> Learned:
    """Hand one message to the ``learn`` hooks of each recipient's policy group (*table_specs*:
    the configuration's ``tables:``, for ``table:`` selectors; *client_ip*: where the message
    came from, for ``client_networks``); never raises for a plugin's error."""
    if verdict not in ("spam", "ham"):
        raise ValueError(f"a report is spam or ham, not {verdict!r}")
    try:
        groups = await recipient_groups(chain, table_specs or {}, recipients, client_ip=client_ip)
    except GroupUnknown as exc:
        return Learned([], str(exc))
    plan: dict[int, tuple[Chain, object, list[str], list[str]]] = {}
    for group in groups:
        for _, plugin in group.chain.phase_plugins("learn"):
            _, _, names, for_whom = plan.setdefault(id(plugin), (group.chain, plugin, [], []))
            names.append(group.name)
            for_whom.extend(group.recipients)
    message = Message(content)
    replies = []
    for group_chain, plugin, names, for_whom in plan.values():
        said = await group_chain.request("learn", only=plugin, message=message, verdict=verdict,
                                         reporter=reporter, recipients=for_whom)
        if chain.policies is not None:
            said = [RequestReply(f"{r.plugin} ({', '.join(names)})", r.text, r.error) for r in said]
        replies.extend(said)
    return Learned(replies)
