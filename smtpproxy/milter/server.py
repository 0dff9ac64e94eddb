"""The milter listener: ``inet:host:port`` or ``unix:/path``, one task per MTA connection.

Each connection reads packets (length checked before the payload is read), decodes them
strictly and hands them to a :class:`~smtpproxy.milter.session.MilterSession`. Anything
that is not valid protocol (a bad length, a truncated packet, an unknown command, a
malformed payload) or an MTA that stays silent past ``milter.timeout`` ends the
connection with one log line; the MTA then applies its own ``milter_default_action``.
A connection beyond ``limits.max_sessions`` open ones is closed at once, the same way.

Stopping (SIGTERM/SIGINT): no new connections; the MTA's open connections may finish
their SMTP sessions within ``limits.shutdown_grace``, then the rest are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from typing import cast

from smtpproxy import __version__
from smtpproxy.chain import Chain
from smtpproxy.config import Config, ConfigSource
from smtpproxy.config.listen import parse_listen
from smtpproxy.eventlog import current_session, event
from smtpproxy.health import HealthServer, front_end_port, open_front_end_health
from smtpproxy.history import HistoryRecorder, node_name
from smtpproxy.metrics import MetricsUnavailable, NullRecorder, front_end_recorder
from smtpproxy.milter import codec
from smtpproxy.milter.codec import MilterProtocolError
from smtpproxy.milter.session import MilterPolicy, MilterSession
from smtpproxy.networks import peer_in_networks, shut_out_warning
from smtpproxy.registry import build_chain
from smtpproxy.sdnotify import notify, ready
from smtpproxy.senderlogin import SenderLoginPolicy
from smtpproxy.startup import StartupError, start_chain
from smtpproxy.store import store_from_config
from smtpproxy.tables import Tables, build_tables, install
from smtpproxy.unixsocket import clear_stale_socket, remove_socket
from smtpproxy.versions import LOG_FORMAT_VERSION

__all__ = ["MilterServer"]


class MilterServer:
    """One milter process: the plugin chain behind one listening socket."""

    def __init__(self, config: Config, source: ConfigSource | None = None, *,
                 chain: Chain | None = None) -> None:
        self.config = config
        self.settings = config.milter
        self.chain = (chain if chain is not None
                      else build_chain(config.plugins, source, plugin_paths=config.plugin_paths,
                                      table_names=config.tables, policies=config.policies))
        self.listen = parse_listen(self.settings.listen)
        self.store = store_from_config(config)
        """The store for the history (None: none configured); a milter's quarantine is the MTA's hold."""
        history = None
        if self.store is not None and config.history.enabled:
            h = config.history
            history = HistoryRecorder(self.store, batch_size=h.batch_size, queue_limit=h.queue_limit,
                                      flush_interval=h.flush_interval, timeout=config.store.timeout)
        self.tables = build_tables(config.tables)  # read once, as the rest (no reload)
        install(self.tables)
        self.policy = MilterPolicy(
            history=history, node=node_name(config),
            default_action=self.settings.default_action,
            not_granted_action=self.settings.not_granted_action,
            max_message_size=config.limits.max_message_size,
            max_recipients=config.limits.max_recipients,
            progress_interval=self.settings.progress_interval,
            sender_login=_sender_login(config, self.tables) if self.settings.check_sender_login else None,
        )
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.metrics = NullRecorder()
        """Counts sessions, refusals, plugin verdicts and messages (``metrics.enabled``)."""
        self.health: HealthServer | None = None
        """/metrics, /healthz and /readyz, with ``metrics.enabled``."""
        self._stopped = asyncio.Event()
        self._stopping = False
        self._hurry = asyncio.Event()
        self._deadlines = _Deadlines(self.settings.timeout)

    @property
    def address(self) -> tuple[str, int] | str:
        """The bound TCP (host, port) (port 0 in the config picks a free one) or socket path."""
        if self.listen.path:
            return self.listen.path
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        try:
            self.metrics = front_end_recorder(front_end_port(self.config.metrics, "milter") is not None,
                                              self.chain, lambda: len(self._connections))
        except MetricsUnavailable as exc:
            raise StartupError(str(exc)) from exc
        self.policy = dataclasses.replace(self.policy, metrics=self.metrics)
        await start_chain(self.chain, self.config.dns)
        if self.policy.history is not None:
            self.policy.history.metrics = self.metrics
            self.policy.history.start()
        try:
            if self.listen.path:
                self._server = await self._start_unix(self.listen.path)
            else:
                self._server = await asyncio.get_running_loop().create_server(
                    self._connection, host=self.listen.host, port=self.listen.port,
                    reuse_address=True, backlog=1024,
                )
        except OSError as exc:
            raise StartupError(
                f"milter.listen: cannot listen on {self.settings.listen}: {exc.strerror or exc}"
            ) from exc
        settings = self.settings
        if warning := shut_out_warning("milter", settings.listen, self.listen.host, settings.clients):
            event("clients_only_this_host", level=logging.WARNING, section="milter", warning=warning)
        try:
            self.health = await open_front_end_health(self.config.metrics, "milter",
                                                      lambda: self._stopping, self.metrics)
        except StartupError:
            self._server.close()
            raise
        event("listening", milter=self.settings.listen, address=str(self.address),
              plugins=[s.name for s in self.chain.steps],
              loop=type(asyncio.get_running_loop()).__module__.split(".")[0], version=__version__,
              log_format=LOG_FORMAT_VERSION)

    async def _start_unix(self, path: str) -> asyncio.Server:
        clear_stale_socket(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._connection, path=path, backlog=1024)
        os.chmod(path, int(self.settings.socket_mode, 8))
        return server

    def _connection(self) -> _Connection:
        return _Connection(self)

    async def _serve(self, connection: _Connection) -> None:
        """One MTA connection's packets, in order, through its :class:`MilterSession`."""
        task = asyncio.current_task()
        assert task is not None
        peer = connection.transport.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        current_session.set(None)
        if not self.listen.path and not peer_in_networks(peer, self.settings.clients):
            # Nobody else's business: a stranger could poison greylisting and rate limits with
            # made-up sessions, or probe the access lists.
            event("milter_refused", level=logging.WARNING, peer=peer_text, reason="client")
            self.metrics.connection_refused("client")
            connection.transport.close()
            return
        if len(self._connections) >= self.config.limits.max_sessions:
            # Closed before a packet: the MTA applies its milter_default_action. (No per-IP
            # cap: every connection comes from the MTA, one per SMTP session it holds.)
            event("milter_refused", level=logging.WARNING, peer=peer_text, reason="max_sessions",
                  max_sessions=self.config.limits.max_sessions)
            self.metrics.connection_refused("max_sessions")
            connection.transport.close()
            return
        self._connections.add(task)
        self.metrics.session_started()
        replies = _Replies(connection)
        acks = _AckNow(connection.transport)
        session = MilterSession(self.chain, self.policy, replies.send, peer_text, replies.progress)
        deadlines = self._deadlines
        pending = replies.pending
        decode, take, macro = codec.decode_command, session.take, codec.Macro  # per packet: ~33 a message
        try:
            while True:
                deadlines.wait(task)
                try:
                    packets = await connection.packets()
                finally:
                    deadlines.done(task)
                if packets is None:
                    break
                go_on = True
                for code, payload in packets:
                    command = decode(code, payload)
                    if (type(command) is macro and command.for_command in _NOT_SENT
                            and _nothing_follows(command, session.negotiated)):
                        acks.now()
                    if take(command):
                        continue
                    go_on = await session.handle(command)
                    if pending:
                        await replies.flush()
                    if not go_on:
                        break
                if not go_on:
                    break
        except MilterProtocolError as exc:
            event("milter_protocol_error", level=logging.WARNING, peer=peer_text, error=str(exc))
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            if self._deadlines.expired(task):
                task.uncancel()
                event("milter_timeout", level=logging.INFO, peer=peer_text,
                      seconds=self.settings.timeout)
            else:
                event("milter_closed", peer=peer_text, reason="shutdown")
        except Exception:
            event("milter_internal_error", level=logging.ERROR, exc_info=True, peer=peer_text)
        finally:
            connection.transport.close()
            with contextlib.suppress(Exception):
                await session.finish()
            self._connections.discard(task)

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, give open connections ``grace`` seconds, then close them."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.limits.shutdown_grace if grace is None else grace
        event("shutdown", connections=len(self._connections), grace=grace)
        if self._server is not None:
            self._server.close()
        if self._connections:
            connections = set(self._connections)
            everyone = asyncio.ensure_future(asyncio.wait(connections))
            hurried = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({everyone, hurried}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (everyone, hurried):
                waiter.cancel()
            pending = {task for task in connections if not task.done()}
            for task in pending:
                task.cancel()  # the MTA applies its milter_default_action to these
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
        if self.listen.path:
            remove_socket(self.listen.path)
        if self.health is not None:
            await self.health.close()
        await self.chain.notify("shutdown")
        if self.policy.history is not None:
            await self.policy.history.close()
        if self.store is not None:
            await self.store.close()
        await self.tables.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Start, run until SIGTERM or SIGINT, then stop gracefully.

        The handlers are in place before the listener opens and stay during the drain, as in
        the proxy: a signal's default action would kill the process with MTA connections
        open. SIGHUP (``systemctl reload``, logrotate) is logged and ignored: the milter
        does not reload (restart it to change its configuration). A second SIGTERM or SIGINT
        during the drain ends the grace period.
        """
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, _ignore_reload)
        try:
            await self.start()
            ready()  # systemd (Type=notify): the MTA's milter socket is open
            await stop_requested.wait()
            notify("STOPPING=1")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.hurry, sig)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def hurry(self, signum: int = signal.SIGTERM) -> None:
        """A second SIGTERM/SIGINT during the drain: close the remaining connections now."""
        event("shutdown_hurried", level=logging.WARNING, signal=signal.Signals(signum).name,
              note="grace period ends now")
        self._hurry.set()


class _Deadlines:
    """``milter.timeout`` for the reads of every connection, kept by one timer for all of
    them instead of a timer per read (issue 31's profile: ~6 % of the milter's CPU went to
    ``asyncio.timeout``): a read notes its task's deadline, and a check every
    ``timeout / 4`` (at most every second) cancels the reads past theirs, so a peer that
    stalls is dropped within a quarter of the timeout after it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4)
        self._waiting: dict[asyncio.Task[None], float] = {}
        self._expired: set[asyncio.Task[None]] = set()
        self._check_handle: asyncio.TimerHandle | None = None

    def wait(self, task: asyncio.Task[None]) -> None:
        """*task* starts waiting for the MTA's next packet."""
        loop = task.get_loop()
        self._waiting[task] = loop.time() + self.timeout
        if self._check_handle is None:
            self._check_handle = loop.call_later(self.interval, self._check, loop)

    def done(self, task: asyncio.Task[None]) -> None:
        """The packet came (or the read ended otherwise)."""
        self._waiting.pop(task, None)

    def expired(self, task: asyncio.Task[None]) -> bool:
        """Whether *task* was cancelled for its deadline (once: the answer is forgotten)."""
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._waiting.items()):
            if deadline <= now:
                del self._waiting[task]
                self._expired.add(task)
                task.cancel()
        self._check_handle = (loop.call_later(self.interval, self._check, loop)
                              if self._waiting else None)


_READ_AHEAD = 1 << 18
"""Reading pauses while this much has arrived that the session has not taken yet (four of
Postfix's 64 KiB body chunks): an MTA that writes faster than the plugins work waits in
its socket, not in our memory."""


class _Connection(asyncio.Protocol):
    """One MTA connection's bytes, cut into packets as they arrive, for its task
    (:meth:`MilterServer._serve`).

    A protocol rather than asyncio's streams: a read hands the task every packet that is
    whole (the MTA writes connect to RCPT, or the headers to the end of the message, in
    one go) through one future, with no stream buffer and no read call per wait in
    between (issue 31: the milter's CPU per message is mostly Python calls).
    """

    def __init__(self, server: MilterServer) -> None:
        self._server = server
        self._decoder = codec.FrameDecoder(server.settings.max_packet_size)
        self._packets: list[tuple[bytes, bytes]] = []
        self._queued = 0  # bytes received that the task has not taken (whole packets or not)
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        self._ended = False  # end of stream or connection lost
        self._lost = False
        self._error: MilterProtocolError | None = None
        self._reading_paused = False
        self.transport: asyncio.Transport

    # -- the transport's side --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._server._serve(self))

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            packets = self._decoder.feed(data)
        except MilterProtocolError as exc:
            self._error = exc
            self._wake()
            return
        self._queued += len(data)
        if packets:
            self._packets += packets
            self._wake()
        if self._queued > _READ_AHEAD and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return True  # our side stays open for the answers still due; the task closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = self._lost = True
        self._wake()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the task's side ------------------------------------------------------------------

    async def packets(self) -> list[tuple[bytes, bytes]] | None:
        """The whole packets that have arrived (at least one; waits for them); None at a
        clean end of stream between packets. Raises for a malformed stream (a bad length,
        a packet cut short by the end of the connection)."""
        while not self._packets:
            if self._error is not None:
                raise self._error
            if self._ended:
                if self._decoder.pending:
                    raise MilterProtocolError(
                        f"truncated packet: the connection closed after {self._decoder.pending} bytes of it")
                return None
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        packets, self._packets, self._queued = self._packets, [], self._decoder.pending
        return packets

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark; raise once the
        connection is gone (as ``StreamWriter.drain`` does)."""
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if self._drained is not None:
            await self._drained
            if self._lost:
                raise ConnectionResetError("Connection lost")


class _Replies:
    """The responses to one MTA packet, written together once it is handled.

    An end of message can answer with several packets (header edits, then the verdict):
    one write puts them in one segment instead of one system call (and, on TCP, one
    segment) each. SMFIR_PROGRESS is the exception: it must reach the MTA while the
    plugins still work, so it goes out at once, with anything before it.
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.pending: list[bytes] = []
        """Responses waiting for :meth:`flush` (most packets of a message get none)."""

    async def send(self, response: codec.Response) -> None:
        self.pending.append(codec.encode_response(response))
        if isinstance(response, codec.Progress):
            await self.flush()

    def progress(self) -> None:
        """SMFIR_PROGRESS now, after anything pending (a timer's call while plugins work);
        nothing once the MTA went away (the connection's task finds that out at its next
        read or write, and a timer has nobody to tell)."""
        if self._connection.transport.is_closing():
            return
        self.pending.append(_PROGRESS)
        data = b"".join(self.pending)
        self.pending.clear()
        self._connection.write(data)

    async def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending.clear()
            self._connection.write(data)
            await self._connection.drain()


_PROGRESS = codec.encode_response(codec.Progress())

# Commands we ask the MTA not to send (SMFIP_NO*), by the code their macros name.
_NOT_SENT = {"T": codec.SMFIP_NODATA, "U": codec.SMFIP_NOUNKNOWN}


def _nothing_follows(macro: codec.Macro, negotiated: codec.OptNeg | None) -> bool:
    """Whether these macros are for a command the MTA will not send (we negotiated it away):
    then nothing follows them in the same write, and the MTA's next write comes later,
    from its next step. Other macros arrive with their command, which we answer."""
    step = _NOT_SENT.get(macro.for_command)
    return step is not None and negotiated is not None and bool(negotiated.protocol & step)


class _AckNow:
    """Acknowledge macros that get no reply and no command at once (Linux TCP_QUICKACK), so
    that the MTA's next packet is not held back for our delayed ACK.

    Postfix's smtpd writes the DATA-stage macros (SMFIC_MACRO, no reply) and returns; its
    cleanup server then writes the headers on the same socket. Postfix leaves Nagle's
    algorithm on for milter sockets, so that second write waits until the first is
    acknowledged, and the receiver delays that ACK (40 ms on Linux) hoping to piggyback
    it on a reply that never comes: ~40 ms per message on ``inet:`` (docs/deploy-milter.md).
    A Unix socket has neither; there, and where the option does not exist, this does nothing.
    """

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.BaseTransport | None = transport
        self._sock: socket.socket | None = None

    def now(self) -> None:
        if self._transport is not None:  # the socket looked up at the first use, not per connection
            sock = self._transport.get_extra_info("socket")
            self._transport = None
            tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
            self._sock = sock if tcp else None
        if self._sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _sender_login(config: Config, tables: Tables) -> SenderLoginPolicy | None:
    """The sender_login map (read once: the milter does not reload)."""
    section = config.sender_login
    if section is None:
        return None
    return SenderLoginPolicy.from_section(section, tables)


def _ignore_reload() -> None:
    event("signal_ignored", level=logging.WARNING, signal="SIGHUP",
          note="the milter does not reload; restart it to apply a new configuration")


