"""Which plugins a policy service cannot run: Postfix sends it no header and no body.

A plugin's ``data`` hook is where it sees the message (DKIM, DMARC, ARC, content rules,
scoring, virus and attachment scans). Under ``smtpproxy policy`` that hook never runs;
For a plugin that has nothing else (``only_message``) ``policy.message_plugins`` says
whether that refuses the configuration or is a warning; a plugin with envelope hooks too
(``partly``: ratelimit's message and byte counts, dnsbl's body URIs) runs its envelope
part and is named in a warning. Either way the plugins are named, never skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpproxy.chain import Chain

__all__ = ["MessagePlugins", "message_plugins"]

_ENVELOPE_PHASES = ("connect", "helo", "mail_from", "rcpt_to")


@dataclass(frozen=True, slots=True)
class MessagePlugins:
    only_message: tuple[str, ...]
    """Plugins that decide only on the message: nothing of them runs here."""
    partly: tuple[str, ...]
    """Plugins with envelope hooks too: those run, their ``data`` part does not."""

    def __bool__(self) -> bool:
        return bool(self.only_message or self.partly)

    def describe(self) -> str:
        parts = []
        if self.only_message:
            parts.append(f"cannot run (they need the header or body): {', '.join(self.only_message)}")
        if self.partly:
            parts.append(f"run without their message checks (data hook): {', '.join(self.partly)}")
        return "; ".join(parts)


def message_plugins(chain: Chain) -> MessagePlugins:
    """The chain's plugins with a ``data`` hook, split by whether anything else of theirs runs;
    the policy groups' chains (a group may turn on a plugin the global chain has off) count too."""
    chains = chain.family
    envelope = {name for c in chains for phase in _ENVELOPE_PHASES for name in c.implementers(phase)}
    data = list(dict.fromkeys(name for c in chains for name in c.implementers("data")))
    return MessagePlugins(tuple(n for n in data if n not in envelope),
                          tuple(n for n in data if n in envelope))
