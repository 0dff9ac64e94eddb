"""The running proxy: builds everything from a Config, listens, and shuts down gracefully.

Shutdown (SIGTERM/SIGINT): stop accepting; idle sessions get ``421`` at once; a session in
the middle of a command (receiving DATA, waiting on the upstream) finishes it and then gets
``421``; whatever is still running after ``limits.shutdown_grace`` is closed with ``421``.
A client that never heard 250 retries, so nothing acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpproxy import __version__
from smtpproxy.auth import PasswordFile, PasswordFileError
from smtpproxy.chain import Chain
from smtpproxy.config import Config, ConfigError, ConfigSource, ListenerTLS, load_config
from smtpproxy.config import LoginThrottle as LoginThrottleConfig
from smtpproxy.delivery import Delivery
from smtpproxy.delivery.factory import config_hostname, make_delivery
from smtpproxy.eventlog import event
from smtpproxy.health import HealthServer, Readiness, open_health
from smtpproxy.history import HistoryRecorder, node_name
from smtpproxy.implicit_tls import ImplicitTLSGate
from smtpproxy.inbound import InboundSMTP
from smtpproxy.limits import ConnectionLimiter
from smtpproxy.listener import ListenerPolicy, Services
from smtpproxy.loginthrottle import LoginThrottle, RedisStore, ThrottleSettings
from smtpproxy.metrics import MetricsUnavailable, PrometheusRecorder, make_recorder, plugin_phases
from smtpproxy.pidfile import remove_pid_file, write_pid_file
from smtpproxy.proxyprotocol import ProxyProtocolSettings
from smtpproxy.quarantine import QuarantineStore
from smtpproxy.registry import build_chain
from smtpproxy.relay import RelayPolicy
from smtpproxy.reload import restart_only_changes, without_restart_only_changes
from smtpproxy.sdnotify import monotonic_usec, notify, ready
from smtpproxy.senderlogin import SenderLoginMapError, SenderLoginPolicy
from smtpproxy.startup import StartupError, configure_dns, start_chain
from smtpproxy.store import Store, StoreError, store_from_config
from smtpproxy.store.quarantine import DatabaseQuarantine
from smtpproxy.tables import TableError, Tables, build_tables, install
from smtpproxy.versions import LOG_FORMAT_VERSION
from smtpproxy.workers import inherited_listener, tell_supervisor_ready

__all__ = ["ProxyServer", "StartupError"]


HOUSEKEEPING_INTERVAL = 600.0
"""Seconds between two runs of the store's retention (expired history and quarantine)."""


def server_tls_context(tls: ListenerTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _login_throttle(config: Config) -> LoginThrottle | None:
    """The login throttle of a proxy with submission listeners (None without AUTH or when off)."""
    section = config.login_throttle
    if not section.enabled or not any(listener.auth for listener in config.listeners):
        return None
    store = None if section.redis_url is None else RedisStore(section.redis_url, section.redis_timeout)
    return LoginThrottle(throttle_settings(section), store)  # (the schema checked that redis imports)


def throttle_settings(section: LoginThrottleConfig) -> ThrottleSettings:
    """The throttle's settings from its configuration section."""
    return ThrottleSettings(
        initial_delay=section.initial_delay, max_delay=section.max_delay,
        lockout_after=section.lockout_after, lockout_seconds=section.lockout_seconds,
        forget_after=section.forget_after, ipv4_prefix=section.ipv4_prefix,
        ipv6_prefix=section.ipv6_prefix, spraying_logins=section.spraying_logins,
        trusted_networks=tuple(section.trusted_networks),
    )


def _sender_login(config: Config, tables: Tables) -> SenderLoginPolicy | None:
    """The sender/login map (YAML map, then the file, read now: a reload reads it again; or
    a lookup table of *tables*)."""
    section = config.sender_login
    if section is None:
        return None
    return SenderLoginPolicy.from_section(section, tables)


class ProxyServer:
    """One proxy process: listeners, the plugin chain and a delivery backend."""

    def __init__(self, config: Config, source: ConfigSource | None = None, *,
                 chain: Chain | None = None, delivery: Delivery | None = None,
                 worker: int | None = None, login_throttle: LoginThrottle | None = None):
        self.config = config
        self.worker = worker
        """This process's index under a ``workers: N`` supervisor (None: a single process)."""
        limits = config.limits
        self.store: Store | None = store_from_config(config)
        """The history and quarantine database (None: no ``store`` configured)."""
        self.services = Services(
            chain=chain if chain is not None
            else build_chain(config.plugins, source, plugin_paths=config.plugin_paths,
                             table_names=config.tables, policies=config.policies),
            delivery=delivery if delivery is not None else make_delivery(config),
            quarantine=self._quarantine(config),
            relay=RelayPolicy.of(config.relay),
            limiter=ConnectionLimiter(limits.max_sessions, limits.max_sessions_per_ip),
            sessions=set(),
            background=set(),
            drained=asyncio.Event(),
            login_throttle=login_throttle if login_throttle is not None else _login_throttle(config),
        )
        self.services.drained.set()
        self.services.node = node_name(config)
        if self.store is not None and config.history.enabled:
            h = config.history
            self.services.history = HistoryRecorder(
                self.store, batch_size=h.batch_size, queue_limit=h.queue_limit,
                flush_interval=h.flush_interval, timeout=config.store.timeout)
        self._housekeeping: asyncio.Task[None] | None = None
        self.source = source
        self.health: HealthServer | None = None
        """The /metrics, /healthz and /readyz endpoint (None unless metrics are enabled)."""
        self._servers: list[asyncio.Server] = []
        # Per listener: the policy and STARTTLS context new sessions get (a reload replaces
        # them), and the implicit-TLS context bound to the socket (a reload reloads its cert).
        self._listener_state: list[tuple[ListenerPolicy, ssl.SSLContext | None]] = []
        self._implicit_tls: dict[int, ssl.SSLContext] = {}
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._hurry = asyncio.Event()
        self.tables = Tables()
        """The lookup tables (smtpproxy.tables), built at start and at each reload."""
        self._retired_tables: list[tuple[Tables, asyncio.Task[None]]] = []

    def _quarantine(self, config: Config) -> QuarantineStore | DatabaseQuarantine:
        """The store's quarantine when there is a store; else the quarantine directory."""
        if self.store is None:
            return QuarantineStore(Path(config.quarantine.path))
        return DatabaseQuarantine(self.store, node=node_name(config),
                                  retention_days=config.quarantine.retention_days,
                                  admin_only=config.quarantine.admin_only, timeout=config.store.timeout)

    async def _start_store(self) -> None:
        """Upgrade the store's schema, start the history writer and the retention task.
        A store that is down now is no reason to stop the mail: it is retried on use."""
        if self.store is None:
            return
        try:
            found, now = await asyncio.wait_for(self.store.migrate(), self.config.store.timeout)
        except (StoreError, TimeoutError) as exc:
            event("store_unavailable", level=logging.WARNING, store=self.store.name,
                  error=str(exc) or type(exc).__name__)
        else:
            if found != now:
                event("store_upgraded", store=self.store.name, version_from=found, version=now)
        if self.services.history is not None:
            self.services.history.metrics = self.services.metrics
            self.services.history.start()
        self._housekeeping = asyncio.create_task(self._keep_store(), name="smtpproxy-store-retention")

    async def _keep_store(self) -> None:
        """Retention, run by itself: expired history entries and quarantined messages go."""
        assert self.store is not None
        while True:
            c = self.config
            now = time.time()
            try:
                history = await self.store.expire_history(now - c.history.retention_days * 86400)
                quarantine = await self.store.expire_quarantine(now)
            except (StoreError, OSError) as exc:
                event("store_retention_failed", level=logging.WARNING, error=str(exc) or repr(exc))
            else:
                if history or quarantine:
                    event("store_retention", history_removed=history, quarantine_removed=quarantine)
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)

    async def _stop_store(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.services.history is not None:
            await self.services.history.close()
        if self.store is not None:
            await self.store.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound (port 0 in the config picks a free one)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((host, port))
        return out

    def _policy(self, index: int, config: Config | None = None,
                tables: Tables | None = None) -> ListenerPolicy:
        c = config or self.config
        tables = self.tables if tables is None else tables
        listener = c.listeners[index]
        lim = c.limits
        return ListenerPolicy(
            hostname=config_hostname(c), banner=listener.banner,
            max_message_size=lim.max_message_size, max_recipients=lim.max_recipients,
            max_line_length=lim.max_line_length, max_command_line=lim.max_command_line,
            max_commands=lim.max_commands, max_errors=lim.max_errors,
            idle_timeout=lim.idle_timeout, data_timeout=lim.data_timeout,
            session_timeout=lim.session_timeout,
            normalize_bare_newlines=c.smtp.bare_newlines == "normalize",
            spool_threshold=lim.spool_threshold,
            spool_directory=str(lim.spool_directory) if lim.spool_directory else None,
            smtputf8=c.smtp.smtputf8, pipelining=c.smtp.pipelining,
            require_starttls=listener.require_starttls,
            auth=PasswordFile.load(listener.auth.users_file) if listener.auth else None,
            auth_required=listener.auth is not None and listener.auth.require,
            proxy_protocol=ProxyProtocolSettings(
                tuple(listener.proxy_protocol_from), listener.proxy_protocol_timeout
            ) if listener.proxy_protocol else None,
            sender_login=_sender_login(c, tables) if listener.auth and listener.auth.check_sender_login
            else None,
        )

    async def start(self) -> None:
        """Run startup hooks, prepare delivery, open every listener; StartupError if any fails."""
        services = self.services
        configure_dns(self.config.dns)
        try:
            services.metrics = make_recorder(
                self.config.metrics.enabled, lambda: len(services.sessions), services.leases.on_retired
            )
        except MetricsUnavailable as exc:
            raise StartupError(str(exc)) from exc
        if services.login_throttle is not None:
            services.login_throttle.metrics = services.metrics
            if self.worker is not None and not isinstance(services.login_throttle.store, RedisStore):
                event("login_throttle_per_worker", level=logging.WARNING, worker=self.worker,
                      note="each worker counts failed logins alone; set login_throttle.redis_url")
        try:
            self.tables = build_tables(self.config.tables)
        except TableError as exc:
            raise StartupError(str(exc)) from exc
        install(self.tables)
        await start_chain(services.chain)
        await self._start_store()
        try:
            await services.delivery.start()
        except Exception as exc:
            raise StartupError(f"delivery backend {services.delivery.name}: {exc}") from exc
        try:
            await services.quarantine.start()
        except OSError as exc:
            raise StartupError(f"quarantine.path: {exc}") from exc
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listeners):
            try:
                policy = self._policy(index)
            except PasswordFileError as exc:
                await self._close_servers()
                raise StartupError(f"listeners[{index}].auth.users_file: {exc}") from exc
            except SenderLoginMapError as exc:
                await self._close_servers()
                raise StartupError(f"sender_login: {exc}") from exc
            try:
                tls = server_tls_context(listener.tls) if listener.tls else None
            except (OSError, ssl.SSLError) as exc:
                await self._close_servers()
                raise StartupError(f"listeners[{index}].tls: cannot load certificate: {exc}") from exc
            # Implicit TLS: the gate counts the connection, then does the handshake; the
            # protocol gets no STARTTLS context (so STARTTLS is not offered).
            implicit = tls if listener.implicit_tls else None
            self._listener_state.append((policy, None if implicit else tls))
            if implicit is not None:
                self._implicit_tls[index] = implicit

            def inbound(index: int = index) -> InboundSMTP:
                policy, starttls = self._listener_state[index]  # looked up per connection: reload
                return InboundSMTP(services, policy, starttls)

            def gate(index: int = index) -> ImplicitTLSGate:
                return ImplicitTLSGate(services, lambda: inbound(index), lambda: self._implicit_tls[index])

            factory: Callable[[], asyncio.Protocol] = gate if implicit is not None else inbound
            # A worker accepts from the socket its supervisor opened (one queue for all).
            inherited = inherited_listener(index) if self.worker is not None else None
            where: dict[str, Any] = ({"sock": inherited} if inherited is not None else
                                     {"host": listener.address, "port": listener.port, "reuse_address": True,
                                      "reuse_port": self.worker is not None})
            try:
                server = await loop.create_server(factory, **where, backlog=1024)
            except OSError as exc:
                await self._close_servers()
                raise StartupError(
                    f"listeners[{index}]: cannot listen on {listener.address}:{listener.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            self._servers.append(server)
        for host, port in self.addresses:
            event("listening", address=host, port=port, delivery=services.delivery.name,
                  plugins=[s.name for s in services.chain.steps], groups=_group_names(services.chain),
                  loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                  worker=self.worker, pid=os.getpid(), version=__version__, log_format=LOG_FORMAT_VERSION)
        if isinstance(services.metrics, PrometheusRecorder):
            await self._start_health(services.metrics)
        self._started.set()

    async def _start_health(self, metrics: PrometheusRecorder) -> None:
        delivery, m = self.services.delivery, self.config.metrics
        delivery.report_to(metrics.upstream_down, metrics.upstream_identity)
        metrics.prepare(delivery.name, delivery.upstream_names(), plugin_phases(self.services.chain))
        metrics.shadowed(self.services.chain.shadowed_anywhere)
        readiness = Readiness(delivery, lambda: self._stopping, cache_seconds=m.ready_cache,
                              require_delivery=m.ready_requires_delivery,
                              on_probe=metrics.delivery_probed)
        port = m.port + self.worker if self.worker is not None and m.port else m.port
        try:
            self.health = await open_health(m, port, readiness, metrics)
        except StartupError:
            await self._close_servers()
            raise

    async def reload(self) -> bool:
        """Re-read the configuration file and apply it to new sessions; True if it was applied.

        Sessions already running finish on the chain they started with; the replaced chain
        gets its ``shutdown`` notification after its last session. An invalid file, or a
        plugin whose ``startup`` hook fails, changes nothing. Sections that need a restart
        (:data:`smtpproxy.reload.RESTART_ONLY`) keep their running values.
        Every outcome is logged as ``event=reload``. Concurrent reloads run one at a time.
        """
        async with self._reload_lock:
            if self.source is None:
                event("reload", level=logging.WARNING, result="skipped",
                      reason="no configuration file (running on the embedded default)")
                return False
            if self._stopping:
                event("reload", result="skipped", reason="shutting down")
                return False
            notify("RELOADING=1", monotonic_usec())
            try:
                return await self._reload(self.source.file)
            finally:
                notify("READY=1")

    async def _reload(self, file: str) -> bool:
        try:
            new, source = load_config(file)
            chain = build_chain(new.plugins, source, plugin_paths=new.plugin_paths, table_names=new.tables,
                                policies=new.policies)
            tables = build_tables(new.tables)
        except (ConfigError, TableError) as exc:
            return self._reload_failed(file, str(exc))
        applied = without_restart_only_changes(self.config, new)
        try:
            state = []
            for index, listener in enumerate(applied.listeners):
                tls = server_tls_context(listener.tls) if listener.tls else None
                state.append((self._policy(index, applied, tables), None if listener.implicit_tls else tls))
        except PasswordFileError as exc:
            return self._reload_failed(file, f"listeners[{index}].auth.users_file: {exc}")
        except SenderLoginMapError as exc:
            return self._reload_failed(file, f"sender_login: {exc}")
        except (OSError, ssl.SSLError) as exc:
            return self._reload_failed(file, f"listeners[{index}].tls: cannot load certificate: {exc}")
        old_tables = install(tables)  # before the startup hooks: plugins may look theirs up
        try:
            await start_chain(chain)
        except StartupError as exc:
            install(old_tables)
            await tables.close()
            return self._reload_failed(file, str(exc))
        if self._stopping:
            install(old_tables)
            await tables.close()
            await chain.notify("shutdown")  # started for nothing: the proxy is stopping
            return False
        self.tables = tables
        self._retire_tables(old_tables, applied.limits.session_timeout)
        for index, ctx in self._implicit_tls.items():
            tls_files = applied.listeners[index].tls
            assert tls_files is not None
            ctx.load_cert_chain(str(tls_files.cert), str(tls_files.key))  # checked above
        services, restart = self.services, restart_only_changes(self.config, new)
        old_chain, services.chain = services.chain, chain
        services.relay = RelayPolicy.of(applied.relay)
        if applied.quarantine != self.config.quarantine:
            services.quarantine = self._quarantine(applied)
            try:
                await services.quarantine.start()
            except OSError as exc:  # a store it cannot narrow still takes messages
                event("file_modes_not_corrected", level=logging.WARNING, store="quarantine", error=str(exc))
        services.limiter.max_sessions = applied.limits.max_sessions
        services.limiter.max_per_ip = applied.limits.max_sessions_per_ip
        self._listener_state = state
        self.config, self.source = applied, source
        services.leases.retire(old_chain)
        services.metrics.prepare(services.delivery.name, (), plugin_phases(chain))
        services.metrics.shadowed(chain.shadowed_anywhere)
        services.metrics.reloaded(True)
        event("reload", level=logging.WARNING if restart else logging.INFO, result="ok", file=file,
              plugins=[s.name for s in chain.steps], groups=_group_names(chain),
              previous_chain_sessions=services.leases.users(old_chain),
              restart_needed=restart or None,
              note="changes to these sections apply at the next restart" if restart else None)
        return True

    def _retire_tables(self, tables: Tables, after: float) -> None:
        """Close a reload's replaced tables once the sessions that may still use them are over
        (a session lasts at most limits.session_timeout); at stop, at once."""
        async def close_later() -> None:
            await asyncio.sleep(after)
            self._retired_tables[:] = [(t, task) for t, task in self._retired_tables if t is not tables]
            await tables.close()

        self._retired_tables.append((tables, asyncio.get_running_loop().create_task(close_later())))

    def _reload_failed(self, file: str, error: str) -> bool:
        self.services.metrics.reloaded(False)
        event("reload", level=logging.ERROR, result="failed", file=file, error=error,
              note="still running on the previous configuration")
        return False

    def request_reload(self) -> None:
        """Reload soon (the SIGHUP handler); waits for startup to finish first."""
        async def run() -> bool:
            await self._started.wait()
            return await self.reload()

        task = asyncio.get_running_loop().create_task(run())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()

    def hurry(self, signum: int = signal.SIGTERM) -> None:
        """A second SIGTERM/SIGINT during the drain: end the grace period now.

        Sessions still get 421 and messages already handed to the upstream still get its
        reply (see :meth:`stop`); only the wait for the others is cut short.
        """
        event("shutdown_hurried", level=logging.WARNING, signal=signal.Signals(signum).name,
              note="grace period ends now; upstream replies already due are still awaited")
        self._hurry.set()

    def _ignore_reload(self) -> None:
        event("signal_ignored", level=logging.WARNING, signal="SIGHUP",
              note="shutting down; no reload")

    def _delivery_bound(self) -> float:
        """How long a message already handed to the backend may still take to be answered."""
        return self.services.delivery.reply_bound()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let busy sessions finish within the grace period, then close all.

        When the grace period ends (or :meth:`hurry` ends it), a session whose message is
        with the upstream waits for the upstream's reply (bounded by the delivery timeouts),
        so the client hears the upstream's answer and the proxy never delivers a message the
        client was told to retry. Every other session gets 421 and is closed.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.services.stopping = True
        notify("STOPPING=1")
        grace = self.config.limits.shutdown_grace if grace is None else grace
        event("shutdown", sessions=len(self.services.sessions), grace=grace)
        for server in self._servers:
            server.close()
        for session in list(self.services.sessions):
            session.request_close()
        drained = asyncio.ensure_future(self.services.drained.wait())
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({drained, hurried}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        hurried.cancel()
        due = [s.delivering for s in self.services.sessions if s.delivering is not None]
        if due:
            bound = self._delivery_bound()
            event("shutdown_awaiting_upstream", sessions=len(due), seconds=bound)
            await asyncio.wait([asyncio.ensure_future(d.wait()) for d in due], timeout=bound)
        for session in list(self.services.sessions):
            session.force_close()
        if self.services.background:
            await asyncio.wait(set(self.services.background), timeout=max(1.0, grace))
        for server in self._servers:
            # On Python 3.11 wait_closed also waits for connections still setting up (PROXY
            # header, TLS handshake); those time out on their own, but never wait forever.
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=max(1.0, grace))
            except TimeoutError:
                event("shutdown_slow", logging.WARNING, note="listener connections still open")
        async with self._reload_lock:  # a reload in progress finishes (or backs out) first
            await self.services.chain.notify("shutdown")
        await self.services.leases.close()
        for tables, task in self._retired_tables:
            task.cancel()
            await tables.close()
        self._retired_tables.clear()
        await self.tables.close()
        await self.services.delivery.close()
        if self.services.login_throttle is not None:
            await self.services.login_throttle.close()
        await self._stop_store()
        if self.health is not None:
            await self.health.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        # Before start(): a signal's default action would kill a proxy that is still starting,
        # or that has just opened its listeners (a SIGTERM right after the `listening` line
        # ended the process with -15 instead of a graceful stop).
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        pid_file = self.config.pid_file if self.worker is None else None  # the supervisor's
        try:
            if pid_file is not None:  # after the SIGHUP handler: `smtpproxy reload` may use it now
                try:
                    write_pid_file(Path(pid_file))
                except OSError as exc:
                    raise StartupError(f"pid_file: cannot write {pid_file}: {exc.strerror or exc}") from exc
            await self.start()
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if pid_file is not None:
                remove_pid_file(Path(pid_file))
            raise
        ready()
        tell_supervisor_ready()
        try:
            await stop_requested.wait()
        finally:
            # Keep handling signals while draining: without a handler a second SIGTERM, or
            # the SIGHUP of a logrotate or `systemctl reload`, would kill the process with
            # messages in flight (delivered upstream, the client never hearing 250).
            loop.add_signal_handler(signal.SIGHUP, self._ignore_reload)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.hurry, sig)
            for task in self._reloads:
                task.cancel()
            try:
                await self.stop()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if pid_file is not None:
                remove_pid_file(Path(pid_file))


def _group_names(chain: Chain) -> list[str] | None:
    """The policy groups of a chain, for the listening and reload lines (None: no policies:)."""
    return [g.name for g in chain.policies.groups] if chain.policies is not None else None


