"""Verdict's quick check of the common verdict accepts nothing that all its rules refuse."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.verdicts import Action, Reply, Verdict


class StrTag(str):
    """A str subclass: the quick check leaves it to the rules (which accept it)."""


class FloatScore(float):
    pass


actions = st.one_of(st.sampled_from(list(Action)), st.sampled_from(["continue", None, 1]))
# Mostly what the quick check passes, so that each of its conditions meets its edge cases.
replies = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([Reply(550, "5.7.1", "no"), Reply(451, "4.7.1", "later"),
                                                Reply(250, None, "ok"), "550 no"]))
reasons = st.one_of(st.text(max_size=5), st.text(max_size=5), st.sampled_from([None, b"x", 1, StrTag("r")]))
scores = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, -math.inf, 0.0]),
                   st.integers(-5, 5), st.booleans(),
                   st.sampled_from([FloatScore(1.5), FloatScore(math.inf), "1", None, 10**400]))
tag_items = st.one_of(st.text(max_size=4), st.sampled_from([StrTag("t"), b"t", 1, None]))
tags = st.one_of(st.lists(st.text(max_size=3), max_size=3).map(tuple), st.lists(tag_items, max_size=3).map(tuple), st.lists(st.text(max_size=3), max_size=2),
                 st.sampled_from(["a:b", None]))


def _outcome(build: Any) -> tuple[type[BaseException], str] | None:
    try:
        build()
    except BaseException as exc:  # the outcomes are compared, whatever they are
        return type(exc), str(exc)
    return None


def _all_rules(values: tuple[Any, ...]) -> None:
    """Every rule, on a verdict holding these values without its constructor's quick check."""
    verdict = object.__new__(Verdict)
    for name, value in zip(("action", "reply", "reason", "score", "tags"), values, strict=True):
        object.__setattr__(verdict, name, value)
    verdict._check()


@settings(max_examples=1500, deadline=None)
@given(actions, replies, reasons, scores, tags)
def test_the_quick_check_decides_as_every_rule(action: Any, reply: Any, reason: Any, score: Any, tags: Any) -> None:
    values = (action, reply, reason, score, tags)
    assert _outcome(lambda: Verdict(*values)) == _outcome(lambda: _all_rules(values))


def test_the_rules_still_refuse_what_the_quick_check_passes_over() -> None:
    assert _outcome(lambda: Verdict(Action.CONTINUE, None, "", math.nan)) is not None
    assert _outcome(lambda: Verdict(Action.CONTINUE, None, "", 0.0, ("a", 1))) is not None  # type: ignore[arg-type]
    assert _outcome(lambda: Verdict(Action.ACCEPT, Reply(550, "5.7.1", "no"))) is not None
    assert _outcome(lambda: Verdict(Action.REJECT, None)) is not None
    assert Verdict(Action.CONTINUE, None, StrTag("r"), FloatScore(1.0), (StrTag("t"),)).tags == ("t",)
