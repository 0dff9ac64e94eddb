"""The chain runner: calls plugin hooks in configured order, time-boxed and isolated.

It knows nothing of aiosmtpd or sockets. A front end (the SMTP proxy, a milter, the
offline tracer) calls :meth:`Chain.run` for a phase and turns the returned verdict into
its own reply. pluggy gives us hook validation and argument matching; we iterate the
implementations ourselves because pluggy's call loop cannot await coroutines, stop on a
final verdict, or time-box one plugin ("await me maybe", as datasette does it).

The chain is where "a plugin cannot break mail flow" is enforced, once for every front end:

- ``async def`` hooks run on the event loop under the plugin's ``timeout``; one that
  overran it (even by blocking the loop, which no timer can interrupt) has timed out, and
  whatever it returned late is ignored;
- plain hooks run in a bounded pool of threads (:mod:`smtpproxy.hookthread`), so a
  blocking one cannot stall other sessions, and the same timeout holds;
- anything a hook raises, ``BaseException`` included (``KeyboardInterrupt``,
  ``SystemExit``, a ``CancelledError`` of its own), is that plugin's error; only the
  server's own cancellation of the session passes through;
- a return value that is not a valid :class:`~smtpproxy.Verdict` is the plugin's error too.

A plugin's error becomes its ``on_error`` policy: ``tempfail`` (a 451 4.3.0 verdict, marked
as failed) or ``continue``. What the front ends make of the result is decided in
:mod:`smtpproxy.outcome`.

A plugin in shadow mode (``enforce: false``) is also enforced here, once: it runs as any
other, but its verdict never stops the phase (nor does its error: a shadowed plugin cannot
tempfail mail), its edits of the message and envelope are undone, and its outcome is recorded
as ``shadow`` (its score and tags count apart). What it would have done is logged
(``would_reject``, ``would_tempfail``, ``would_quarantine``, ``would_discard``) and given to
the front ends as :attr:`PhaseResult.would`, the phase as it would have ended.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pluggy

from smtpproxy.eventlog import event
from smtpproxy.hookspecs import HOOKS, NOTIFICATIONS
from smtpproxy.hookthread import HookPool, hook_pool
from smtpproxy.message import Change, Message
from smtpproxy.session import Envelope, EnvelopeChange, Outcome, Results
from smtpproxy.verdicts import Action, Verdict

__all__ = ["Chain", "ChainStep", "PhaseResult", "RequestReply"]


ERROR_TEMPFAIL = Verdict.tempfail(
    "Temporary local problem, please try again later", code=451, enhanced="4.3.0"
)


@dataclass(frozen=True, slots=True)
class ChainStep:
    """One plugin in the chain, with its isolation policy."""

    name: str
    plugin: object
    timeout: float = 10.0
    on_error: Literal["tempfail", "continue"] = "tempfail"
    enforce: bool = True
    """False: shadow mode; its verdicts are logged and counted, never applied."""


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """What one phase of the chain came to: the verdict that stopped it, and whose it was."""

    verdict: Verdict | None = None
    """The final verdict (accept, reject, tempfail, discard, quarantine); None when every
    plugin continued."""
    decided_by: str | None = None
    """The plugin whose verdict (or whose error) stopped the phase."""
    failed: bool = False
    """True when :attr:`verdict` stands in for that plugin's error (``on_error: tempfail``)."""
    error: str | None = None
    """The error, when :attr:`failed`."""
    would: PhaseResult | None = None
    """How the phase would have ended had its shadowed plugins enforced: the first final
    verdict of any plugin, shadowed or not. None when that is this result."""

    def __post_init__(self) -> None:
        if (self.verdict is None) != (self.decided_by is None):
            raise ValueError("a phase result names who decided exactly when it has a verdict")
        if self.verdict is not None and not self.verdict.action.is_final:
            raise ValueError("a phase result holds a final verdict only")
        if self.failed and (self.verdict is None or self.verdict.action is not Action.TEMPFAIL):
            raise ValueError("a failed plugin's phase result is a tempfail")


CONTINUED = PhaseResult()
"""Every plugin of the phase continued."""

WOULD_EVENTS = {
    Action.REJECT: "would_reject", Action.TEMPFAIL: "would_tempfail",
    Action.QUARANTINE: "would_quarantine", Action.DISCARD: "would_discard",
}
"""The log event for what a shadowed plugin would have done (an ``accept`` only shows in the
would-be outcome: it refuses nothing)."""


@dataclass(frozen=True, slots=True)
class _Call:
    step: ChainStep
    impl: pluggy.HookImpl
    thread: HookPool | None
    """Where a plain hook runs; None for ``async def`` hooks (they run on the loop)."""


@dataclass(frozen=True, slots=True)
class RequestReply:
    """What one plugin made of a request hook: its text, or its error."""

    plugin: str
    text: str | None
    error: str | None


class Chain:
    """An ordered, immutable set of plugins, ready to run any phase.

    A new configuration builds a new Chain; sessions keep the one they started with.
    """

    def __init__(self, pm: pluggy.PluginManager, steps: Iterable[ChainStep]):
        self.pm = pm
        self.steps = tuple(steps)
        self.policies: Any = None
        """The policy groups (:class:`smtpproxy.groups.Policies`) whose default chain this is,
        or None: no ``policies:``. They live and retire with this chain."""
        self.companions: tuple[Chain, ...] = ()
        """The groups' chains: their plugins that are not this chain's get ``startup`` and
        ``shutdown`` with it."""
        self._calls: dict[str, tuple[_Call, ...]] = {}
        for hook_name in HOOKS:
            impls = getattr(pm.hook, hook_name).get_hookimpls()
            calls = []
            for step in self.steps:
                for impl in impls:
                    if impl.plugin is not step.plugin:
                        continue
                    calls.append(_Call(step, impl, None if _is_async(impl.function) else hook_pool()))
            self._calls[hook_name] = tuple(calls)

    def implements(self, hook_name: str) -> bool:
        """True when any plugin of the chain implements the hook."""
        return bool(self._calls[hook_name])

    def phase_plugins(self, hook_name: str) -> tuple[tuple[str, object], ...]:
        """(name, plugin instance) of each implementer of a hook, in call order."""
        return tuple((c.step.name, c.step.plugin) for c in self._calls[hook_name])

    @property
    def shadowed(self) -> tuple[str, ...]:
        """Names of the plugins in shadow mode (``enforce: false``), in order."""
        return tuple(step.name for step in self.steps if not step.enforce)

    @property
    def family(self) -> tuple[Chain, ...]:
        """This chain and its policy groups' chains (:attr:`companions`)."""
        return (self, *self.companions)

    @property
    def shadowed_anywhere(self) -> tuple[str, ...]:
        """The plugins in shadow mode here or in a policy group's chain, each once."""
        return tuple(dict.fromkeys(name for chain in self.family for name in chain.shadowed))

    def implementers(self, hook_name: str) -> list[str]:
        """Names of the plugins implementing a hook, in call order."""
        return [c.step.name for c in self._calls[hook_name]]

    async def run(
        self, phase: str, results: Results, *, on_outcome: Callable[[Outcome], None] | None = None,
        **kwargs: Any,
    ) -> PhaseResult:
        """Run one phase until a final verdict; every call is recorded in ``results``, and
        shown to *on_outcome* right after it (an observer such as the tracer's)."""
        would: PhaseResult | None = None
        for call in self._calls[phase]:
            step = call.step
            if not step.enforce:
                shadowed = await self._shadow(call, phase, results, on_outcome, kwargs)
                would = would or shadowed  # the first final verdict ends the would-be phase
                continue
            verdict, error, duration = await self._invoke(call, phase, kwargs)
            failed = False
            if error is not None:
                failed = step.on_error == "tempfail"
                verdict = ERROR_TEMPFAIL if failed else None
                event("plugin_error", level=logging.WARNING, plugin=step.name, phase=phase,
                      error=error, action=step.on_error)
            outcome = _outcome(step.name, phase, verdict, duration, error)
            results.add(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if verdict is not None and verdict.action.is_final:
                return PhaseResult(verdict, step.name, failed, error if failed else None, would)
        return CONTINUED if would is None else PhaseResult(would=would)

    async def _shadow(
        self, call: _Call, phase: str, results: Results,
        on_outcome: Callable[[Outcome], None] | None, kwargs: Mapping[str, Any],
    ) -> PhaseResult | None:
        """Run a shadowed plugin: record and log what it did, undo its edits, apply nothing.

        Returns the phase's would-be end when its verdict (or its error, under ``on_error:
        tempfail``) is final, else None.
        """
        step = call.step
        undo = _Undo(kwargs)
        verdict, error, duration = await self._invoke(call, phase, kwargs)
        undone = undo()
        failed = False
        if error is not None:
            failed = step.on_error == "tempfail"
            verdict = ERROR_TEMPFAIL if failed else None
            event("plugin_error", level=logging.WARNING, plugin=step.name, phase=phase,
                  error=error, action=step.on_error, shadow=True)
        if undone:
            event("shadow_edits_undone", plugin=step.name, phase=phase, changes=list(undone),
                  **_tx(kwargs))
        outcome = _outcome(step.name, phase, verdict, duration, error, shadow=True, undone=undone)
        results.add(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if verdict is None or not verdict.action.is_final:
            return None
        name = WOULD_EVENTS.get(verdict.action)
        if name is not None:
            event(name, plugin=step.name, phase=phase, reply=_reply(verdict), reason=verdict.reason,
                  **_tx(kwargs))
        return PhaseResult(verdict, step.name, failed, error if failed else None)

    async def notify(self, hook_name: str, **kwargs: Any) -> list[tuple[str, str]]:
        """Call a notification hook on every implementer; return (plugin, error) for failures."""
        failures = []
        for call in self._lifecycle_calls(hook_name) if self.companions else self._calls[hook_name]:
            _, error, _ = await self._invoke(call, hook_name, kwargs)
            if error is not None:
                event("plugin_error", level=logging.WARNING, plugin=call.step.name,
                      phase=hook_name, error=error)
                failures.append((call.step.name, error))
        return failures

    def _lifecycle_calls(self, hook_name: str) -> tuple[_Call, ...]:
        """This chain's calls, and for ``startup``/``shutdown`` also the companions' calls
        on plugins not already called (an instance shared between groups is called once)."""
        calls = self._calls[hook_name]
        if hook_name not in ("startup", "shutdown"):
            return calls
        seen = {id(c.step.plugin) for c in calls}
        extra = []
        for companion in self.companions:
            for call in companion._calls[hook_name]:
                if id(call.step.plugin) not in seen:
                    seen.add(id(call.step.plugin))
                    extra.append(call)
        return (*calls, *extra)

    async def request(self, hook_name: str, *, only: object | None = None,
                      **kwargs: Any) -> list[RequestReply]:
        """Call a request hook (``learn``) on every implementer (*only*: on that plugin
        instance alone), in order: what each said or why it failed. Never raises for a
        plugin's error."""
        replies = []
        for call in self._calls[hook_name]:
            if only is not None and call.step.plugin is not only:
                continue
            result, error, _ = await self._call(call, kwargs)
            if error is None and result is not None and not isinstance(result, str):
                error = f"returned {type(result).__name__}, not a text"
            if error is not None:
                event("plugin_error", level=logging.WARNING, plugin=call.step.name,
                      phase=hook_name, error=error)
                replies.append(RequestReply(call.step.name, None, error))
            else:
                replies.append(RequestReply(call.step.name, result, None))
        return replies

    async def _invoke(
        self, call: _Call, phase: str, kwargs: Mapping[str, Any]
    ) -> tuple[Verdict | None, str | None, float]:
        """Call one hook implementation: (verdict, error, seconds). Never raises, except
        when the server itself cancels the session."""
        result, error, duration = await self._call(call, kwargs)
        if error is not None or result is None or phase in NOTIFICATIONS:
            return None, error, duration
        try:
            return Verdict.checked(result), None, duration
        except (TypeError, ValueError) as exc:
            return None, f"invalid verdict: {exc}", duration

    async def _call(self, call: _Call, kwargs: Mapping[str, Any]) -> tuple[Any, str | None, float]:
        """Call one hook implementation: (what it returned, error, seconds)."""
        step = call.step
        started = time.perf_counter()
        deadline: asyncio.Timeout | None = None
        try:
            args = [kwargs[name] for name in call.impl.argnames]
            if call.thread is not None:
                async with asyncio.timeout(step.timeout) as deadline:
                    result, raised = await call.thread.call(call.impl.function, args)
                    if raised is not None:
                        raise raised
                    if inspect.isawaitable(result):
                        result = await result
            else:
                result = call.impl.function(*args)
                if isinstance(result, types.CoroutineType):
                    # Run it up to its first suspension here: most hooks finish without one
                    # (cached lookups, header checks), and a timer could not interrupt that
                    # part anyway (the blocked-loop check below covers it). Only a hook that
                    # does suspend gets a timer, for what is left of its timeout.
                    try:
                        suspended = result.send(None)
                    except StopIteration as finished:
                        result = finished.value
                    else:
                        left = step.timeout - (time.perf_counter() - started)
                        async with asyncio.timeout(left) as deadline:
                            result = await _resume(result, suspended)
                elif inspect.isawaitable(result):
                    async with asyncio.timeout(step.timeout) as deadline:
                        result = await result
            duration = time.perf_counter() - started
            if duration > step.timeout:
                # Only an async hook that blocked the event loop gets here: no timer could fire.
                return None, (f"blocked the event loop for {duration:.3f}s (timeout "
                              f"{step.timeout:g}s); its verdict is ignored"), duration
            return result, None, duration
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():  # the plugin's own TimeoutError
                return None, _describe(exc), time.perf_counter() - started
            return None, f"timed out after {step.timeout:g}s", time.perf_counter() - started
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server's own cancellation (shutdown, the client went away)
            return None, "raised CancelledError", time.perf_counter() - started
        except BaseException as exc:  # KeyboardInterrupt, SystemExit too: a plugin cannot stop the server
            return None, _describe(exc), time.perf_counter() - started


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, Any], suspended: Any) -> Generator[Any, Any, Any]:
    """Await *coroutine* from where it suspended, handing *suspended* (what it yielded) to the task.

    After that it is ``yield from coroutine``, as ``await`` would have been all along: the task
    resumes it with ``send(None)``, or throws in what cancels it (the timeout).
    """
    while True:
        try:
            yield suspended
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:  # a cancellation: the coroutine sees it where it waits
            try:
                suspended = coroutine.throw(exc)
            except StopIteration as finished:
                return finished.value
        else:
            return (yield from coroutine.__await__())


def _is_async(function: object) -> bool:
    """True for ``async def`` hooks (also a callable object with an ``async def __call__``)."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004 - the callable's own __call__
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Undo:
    """Undoes what a shadowed plugin's call changes in the message and envelope it was given."""

    __slots__ = ("_envelope", "_envelope_at", "_message", "_message_at")

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        transaction = kwargs.get("transaction")
        message = kwargs.get("message")
        self._envelope: Envelope | None = transaction.envelope if transaction is not None else None
        self._envelope_at = self._envelope._savepoint() if self._envelope is not None else None
        self._message: Message | None = message if isinstance(message, Message) else None
        self._message_at = self._message._savepoint() if self._message is not None else None

    def __call__(self) -> tuple[str, ...]:
        """Undo; the edits undone, as the tracer shows changes."""
        undone: list[str] = []
        if self._message is not None and self._message_at is not None:
            for change in self._message._rollback(self._message_at):
                undone.append(describe_change(change))
        if self._envelope is not None and self._envelope_at is not None:
            for env_change in self._envelope._rollback(self._envelope_at):
                undone.append(describe_envelope_change(env_change))
        return tuple(undone)


def describe_change(change: Change) -> str:
    """One message edit as a line: ``+ Name: value``, ``- Name``, ``= Name: value``, ``body replaced``."""
    if change.op == "add":
        return f"+ {change.name}: {change.value}"
    if change.op == "remove":
        return f"- {change.name}"
    if change.op == "replace":
        return f"= {change.name}: {change.value}"
    return "body replaced"


ENVELOPE_CHANGE_LABELS = {"sender": "sender", "add_recipient": "+rcpt", "remove_recipient": "-rcpt"}
"""How an envelope edit's operation is shown (log lines, the tracer's report)."""


def describe_envelope_change(change: EnvelopeChange) -> str:
    """One envelope edit as a line: ``sender <a>``, ``+rcpt <a>``, ``-rcpt <a>``."""
    return f"{ENVELOPE_CHANGE_LABELS.get(change.op, change.op)} <{change.address.text}>"


def _tx(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    transaction = kwargs.get("transaction")
    return {"tx": transaction.id} if transaction is not None else {}


def _reply(verdict: Verdict) -> str | None:
    reply = verdict.reply
    if reply is None:
        return None
    return " ".join(part for part in (str(reply.code), reply.enhanced, reply.text) if part)


def _outcome(
    plugin: str, phase: str, verdict: Verdict | None, duration: float, error: str | None,
    *, shadow: bool = False, undone: tuple[str, ...] = (),
) -> Outcome:
    if verdict is None:
        return Outcome(plugin, phase, Action.CONTINUE, duration, error=error, shadow=shadow,
                       undone=undone)
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
        shadow=shadow,
        undone=undone,
    )
