"""Plugins written by an attacker (or in a hurry): none of them can fail open, lose mail,
stall other sessions or stop the server. Each test is one of the ways issue 12 found, run
against a live proxy with a real capturing upstream; a Hypothesis model check covers any
sequence of hook results.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpproxy import Address, Recipient, Transaction, Verdict, hookimpl
from smtpproxy.chain import ChainStep
from smtpproxy.config import ConfigError, PluginSpec
from smtpproxy.registry import build_chain
from smtpproxy.session import Decision, Envelope
from smtpproxy.tracer import Tracer
from smtpproxy.verdicts import Action, Reply
from tests.conftest import ProxyFactory, Sink, Talk, chain_of, port_of

MESSAGE = b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def send(port: int, rcpt: str = "bob@dest.test") -> tuple[int, str]:
    talk = await Talk.open(port)
    try:
        await talk.hello()
        code, text = await talk.cmd("MAIL FROM:<a@sender.test>")
        assert code == 250, text
        code, text = await talk.cmd(f"RCPT TO:<{rcpt}>")
        if code != 250:
            return code, text
        assert (await talk.cmd("DATA"))[0] == 354
        talk.send(MESSAGE + b".\r\n")
        return await talk.reply()
    finally:
        await talk.close()


# -- 1, 2: verdicts that say something impossible ----------------------------------------


@pytest.mark.parametrize("build", [
    lambda: Verdict(Action.REJECT, reason="spam"),                     # a refusal without a reply
    lambda: Verdict(Action.TEMPFAIL),
    lambda: Verdict(Action.REJECT, Reply(250, None, "fake ok")),       # a positive refusal
    lambda: Verdict(Action.DISCARD, Reply(250, None, "ok")),           # a plugin's own 2xx
    lambda: Verdict(Action.CONTINUE, score=float("nan")),
    lambda: Verdict(Action.CONTINUE, score=True),                      # a bool is not a score
    lambda: Verdict(Action.CONTINUE, tags=("ok", 3)),                  # a tag that is not a str
    lambda: Verdict(Action.CONTINUE, tags=["spf:pass"]),               # tags that are not a tuple
])
def test_impossible_verdicts_are_refused_on_construction(build: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        build()


@pytest.mark.parametrize("phase", ["rcpt_to", "data"])
@pytest.mark.parametrize("how", ["no-reply", "positive-reply", "tampered", "subclass"])
async def test_an_impossible_verdict_tempfails_and_delivers_nothing(
    phase: str, how: str, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    class Sneaky(Verdict):
        @property
        def is_refusal(self) -> bool:
            return False

    def hook(self: object) -> Verdict:
        if how == "no-reply":
            return Verdict(Action.REJECT, reason="spam")
        if how == "positive-reply":
            return Verdict(Action.REJECT, Reply(250, None, "fake ok"))
        verdict = Verdict.reject("spam") if how == "tampered" else Sneaky.reject("spam")
        object.__setattr__(verdict, "reply", Reply(250, None, "fake ok"))
        return verdict

    plugin = type("Impossible", (), {phase: hookimpl(hook)})()
    server = await proxy_factory(plugin, upstream=sink.port)
    code, text = await send(port_of(server))
    assert code == 451 and "4.3.0" in text  # the plugin's error, never 250
    assert sink.messages == []


# -- 3: blocking hooks -------------------------------------------------------------------


async def test_a_blocking_plain_hook_times_out_and_stalls_no_other_session(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    release = threading.Event()
    entered = threading.Event()

    class Blocks:
        timeout = 0.5

        @hookimpl
        def rcpt_to(self, recipient: Recipient) -> None:
            if recipient.address.local == "slow":
                entered.set()
                release.wait(30)  # a synchronous library call that hangs

    server = await proxy_factory(Blocks(), upstream=sink.port)
    port = port_of(server)
    slow = asyncio.create_task(send(port, "slow@dest.test"))
    await asyncio.to_thread(entered.wait, 10)
    # While the plain hook is stuck, other sessions are served in full.
    assert (await send(port, "fast@dest.test"))[0] == 250
    assert not release.is_set() and not slow.done()
    code, _ = await slow  # the timeout holds for the stuck call
    assert code == 451
    release.set()
    assert [m.recipients for m in sink.messages] == [["fast@dest.test"]]


async def test_an_async_hook_that_blocks_the_loop_past_its_timeout_is_a_timeout(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    import time

    class BlocksLoop:
        timeout = 0.2

        @hookimpl
        async def data(self) -> Verdict:
            time.sleep(0.4)  # noqa: ASYNC251 - the point: no timer can interrupt this
            return Verdict.accept()

    server = await proxy_factory(BlocksLoop(), upstream=sink.port)
    assert (await send(port_of(server)))[0] == 451
    assert sink.messages == []


# -- 4, 5: exceptions that are not Exceptions --------------------------------------------


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3),
                                 GeneratorExit()])
@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_base_exceptions_from_a_hook_tempfail_and_the_session_goes_on(
    exc: BaseException, kind: str, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    if kind == "async":
        async def hook(self: object) -> None:
            raise exc
    else:
        def hook(self: object) -> None:  # type: ignore[misc]
            raise exc
    server = await proxy_factory(type("Raiser", (), {"data": hookimpl(hook)})(), upstream=sink.port)
    talk = await Talk.open(port_of(server))
    await talk.hello()
    for _ in range(2):  # the same connection, twice: nothing dropped, nothing stopped
        code, _ = await talk.send_message("a@sender.test", ["bob@dest.test"], MESSAGE)
        assert code == 451
    assert (await talk.cmd("NOOP"))[0] == 250
    await talk.close()
    assert sink.messages == []
    assert (await send(port_of(server)))[0] == 451  # the server still serves new clients


# -- 7: the envelope is edited through methods only --------------------------------------


async def test_assigning_the_envelope_sender_is_an_error_not_a_silent_loss(
    proxy_factory: ProxyFactory, sink: Sink
) -> None:
    class Assigns:
        @hookimpl
        async def data(self, transaction: Transaction) -> None:
            transaction.envelope.sender = Address("x@evil.test", "x", "evil.test")  # type: ignore[misc]

    server = await proxy_factory(Assigns(), upstream=sink.port, delivery={"rcpt_mode": "relay"})
    assert (await send(port_of(server)))[0] == 451
    assert sink.messages == []


async def test_set_sender_in_relay_mode_reaches_the_upstream(proxy_factory: ProxyFactory, sink: Sink) -> None:
    class Rewrites:
        @hookimpl
        async def data(self, transaction: Transaction) -> None:
            transaction.envelope.set_sender(Address("bounce@sender.test", "bounce", "sender.test"))

    server = await proxy_factory(Rewrites(), upstream=sink.port, delivery={"rcpt_mode": "relay"})
    assert (await send(port_of(server)))[0] == 250
    assert [m.sender for m in sink.messages] == ["bounce@sender.test"]


def test_envelope_views_are_read_only() -> None:
    envelope = Envelope(Address("a@b.test", "a", "b.test"), {"SIZE": "10"})
    with pytest.raises(AttributeError):
        envelope.recipients = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        envelope.sender_params["BODY"] = "8BITMIME"  # type: ignore[index]
    recipient = Recipient(Address("r@b.test", "r", "b.test"), {"NOTIFY": "NEVER"})
    with pytest.raises(AttributeError):
        recipient.address = Address("x@b.test", "x", "b.test")  # type: ignore[misc]
    with pytest.raises(ValueError, match="ESMTP parameter"):
        envelope.add_recipient(Address("r@b.test", "r", "b.test"), {"NOTIFY": "NEVER\r\nRCPT TO:<x@y>"})
    assert envelope.changes == ()


# -- registration -----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["tryfirst", "trylast", "optionalhook"])
def test_hookimpl_options_that_cannot_be_honoured_are_refused_at_startup(
    option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    async def helo(self: object) -> None: ...

    module = types.ModuleType("hostile_options")
    module.Plugin = type("Plugin", (), {"helo": hookimpl(**{option: True})(helo)})  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "hostile_options", module)
    with pytest.raises(ConfigError, match=rf"'first'.*{option}"):
        build_chain([PluginSpec(name="first", use="hostile_options:Plugin")], None)


def test_a_decision_cannot_pair_a_positive_reply_with_a_refusal() -> None:
    with pytest.raises(ValueError):
        Decision("rejected", Reply(250, None, "ok"), "p")
    with pytest.raises(ValueError):
        Decision("delivered", Reply(451, None, "later"), "delivery")
    with pytest.raises(ValueError):
        Decision("accepted", Reply(250, None, "ok"), "p")


# -- any sequence of hook results: a model check ---------------------------------------

PHASES = ("connect", "helo", "mail_from", "rcpt_to", "data")
RESULTS: dict[str, Any] = {
    "none": lambda: None,
    "continue": lambda: Verdict.cont(score=1.0),
    "accept": Verdict.accept,
    "reject": lambda: Verdict.reject("no"),
    "tempfail": lambda: Verdict.tempfail("later"),
    "discard": lambda: Verdict.discard("drop"),
    "quarantine": lambda: Verdict.quarantine("hold"),
    "raises": lambda: 1 / 0,
    "junk": lambda: Reply(250, None, "ok"),
    "no-reply-reject": lambda: Verdict(Action.REJECT),
}
REFUSING = {"reject", "tempfail", "raises", "junk", "no-reply-reject"}


def plugin_of(name: str, plan: dict[str, str]) -> object:
    def make(result: str) -> Any:
        async def hook(self: object) -> Any:
            return RESULTS[result]()
        return hookimpl(hook)
    return type(name, (), {"name": name, **{phase: make(r) for phase, r in plan.items()}})()


def model(plans: list[dict[str, str]]) -> tuple[int, str]:
    """The rules as a reader of docs/verdicts.md would apply them: (reply class, disposition)."""
    pending = ""
    for phase in PHASES:
        if phase == "data" and pending == "discard":
            return 2, "discarded"  # the data chain does not run
        for plan in plans:
            result = plan.get(phase, "none")
            if result in REFUSING:
                return (4 if result in ("tempfail", "raises", "junk", "no-reply-reject") else 5), (
                    "tempfailed" if result != "reject" else "rejected")
            if result == "discard":
                pending = "discard"
                break
            if result == "quarantine":
                pending = pending or "quarantine"
                break
            if result == "accept":
                break
    return 2, {"discard": "discarded", "quarantine": "quarantined", "": "delivered"}[pending]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(PHASES), st.sampled_from(sorted(RESULTS))),
                min_size=1, max_size=3))
async def test_no_sequence_of_hook_results_answers_2xx_for_a_lost_message(plans: list[dict[str, str]]) -> None:
    chain = chain_of(*(plugin_of(f"p{i}", plan) for i, plan in enumerate(plans)))
    async with Tracer(chain) as tracer:
        trace = await tracer.trace(MESSAGE, sender="a@sender.test", recipients=["bob@dest.test"])
    code = int(trace.reply[:3])
    if code // 100 == 2:
        assert trace.decision in ("delivered", "quarantined", "discarded")
    assert (code // 100, trace.decision) == model(plans)


def test_chainstep_is_plain_data() -> None:
    step = ChainStep("x", object())
    assert step.timeout == 10.0 and step.on_error == "tempfail"


async def test_a_burst_of_plain_calls_gets_a_thread_each_up_to_the_pool_size() -> None:
    """Calls that arrive together do not queue behind each other's blocking work."""
    from smtpproxy.hookthread import HookPool

    pool = HookPool(size=4)
    inside = threading.Barrier(4, timeout=10)  # passes only if 4 calls run at the same time

    def blocking() -> str:
        inside.wait()
        return "ok"

    results = await asyncio.gather(*(pool.call(blocking, ()) for _ in range(4)))
    assert results == [("ok", None)] * 4
