"""aiosmtpd's SMTP protocol, set up per connection for a server that answers every command itself.

:class:`~smtpproxy.inbound.InboundSMTP` keeps aiosmtpd's ``SMTP`` as its base (transport and
STARTTLS plumbing, the stream reader and writer) but uses none of its handler hooks, its
AUTH mechanisms, its call limits or its PROXY protocol support. aiosmtpd's ``__init__``
works those out again for every connection (``inspect.getmembers`` of the protocol and of
the handler, ``dir()`` of the handler, an info line listing AUTH mechanisms): half of a
connection's set-up. :meth:`CommandServer._set_up_smtp` sets the same attributes to the
values that ``__init__`` gives for these arguments, and nothing else
(tests/unit/test_dependency_internals.py compares the two, attribute by attribute).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, login_always_fail

__all__ = ["CommandServer", "Commands", "NoHandler"]


class NoHandler:
    """aiosmtpd wants an event handler; every decision is taken elsewhere (the chain)."""

    def __dir__(self) -> list[str]:
        return []  # no handle_* or auth_* hooks


_NO_HANDLER = NoHandler()

_COMMAND_FUNCTIONS: dict[type, dict[str, Callable[..., Any]]] = {}
"""Per class, each SMTP verb and the ``smtp_*`` function (of the class) that handles it."""


class Commands:
    """The session's command table, as aiosmtpd's ``_smtp_methods`` dict is used
    (``get(verb)``), without binding every ``smtp_*`` method of every new connection."""

    __slots__ = ("_owner", "functions")

    def __init__(self, owner: SMTP) -> None:
        cls = type(owner)
        functions = _COMMAND_FUNCTIONS.get(cls)
        if functions is None:
            functions = _COMMAND_FUNCTIONS[cls] = {
                n.removeprefix("smtp_"): getattr(cls, n)
                for n in object.__dir__(owner) if n.startswith("smtp_")
            }
        self._owner = weakref.ref(owner)  # the connection holds this table: no cycle
        self.functions = functions
        """Verb to function, to be called with the connection and the argument."""

    def get(self, verb: str) -> Callable[[str | None], Any] | None:
        function = self.functions.get(verb)
        return None if function is None else function.__get__(self._owner())


class CommandServer(SMTP):
    """aiosmtpd's ``SMTP``, set up by :meth:`_set_up_smtp` instead of its ``__init__``."""

    line_length_limit: int
    """The stream reader's limit: the longest line the subclass accepts, plus CRLF."""

    def _set_up_smtp(
        self, *, banner: str, hostname: str, data_size_limit: int, smtputf8: bool,
        tls_context: ssl.SSLContext | None, require_starttls: bool, idle_timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """What ``SMTP.__init__(NoHandler(), data_size_limit=..., enable_SMTPUTF8=smtputf8,
        hostname=..., ident=banner, tls_context=..., require_starttls=...,
        timeout=idle_timeout, loop=loop)`` sets up."""
        self.__ident__ = banner
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = _NO_HANDLER
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = smtputf8
        self._decode_data = False
        self.hostname = hostname or socket.getfqdn()
        self.tls_context = tls_context
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = idle_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods: Commands = Commands(self)  # type: ignore[assignment]
        self._enforce_call_limit = False

    def __dir__(self) -> list[str]:
        """Nothing: aiosmtpd's ``__init__`` (and anything else) would scan ``dir(self)`` to
        bind each ``smtp_*`` and ``auth_*`` method. The subclass answers every command from
        :class:`Commands` (``_smtp_methods``) and uses none of aiosmtpd's ``auth_*``."""
        return []
