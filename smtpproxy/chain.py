"""The chain runner: calls plugin hooks in configured order, time-boxed and isolated.

It knows nothing of aiosmtpd or sockets. A front end (the SMTP proxy, a milter, the
offline tracer) calls :meth:`Chain.run` for a phase and turns the returned verdict into
its own reply. pluggy gives us hook validation and argument matching; we iterate the
implementations ourselves because pluggy's call loop cannot await coroutines, stop on a
final verdict, or time-box one plugin ("await me maybe", as datasette does it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pluggy

from smtpproxy.eventlog import event
from smtpproxy.hookspecs import NOTIFICATIONS, PHASES
from smtpproxy.session import Outcome, Results
from smtpproxy.verdicts import Action, Verdict

__all__ = ["Chain", "ChainStep", "PluginError"]


ERROR_TEMPFAIL = Verdict.tempfail(
    "Temporary local problem, please try again later", code=451, enhanced="4.3.0"
)


class PluginError(Exception):
    """A plugin broke its contract (for example returned something that is not a Verdict)."""


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One plugin in the chain, with its isolation policy."""

    name: str
    plugin: object
    timeout: float = 10.0
    on_error: Literal["tempfail", "continue"] = "tempfail"


@dataclass(frozen=True, slots=True)
class _Call:
    step: ChainStep
    impl: pluggy.HookImpl


class Chain:
    """An ordered, immutable set of plugins, ready to run any phase.

    A new configuration builds a new Chain; sessions keep the one they started with.
    """

    def __init__(self, pm: pluggy.PluginManager, steps: Iterable[ChainStep]):
        self.pm = pm
        self.steps = tuple(steps)
        self._calls: dict[str, tuple[_Call, ...]] = {}
        for hook_name in (*PHASES, *NOTIFICATIONS):
            impls = getattr(pm.hook, hook_name).get_hookimpls()
            self._calls[hook_name] = tuple(
                _Call(step, impl)
                for step in self.steps
                for impl in impls
                if impl.plugin is step.plugin
            )

    def implementers(self, hook_name: str) -> list[str]:
        """Names of the plugins implementing a hook, in call order."""
        return [c.step.name for c in self._calls[hook_name]]

    async def run(self, phase: str, results: Results, **kwargs: Any) -> Verdict | None:
        """Run one phase; return the first final verdict, or None when everyone continued.

        Every call is recorded in ``results`` with its duration, including failures.
        """
        for call in self._calls[phase]:
            verdict, error, duration = await self._invoke(call, phase, kwargs)
            if error is not None:
                verdict = ERROR_TEMPFAIL if call.step.on_error == "tempfail" else None
                event("plugin_error", logging.WARNING, plugin=call.step.name, phase=phase, error=error,
                      action=call.step.on_error)
            results.add(_outcome(call.step.name, phase, verdict, duration, error))
            if verdict is not None and verdict.action.is_final:
                return verdict
        return None

    async def notify(self, hook_name: str, **kwargs: Any) -> list[tuple[str, str]]:
        """Call a notification hook on every implementer; return (plugin, error) for failures."""
        failures = []
        for call in self._calls[hook_name]:
            _, error, _ = await self._invoke(call, hook_name, kwargs)
            if error is not None:
                event("plugin_error", logging.WARNING, plugin=call.step.name, phase=hook_name, error=error)
                failures.append((call.step.name, error))
        return failures

    async def _invoke(
        self, call: _Call, phase: str, kwargs: Mapping[str, Any]
    ) -> tuple[Verdict | None, str | None, float]:
        """Call one hook implementation; never raises (except cancellation)."""
        started = time.perf_counter()
        try:
            result = call.impl.function(*[kwargs[name] for name in call.impl.argnames])
            if inspect.isawaitable(result):
                deadline = asyncio.timeout(call.step.timeout)
                try:
                    async with deadline:
                        result = await result
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the plugin's own timeout, reported as its error below
                    duration = time.perf_counter() - started
                    return None, f"timed out after {call.step.timeout:g}s", duration
            elif time.perf_counter() - started > call.step.timeout:
                event("plugin_slow", logging.WARNING, plugin=call.step.name, phase=phase,
                      seconds=round(time.perf_counter() - started, 3),
                      note="a plain hook blocked the event loop; make it async")
            if result is not None and not isinstance(result, Verdict):
                raise PluginError(
                    f"{phase} hook returned {type(result).__name__}; return None or a Verdict"
                )
            if result is not None and phase in NOTIFICATIONS:
                result = None
            return result, None, time.perf_counter() - started
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - started


def _outcome(
    plugin: str, phase: str, verdict: Verdict | None, duration: float, error: str | None
) -> Outcome:
    if verdict is None:
        return Outcome(plugin, phase, Action.CONTINUE, duration, error=error)
    return Outcome(
        plugin,
        phase,
        verdict.action,
        duration,
        reply=verdict.reply,
        reason=verdict.reason,
        score=verdict.score,
        tags=verdict.tags,
        error=error,
    )
