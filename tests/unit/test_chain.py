"""The chain runner on its own: order, sync and async hooks, isolation, records."""

from __future__ import annotations

import asyncio

import pluggy
import pytest

from smtpproxy import Action, Verdict, hookimpl
from smtpproxy.chain import Chain, ChainStep
from smtpproxy.registry import new_plugin_manager
from smtpproxy.session import Client, Results, Session


def build(*steps: ChainStep) -> Chain:
    pm = new_plugin_manager()
    for step in steps:
        pm.register(step.plugin, name=step.name)
    return Chain(pm, steps)


class Says:
    def __init__(self, log: list[str], name: str, verdict: Verdict | None = None):
        self.log, self.name, self.verdict = log, name, verdict

    @hookimpl
    def helo(self, hostname: str) -> Verdict | None:
        self.log.append(f"{self.name}:{hostname}")
        return self.verdict


class SaysAsync(Says):
    @hookimpl
    async def helo(self, hostname: str) -> Verdict | None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(f"{self.name}:{hostname}")
        return self.verdict


def session() -> Session:
    return Session(Client("192.0.2.1", 1234))


async def test_runs_in_configured_order_not_registration_order() -> None:
    log: list[str] = []
    a, b = Says(log, "a"), Says(log, "b")
    pm = new_plugin_manager()
    pm.register(b, name="b")
    pm.register(a, name="a")
    chain = Chain(pm, [ChainStep("a", a), ChainStep("b", b)])
    results = Results()
    result = await chain.run("helo", results, session=session(), hostname="h")
    assert result.verdict is None and result.decided_by is None and not result.failed
    assert log == ["a:h", "b:h"]
    assert [o.plugin for o in results] == ["a", "b"]
    assert all(o.action is Action.CONTINUE and o.duration >= 0 for o in results)


async def test_final_verdict_stops_the_phase_and_scores_accumulate() -> None:
    log: list[str] = []
    chain = build(
        ChainStep("s", Says(log, "s", Verdict.cont(score=2.5, reason="odd helo", tags=("helo:odd",)))),
        ChainStep("r", SaysAsync(log, "r", Verdict.reject("no"))),
        ChainStep("never", Says(log, "never")),
    )
    results = Results()
    result = await chain.run("helo", results, session=session(), hostname="h")
    assert result.verdict is not None and result.verdict.action is Action.REJECT
    assert result.decided_by == "r" and not result.failed
    assert log == ["s:h", "r:h"]
    assert results.score == 2.5 and results.tags == {"helo:odd"}
    assert results.outcomes[-1].reply is not None and results.outcomes[-1].reply.code == 550


class Raises:
    @hookimpl
    def helo(self) -> None:
        raise ValueError("boom")


class Hangs:
    @hookimpl
    async def helo(self) -> None:
        await asyncio.Event().wait()


class OwnTimeout:
    @hookimpl
    async def helo(self) -> None:
        raise TimeoutError("my DNS query timed out")


@pytest.mark.parametrize(
    ("plugin", "error"),
    [(Raises(), "ValueError: boom"), (Hangs(), "timed out after 0.05s"),
     (OwnTimeout(), "TimeoutError: my DNS query timed out")],
)
async def test_errors_are_isolated_per_policy(plugin: object, error: str) -> None:
    log: list[str] = []
    for on_error, expected in (("tempfail", Action.TEMPFAIL), ("continue", None)):
        chain = build(ChainStep("bad", plugin, timeout=0.05, on_error=on_error),  # type: ignore[arg-type]
                      ChainStep("next", Says(log, "next")))
        results = Results()
        result = await chain.run("helo", results, session=session(), hostname="h")
        assert (result.verdict.action if result.verdict else None) is expected
        assert result.failed is (on_error == "tempfail")
        assert result.decided_by == ("bad" if on_error == "tempfail" else None)
        assert results.outcomes[0].error == error
    assert log == ["next:h"]  # reached only with on_error: continue


async def test_notifications_run_everywhere_and_report_failures() -> None:
    calls: list[str] = []

    class Ok:
        @hookimpl
        async def disconnect(self) -> Verdict:
            calls.append("ok")
            return Verdict.reject("ignored in a notification")

    class Bad:
        @hookimpl
        def disconnect(self) -> None:
            raise RuntimeError("x")

    chain = build(ChainStep("bad", Bad()), ChainStep("ok", Ok()))
    failures = await chain.notify("disconnect", session=session())
    assert calls == ["ok"]
    assert failures == [("bad", "RuntimeError: x")]


def test_unknown_hook_names_are_refused_at_registration() -> None:
    from smtpproxy.registry import _register

    class Typo:
        @hookimpl
        def rcpt(self) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match=r"unknown hook.*rcpt"):
        _register(new_plugin_manager(), Typo(), "typo")


async def test_every_implementation_of_a_plugin_runs() -> None:
    calls: list[str] = []

    class Two:
        @hookimpl
        def helo(self) -> None:
            calls.append("first")

        @hookimpl(specname="helo")
        async def helo_again(self) -> None:
            calls.append("second")

    results = Results()
    await build(ChainStep("two", Two())).run("helo", results, session=session(), hostname="h")
    assert sorted(calls) == ["first", "second"]
    assert len(results) == 2


class HangsAfterWork:
    """Suspends a few times, then waits forever; records that its cancellation reached it."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.cancelled = False

    @hookimpl
    async def helo(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        try:
            self.waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_a_hook_that_suspends_then_hangs_is_cancelled_at_its_timeout() -> None:
    """The timer armed at a hook's first suspension cancels it where it waits, as a timeout."""
    plugin = HangsAfterWork()
    results = Results()
    result = await build(ChainStep("slow", plugin, timeout=0.05)).run(
        "helo", results, session=session(), hostname="h")
    assert result.failed and result.decided_by == "slow"
    assert results.outcomes[0].error == "timed out after 0.05s"
    assert plugin.cancelled


async def test_the_servers_cancellation_passes_through_a_suspended_hook() -> None:
    """Cancelling the session while a hook waits cancels the hook and the session's task,
    and is not recorded as the plugin's error."""
    plugin = HangsAfterWork()
    results = Results()
    task = asyncio.create_task(build(ChainStep("slow", plugin, timeout=30)).run(
        "helo", results, session=session(), hostname="h"))
    await plugin.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert plugin.cancelled and len(results) == 0


async def test_a_hook_that_suspends_several_times_returns_its_verdict() -> None:
    class Slowly:
        @hookimpl
        async def helo(self, hostname: str) -> Verdict:
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, lambda: None)
            return Verdict.reject(f"no {hostname}")

    results = Results()
    result = await build(ChainStep("slowly", Slowly(), timeout=5)).run(
        "helo", results, session=session(), hostname="h")
    assert result.verdict is not None and result.verdict.action is Action.REJECT
    assert result.verdict.reply is not None and result.verdict.reply.text == "no h"
    assert not result.failed and results.outcomes[0].error is None


class Learns:
    def __init__(self, answer: object = None, *, raises: BaseException | None = None, sleeps: float = 0):
        self.answer, self.raises, self.sleeps = answer, raises, sleeps

    @hookimpl
    async def learn(self, verdict: str) -> object:
        await asyncio.sleep(self.sleeps)
        if self.raises is not None:
            raise self.raises
        return self.answer if self.answer is not None else f"learned {verdict}"


async def test_a_request_hook_asks_every_plugin_and_hands_back_each_answer_or_error() -> None:
    """``learn``: every implementer runs, in order, whatever the one before it did; a raise, a
    timeout, a KeyboardInterrupt or an answer that is not a text is that plugin's error."""
    chain = build(ChainStep("a", Learns()), ChainStep("b", Learns(raises=ConnectionError("down"))),
                  ChainStep("c", Learns(7)), ChainStep("d", Learns(sleeps=5), timeout=0.05),
                  ChainStep("e", Learns(raises=KeyboardInterrupt())), ChainStep("f", Learns("ok")))
    assert chain.implementers("learn") == ["a", "b", "c", "d", "e", "f"]
    replies = await chain.request("learn", message=None, verdict="spam", reporter="cli", recipients=[])
    assert [(r.plugin, r.text, r.error) for r in replies] == [
        ("a", "learned spam", None),
        ("b", None, "ConnectionError: down"),
        ("c", None, "returned int, not a text"),
        ("d", None, "timed out after 0.05s"),
        ("e", None, "KeyboardInterrupt"),
        ("f", "ok", None),
    ]
    assert await build(ChainStep("x", Says([], "x"))).request("learn", verdict="ham") == []
