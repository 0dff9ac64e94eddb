"""Where the header block ends, and what each field is: Message against the real Postfix.

Plugins read headers through :class:`smtpproxy.Message`; the MTA behind the proxy parses the
same bytes again. If the two disagree, a forged field can hide from every plugin and still be
delivered (issue 14: ``X-Obs : y`` ended Message's header block while Postfix read on). Here a
generated corpus of odd header blocks goes to a private Postfix; each delivered Maildir file
is split the way Postfix wrote it, and its fields and body must be exactly Message's.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from smtpproxy_plugins.auth_results import AuthResults
from smtpproxy_plugins.dmarc import DMARC

import smtpproxy.dns
from smtpproxy import Message, Transaction, Verdict, hookimpl
from smtpproxy.authresults import AuthCheck, record
from smtpproxy.dns import Resolver
from smtpproxy.message import POSTFIX_LINE_LIMIT
from tests.conftest import ProxyFactory, Talk, port_of
from tests.dns_server import ZoneServer
from tests.postfix_instance import PostfixFactory, PostfixInstance

RELAY = {"domains": ["dest.test"], "networks": []}
#: No header rewriting or added Date/Message-ID: Postfix must show us what it parsed, nothing more.
MAIN_CF = {"local_header_rewrite_clients": "", "header_size_limit": "1000000"}

# -- the corpus --------------------------------------------------------------------------------

NAMES = [b"X-A", b"X-Obs", b"Subject", b"Authentication-Results", b"From"]
SPACING = [b"", b" ", b"\t", b"  \t ", b"\t\t"]  # between the name and the colon
ODD_LINES = [
    b"X-Eight\xc3\xa9bit: v",  # 8-bit in the name: not a field
    b"\xc3\xa9: v",
    b": empty name",
    b" : empty name after space",
    b"X Space: inside the name",
    b"X-Ctl\x01: control in the name",
    b"X-Del\x7f: DEL in the name",
    b"no colon at all",
    b"X-Colon:: two colons",
    b"X-Trailing:",
    b"X-Only-Space: ",
    b"X-Eight: \xff\xfe value bytes",
    b"!#$%&'*+-/=?^_`{|}~: all the odd name characters",
    b"[x]: brackets",
    b"X-Obs\t : tab then space",
    b"-: dash",
]
CONTINUATIONS = [
    b" continued",
    b"\tcontinued by tab",
    b" ",
    b"\t",
    b"  X-Looks-Like: a field but is a continuation",
]


def header_lines() -> list[list[bytes]]:
    """Header blocks (lists of lines without CRLF), each then followed by a probe field."""
    blocks: list[list[bytes]] = []
    for name, space in itertools.product(NAMES, SPACING):
        blocks.append([name + space + b": value of " + name])
    blocks.extend([line] for line in ODD_LINES)
    for cont in CONTINUATIONS:
        blocks.append([b"X-A: first", cont])
        blocks.append([b"X-Obs : first", cont, cont])
    # the very first line: a continuation of nothing, an mbox "From " line
    blocks.append([b" leading space on the first line"])
    blocks.append([b"\tleading tab on the first line"])
    blocks.append([b"From alice@sender.test Tue Apr  1 10:00:00 2025"])
    blocks.append([b">From alice@sender.test Tue Apr  1 10:00:00 2025"])
    blocks.append([b"X-First: a", b"From alice@sender.test Tue Apr  1 10:00:00 2025"])
    # very long fields: folded, unfolded past 998, and around Postfix's 2048-octet pieces
    blocks.append([b"X-Long: " + b"w" * 3000])
    blocks.append([b"X-Folded: " + b" ".join([b"word"] * 50), b"\t" + b"x" * 2500])
    for name_length in (POSTFIX_LINE_LIMIT - 2, POSTFIX_LINE_LIMIT - 1, POSTFIX_LINE_LIMIT,
                        POSTFIX_LINE_LIMIT + 5):
        blocks.append([b"X" * name_length + b": long name"])
    blocks.append([b"X" * (POSTFIX_LINE_LIMIT - 3) + b"  : long name, space"])
    blocks.append([b"X" * (POSTFIX_LINE_LIMIT - 2) + b"  : long name, space past the limit"])
    return blocks


def message_for(case: int, lines: list[bytes]) -> bytes:
    head = b"".join(line + b"\r\n" for line in lines)
    probe = b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\nX-After: probe\r\n"
    return head + probe + b"\r\nbody of case-%d\r\n" % case


def dot_stuff(raw: bytes) -> bytes:
    return raw.replace(b"\r\n.", b"\r\n..")


# -- reading what Postfix delivered -------------------------------------------------------------


def postfix_fields(stored: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(name, unfolded value) of each field Postfix wrote, and the body, in wire (CRLF) form.

    Postfix writes LF line ends, normalizes ``Name : value`` to ``Name: value`` and always
    ends the header block with an empty line (it inserts one before a non-field line)."""
    head, _, body = stored.partition(b"\n\n")
    fields: list[list[bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    parsed = []
    for lines in fields:
        name, _, value = b"".join(lines).partition(b":")
        parsed.append((name.decode("utf-8", "replace"), value.strip(b" \t").decode("utf-8", "replace")))
    own = next(i for i, (name, _) in enumerate(parsed) if name == "Received")  # Postfix's
    return parsed[own + 1:], body.replace(b"\n", b"\r\n")


def message_fields(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    message = Message(raw)
    return message.headers, message.body


async def deliver_all(postfix: PostfixInstance, raws: list[bytes]) -> list[bytes]:
    talk = await Talk.open(postfix.port)
    await talk.hello()
    for raw in raws:
        code, text = await talk.send_message("alice@sender.test", ["bob@dest.test"], dot_stuff(raw))
        assert code == 250, text
    await talk.close()
    stored = await asyncio.to_thread(postfix.wait_for_messages, "bob", len(raws), 60)
    by_case: dict[int, bytes] = {}
    for content in stored:
        case = int(content.rsplit(b"body of case-", 1)[1].split(b"\n", 1)[0])
        by_case[case] = content
    return [by_case[i] for i in range(len(raws))]


async def test_message_parses_every_header_block_exactly_as_postfix(postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory(main_cf=MAIN_CF)
    blocks = header_lines()
    raws = [message_for(i, lines) for i, lines in enumerate(blocks)]
    stored = await deliver_all(postfix, raws)
    mismatches = []
    for raw, delivered in zip(raws, stored, strict=True):
        expected = postfix_fields(delivered)
        if message_fields(raw) != expected:
            mismatches.append((raw[:200], expected[0][:6], message_fields(raw)[0][:6]))
    assert mismatches == []
    # The corpus does exercise both sides: obsolete spacing is a field to both ...
    obsolete = message_for(0, [b"X-Obs \t : y"])
    assert ("X-Obs", "y") in Message(obsolete).headers
    assert Message(obsolete).get("X-After") == "probe"
    # ... and an 8-bit name ends the header block for both.
    assert Message(message_for(0, [b"X-\xc3\xa9: v"])).get("X-After") is None


# -- what it meant end to end -------------------------------------------------------------------


class ForgedDKIMPass:
    """Stands in for spf + dkim_verify: records what they would for the attacker's message."""

    name = "forged_inputs"

    @hookimpl
    def data(self, transaction: Transaction) -> None:
        record(transaction, AuthCheck("spf", "pass", properties={"smtp.mailfrom": "x@attacker.test"}))
        record(transaction, AuthCheck("dkim", "pass", properties={"header.d": "attacker.test"}))


class SeenFrom:
    name = "seen_from"

    def __init__(self) -> None:
        self.froms: list[list[str]] = []

    @hookimpl
    def data(self, message: Message) -> Verdict | None:
        self.froms.append(message.get_all("From"))
        return None


ATTACK = (b"From: Mallory <x@attacker.test>\r\nTo: bob@dest.test\r\nSubject: invoice\r\n"
          b"X-Obs : y\r\n"
          b"Authentication-Results: mx.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"
          b"From : CEO <ceo@bank.test>\r\n"
          b"\r\nPlease pay.\r\n")


@pytest.fixture
def zone(module_dns_server: ZoneServer, monkeypatch: pytest.MonkeyPatch) -> ZoneServer:
    module_dns_server.clear()
    monkeypatch.setattr(smtpproxy.dns, "_resolver", smtpproxy.dns._resolver)
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=module_dns_server.port, timeout=1))
    return module_dns_server


async def test_forged_fields_after_obsolete_syntax_are_seen_by_auth_results_and_dmarc(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, zone: ZoneServer
) -> None:
    """Before the fix: the forged Authentication-Results reached the mailbox and DMARC evaluated
    only attacker.test (pass), while Postfix delivered both From fields."""
    zone.txt("_dmarc.attacker.test", "v=DMARC1; p=none")
    zone.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    postfix = postfix_factory(main_cf=MAIN_CF)
    seen = SeenFrom()
    auth_results = AuthResults(AuthResults.Settings(authserv_id="mx.test"))
    delivery = {"type": "smtp", "host": "127.0.0.1", "port": postfix.port, "tls": "none"}
    dns = {"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 1}
    proxy = await proxy_factory(ForgedDKIMPass(), seen, DMARC(), auth_results,
                                relay=RELAY, dns=dns, delivery=delivery)
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    # DMARC sees both authors and applies bank.test's p=reject (before: it saw only attacker.test).
    assert await talk.send_message("x@attacker.test", ["bob@dest.test"], ATTACK) == (
        550, "5.7.1 DMARC policy of bank.test rejects this message (p=reject)")
    assert seen.froms == [["Mallory <x@attacker.test>", "CEO <ceo@bank.test>"]]
    await talk.close()
    # Without DMARC in the way, auth_results removes the forged field after the obsolete line.
    proxy = await proxy_factory(ForgedDKIMPass(), auth_results, relay=RELAY, dns=dns, delivery=delivery)
    talk = await Talk.open(port_of(proxy))
    await talk.hello()
    assert (await talk.send_message("x@attacker.test", ["bob@dest.test"], ATTACK))[0] == 250
    await talk.close()
    [stored] = await asyncio.to_thread(postfix.wait_for_messages, "bob", 1)
    assert b"header.d=bank.test" not in stored and b"dmarc=pass" not in stored
    assert stored.count(b"Authentication-Results:") == 1  # ours
