"""Reports of spam and not spam: the configured plugins' ``learn`` hook, on request.

``smtpproxy quarantine report`` and the console's "Spam" / "Not spam" buttons hand a kept
message to every plugin of the configured chain that implements ``learn`` (the rspamd and
spamd bridges teach their engine's Bayes classifier). The chain is built as the proxy builds
it, but only ``learn`` runs: no message passes through it. Each plugin's answer or error is
shown to whoever reported; an engine's error is never a crash, and never stops the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smtpproxy.chain import Chain, RequestReply
from smtpproxy.config import Config
from smtpproxy.message import Message
from smtpproxy.registry import build_chain

__all__ = ["Learned", "Verdict", "learners", "report"]

Verdict = Literal["spam", "ham"]


@dataclass(frozen=True, slots=True)
class Learned:
    """What the plugins made of one report."""

    replies: list[RequestReply]

    @property
    def failed(self) -> bool:
        """Nothing learned it (no plugin learns, or every one failed)."""
        return not self.replies or all(r.error is not None for r in self.replies)

    def lines(self) -> list[str]:
        if not self.replies:
            return ["no plugin of the configured chain learns (rspamd and spamd do): nothing was taught"]
        return [f"{r.plugin}: {r.text or 'done'}" if r.error is None else f"{r.plugin}: FAILED: {r.error}"
                for r in self.replies]


def learners(config: Config) -> Chain:
    """The configured chain, for its ``learn`` hooks (ConfigError when a plugin cannot be built)."""
    return build_chain(config.plugins, None, plugin_paths=config.plugin_paths, table_names=config.tables)


async def report(chain: Chain, content: bytes, verdict: Verdict, reporter: str,
                 recipients: list[str]) -> Learned:
    """Hand one message to every ``learn`` hook of *chain*; never raises for a plugin's error."""
    if verdict not in ("spam", "ham"):
        raise ValueError(f"a report is spam or ham, not {verdict!r}")
    if not chain.implements("learn"):
        return Learned([])
    replies = await chain.request("learn", message=Message(content), verdict=verdict, reporter=reporter,
                                  recipients=list(recipients))
    return Learned(replies)
