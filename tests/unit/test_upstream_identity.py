"""The client's identity for the upstream (XCLIENT, XFORWARD) is encoded once per identity.

``Connector`` keeps the encoded attributes by the values of the attributes the server
offers, so a server that is not offered the client's port (smtp-sink, an older Postfix)
gets one encoding for every connection from the same client. The encoders write each
attribute themselves instead of through a dictionary of every value; they must give what
the dictionary version gave (kept here as the reference).
"""

from __future__ import annotations

import aiosmtplib
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.delivery.identity import helo_value, xclient_attributes, xforward_attributes, xtext
from smtpproxy.delivery.upstream import Connection, Connector, ConnectorSettings, UpstreamServer
from smtpproxy.session import Client, Session

XCLIENT = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
XFORWARD = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


def _addr(ip: str) -> str:
    return f"IPV6:{ip}" if ":" in ip else ip


def _reference_values(session: Session) -> dict[str, str]:
    return {
        "ADDR": _addr(session.client.ip),
        "PORT": str(session.client.port),
        "NAME": session.client.hostname or "[UNAVAILABLE]",
        "HELO": helo_value(session.helo),
        "PROTO": "ESMTP" if session.esmtp else "SMTP",
    }


def _reference_xclient(session: Session, offered: frozenset[str]) -> list[str]:
    values = {
        **_reference_values(session),
        "LOGIN": session.auth_user or "[UNAVAILABLE]",
        "DESTADDR": _addr(session.local_ip) if session.local_ip else "",
        "DESTPORT": str(session.local_port) if session.local_port else "",
    }
    return [f"{k}={xtext(v)}" for k, v in values.items() if k in offered and v]


def _reference_xforward(session: Session, offered: frozenset[str]) -> list[str]:
    values = {**_reference_values(session), "SOURCE": "REMOTE"}
    return [f"{k}={xtext(v)}" for k, v in values.items() if k in offered and v]


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


def _session(client: Client, *, helo: str | None, esmtp: bool = True, user: str | None = None,
             local_ip: str = "127.0.0.1", local_port: int = 25) -> Session:
    session = Session(client, local_ip=local_ip, local_port=local_port)
    session.helo, session.esmtp, session.auth_user = helo, esmtp, user
    return session


_sessions = st.builds(
    _session,
    st.builds(Client, st.sampled_from(["192.0.2.1", "2001:db8::1", "unknown", ""]),
              st.integers(0, 65535), st.none() | _text),
    helo=st.none() | _text | st.just("x" * 300), esmtp=st.booleans(), user=st.none() | _text,
    local_ip=st.sampled_from(["", "127.0.0.1", "::1"]), local_port=st.integers(0, 65535),
)


@given(_sessions, st.frozensets(st.sampled_from(XCLIENT)))
def test_xclient_attributes_are_what_the_dictionary_version_gave(session: Session, offered: frozenset[str]) -> None:
    assert xclient_attributes(session, offered) == _reference_xclient(session, offered)


@given(_sessions, st.frozensets(st.sampled_from(XFORWARD)))
def test_xforward_attributes_are_what_the_dictionary_version_gave(session: Session, offered: frozenset[str]) -> None:
    assert xforward_attributes(session, offered) == _reference_xforward(session, offered)


def _connection(xclient: str | None, xforward: str | None) -> tuple[Connector, Connection]:
    connector = Connector(ConnectorSettings(tls="none"))
    client = aiosmtplib.SMTP(hostname="upstream.test")
    client.esmtp_extensions = {
        **({"xclient": xclient} if xclient is not None else {}),
        **({"xforward": xforward} if xforward is not None else {}),
    }
    offered = frozenset(xclient.upper().split()) if xclient is not None else None
    return connector, Connection(client, UpstreamServer("upstream.test", 25), None, xclient_offered=offered)


@given(_sessions, _sessions, st.frozensets(st.sampled_from(XCLIENT)), st.frozensets(st.sampled_from(XFORWARD)))
def test_a_kept_identity_is_the_one_the_session_would_get(
    first: Session, second: Session, xclient: frozenset[str], xforward: frozenset[str]
) -> None:
    """Whatever was encoded for another session before, each session gets its own attributes."""
    connector, conn = _connection(" ".join(sorted(xclient)), " ".join(sorted(xforward)).lower())
    for session in (first, second, first):
        assert connector._xclient_identity(conn, session) == tuple(_reference_xclient(session, xclient))
        expected = b" ".join([b"XFORWARD", *[a.encode() for a in _reference_xforward(session, xforward)]])
        assert connector._xforward_command(conn, session) == expected


def test_a_port_the_server_is_not_offered_does_not_make_a_new_identity() -> None:
    """smtp-sink offers XCLIENT NAME HELO and XFORWARD without PORT: a new connection from
    the same client (a new port) reuses what was encoded; with PORT offered it does not."""
    connector, conn = _connection("NAME HELO", "NAME ADDR PROTO HELO")
    one, two = (_session(Client("192.0.2.1", port), helo="client.test") for port in (40001, 40002))
    assert connector._xclient_identity(conn, one) is connector._xclient_identity(conn, two)
    assert connector._xforward_command(conn, one) is connector._xforward_command(conn, two)
    connector, conn = _connection("NAME ADDR PORT HELO", "NAME ADDR PORT PROTO HELO")
    assert connector._xclient_identity(conn, one) != connector._xclient_identity(conn, two)
    assert connector._xforward_command(conn, one) != connector._xforward_command(conn, two)
