"""Hot reload support: which chain each session uses, and what a new configuration can change live.

A reload builds a new :class:`~smtpproxy.chain.Chain` and swaps it in for new sessions.
Sessions already running keep the chain they started with (they hold a lease on it); the
replaced chain's ``shutdown`` notification runs when its last session ends, so a plugin
never sees ``shutdown`` while one of its sessions is still in a hook.

Some sections cannot change under a running process (open sockets, connection pools, the
log handler): :func:`restart_only_changes` names them, and the reload keeps their old
values and logs that a restart is needed to apply them.
"""

from __future__ import annotations

import asyncio
import logging

from smtpproxy.chain import Chain
from smtpproxy.config import Config
from smtpproxy.eventlog import event

__all__ = ["RESTART_ONLY", "ChainLeases", "restart_only_changes", "without_restart_only_changes"]

RESTART_ONLY = (
    "listeners", "delivery", "dns", "logging", "metrics", "pid_file", "workers", "event_loop",
    "store", "history",
    "login_throttle",  # its counts live on; new settings with the next start
)
"""Top-level sections a reload does not apply (a restart does)."""


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The restart-only sections that differ between two configurations."""
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]


def without_restart_only_changes(old: Config, new: Config) -> Config:
    """*new*, with the restart-only sections as they are in *old* (what a reload applies)."""
    return new.model_copy(update={name: getattr(old, name) for name in RESTART_ONLY})


class ChainLeases:
    """Counts the sessions on each chain; a retired chain shuts down after its last session."""

    def __init__(self) -> None:
        self._users: dict[Chain, int] = {}
        self._retired: set[Chain] = set()
        self._shutdowns: set[asyncio.Task[None]] = set()

    def acquire(self, chain: Chain) -> Chain:
        """A session starts on *chain* (returned for convenience)."""
        self._users[chain] = self._users.get(chain, 0) + 1
        return chain

    def release(self, chain: Chain) -> None:
        """A session on *chain* has finished (its ``disconnect`` notification included)."""
        left = self._users[chain] - 1
        if left:
            self._users[chain] = left
            return
        del self._users[chain]
        if chain in self._retired:
            self._retired.discard(chain)
            self._start_shutdown(chain)

    def users(self, chain: Chain) -> int:
        return self._users.get(chain, 0)

    def on_retired(self) -> int:
        """Sessions still running on chains that a reload replaced."""
        return sum(self._users.get(chain, 0) for chain in self._retired)

    def retire(self, chain: Chain) -> None:
        """*chain* takes no new sessions; shut it down now, or when its last session ends."""
        if self._users.get(chain):
            self._retired.add(chain)
            event("chain_draining", sessions=self._users[chain])
        else:
            self._start_shutdown(chain)

    def _start_shutdown(self, chain: Chain) -> None:
        task = asyncio.get_running_loop().create_task(_shutdown(chain))
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdowns.discard)

    async def close(self) -> None:
        """Proxy shutdown: every retired chain shuts down now, and we wait for all of them."""
        for chain in list(self._retired):
            self._retired.discard(chain)
            self._start_shutdown(chain)
        if self._shutdowns:
            await asyncio.wait(set(self._shutdowns))


async def _shutdown(chain: Chain) -> None:
    failures = await chain.notify("shutdown")
    event("chain_retired", level=logging.WARNING if failures else logging.INFO,
          plugins=[s.name for s in chain.steps],
          failures=[f"{name}: {error}" for name, error in failures] or None)
