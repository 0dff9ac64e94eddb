"""Python's cyclic garbage collector, set for a server whose sessions leave no cycles.

Every session of the proxy, the milter and the policy service is freed by reference counting
as it ends (tests/wire/test_reference_cycles.py holds each front end to that), so what the
collector's runs find is nothing: they only walk the objects of the sessions still open. With
CPython's first threshold, a run every 700 container objects allocated and not yet freed,
that came to 6-40 µs of CPU a message at 100 concurrent sessions behind Postfix, 1-3 % of
the process (bench/gc_cost.py). At 10,000 runs come tens of times less often and the
collector costs 0.2-4 µs a message; a cycle a plugin makes is still freed, by a later run.
"""

from __future__ import annotations

import gc

__all__ = ["SERVING_THRESHOLD", "set_for_serving"]

SERVING_THRESHOLD = 10_000
"""The first generation's threshold while a front end serves."""


def set_for_serving() -> None:
    """Raise the first threshold to :data:`SERVING_THRESHOLD` for the process that serves
    (``smtpproxy run``, ``milter``, ``policy``; not the library imported elsewhere). A
    threshold already higher, or the collector switched off (0), is left as it is."""
    first, *older = gc.get_threshold()
    if 0 < first < SERVING_THRESHOLD:
        gc.set_threshold(SERVING_THRESHOLD, *older)
