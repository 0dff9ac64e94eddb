"""The collector's threshold while a front end serves (smtpproxy/collector.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from smtpproxy import cli, collector
from smtpproxy.config import Config


@pytest.fixture(autouse=True)
def _threshold_restored() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_serving_runs_with_the_raised_threshold() -> None:
    """``run``, ``milter`` and ``policy`` all serve through cli._serve."""
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, ...]] = []

    async def front_end() -> None:
        seen.append(gc.get_threshold())

    assert cli._serve(front_end(), Config.model_validate({"event_loop": "asyncio"})) == 0
    assert seen == [(collector.SERVING_THRESHOLD, 10, 10)]


@pytest.mark.parametrize(("before", "after"), [
    ((700, 10, 10), (collector.SERVING_THRESHOLD, 10, 10)),
    ((2000, 5, 20), (collector.SERVING_THRESHOLD, 5, 20)),  # the older generations as they were
    ((50_000, 10, 10), (50_000, 10, 10)),  # already higher: left
    ((0, 10, 10), (0, 10, 10)),  # the collector switched off: left off
])
def test_only_a_lower_threshold_is_raised(before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
    gc.set_threshold(*before)
    collector.set_for_serving()
    assert gc.get_threshold() == after
