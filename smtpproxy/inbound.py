"""The inbound SMTP server: aiosmtpd's protocol, hardened, driving the plugin chain.

We subclass :class:`aiosmtpd.smtp.SMTP` (set up per connection by
:mod:`smtpproxy.smtpbase`) and keep what it does well (transport and STARTTLS plumbing,
including discarding plaintext pipelined behind STARTTLS, and the idle timer). We replace
the parts a filtering proxy cannot live with:

- the command loop, so a bare LF never ends a command line, the ``connect`` hook runs
  before the greeting, a client that talks before the greeting is refused, and every
  session has caps on commands, errors and total lifetime;
- EHLO, MAIL, RCPT and DATA, so addresses are validated strictly and forwarded exactly,
  every reply carries an enhanced status code, and DATA is read by
  :class:`~smtpproxy.datareader.DataReader` (no smuggling) with the limits enforced;
- timeouts answer ``421`` before closing instead of dropping the connection silently, and
  the client's timers (idle, DATA) run only while the proxy waits for the client: while it
  waits on plugins or the upstream, their own timeouts bound the wait, so a slow upstream
  never turns into a 421 for a message the upstream then accepts (a duplicate on retry).

The state machine in order: connect → greeting → HELO/EHLO → (MAIL → RCPT+ → DATA)* →
QUIT. Every verdict a plugin returns is translated into a reply here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from typing import cast

from aiosmtpd.smtp import TLSSetupException

from smtpproxy import dsn
from smtpproxy.addresses import AddressError, parse_mail_from, parse_rcpt_to
from smtpproxy.conversation import Conversation, Rules
from smtpproxy.datareader import DataReader, read_data
from smtpproxy.delivery import Delivered
from smtpproxy.delivery.handover import Handover
from smtpproxy.disposal import carry_out
from smtpproxy.eventlog import current_session, event
from smtpproxy.listener import ListenerPolicy, Services
from smtpproxy.message import Message, received_message
from smtpproxy.proxyprotocol import read_proxy_header
from smtpproxy.replywire import BYE, OK, RECIPIENT_OK, SENDER_OK, START_DATA, ehlo_reply, greeting, wire
from smtpproxy.sasl import authenticate
from smtpproxy.session import Client, Recipient, Session, TLSInfo, Transaction
from smtpproxy.smtpbase import CommandServer
from smtpproxy.verdicts import Reply

__all__ = ["InboundSMTP", "ListenerPolicy", "Services"]  # the last two from smtpproxy.listener


# aiosmtpd replies we do not override, given the enhanced status codes we advertise.
_ENHANCED_REPLIES = {
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}
_ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET"})
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})
# RFC 5321 4.5.3.1.4 allows extensions to lengthen MAIL and RCPT lines.
_PARAM_ALLOWANCE = 512
_CONTROL_OCTET = re.compile(rb"[\x00-\x1f\x7f]")


class InboundSMTP(CommandServer):
    """One client connection."""

    def __init__(
        self,
        services: Services,
        policy: ListenerPolicy,
        tls_context: ssl.SSLContext | None = None,
    ):
        self.services = services
        self.chain = services.chain  # replaced by a lease when the session starts
        self.policy = policy
        # The stream buffer must hold the longest line we accept, plus CRLF.
        self.line_length_limit = max(
            policy.max_line_length + 3, policy.max_command_line + _PARAM_ALLOWANCE + 2
        )
        self._set_up_smtp(
            banner=policy.banner, hostname=policy.hostname, data_size_limit=policy.max_message_size,
            smtputf8=policy.smtputf8, tls_context=tls_context, require_starttls=policy.require_starttls,
            idle_timeout=policy.idle_timeout, loop=asyncio.get_running_loop(),
        )
        self.plugin_session: Session | None = None
        """The session plugins see (smtpproxy's model), beside aiosmtpd's own ``self.session``."""
        self._errors = 0
        self._commands = 0
        self._busy = False
        self._closing = False
        self.conversation: Conversation
        """Made when the session starts (:meth:`_handle_client`), on the chain it leases."""
        self._handover: Handover | None = None  # the current transaction's, from its first RCPT
        self._held_replies: list[bytes] = []  # answers to pipelined commands, sent together
        self._deadline = 0.0  # loop time at which the idle/DATA timer fires (see _reset_timeout)
        self._timer_paused = False  # the proxy is working, not waiting for the client
        self._reading_message = False  # between 354 and the end of data (see data_received)
        self._dsn = False  # DSN was offered in the last EHLO
        self._8bitmime = True  # 8BITMIME was offered in the last EHLO
        self._smtputf8 = self.enable_SMTPUTF8  # SMTPUTF8 was offered in the last EHLO
        self._size_limit = policy.max_message_size  # the SIZE announced in the last EHLO
        self.delivering: asyncio.Event | None = None
        """Set while a message is with the delivery backend; shutdown waits for its reply."""
        self.counted = False
        """The session caps already counted this connection (implicit TLS: before the handshake)."""
        self._expired = False  # the session's time limit passed (see _handle_client)
        self._ends = 0  # see _unlink

    def _conversation(self) -> Conversation:
        """The conversation on this session's chain, with the rules in force now."""
        services, policy = self.services, self.policy
        rules = Rules(max_recipients=policy.max_recipients, relay=services.relay,
                      route_key=services.delivery.route_key, sender_login=policy.sender_login)
        return Conversation(self.chain, rules, metrics=services.metrics, history=services.history,
                            node=services.node)

    # -- connection lifecycle -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls_done = self._original_transport is not None
        super().connection_made(transport)
        # Used once, by the call above (it is a bound method: a reference cycle, see _unlink).
        self._client_connected_cb = None
        if starttls_done and self.plugin_session is not None:
            # RFC 3207 4.2: forget everything learned before TLS.
            self.plugin_session.helo = None
            self.plugin_session.esmtp = False
            self._end_transaction()
            tls = self.plugin_session.tls = _tls_info(transport)
            if tls is not None:
                event("starttls", version=tls.version, cipher=tls.cipher)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the idle (or DATA) deadline back.

        Called for every command and every DATA line, so it only moves a number; one timer
        per session re-arms itself when it finds the deadline moved. aiosmtpd cancels and
        schedules a new timer each time, which cost about a tenth of the CPU under load.
        """
        self._timer_paused = False
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._deadline_reached)

    def data_received(self, data: bytes) -> None:
        if self._reading_message:
            # The DATA timer runs from the last octets received, as Postfix's smtpd_timeout
            # does, not from the last block smtp_DATA took: a slow link is not a silent client.
            self._reset_timeout(self.policy.data_timeout)
        self._reader.feed_data(data)  # what StreamReaderProtocol.data_received does, a call less

    def _pause_timeout(self) -> None:
        """Stop the client's clock: the proxy itself is busy (plugins, upstream).

        Those waits have their own bounds (plugin and delivery timeouts, session_timeout);
        the next ``_reset_timeout`` (waiting for the client again) restarts the clock. The
        timer itself stays armed (cancelling it here made every command create a new one):
        if it fires while the clock is stopped, it does nothing.
        """
        self._timer_paused = True

    def _deadline_reached(self) -> None:
        if self._timer_paused:
            # Not waiting for the client: no timeout. The handle has run; cancelled, it tells
            # _reset_timeout to arm a new one (aiosmtpd's connection_lost expects a handle).
            assert self._timeout_handle is not None
            self._timeout_handle.cancel()
            return
        if self._deadline > self.loop.time():
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        """Idle or DATA timeout: say so with 421 before closing (aiosmtpd closes silently)."""
        self._flush_replies()
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(
                f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode("ascii")
            )
            event("timeout", level=logging.INFO)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def request_close(self) -> None:
        """Graceful shutdown: idle sessions get 421 now, busy ones after their command."""
        self._closing = True
        if not self._busy and self.transport is not None and not self.transport.is_closing():
            self._flush_replies()
            self._writer.write(b"421 4.3.2 Service shutting down, try again later\r\n")
            self.transport.close()

    def force_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush_replies()
            self._writer.write(b"421 4.3.2 Service shutting down, try again later\r\n")
            self.transport.close()

    async def push(self, status: str) -> None:  # type: ignore[override]  # we only push str
        """aiosmtpd's own replies (STARTTLS), given enhanced status codes."""
        self._flush_replies()
        await super().push(_ENHANCED_REPLIES.get(status, status))

    async def reply(self, reply: Reply) -> None:
        """Send a reply; with more pipelined commands waiting, hold it to send with theirs.

        RFC 2920 lets a server answer a pipelined group together: one write instead of one
        per command (each write is a system call). A reply is only held while a complete
        command line is already buffered, so the next one is processed at once.
        """
        data = wire(reply, "utf-8" if self.enable_SMTPUTF8 else "ascii")
        if b"\n" in getattr(self._reader, "_buffer", b""):
            self._held_replies.append(data)
            return
        transport = cast("asyncio.WriteTransport | None", self.transport)
        if self._held_replies:
            self._held_replies.append(data)
            self._flush_replies()
        elif transport is not None and not transport.is_closing():
            transport.write(data)  # the usual case: one reply, nothing held (as StreamWriter.write)
        if transport is not None and not transport.get_write_buffer_size():
            return  # the kernel took it all: drain() would find nothing to wait for
        if self._timer_paused:
            # A client that does not read its replies is a client we wait for.
            self._reset_timeout()
            await self._writer.drain()
            self._pause_timeout()
        else:
            await self._writer.drain()

    def _flush_replies(self) -> None:
        if self._held_replies:
            data = b"".join(self._held_replies)
            self._held_replies.clear()
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(data)

    async def _error(self, reply: Reply) -> None:
        """Reply to a protocol error and count it; too many close the session."""
        self._errors += 1
        await self.reply(reply)
        if self._errors >= self.policy.max_errors:
            await self.reply(Reply(421, "4.7.0", "Too many errors, closing connection"))
            event("too_many_errors", errors=self._errors)
            self._close()

    def _end_transaction(self) -> None:
        """Forget the current transaction; an upstream one that followed it is aborted."""
        if self.plugin_session is not None:
            self.conversation.end_transaction(self.plugin_session)
        handover, self._handover = self._handover, None
        abort = handover.abort() if handover is not None else None
        if abort is not None:
            task = asyncio.get_running_loop().create_task(abort)
            self.services.background.add(task)
            task.add_done_callback(self.services.background.discard)

    def _close(self) -> None:
        self._flush_replies()
        if self.transport is not None:
            self.transport.close()

    # -- the command loop -----------------------------------------------------

    async def _handle_client(self) -> None:
        peer = self._transport_peer()
        local = self.transport.get_extra_info("sockname") if self.transport else None
        self.plugin_session = Session(
            Client(peer[0], peer[1]),
            local_ip=local[0] if local else "",
            local_port=local[1] if local else 0,
        )
        current_session.set(self.plugin_session.id)
        self.plugin_session.tls = _tls_info(self.transport)  # implicit TLS: encrypted from the start
        if self.plugin_session.tls is not None:
            tls = self.plugin_session.tls
            event("implicit_tls", version=tls.version, cipher=tls.cipher)
        if self.policy.proxy_protocol is not None:
            # Before the limiter, so the per-IP cap counts the real client.
            real = await read_proxy_header(
                self._reader, self.plugin_session.client, self.policy.proxy_protocol
            )
            if real is None:
                self._close()
                self._unlink()  # the session ends here (see _unlink)
                return
            self.plugin_session.client = real
        services = self.services
        refusal = None if self.counted else services.limiter.acquire(self.plugin_session.client.ip)
        if refusal is not None:
            services.metrics.connection_refused(
                "max_sessions" if services.limiter.active >= services.limiter.max_sessions
                else "max_sessions_per_ip"
            )
            event("connect_refused", client=self.plugin_session.client.ip, reply=refusal.code,
                  reason=refusal.text)
            await self.reply(refusal)
            self._close()
            self._unlink()
            return
        if services.stopping:
            # Still in PROXY/TLS set-up when shutdown began: not counted by the drain, so no banner.
            services.metrics.connection_refused("shutting_down")
            await self.reply(Reply(421, "4.3.2", "Service shutting down, try again later"))
            services.limiter.release(self.plugin_session.client.ip)
            self._close()
            self._unlink()
            return
        services.sessions.add(self)
        services.drained.clear()
        # The chain is fixed for the whole session: a reload affects new sessions only.
        self.chain = services.leases.acquire(services.chain)
        self.conversation = self._conversation()
        self._pause_timeout()  # the connect hook runs on the proxy's time, not the client's
        services.metrics.session_started()
        event("connect", client=self.plugin_session.client.ip, port=self.plugin_session.client.port,
              listener=f"{self.plugin_session.local_ip}:{self.plugin_session.local_port}")
        # The session's time limit, as asyncio.timeout() keeps it (cancel the task, then tell
        # that cancellation from any other by uncancel()), with one timer and no Timeout.
        expiry = self.loop.call_later(self.policy.session_timeout, self._session_expired)
        try:
            try:
                await self._converse()
            except asyncio.CancelledError:
                # (No local for the task: the frame, kept by the cancellation's traceback,
                # would keep the task that keeps the cancellation, a cycle.)
                if not (self._expired and self._handler_coroutine is not None
                        and self._handler_coroutine.uncancel() == 0):
                    raise
                raise TimeoutError from None
        except TimeoutError:
            event("session_timeout", seconds=self.policy.session_timeout)
            with contextlib.suppress(Exception):
                await self.reply(Reply(421, "4.4.2", "Session time limit exceeded"))
            self._close()
        finally:
            expiry.cancel()
            self._end_transaction()
            services.delivery.end_session(self.plugin_session)
            services.limiter.release(self.plugin_session.client.ip)
            services.sessions.discard(self)
            if not services.sessions:
                services.drained.set()
            self._close()
            if self.conversation.pending or self.chain.implements("disconnect"):
                task = asyncio.get_running_loop().create_task(self._finish_session())
                services.background.add(task)
                task.add_done_callback(services.background.discard)
            else:  # nothing to wait for and no disconnect hook: no task needed
                self._session_finished()

    def _session_expired(self) -> None:
        self._expired = True
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _transport_peer(self) -> tuple[str, int]:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if not peer:
            return ("unknown", 0)
        return (str(peer[0]), int(peer[1]))

    async def _finish_session(self) -> None:
        """Runs after the connection is gone: pending notifications, then ``disconnect``."""
        assert self.plugin_session is not None
        current_session.set(self.plugin_session.id)
        try:
            await self.conversation.disconnect(self.plugin_session)
        finally:
            self._release_session()
        self._log_disconnect()

    def _session_finished(self) -> None:
        """``_finish_session`` without a task: nothing pending, no ``disconnect`` hook."""
        self._release_session()
        self._log_disconnect()

    def _release_session(self) -> None:
        assert self.plugin_session is not None
        try:
            self.services.metrics.outcomes(self.plugin_session.results)
        finally:
            self.services.leases.release(self.chain)

    def _log_disconnect(self) -> None:
        assert self.plugin_session is not None
        event("disconnect", transactions=self.plugin_session.transaction_count,
              seconds=round(time.time() - self.plugin_session.started, 3), errors=self._errors)
        self._unlink()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._unlink()

    def _unlink(self) -> None:
        """At the second of the session's two ends (its work done, its connection lost), drop
        what refers back to this protocol: the StreamWriter, and the session's task (which
        keeps the exception that ended it, a client's drop or a cancellation, with its frames).
        Without these cycles the session's objects (about 35) are freed as their last
        reference goes, not left for the cyclic garbage collector, whose passes over a
        hundred live sessions cost more than the sessions' own work."""
        self._ends += 1
        if self._ends == 2:
            self._writer = None  # type: ignore[assignment]
            self._handler_coroutine = None

    def _buffered(self) -> int:
        """Bytes the client sent that we have not read yet (to catch improper pipelining)."""
        return len(getattr(self._reader, "_buffer", b""))

    async def _converse(self) -> None:
        assert self.plugin_session is not None
        refusal = await self.conversation.connect(self.plugin_session)
        if refusal is not None:
            await self.reply(refusal.reply)
            self._close()
            return
        if self._buffered():
            event("pregreet", bytes=self._buffered())
            await self.reply(
                Reply(554, "5.5.0", "SMTP protocol error: client spoke before the greeting")
            )
            self._close()
            return
        await self.reply(greeting(self.hostname, self.__ident__))

        policy = self.policy
        session = self.plugin_session
        functions = self._smtp_methods.functions
        while (transport := self.transport) is not None and not transport.is_closing():
            self._reset_timeout()  # waiting for the client from here
            # _read_command_line() inline (one coroutine less per command): a line that is
            # not a clean command goes to it to be answered.
            try:
                line: bytes = await self._reader.readuntil(b"\n")
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
                await self._refuse_line(exc)
                continue
            if len(line) < 3 or line[-2] != 0x0D or _CONTROL_OCTET.search(line, 0, len(line) - 2):
                await self._refuse_line(line)
                continue
            line = line[:-2]
            self._commands += 1
            if self._commands > policy.max_commands:
                await self.reply(Reply(421, "4.7.0", "Too many commands, closing connection"))
                self._close()
                return
            verb, _, arg_bytes = line.partition(b" ")
            try:
                command = verb.upper().decode("ascii")
            except UnicodeDecodeError:
                await self._error(Reply(500, "5.5.2", "Syntax error, command unrecognized"))
                continue
            arg = self._decode_argument(arg_bytes.strip())
            if arg is None:
                await self._error(Reply(500, "5.5.2", "Non-ASCII characters in command; use SMTPUTF8"))
                continue
            limit = policy.max_command_line
            if command in ("MAIL", "RCPT") and session.esmtp:
                limit += _PARAM_ALLOWANCE
            if len(line) + 2 > limit:
                await self._error(Reply(500, "5.5.2", f"Command line too long (limit {limit} octets)"))
                continue
            if not self._tls_handshake_okay and command != "QUIT":
                await self.push("554 Command refused due to lack of security")
                continue
            if (self.require_starttls and not self._tls_protocol
                    and command not in _ALLOWED_BEFORE_STARTTLS):
                await self.push("530 Must issue a STARTTLS command first")
                continue
            function = functions.get(command)
            if function is None:
                await self._error(Reply(500, "5.5.1", f"Command unrecognized: {command[:20]}"))
                continue
            self._timer_paused = True  # _pause_timeout(): the proxy's own waits have their own bounds
            self._busy = True
            try:
                await function(self, arg or None)
            except TLSSetupException:
                event("tls_failed")
                self._close()
                return
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                event("internal_error", level=logging.ERROR, exc_info=True, command=command)
                await self.reply(Reply(451, "4.3.0", "Internal error, try again later"))
                if session.transaction is not None:
                    self._end_transaction()
            finally:
                self._busy = False
            if self._closing:
                await self.reply(Reply(421, "4.3.2", "Service shutting down, try again later"))
                self._close()
                return

    async def _read_command_line(self) -> bytes | None:
        """One command line without its CRLF, or None after answering a bad line."""
        try:
            line: bytes = await self._reader.readuntil(b"\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            await self._refuse_line(exc)
            return None
        if len(line) < 3 or line[-2] != 0x0D or _CONTROL_OCTET.search(line, 0, len(line) - 2):
            await self._refuse_line(line)
            return None
        return line[:-2]

    async def _refuse_line(
        self, line: bytes | asyncio.LimitOverrunError | asyncio.IncompleteReadError
    ) -> None:
        """Answer (or end the session on) what came instead of a clean command line: a line
        over the limit, the end of the stream, a bare LF, a control character, nothing."""
        if isinstance(line, asyncio.LimitOverrunError):
            await self._discard_long_line(line.consumed)
            await self._error(Reply(500, "5.5.2", "Command line too long"))
        elif isinstance(line, asyncio.IncompleteReadError):
            self._close()
        elif not line.endswith(b"\r\n"):
            await self._error(Reply(500, "5.5.2", "Bare LF in command; SMTP lines end with CRLF"))
        elif _CONTROL_OCTET.search(line[:-2]):
            await self._error(Reply(500, "5.5.2", "Control character in command"))
        else:
            await self._error(Reply(500, "5.5.2", "Empty command"))

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

    def _decode_argument(self, arg: bytes) -> str | None:
        if self.enable_SMTPUTF8:
            return arg.decode("utf-8", "surrogateescape")
        try:
            return arg.decode("ascii")
        except UnicodeDecodeError:
            return None

    # -- commands ----------------------------------------------------------------

    async def _need_helo(self) -> bool:
        assert self.plugin_session is not None
        if not self.plugin_session.helo:
            await self._error(Reply(503, "5.5.1", "Send HELO/EHLO first"))
            return True
        return False

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._greet(arg, esmtp=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._greet(arg, esmtp=True)

    async def _greet(self, hostname: str | None, *, esmtp: bool) -> None:
        assert self.plugin_session is not None
        verb = "EHLO" if esmtp else "HELO"
        if not hostname:
            await self._error(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        self._end_transaction()
        refusal = await self.conversation.greet(self.plugin_session, hostname, verb=verb)
        if refusal is not None:
            await self.reply(refusal.reply)
            return
        self.plugin_session.esmtp = esmtp
        if not esmtp:
            await self.reply(Reply(250, None, self.hostname))
            return
        lines = [self.hostname]
        if self.policy.pipelining:
            lines.append("PIPELINING")
        # Only what every upstream route offers: the route is not known before RCPT.
        delivery = self.services.delivery
        backend_size = delivery.size_limit()
        self._size_limit = min(self.policy.max_message_size, backend_size or self.policy.max_message_size)
        lines.append(f"SIZE {self._size_limit}")
        self._8bitmime = delivery.offers_8bitmime()
        if self._8bitmime:
            lines.append("8BITMIME")
        self._smtputf8 = self.enable_SMTPUTF8 and delivery.offers_smtputf8()
        if self._smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        self._dsn = delivery.offers_dsn()
        if self._dsn:
            lines.append("DSN")
        if self.tls_context and self.plugin_session.tls is None:
            lines.append("STARTTLS")
        if self.policy.auth is not None and self.plugin_session.tls is not None:
            lines.append("AUTH PLAIN LOGIN")
        await self.reply(ehlo_reply(tuple(lines)))

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.plugin_session is not None
        if await self._need_helo():
            return
        if self.policy.auth_required and self.plugin_session.auth_user is None:
            await self._error(Reply(530, "5.7.0", "Authentication required"))
            return
        if self.plugin_session.transaction is not None:
            await self._error(Reply(503, "5.5.1", "Nested MAIL command"))
            return
        try:
            path = parse_mail_from(arg or "", smtputf8_enabled=self.enable_SMTPUTF8)
        except AddressError as exc:
            await self._error(Reply(exc.code, exc.enhanced, exc.text))
            return
        params = path.params
        if params and not self.plugin_session.esmtp:
            await self._error(Reply(501, "5.5.4", "MAIL parameters need EHLO"))
            return
        unknown = sorted(set(params) - _MAIL_PARAMS - (dsn.MAIL_PARAMS if self._dsn else set()))
        if "SMTPUTF8" in params and not self._smtputf8:
            unknown.append("SMTPUTF8")
        if (params.get("BODY") or "").upper() == "8BITMIME" and not self._8bitmime:
            unknown.append("BODY=8BITMIME")  # not offered in the last EHLO (RFC 6152)
        if unknown:
            await self._error(Reply(555, "5.5.4", f"MAIL parameter {unknown[0]} not supported"))
            return
        problem = dsn.check_mail_params(params)
        if problem is not None:
            await self._error(Reply(501, "5.5.4", f"Syntax error in MAIL parameters: {problem}"))
            return
        size = params.get("SIZE")
        if size is not None and int(size) > self._size_limit:
            await self.reply(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return
        refusal = await self.conversation.mail(self.plugin_session, path.address, params)
        if refusal is not None:
            self._end_transaction()
            await self.reply(refusal.reply)
            return
        await self.reply(SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.plugin_session is not None
        if await self._need_helo():
            return
        transaction = self.plugin_session.transaction
        if transaction is None:
            await self._error(Reply(503, "5.5.1", "Need MAIL command first"))
            return
        full = self.conversation.recipient_limit(transaction)
        if full is not None:  # before the syntax: whatever the client sends, it gets no further
            await self.reply(full.reply)
            return
        try:
            path = parse_rcpt_to(
                arg or "", smtputf8_enabled=self.enable_SMTPUTF8 and transaction.envelope.smtputf8
            )
        except AddressError as exc:
            await self._error(Reply(exc.code, exc.enhanced, exc.text))
            return
        unknown = [k for k in path.params if not (self._dsn and k in dsn.RCPT_PARAMS)]
        if unknown:
            await self._error(Reply(555, "5.5.4", f"RCPT parameter {unknown[0]} not supported"))
            return
        problem = dsn.check_rcpt_params(path.params)
        if problem is not None:
            await self._error(Reply(501, "5.5.4", f"Syntax error in RCPT parameters: {problem}"))
            return
        address = path.address
        recipient = Recipient(address, dict(path.params))
        refusal = await self.conversation.rcpt(self.plugin_session, transaction, recipient)
        if refusal is not None:
            await self.reply(refusal.reply)
            return
        if self._handover is None:
            self._handover = Handover(self.services.delivery, self.plugin_session, transaction,
                                      self.services.metrics)
        # A message already to be discarded or quarantined does not go upstream as it is.
        reply = await self._handover.rcpt(recipient, ask_upstream=transaction.disposition is None)
        if reply is not None and not reply.is_positive:
            await self.reply(reply)
            return
        self.conversation.accept(transaction, recipient)
        await self.reply(reply or RECIPIENT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.plugin_session is not None
        if await self._need_helo():
            return
        transaction = self.plugin_session.transaction
        if transaction is None:
            await self._error(Reply(503, "5.5.1", "Need MAIL command first"))
            return
        if not transaction.envelope.recipients:
            await self._error(Reply(554, "5.5.1", "No valid recipients"))
            return
        if arg:
            await self._error(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if self._buffered():
            # RFC 2920 3.1: the client must wait for 354. Data already here would be read
            # as message content by us and as commands by anyone who waited: refuse.
            event("improper_pipelining", tx=transaction.id, bytes=self._buffered())
            await self.reply(Reply(554, "5.5.0", "Improper pipelining: message data sent before 354"))
            self._close()
            return
        await self.reply(START_DATA)
        reader = DataReader(
            self.policy.max_message_size, self.policy.max_line_length,
            normalize_bare_newlines=self.policy.normalize_bare_newlines,
            spool_threshold=self.policy.spool_threshold, spool_dir=self.policy.spool_directory,
        )
        started = time.perf_counter()
        self._reading_message = True
        try:
            complete = await read_data(self._reader, reader,
                                       lambda: self._reset_timeout(self.policy.data_timeout))
        finally:
            self._reading_message = False
        if not complete:
            self._close()
            return
        self._pause_timeout()
        if reader.problem is not None:
            reply = reader.problem.reply(self.policy.max_message_size, self.policy.max_line_length)
            event("data_refused", tx=transaction.id, problem=reader.problem.value,
                  bytes=reader.size, reply=reply.code)
            self._end_transaction()
            await self._error(reply)
            return
        if reader.bare_newlines_seen:
            event("bare_newlines_normalized", tx=transaction.id, lines=reader.bare_newlines_seen)
        transaction.message = received_message(reader.content())
        refusal = await self.conversation.headers_refusal(self.plugin_session, transaction)
        if refusal is not None:
            self._end_transaction()
            await self.reply(refusal.reply)
            return
        try:
            await self._finish_message(transaction, started)
        finally:
            self._end_transaction()

    async def _finish_message(self, transaction: Transaction, started: float) -> None:
        """Run the data chain, then deliver, quarantine, discard or refuse; reply last."""
        session = self.plugin_session
        assert session is not None and transaction.message is not None
        outcome = await self.conversation.end_of_message(session, transaction)
        message = transaction.message
        services = self.services
        decision, quarantine_id = await carry_out(
            session, transaction, outcome, deliver=lambda: self._deliver(transaction, message),
            quarantine=services.quarantine, metrics=services.metrics, backend=services.delivery.name,
        )
        await self.reply(decision.reply)
        if decision.reply.is_positive:
            self._commands = 0  # the command cap is for junk, not for productive sessions
        await self.conversation.settle(session, transaction, decision, started, quarantine_id,
                                       client=session.client.ip, helo=session.helo)

    async def _deliver(self, transaction: Transaction, content: Message) -> Delivered:
        """Hand the message over (:class:`~smtpproxy.delivery.handover.Handover`); shutdown
        waits for the answer."""
        assert self.plugin_session is not None
        handover, self._handover = self._handover, None
        if handover is None:
            handover = Handover(self.services.delivery, self.plugin_session, transaction,
                                self.services.metrics)
        done = self.delivering = asyncio.Event()
        try:
            return await handover.deliver(content)
        finally:
            self.delivering = None
            done.set()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """RFC 3207: once the session is encrypted (STARTTLS or implicit TLS), no second TLS.

        aiosmtpd would answer 220 and layer a new TLS session on the encrypted one, which
        fails with an internal error; Postfix says "554 5.5.1 Error: TLS already active".
        """
        assert self.plugin_session is not None
        if self.plugin_session.tls is not None:
            await self._error(Reply(503, "5.5.1", "TLS already active"))
            return
        await super().smtp_STARTTLS(arg or "")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self._error(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        if self.plugin_session is not None:
            self._end_transaction()
        await self.reply(OK)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self._error(Reply(501, "5.5.4", "Syntax: QUIT"))
            return
        await self.reply(BYE)
        self._close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(
            Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
        )

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(Reply(502, "5.5.1", "EXPN not available"))

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(
            Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
        )

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH, mechanisms PLAIN and LOGIN, only over TLS; failures count as errors."""
        assert self.plugin_session is not None
        users = self.policy.auth
        if users is None:
            await self._error(Reply(502, "5.5.1", "AUTH not available on this listener"))
            return
        if await self._need_helo():
            return
        if self.plugin_session.tls is None:
            await self._error(
                Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            )
            return
        if self.plugin_session.auth_user is not None:
            await self._error(Reply(503, "5.5.1", "Already authenticated"))
            return
        if self.plugin_session.transaction is not None:
            await self._error(Reply(503, "5.5.1", "AUTH not permitted during a mail transaction"))
            return
        found = await authenticate(
            _SaslWire(self), arg or "", users=users, throttle=self.services.login_throttle,
            client_ip=self.plugin_session.client.ip,
        )
        if found is None:
            return
        user, mechanism = found
        self.plugin_session.auth_user = user
        event("auth", mechanism=mechanism, user=user)
        await self.reply(Reply(235, "2.7.0", "Authentication successful"))


class _SaslWire:
    """The connection as the SASL exchange sees it (:class:`smtpproxy.sasl.SaslPeer`)."""

    __slots__ = ("_smtp",)

    def __init__(self, smtp: InboundSMTP) -> None:
        self._smtp = smtp

    async def write(self, data: bytes) -> None:
        smtp = self._smtp
        smtp._flush_replies()
        smtp._writer.write(data)
        await smtp._writer.drain()

    async def read_line(self) -> bytes | None:
        smtp = self._smtp
        smtp._reset_timeout()  # waiting for the client
        line = await smtp._read_command_line()
        smtp._pause_timeout()
        return line

    async def reply(self, reply: Reply) -> None:
        await self._smtp.reply(reply)

    async def error(self, reply: Reply) -> None:
        await self._smtp._error(reply)

    def close(self) -> None:
        self._smtp._close()


def _tls_info(transport: asyncio.BaseTransport | None) -> TLSInfo | None:
    """What TLS the transport speaks, or None for plaintext."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    name, _, bits = ssl_object.cipher() or ("", "", None)
    return TLSInfo(ssl_object.version() or "", name, bits)
