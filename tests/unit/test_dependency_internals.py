"""The private members of our dependencies that smtpproxy relies on are still there.

``smtpproxy/inbound.py`` subclasses aiosmtpd's ``SMTP`` and uses some of its private
attributes and methods, and reads ``asyncio.StreamReader._buffer`` to catch improper
pipelining; ``smtpproxy/delivery/stream.py`` and ``pipelining.py`` use aiosmtplib's protocol
internals. The
versions are pinned in pyproject.toml for that reason; when a new release is allowed in,
this test says exactly which member went missing instead of a proxy failing at run time.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from types import SimpleNamespace

import aiosmtpd
import aiosmtpd.smtp
import pytest

# Members smtpproxy.inbound.InboundSMTP reads, assigns or overrides.
AIOSMTPD_METHODS = ("_handle_client", "_cb_client_connected", "_reset_timeout", "_timeout_cb", "push", "connection_made",
                    "connection_lost")
AIOSMTPD_ATTRIBUTES = ("_timeout_handle", "_original_transport", "_tls_handshake_okay",
                       "_tls_protocol", "_smtp_methods", "_reader", "_writer", "_timeout_duration",
                       "__ident__", "_handler_coroutine")


def test_aiosmtpd_still_has_what_inbound_relies_on() -> None:
    source = inspect.getsource(aiosmtpd.smtp.SMTP)
    missing = [m for m in AIOSMTPD_METHODS if not callable(getattr(aiosmtpd.smtp.SMTP, m, None))]
    missing += [a for a in AIOSMTPD_ATTRIBUTES if f"self.{a}" not in source]
    assert missing == [], (
        f"aiosmtpd {aiosmtpd.__version__} no longer has {missing}: smtpproxy/inbound.py relies on them; "
        "adapt InboundSMTP before widening the aiosmtpd pin in pyproject.toml"
    )


def test_inbound_uses_no_other_private_aiosmtpd_member() -> None:
    """A new private member used in inbound.py must be added to the lists above (and the
    pin). (smtpbase.py, which sets aiosmtpd's attributes up, is held to aiosmtpd's own
    ``__init__`` by the test after this one.)"""
    import re

    from smtpproxy import inbound, smtpbase

    source = inspect.getsource(inbound)
    own = set(re.findall(r"self\.(_\w+)\s*(?::[^=\n]*)?=", source)) | set(re.findall(r"def (_\w+)", source))
    own |= set(re.findall(r"def (_\w+)", inspect.getsource(smtpbase)))  # its base's own methods
    used = set(re.findall(r"self\.(_\w+)", source)) - own
    known = set(AIOSMTPD_ATTRIBUTES) | set(AIOSMTPD_METHODS)
    assert used - known == set(), f"inbound.py uses aiosmtpd members not listed here: {used - known}"


async def test_streamreader_limit_still_bounds_readuntil_and_flow_control() -> None:
    """inbound.py raises ``StreamReader._limit`` while a message comes in (smtp_DATA)."""
    reader = asyncio.StreamReader(limit=8)
    reader.feed_data(b"0123456789abcdef")
    try:
        await reader.readuntil(b".\r\n")
        raise AssertionError("no LimitOverrunError at the limit")
    except asyncio.LimitOverrunError as exc:
        assert exc.consumed == 14  # what may be taken without splitting a separator
    reader._limit = 64  # type: ignore[attr-defined]
    reader.feed_data(b".\r\n")
    assert await reader.readuntil(b".\r\n") == b"0123456789abcdef.\r\n"


async def test_streamreader_buffer_is_still_readable() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"RCPT TO:<a@b>\r\n")
    assert bytes(reader._buffer) == b"RCPT TO:<a@b>\r\n", (
        "asyncio.StreamReader._buffer changed: smtpproxy/inbound.py _buffered() must be adapted"
    )


@pytest.mark.parametrize("starttls", [False, True])
async def test_inbound_sets_up_what_aiosmtpds_init_would(starttls: bool) -> None:
    """InboundSMTP does the work of ``aiosmtpd.smtp.SMTP.__init__`` itself (its scans cost
    half of a connection's set-up): the protocol must end up with the same attributes, of
    the same values, as aiosmtpd's own ``__init__`` gives for the listener's arguments. A new
    aiosmtpd that sets anything else fails here."""
    import ssl

    from smtpproxy.inbound import InboundSMTP
    from smtpproxy.listener import ListenerPolicy
    from smtpproxy.smtpbase import NoHandler

    policy = ListenerPolicy(hostname="mx.example.test", banner="ESMTP test", max_message_size=1234,
                            idle_timeout=17.0, smtputf8=False, require_starttls=starttls)
    services = SimpleNamespace(chain=None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if starttls else None
    ours = InboundSMTP(services, policy, context)  # type: ignore[arg-type]
    theirs = object.__new__(InboundSMTP)
    theirs.line_length_limit = ours.line_length_limit
    aiosmtpd.smtp.SMTP.__init__(
        theirs, NoHandler(), data_size_limit=policy.max_message_size, enable_SMTPUTF8=policy.smtputf8,
        hostname=policy.hostname, ident=policy.banner, tls_context=context,
        require_starttls=policy.require_starttls, timeout=policy.idle_timeout, loop=ours.loop,
    )
    theirs_state = vars(theirs)
    ours_state = {k: v for k, v in vars(ours).items() if k in theirs_state or k in aiosmtpd_attributes()}
    assert set(ours_state) == set(theirs_state)
    for name, value in theirs_state.items():
        mine = ours_state[name]
        if name == "_smtp_methods":  # ours answers get(verb) from the class, for every verb
            assert {v: mine.get(v).__func__ for v in value} == {v: m.__func__ for v, m in value.items()}
        elif isinstance(value, (asyncio.Future, asyncio.StreamReader, weakref.ref, NoHandler)):
            assert type(mine) is type(value), name  # one of its own per connection, as aiosmtpd's
        elif inspect.ismethod(value):
            assert mine.__func__ is value.__func__ and mine.__self__ is ours, name
        else:
            assert mine == value, name
    assert ours._strong_reader is not None and ours._stream_reader_wr() is ours._strong_reader  # type: ignore[attr-defined]
    assert ours._strong_reader._limit == ours.line_length_limit  # type: ignore[attr-defined]


def aiosmtpd_attributes() -> set[str]:
    """The instance attributes aiosmtpd's SMTP.__init__ (and asyncio's protocol) assign."""
    import re

    source = inspect.getsource(aiosmtpd.smtp.SMTP.__init__)
    source += inspect.getsource(asyncio.StreamReaderProtocol.__init__)
    source += inspect.getsource(asyncio.streams.FlowControlMixin.__init__)
    return set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?=", source))


def test_dkimpy_still_has_what_the_streamed_verifier_relies_on() -> None:
    """plugins/dkim.py _Verifier overrides two DomainSigner methods and reads their state."""
    import dkim
    import dkim.canonicalization
    import dkim.crypto

    source = inspect.getsource(dkim.DomainSigner)
    missing = [m for m in ("verify_sig", "verify_sig_process") if not callable(getattr(dkim.DKIM, m, None))]
    missing += [a for a in ("self.pk", "self.keysize", "self.ktag", "self.seqtlsrpt", "self.tlsrpt",
                            "self.timeout", "canonicalize_body(self.body)")
                if a not in source]
    missing += [n for n in ("evaluate_pk", "HASH_ALGORITHMS", "DnsTimeoutError") if not hasattr(dkim, n)]
    missing += [n for n in ("int2str", "str2int") if not callable(getattr(dkim.crypto, n, None))]
    # plugins/dkim.py replaces the RSA verification where dkimpy's verify_sig_process calls it
    missing += [n for n in ("RSASSA_PKCS1_v1_5_verify", "EMSA_PKCS1_v1_5_encode")
                if not callable(getattr(dkim.crypto, n, None))]
    if "RSASSA_PKCS1_v1_5_verify(h, signature, self.pk)" not in source:
        missing.append("the call RSASSA_PKCS1_v1_5_verify(h, signature, self.pk)")
    assert inspect.signature(dkim.DKIM.verify_sig).parameters.keys() == {
        "self", "sig", "include_headers", "sig_header", "dnsfunc"}
    assert dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/simple").body_algorithm \
        is dkim.canonicalization.Simple
    assert missing == [], (
        f"dkimpy no longer has {missing}: plugins/dkim.py _Verifier relies on them (it checks the "
        "body hash itself and hands dkimpy only the header block)"
    )


def test_dkimpy_still_has_every_name_install_replaces() -> None:
    """plugins/_dkimpy.py's install() replaces these dkimpy names (its docstring lists them):
    each must still exist before, and be ours after; a second install changes nothing."""
    import importlib

    from smtpproxy_plugins import _dkimpy

    def lookup(dotted: str) -> object:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name, None)

    assert len(_dkimpy.REPLACED) == 13
    assert [n for n in _dkimpy.REPLACED if lookup(n) is None] == []
    _dkimpy.install()
    installed = {n: lookup(n) for n in _dkimpy.REPLACED}
    assert all(getattr(f, "__module__", "") == _dkimpy.__name__ or f in (_dkimpy._BTAG,)
               for f in installed.values()), installed
    _dkimpy.install()
    assert {n: lookup(n) for n in _dkimpy.REPLACED} == installed


def test_aiosmtplib_still_has_what_streaming_and_pipelining_rely_on() -> None:
    """stream.py writes the message through the protocol; pipelining.py adopts the protocol
    object into a subclass that keeps replies due to a pipelined group."""
    import aiosmtplib.protocol
    import aiosmtplib.smtp

    protocol = aiosmtplib.protocol.SMTPProtocol
    source = inspect.getsource(protocol)
    missing = [m for m in ("_read_response_from_buffer", "_set_response_exception", "_drain_helper",
                           "write", "read_response", "data_received") if not callable(getattr(protocol, m, None))]
    missing += [a for a in ("_buffer", "_response_waiter", "_response_pending", "_command_lock")
                if f"self.{a}" not in source]
    missing += [a for a in ("_paused",)  # stream.py: a paused write also watches for a reply
                if f"self.{a}" not in inspect.getsource(aiosmtplib.protocol.FlowControlMixin)]
    missing += [c for c in ("COMMAND_INJECTION_REGEX", "MAX_RESPONSE_LENGTH", "MAX_LINE_LENGTH")
                if not hasattr(aiosmtplib.protocol, c)]
    # upstream.py _learn_extensions: what the last_ehlo_response setter stores
    setter = inspect.getsource(aiosmtplib.smtp.SMTP.last_ehlo_response.fset)  # type: ignore[arg-type]
    missing += [a for a in ("_last_ehlo_response", "esmtp_extensions", "server_auth_methods",
                            "supports_esmtp") if f"self.{a} =" not in setter]
    # pipelining.py open_connection: what SMTP.connect() hands its protocol and keeps
    missing += [m for m in ("_on_connection_lost", "close") if not callable(getattr(aiosmtplib.smtp.SMTP, m, None))]
    connect = inspect.getsource(aiosmtplib.smtp.SMTP._create_connection)
    missing += [a for a in ("connection_lost_callback=self._on_connection_lost", "self.protocol = protocol",
                            "self.transport = transport") if a not in connect]
    assert "__slots__" not in vars(protocol), "a protocol with __slots__ cannot be adopted by a subclass"
    assert missing == [], f"aiosmtplib {aiosmtplib.__version__} no longer has {missing}"
    # The protocol object is made per connection and kept through STARTTLS (so adopting it
    # once, after connect, holds for the connection's life).
    assert "SMTPProtocol(" in inspect.getsource(aiosmtplib.smtp.SMTP._create_connection)
    assert "self,\n" in inspect.getsource(protocol.start_tls)
