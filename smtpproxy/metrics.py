"""Prometheus metrics: what the proxy counts, and a recorder that costs nothing when off.

The front end calls a :class:`Recorder` at a handful of points per session and message.
With metrics disabled (the default) that is :class:`NullRecorder`, whose methods do
nothing, so the per-message overhead is a few empty method calls. With metrics enabled,
:class:`PrometheusRecorder` keeps its instruments in a :class:`CollectorRegistry` of its
own (not prometheus_client's global one), so several proxies in one process never clash.

prometheus_client is imported only when metrics are enabled: the core runs without it
(``pip install prometheus-client``, or the ``[metrics]`` extra, adds it).

Plugin verdicts and latencies are read from the :class:`~smtpproxy.session.Results` a
session or transaction accumulated, once when it ends, so the chain itself stays
metrics-agnostic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, cast

from smtpproxy import __version__
from smtpproxy.hookspecs import PHASES
from smtpproxy.session import Outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from smtpproxy.chain import Chain

__all__ = [
    "MetricsUnavailable",
    "NullRecorder",
    "PrometheusRecorder",
    "Recorder",
    "front_end_recorder",
    "make_recorder",
    "plugin_phases",
    "web_recorder",
]

PARTS = ("mail", "delivery", "reloads", "logins")
"""The groups of series a front end may serve: ``mail`` (sessions, refusals, messages, plugin
verdicts and timings, history), ``delivery`` (the upstreams), ``reloads``, ``logins`` (the login
throttle). The proxy serves all; the milter and the policy service ``mail``; web ``logins``."""

PLUGIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; most hooks take well under a millisecond, DNS-bound ones tens of milliseconds."""
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MESSAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The label values known before the first event. Their series start at 0 (see
# PrometheusRecorder.prepare): a counter born at 1 hides its first increment from rate().
DECISIONS = ("delivered", "quarantined", "discarded", "rejected", "tempfailed")
REFUSAL_REASONS = ("max_sessions", "max_sessions_per_ip", "shutting_down")
FAILURE_RESULTS = ("tempfail", "reject", "error")
RCPT_RESULTS = ("ok", "tempfail", "reject")
DOWN_REASONS = ("connect", "timeout", "tls", "tls_verify", "auth")
SHADOW_ACTIONS = ("reject", "tempfail", "quarantine", "discard")


class MetricsUnavailable(Exception):
    """metrics.enabled is true but prometheus_client is not installed."""


class NullRecorder:
    """Metrics off: every observation is a no-op."""

    enabled = False

    def prepare(self, backend: str | None, upstreams: Iterable[str], plugins: Iterable[tuple[str, str]],
                refusals: Iterable[str] = REFUSAL_REASONS) -> None:
        pass

    def session_started(self) -> None:
        pass

    def connection_refused(self, reason: str) -> None:
        pass

    def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        pass

    def shadowed(self, plugins: Iterable[str]) -> None:
        pass

    def message(self, decision: str, seconds: float) -> None:
        pass

    def group_message(self, group: str, decision: str) -> None:
        pass

    def delivery_started(self) -> None:
        pass

    def delivery_finished(self, backend: str, result: str, seconds: float) -> None:
        pass

    def upstream_down(self, upstream: str, reason: str = "connect") -> None:
        pass

    def upstream_rcpt(self, result: str) -> None:
        pass

    def delivery_probed(self, ready: bool, upstreams: dict[str, bool]) -> None:
        pass

    def upstream_identity(self, upstream: str, mechanism: str) -> None:
        pass

    def reloaded(self, ok: bool) -> None:
        pass

    def auth_event(self, name: str) -> None:
        pass

    def history(self, result: str, count: int) -> None:
        pass


Recorder = NullRecorder
"""The interface the front end calls (PrometheusRecorder implements the same methods)."""


class PrometheusRecorder(NullRecorder):
    """Metrics on: counters, gauges and histograms in a registry of this proxy's own."""

    enabled = True

    def __init__(self, active_sessions: Callable[[], int], old_chain_sessions: Callable[[], int], *,
                 parts: Collection[str] = PARTS):
        """*parts*: which of :data:`PARTS` this front end serves (the process metrics always)."""
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:
            raise MetricsUnavailable(
                "metrics.enabled is true but prometheus_client is not installed: "
                "pip install prometheus-client (the [metrics] extra) or set metrics.enabled: false"
            ) from exc
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # A part this front end does not serve goes to a registry nobody scrapes, so that the
        # methods stay the same for all.
        unserved = CollectorRegistry(auto_describe=True)
        mail, delivery, reloads, logins = (r if part in parts else unserved for part in PARTS)
        # process_start_time_seconds (a restart: SmtpproxyRestarting), CPU, memory, open files
        register_process_metrics(r)
        Gauge("smtpproxy_info", "Version of the running proxy (always 1).", ["version"],
              registry=r).labels(__version__).set(1)
        self.sessions = Counter("smtpproxy_sessions", "SMTP sessions accepted (past the session caps).",
                                registry=mail)
        self.refused = Counter(
            "smtpproxy_connections_refused",
            "Connections turned away before the greeting, by reason "
            "(max_sessions, max_sessions_per_ip, shutting_down; the milter and the policy "
            "service: max_sessions, client).",
            ["reason"], registry=mail,
        )
        active = Gauge("smtpproxy_active_sessions", "SMTP sessions open now.", registry=mail)
        active.set_function(active_sessions)
        old = Gauge(
            "smtpproxy_sessions_on_previous_chain",
            "Sessions still running on a plugin chain replaced by a reload.", registry=reloads,
        )
        old.set_function(old_chain_sessions)
        self.messages = Counter(
            "smtpproxy_messages", "Messages (end of DATA) by final decision "
            "(delivered, quarantined, discarded, rejected, tempfailed).", ["decision"], registry=mail,
        )
        self.group_messages = Counter(
            "smtpproxy_group_messages", "Messages by policy group (docs/multi-domain.md; a message "
            "for recipients of two groups counts in each) and final decision.",
            ["group", "decision"], registry=mail,
        )
        self.message_seconds = Histogram(
            "smtpproxy_message_processing_seconds",
            "From the end of DATA to the reply: data-phase plugins plus delivery.",
            buckets=MESSAGE_BUCKETS, registry=mail,
        )
        self.verdicts = Counter(
            "smtpproxy_plugin_verdicts", "Plugin hook results by plugin, phase and action.",
            ["plugin", "phase", "action"], registry=mail,
        )
        self.shadow_verdicts = Counter(
            "smtpproxy_shadow_verdicts",
            "What plugins in shadow mode (enforce: false) would have done and did not, by plugin "
            "and action (reject, tempfail, quarantine, discard).", ["plugin", "action"], registry=mail,
        )
        self.plugin_errors = Counter(
            "smtpproxy_plugin_errors", "Plugin hooks that raised or timed out.",
            ["plugin", "phase"], registry=mail,
        )
        self.plugin_seconds = Histogram(
            "smtpproxy_plugin_duration_seconds", "Time one plugin hook took.",
            ["plugin", "phase"], buckets=PLUGIN_BUCKETS, registry=mail,
        )
        self.delivering = Gauge(
            "smtpproxy_deliveries_in_progress",
            "Sessions waiting on the delivery backend (upstream) for a message right now.",
            registry=delivery,
        )
        self.delivery_seconds = Histogram(
            "smtpproxy_upstream_duration_seconds",
            "Time to hand one message to the delivery backend (connect or reuse, "
            "MAIL, RCPT, DATA), by backend and result (ok, tempfail, reject, error).",
            ["backend", "result"], buckets=UPSTREAM_BUCKETS, registry=delivery,
        )
        self.delivery_failures = Counter(
            "smtpproxy_upstream_errors", "Messages the delivery backend did not take, "
            "by backend and result (tempfail, reject, error).", ["backend", "result"], registry=delivery,
        )
        self.rcpt_answers = Counter(
            "smtpproxy_upstream_rcpt",
            "Upstream answers to RCPT (rcpt_mode relay), by result (ok, tempfail, reject); "
            "tempfail includes the proxy's own 451 when no upstream could be reached.",
            ["result"], registry=delivery,
        )
        self.delivery_ready = Gauge(
            "smtpproxy_delivery_ready",
            "1 if the last delivery probe (/readyz, /metrics; at most once per "
            "metrics.ready_cache) found every route reachable (Maildir: writable), else 0.",
            registry=delivery,
        )
        self.delivery_ready.set(1)
        self.upstream_up = Gauge(
            "smtpproxy_upstream_up",
            "1 if the upstream greeted the last probe with 220 (and its certificate verified on "
            "the last delivery), else 0.", ["upstream"], registry=delivery,
        )
        self.down = Counter(
            "smtpproxy_upstream_connect_failures",
            "Upstream servers that failed to connect or greet (each starts a back-off), by "
            "reason (connect, timeout, tls, tls_verify, auth).",
            ["upstream", "reason"], registry=delivery,
        )
        self.identity = Gauge(
            "smtpproxy_upstream_client_identity",
            "1 for how each upstream was last told the original client (xclient, xforward, "
            "none); none means the upstream sees the proxy as the client.",
            ["upstream", "mechanism"], registry=delivery,
        )
        self.reloads = Counter("smtpproxy_config_reloads", "Configuration reloads by result (ok, failed).",
                               ["result"], registry=reloads)
        self.last_reload_ok = Gauge(
            "smtpproxy_config_last_reload_successful", "1 if the last reload succeeded (or none yet).",
            registry=reloads,
        )
        self.last_reload_ok.set(1)
        self.auth = Counter(
            "smtpproxy_auth_throttle_events",
            "Login throttle events (docs/submission.md): auth_failed, auth_delayed, auth_locked "
            "(an address locked out), auth_locked_refused (a login refused during a lockout), "
            "auth_spraying (one address trying many logins).", ["event"], registry=logins,
        )
        self.history_entries = Counter(
            "smtpproxy_history_entries",
            "Decisions for the store's message history, by result (written, dropped: the store "
            "was slow or down and the bounded queue full; the mail itself is never held).",
            ["result"], registry=mail,
        )
        # labels() takes a lock and hashes the label tuple; cache the children we use per message.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def prepare(self, backend: str | None, upstreams: Iterable[str], plugins: Iterable[tuple[str, str]],
                refusals: Iterable[str] = REFUSAL_REASONS) -> None:
        """Create every series whose labels are known now, at 0, so that the first event
        is an increase rate() and increase() see (a series born at 1 shows none). *backend*
        None: a front end that neither delivers nor reloads (the milter, the policy service)."""
        for decision in DECISIONS:
            self._child(self.messages, decision)
        for reason in refusals:
            self._child(self.refused, reason)
        for plugin, phase in plugins:
            self._child(self.plugin_errors, plugin, phase)
        if backend is None:
            return
        for result in FAILURE_RESULTS:
            self._child(self.delivery_failures, backend, result)
        for result in RCPT_RESULTS:
            self._child(self.rcpt_answers, result)
        for upstream in upstreams:
            for reason in DOWN_REASONS:
                self._child(self.down, upstream, reason)
        for result in ("ok", "failed"):
            self._child(self.reloads, result)

    def session_started(self) -> None:
        self.sessions.inc()

    def connection_refused(self, reason: str) -> None:
        self._child(self.refused, reason).inc()

    def shadowed(self, plugins: Iterable[str]) -> None:
        """The plugins in shadow mode: their would-be series start at 0."""
        for plugin in plugins:
            for action in SHADOW_ACTIONS:
                self._child(self.shadow_verdicts, plugin, action)

    def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            action = o.action.value
            if o.shadow:  # not applied: it continued; what it would have done is counted apart
                if action in SHADOW_ACTIONS:
                    self._child(self.shadow_verdicts, o.plugin, action).inc()
                action = "continue"
            self._child(self.verdicts, o.plugin, o.phase, action).inc()
            self._child(self.plugin_seconds, o.plugin, o.phase).observe(o.duration)
            if o.error is not None:
                self._child(self.plugin_errors, o.plugin, o.phase).inc()

    def message(self, decision: str, seconds: float) -> None:
        self._child(self.messages, decision).inc()
        self.message_seconds.observe(seconds)

    def group_message(self, group: str, decision: str) -> None:
        self._child(self.group_messages, group, decision).inc()

    def delivery_started(self) -> None:
        self.delivering.inc()

    def delivery_finished(self, backend: str, result: str, seconds: float) -> None:
        self.delivering.dec()
        self._child(self.delivery_seconds, backend, result).observe(seconds)
        if result != "ok":
            self._child(self.delivery_failures, backend, result).inc()

    def upstream_down(self, upstream: str, reason: str = "connect") -> None:
        self._child(self.down, upstream, reason).inc()

    def upstream_rcpt(self, result: str) -> None:
        self._child(self.rcpt_answers, result).inc()

    def delivery_probed(self, ready: bool, upstreams: dict[str, bool]) -> None:
        self.delivery_ready.set(1 if ready else 0)
        for upstream, up in upstreams.items():
            self._child(self.upstream_up, upstream).set(1 if up else 0)

    def upstream_identity(self, upstream: str, mechanism: str) -> None:
        for name in ("xclient", "xforward", "none"):
            self._child(self.identity, upstream, name).set(1 if name == mechanism else 0)

    def reloaded(self, ok: bool) -> None:
        self._child(self.reloads, "ok" if ok else "failed").inc()
        self.last_reload_ok.set(1 if ok else 0)

    def auth_event(self, name: str) -> None:
        self._child(self.auth, name).inc()
    def history(self, result: str, count: int) -> None:
        self._child(self.history_entries, result).inc(count)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def register_process_metrics(registry: Any, proc: str = "/proc") -> None:
    """prometheus_client's process metrics in *registry*, also where ``/proc/stat`` is hidden.

    Its ProcessCollector reads the boot time from ``/proc/stat`` and, without it, reports
    nothing at all. The shipped units set ``ProcSubset=pid``, which hides every file of /proc
    outside the processes' own directories: no ``process_start_time_seconds`` (so no
    ``SmtpproxyRestarting``), CPU, memory or open files. The boot time is also the clock's
    now less ``CLOCK_BOOTTIME`` (Linux), the clock /proc's start times count from. The method
    replaced is prometheus_client's own: tests/unit/test_process_metrics.py and the units'
    test under systemd fail if it stops being the one asked.
    """
    from prometheus_client import ProcessCollector

    class SandboxedProcessCollector(ProcessCollector):
        def _boot_time(self) -> float | None:
            try:
                return cast("float | None", super()._boot_time())  # type: ignore[no-untyped-call]
            except OSError:
                boottime = getattr(time, "CLOCK_BOOTTIME", None)  # no /proc at all elsewhere
                return None if boottime is None else time.time() - time.clock_gettime(boottime)

    SandboxedProcessCollector(proc=proc, registry=registry)


def make_recorder(
    enabled: bool, active_sessions: Callable[[], int], old_chain_sessions: Callable[[], int], *,
    parts: Collection[str] = PARTS,
) -> NullRecorder:
    """The recorder for a proxy; MetricsUnavailable when enabled without prometheus_client."""
    if not enabled:
        return NullRecorder()
    return PrometheusRecorder(active_sessions, old_chain_sessions, parts=parts)


def plugin_phases(chain: Chain) -> list[tuple[str, str]]:
    """(plugin, phase) for every phase hook of the chain and its policy groups' chains: the
    plugin error series to create."""
    return list(dict.fromkeys((name, phase) for c in chain.family for phase in PHASES
                              for name in c.implementers(phase)))


FRONT_END_REFUSALS = ("max_sessions", "client")
"""Why the milter or the policy service closes a connection before its first packet or
request: ``limits.max_sessions``, or a host not in its ``clients``."""


def front_end_recorder(enabled: bool, chain: Chain, active_sessions: Callable[[], int]) -> NullRecorder:
    """The recorder of the milter or the policy service, its series created: the same
    metrics as the proxy's for what they share (sessions, refusals, plugin verdicts and
    timings, messages by decision), none for delivery or reloads, which they do not do.
    MetricsUnavailable when enabled without prometheus_client."""
    recorder = make_recorder(enabled, active_sessions, lambda: 0, parts=("mail",))
    recorder.prepare(None, (), plugin_phases(chain), refusals=FRONT_END_REFUSALS)
    recorder.shadowed(chain.shadowed_anywhere)
    return recorder


def web_recorder(enabled: bool) -> NullRecorder:
    """The recorder of ``smtpproxy web``: the console's login throttle (``logins``) and the
    process. MetricsUnavailable when enabled without prometheus_client."""
    return make_recorder(enabled, lambda: 0, lambda: 0, parts=("logins",))
