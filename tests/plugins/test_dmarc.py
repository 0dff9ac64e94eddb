"""DMARC against a real authoritative DNS server on loopback.

Unit tests feed SPF and DKIM results in as recorded AuthChecks (as the spf and dkim_verify
plugins record them) and run the plugin's data hook; the end-to-end tests go through a real
proxy with a stand-in SPF plugin in front of DMARC.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from smtpproxy_plugins.dmarc import DMARC, organizational_domain, parse_record

import smtpproxy.dns
from smtpproxy import Action, Address, Client, Envelope, Message, Session, Transaction, Verdict, hookimpl
from smtpproxy.authresults import AuthCheck, checks, record
from smtpproxy.dns import Resolver
from smtpproxy.registry import resolve
from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.dns_server import (
    ZoneServer,
)


@pytest.fixture
def zones(module_dns_server: ZoneServer) -> Iterator[ZoneServer]:
    """An empty zone set, and the shared resolver pointed at it; the previous one restored after."""
    module_dns_server.clear()
    previous = smtpproxy.dns.get_resolver()
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=module_dns_server.port, timeout=1))
    yield module_dns_server
    smtpproxy.dns.configure(previous)


def address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(text, local, domain)


def transaction(sender: str = "bounce@example.org", *, auth_user: str | None = None) -> tuple[Session, Transaction]:
    session = Session(Client("192.0.2.1", 4321))
    session.auth_user = auth_user
    return session, session.begin_transaction(Envelope(address(sender)))


def message(*from_values: str) -> Message:
    head = "".join(f"From: {v}\r\n" for v in from_values)
    return Message((head + "To: rcpt@dest.test\r\nSubject: hi\r\n\r\nbody\r\n").encode())


def spf(tx: Transaction, result: str, mailfrom: str) -> None:
    record(tx, AuthCheck("spf", result, properties={"smtp.mailfrom": mailfrom}))


def dkim(tx: Transaction, result: str, d: str) -> None:
    record(tx, AuthCheck("dkim", result, properties={"header.d": d, "header.s": "sel", "header.b": "AbCdEf12"}))


async def run(
    tx: tuple[Session, Transaction], msg: Message, plugin: DMARC | None = None
) -> tuple[Verdict | None, AuthCheck]:
    session, t = tx
    verdict = await (plugin or DMARC()).data(session, t, msg)
    (result,) = checks(t, "dmarc")
    return verdict, result


def action(verdict: Verdict | None) -> Action:
    return Action.CONTINUE if verdict is None else verdict.action


# -- alignment -------------------------------------------------------------------------------


async def test_pass_through_aligned_spf_only(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    tx = transaction("bounce@example.org")
    spf(tx[1], "pass", "bounce@example.org")
    dkim(tx[1], "fail", "example.org")
    verdict, result = await run(tx, message("Alice <alice@Example.ORG>"))
    assert result == AuthCheck("dmarc", "pass", "p=reject dis=none", {"header.from": "example.org"})
    assert action(verdict) is Action.CONTINUE
    assert verdict is not None and verdict.tags == ("dmarc:pass", "dmarc:p=reject")


async def test_pass_through_aligned_dkim_only(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    tx = transaction("bounce@esp.example.net")
    spf(tx[1], "pass", "bounce@esp.example.net")  # passes, but for another domain
    dkim(tx[1], "pass", "esp.example.net")  # passes, but not aligned
    dkim(tx[1], "pass", "example.org")
    verdict, result = await run(tx, message("alice@example.org"))
    assert result.result == "pass"
    assert action(verdict) is Action.CONTINUE


@pytest.mark.parametrize(
    ("tags", "identifier", "expected"),
    [
        ("", "mail.example.org", "pass"),  # relaxed: same organizational domain
        ("aspf=s; adkim=s", "mail.example.org", "fail"),  # strict: must be the same name
        ("aspf=s; adkim=s", "EXAMPLE.org", "pass"),
        ("", "example.org.evil.test", "fail"),  # a suffix match is not alignment
        ("", "badexample.org", "fail"),
    ],
)
@pytest.mark.parametrize("method", ["spf", "dkim"])
async def test_relaxed_and_strict_alignment(
    zones: ZoneServer, method: str, tags: str, identifier: str, expected: str
) -> None:
    zones.txt("_dmarc.example.org", f"v=DMARC1; p=reject; {tags}")
    tx = transaction(f"bounce@{identifier}")
    if method == "spf":
        spf(tx[1], "pass", f"bounce@{identifier}")
    else:
        dkim(tx[1], "pass", identifier)
    verdict, result = await run(tx, message("alice@example.org"))
    assert result.result == expected
    assert action(verdict) is (Action.CONTINUE if expected == "pass" else Action.REJECT)


async def test_from_a_subdomain_aligns_with_the_parent_in_relaxed_mode_only(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject; adkim=s")
    tx = transaction("bounce@elsewhere.test")
    dkim(tx[1], "pass", "example.org")
    verdict, result = await run(tx, message("news@mail.example.org"))
    assert (result.result, result.properties) == ("fail", {"header.from": "mail.example.org"})
    assert action(verdict) is Action.REJECT


async def test_misaligned_fail_with_p_reject_is_refused_with_a_clear_reply(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject; rua=mailto:dmarc@example.org")
    tx = transaction("spoofer@evil.test")
    spf(tx[1], "pass", "spoofer@evil.test")
    dkim(tx[1], "pass", "evil.test")
    verdict, result = await run(tx, message("ceo@example.org"))
    assert result == AuthCheck("dmarc", "fail", "p=reject dis=reject", {"header.from": "example.org"})
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    assert str(verdict.reply) == "550 5.7.1 DMARC policy of example.org rejects this message (p=reject)"
    assert verdict.tags == ("dmarc:fail", "dmarc:p=reject")


async def test_spf_softfail_and_neutral_do_not_count(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    tx = transaction("a@example.org")
    spf(tx[1], "softfail", "a@example.org")
    spf(tx[1], "neutral", "a@example.org")
    _, result = await run(tx, message("a@example.org"))
    assert result.result == "fail"


async def test_null_sender_uses_the_helo_identity(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    session = Session(Client("192.0.2.1", 4321))
    tx = session.begin_transaction(Envelope(Address("", "", "")))
    record(tx, AuthCheck("spf", "pass", properties={"smtp.helo": "mx1.example.org"}))
    _, result = await run((session, tx), message("mailer-daemon@example.org"))
    assert result.result == "pass"
    # with a real sender, a HELO pass is not the MAIL FROM identity DMARC uses
    tx2 = transaction("a@other.test")
    record(tx2[1], AuthCheck("spf", "pass", properties={"smtp.helo": "mx1.example.org"}))
    _, result = await run(tx2, message("a@example.org"))
    assert result.result == "fail"


async def test_an_aligned_temperror_makes_dmarc_temperror_instead_of_reject(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    tx = transaction("a@other.test")
    dkim(tx[1], "temperror", "example.org")
    verdict, result = await run(tx, message("a@example.org"))
    assert result.result == "temperror"
    assert verdict is not None and str(verdict.reply).startswith("451 4.7.1 ")
    # with p=none nothing is enforced, so the failure is simply reported
    zones.txt("_dmarc.example.net", "v=DMARC1; p=none")
    tx = transaction("a@other.test")
    dkim(tx[1], "temperror", "example.net")
    verdict, result = await run(tx, message("a@example.net"))
    assert result.result == "fail" and action(verdict) is Action.CONTINUE


# -- policy discovery ------------------------------------------------------------------------


async def test_no_record_is_none(zones: ZoneServer) -> None:
    tx = transaction("a@example.org")
    verdict, result = await run(tx, message("a@example.org"))
    assert result == AuthCheck("dmarc", "none", "no DMARC record", {"header.from": "example.org"})
    assert verdict is not None and verdict.action is Action.CONTINUE and verdict.tags == ("dmarc:none",)
    assert ("_dmarc.example.org", "TXT") in zones.queries


async def test_organizational_domain_fallback_uses_the_public_suffix_list(zones: ZoneServer) -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"
    zones.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject; sp=quarantine")
    tx = transaction("a@other.test")
    verdict, result = await run(tx, message("news@mail.example.co.uk"))
    assert result == AuthCheck("dmarc", "fail", "p=quarantine dis=quarantine",
                               {"header.from": "mail.example.co.uk"})
    assert verdict is not None and verdict.action is Action.QUARANTINE
    txt = [name for name, qtype in zones.queries if qtype == "TXT"]
    assert txt == ["_dmarc.mail.example.co.uk", "_dmarc.example.co.uk"]  # never _dmarc.co.uk


async def test_the_public_suffix_itself_is_never_asked(zones: ZoneServer) -> None:
    zones.txt("_dmarc.co.uk", "v=DMARC1; p=reject")
    _, result = await run(transaction("a@other.test"), message("a@example.co.uk"))
    assert result.result == "none"
    assert [n for n, _ in zones.queries] == ["_dmarc.example.co.uk"]


async def test_subdomain_policy_sp_and_its_fallback_to_p(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject; sp=none")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=quarantine")
    verdict, result = await run(transaction("a@x.test"), message("a@sub.example.org"))
    assert (result.result, result.reason, action(verdict)) == ("fail", "p=none dis=none", Action.CONTINUE)
    verdict, result = await run(transaction("a@x.test"), message("a@example.org"))  # sp= is not for the domain itself
    assert (result.reason, action(verdict)) == ("p=reject dis=reject", Action.REJECT)
    verdict, result = await run(transaction("a@x.test"), message("a@deep.sub.example.net"))  # no sp=: p= applies
    assert (result.reason, action(verdict)) == ("p=quarantine dis=quarantine", Action.QUARANTINE)


async def test_a_record_at_the_subdomain_itself_wins_over_the_organizational_one(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    zones.txt("_dmarc.lists.example.org", "v=DMARC1; p=none")
    verdict, result = await run(transaction("a@x.test"), message("a@lists.example.org"))
    assert (result.result, result.reason, action(verdict)) == ("fail", "p=none dis=none", Action.CONTINUE)
    assert [n for n, _ in zones.queries] == ["_dmarc.lists.example.org"]


async def test_np_applies_to_subdomains_that_do_not_exist(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=none; sp=quarantine; np=reject")
    zones.add("real.example.org. 300 IN MX 10 mx.example.org.")
    _, result = await run(transaction("a@x.test"), message("a@real.example.org"))
    assert result.reason == "p=quarantine dis=quarantine"
    verdict, result = await run(transaction("a@x.test"), message("a@ghost.example.org"))
    assert result.reason == "p=reject dis=reject" and action(verdict) is Action.REJECT


async def test_p_quarantine_quarantines(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=quarantine")
    verdict, result = await run(transaction("a@x.test"), message("a@example.org"))
    assert result.reason == "p=quarantine dis=quarantine"
    assert verdict is not None and verdict.action is Action.QUARANTINE
    assert verdict.tags == ("dmarc:fail", "dmarc:p=quarantine")


async def test_pct_samples_and_downgrades_the_rest(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=quarantine; pct=0")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=reject; pct=0")
    zones.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=50")
    # pct=0: the policy is never applied (quarantine becomes none, reject becomes quarantine)
    verdict, result = await run(transaction("a@x.test"), message("a@example.org"), DMARC(rng=lambda: 0.0))
    assert (result.result, result.reason, action(verdict)) == ("fail", "p=quarantine dis=none", Action.CONTINUE)
    assert verdict is not None and "dmarc:sampled-out" in verdict.tags
    verdict, result = await run(transaction("a@x.test"), message("a@example.net"), DMARC(rng=lambda: 0.0))
    assert (result.reason, action(verdict)) == ("p=reject dis=quarantine", Action.QUARANTINE)
    # pct=50: the injected random number decides
    verdict, _ = await run(transaction("a@x.test"), message("a@example.com"), DMARC(rng=lambda: 0.49))
    assert action(verdict) is Action.REJECT
    verdict, _ = await run(transaction("a@x.test"), message("a@example.com"), DMARC(rng=lambda: 0.5))
    assert action(verdict) is Action.QUARANTINE


async def test_several_dmarc_records_mean_no_policy(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    zones.txt("_dmarc.example.org", "v=DMARC1; p=none")
    zones.txt("_dmarc.example.org", "v=spf1 -all")  # not DMARC: ignored, not counted
    verdict, result = await run(transaction("a@x.test"), message("a@example.org"))
    assert result.result == "none" and action(verdict) is Action.CONTINUE
    # one DMARC record among other TXT records is used
    zones.txt("_dmarc.example.net", "some verification token")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=reject")
    _, result = await run(transaction("a@x.test"), message("a@example.net"))
    assert result.result == "fail"


async def test_unusable_records(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=bogus")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=bogus; rua=mailto:agg@example.net")
    zones.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=abc; adkim=z; foo=bar")
    verdict, result = await run(transaction("a@x.test"), message("a@example.org"))
    assert (result.result, result.reason, action(verdict)) == ("permerror", "DMARC record at _dmarc.example.org: invalid p= tag", Action.CONTINUE)
    rejecting = DMARC(DMARC.Settings(permerror="reject"))
    verdict, _ = await run(transaction("a@x.test"), message("a@example.org"), rejecting)
    assert verdict is not None and str(verdict.reply) == "550 5.7.1 DMARC record of example.org is invalid"
    # an invalid p= with a valid rua= acts as p=none (RFC 7489 6.6.3)
    _, result = await run(transaction("a@x.test"), message("a@example.net"))
    assert (result.result, result.reason) == ("fail", "p=none dis=none")
    # invalid optional tags take their defaults
    verdict, result = await run(transaction("a@x.test"), message("a@example.com"))
    assert (result.reason, action(verdict)) == ("p=reject dis=reject", Action.REJECT)


def test_parse_record() -> None:
    rec = parse_record(" v = DMARC1 ;p=Quarantine; sp=reject;pct=25;adkim=s;aspf=r;rua=mailto:a@x.test,mailto:b@x.test!10m;ruf=mailto:f@x.test;fo=1;")
    assert rec is not None
    assert (rec.p, rec.sp, rec.np, rec.pct, rec.adkim, rec.aspf) == ("quarantine", "reject", None, 25, "s", "r")
    assert rec.rua == ("mailto:a@x.test", "mailto:b@x.test!10m") and rec.ruf == ("mailto:f@x.test",)
    assert parse_record("v=spf1 -all") is None
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert parse_record("v=dmarc1; p=reject") is None
    assert parse_record("v=DMARC1; sp=maybe; p=reject") is not None
    assert parse_record("v=DMARC1; sp=maybe; p=reject").problem == "invalid sp= tag"  # type: ignore[union-attr]
    assert parse_record("v=DMARC1").problem == "no p= tag"  # type: ignore[union-attr]
    assert parse_record("v=DMARC1; p=reject; pct=101").pct == 100  # type: ignore[union-attr]


# -- DNS errors, From problems, settings ----------------------------------------------------


@pytest.mark.parametrize("failure", ["timeout", "servfail"])
async def test_dns_failure_is_temperror_and_tempfails(zones: ZoneServer, failure: str) -> None:
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=zones.port, timeout=0.3))
    (zones.timeout_names if failure == "timeout" else zones.servfail_names).add("_dmarc.example.org")
    verdict, result = await run(transaction("a@example.org"), message("a@example.org"))
    assert result == AuthCheck("dmarc", "temperror", "DNS lookup of the DMARC record failed",
                               {"header.from": "example.org"})
    assert verdict is not None and verdict.action is Action.TEMPFAIL
    assert str(verdict.reply) == "451 4.7.1 DMARC policy of example.org could not be checked, try again later"


@pytest.mark.parametrize(
    "froms",
    [
        (),
        ("undisclosed-recipients:;",),
        ("alice@example.org)<bob@evil.test>",),
        ("<a@[192.0.2.1]>",),
        ("not an address",),
    ],
    ids=["none", "empty-group", "malformed", "literal", "garbage"],
)
async def test_from_must_hold_valid_author_addresses(zones: ZoneServer, froms: tuple[str, ...]) -> None:
    verdict, result = await run(transaction("a@example.org"), message(*froms))
    assert result.result == "permerror" and result.properties == {}
    assert verdict is not None and str(verdict.reply) == "550 5.7.1 Message must have a From field with valid author addresses"
    assert zones.queries == []
    lenient = DMARC(DMARC.Settings(invalid_from="continue"))
    verdict, _ = await run(transaction("a@example.org"), message(*froms), lenient)
    assert action(verdict) is Action.CONTINUE


async def test_display_names_and_comments_are_fine(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    tx = transaction("a@example.org")
    spf(tx[1], "pass", "a@example.org")
    _, result = await run(tx, message('"Joe Q. Public (CEO)" <joe@example.org> (work)'))
    assert (result.result, result.properties) == ("pass", {"header.from": "example.org"})


async def test_policy_actions_let_the_admin_override_the_domain(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=none")
    settings = DMARC.Settings.model_validate(
        {"policy_actions": {"reject": 4.5, "none": 1}, "reject_text": "No ({domain}, {policy})"}
    )
    verdict, _ = await run(transaction("a@x.test"), message("a@example.org"), DMARC(settings))
    assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 4.5)
    assert verdict.tags == ("dmarc:fail", "dmarc:p=reject")
    verdict, _ = await run(transaction("a@x.test"), message("a@example.net"), DMARC(settings))
    assert verdict is not None and (verdict.action, verdict.score) == (Action.CONTINUE, 1.0)
    quarantining = DMARC(DMARC.Settings.model_validate({"policy_actions": {"reject": "quarantine"}}))
    verdict, _ = await run(transaction("a@x.test"), message("a@example.org"), quarantining)
    assert action(verdict) is Action.QUARANTINE
    custom = DMARC(DMARC.Settings(reject_text="No mail from {domain} ({policy})"))
    verdict, _ = await run(transaction("a@x.test"), message("a@example.org"), custom)
    assert str(verdict.reply) == "550 5.7.1 No mail from example.org (reject)"  # type: ignore[union-attr]


async def test_authenticated_submission_is_not_checked(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    session, tx = transaction("a@example.org", auth_user="alice")
    assert await DMARC().data(session, tx, message("a@example.org")) is None
    assert checks(tx) == [] and zones.queries == []
    checking = DMARC(DMARC.Settings(skip_authenticated=False))
    assert action(await checking.data(session, tx, message("a@example.org"))) is Action.REJECT


def test_settings_are_validated_and_the_entry_point_resolves() -> None:
    assert resolve("dmarc") is DMARC
    for bad in ({"reject_text": "{nope}"}, {"policy_actions": {"reject": "bounce"}}, {"pct": 5}):
        with pytest.raises(ValueError):
            DMARC.Settings.model_validate(bad)
    for name, info in DMARC.Settings.model_fields.items():
        assert info.description, name


# -- end to end through the proxy -------------------------------------------------------------


class RecordSPF:
    """Stands in for the spf plugin: records a fixed result for the MAIL FROM identity."""

    def __init__(self, result: str):
        self.result = result

    @hookimpl
    def mail_from(self, transaction: Transaction, sender: Address) -> None:
        record(transaction, AuthCheck("spf", self.result, properties={"smtp.mailfrom": sender.text}))


SPOOF = (
    b"From: The CEO <ceo@example.org>\r\nTo: staff@dest.test\r\nSubject: wire money\r\n"
    b"Message-ID: <1@evil.test>\r\n\r\nnow\r\n"
)


async def test_end_to_end_p_reject_fail_is_refused_and_nothing_reaches_the_sink(
    zones: ZoneServer, proxy_factory: ProxyFactory, sink: Sink
) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    dns = {"nameservers": ["127.0.0.1"], "port": zones.port, "timeout": 1}
    proxy = await proxy_factory(RecordSPF("fail"), DMARC(), upstream=sink.port, dns=dns)
    client = await Talk.open(port_of(proxy))
    await client.hello()
    code, text = await client.send_message("ceo@example.org", ["staff@dest.test"], SPOOF)
    assert (code, text) == (550, "5.7.1 DMARC policy of example.org rejects this message (p=reject)")
    assert sink.messages == []
    await client.cmd("QUIT")
    await client.close()


def test_the_documented_configuration_is_valid() -> None:
    import re
    from pathlib import Path

    import yaml

    from smtpproxy.config import Config

    doc = (Path(__file__).parents[2] / "docs" / "plugins" / "dmarc.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    assert len(blocks) == 4
    seen = set()
    for block in blocks:
        config = Config.model_validate({"plugins": block["plugins"]})
        for spec in config.plugins:
            if spec.name in ("dmarc", "auth_results"):
                plugin_class = resolve(spec.name)
                plugin_class.Settings.model_validate(dict(spec.settings))  # type: ignore[attr-defined]
                seen.add(spec.name)
    assert seen == {"dmarc", "auth_results"}
    assert [p.name for p in Config.model_validate({"plugins": blocks[0]["plugins"]}).plugins] == [
        "spf", "dkim_verify", "arc", "dmarc", "auth_results"]


# -- several authors (RFC 7489 section 6.6.1) ------------------------------------------------


async def test_several_authors_that_all_pass_are_accepted(zones: ZoneServer) -> None:
    """Before: refused outright as an invalid From (550), though RFC 5322 allows several authors."""
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject")
    zones.txt("_dmarc.example.net", "v=DMARC1; p=reject")
    tx = transaction("bounce@example.org")
    spf(tx[1], "pass", "bounce@example.org")
    dkim(tx[1], "pass", "example.net")
    verdict, result = await run(tx, message("Alice <alice@example.org>, Bob <bob@example.net>"))
    assert (result.result, result.properties) == ("pass", {"header.from": "example.org"})
    assert action(verdict) is Action.CONTINUE


@pytest.mark.parametrize("froms", [("alice@example.org, CEO <ceo@bank.test>",),
                                   ("alice@example.org", "CEO <ceo@bank.test>")],
                         ids=["one-field", "two-fields"])
async def test_the_strictest_author_decides(zones: ZoneServer, froms: tuple[str, ...]) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=none")
    zones.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    tx = transaction("bounce@example.org")
    spf(tx[1], "pass", "bounce@example.org")  # aligns with example.org only
    verdict, result = await run(tx, message(*froms))
    assert result == AuthCheck("dmarc", "fail", "p=reject dis=reject", {"header.from": "bank.test"})
    assert verdict is not None and str(verdict.reply) == "550 5.7.1 DMARC policy of bank.test rejects this message (p=reject)"
    assert "authors=example.org,bank.test" in verdict.reason


async def test_a_temperror_outranks_a_quarantine_and_a_pass(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=quarantine")
    zones.timeout_names.add("_dmarc.slow.test")
    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=zones.port, timeout=0.3))
    tx = transaction("bounce@other.test")
    verdict, result = await run(tx, message("a@example.org, b@slow.test, c@nodmarc.test"))
    assert (result.result, result.properties) == ("temperror", {"header.from": "slow.test"})
    assert action(verdict) is Action.TEMPFAIL


async def test_multiple_authors_can_be_refused_and_are_bounded(zones: ZoneServer) -> None:
    refuse = DMARC(DMARC.Settings(multiple_authors="refuse"))
    for froms in (("a@example.org, b@example.net",), ("a@example.org", "b@example.org")):
        verdict, result = await run(transaction("a@example.org"), message(*froms), refuse)
        assert result.result == "permerror" and action(verdict) is Action.REJECT
    many = ", ".join(f"a@d{i}.example" for i in range(6))
    verdict, result = await run(transaction("a@example.org"), message(many))
    assert result.result == "permerror" and action(verdict) is Action.REJECT
    assert zones.queries == []  # nothing looked up for a refused From
    same_domain_twice = ("a@example.org", "b@EXAMPLE.org")  # one author domain
    zones.txt("_dmarc.example.org", "v=DMARC1; p=none")
    _, result = await run(transaction("a@example.org"), message(*same_domain_twice))
    assert result.result == "fail" and result.properties == {"header.from": "example.org"}


# -- caches (issue 15) ------------------------------------------------------------------------


async def test_dmarc_records_are_kept_for_their_ttl_and_failures_never(zones: ZoneServer) -> None:
    zones.txt("_dmarc.example.org", "v=DMARC1; p=reject", ttl=300)
    for _ in range(3):
        _, result = await run(transaction("a@example.org"), message("a@example.org"))
        assert result.result == "fail" and result.reason == "p=reject dis=reject"
    assert zones.queries.count(("_dmarc.example.org", "TXT")) == 1
    zones.txt("_dmarc.zero.example", "v=DMARC1; p=none", ttl=0)
    for _ in range(2):
        await run(transaction("a@zero.example"), message("a@zero.example"))
    assert zones.queries.count(("_dmarc.zero.example", "TXT")) == 2  # TTL 0: asked every time

    smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=zones.port, timeout=0.3))
    zones.servfail_names.add("_dmarc.flaky.example")
    _, result = await run(transaction("a@flaky.example"), message("a@flaky.example"))
    assert result.result == "temperror"
    zones.servfail_names.discard("_dmarc.flaky.example")
    zones.txt("_dmarc.flaky.example", "v=DMARC1; p=quarantine")
    _, result = await run(transaction("a@flaky.example"), message("a@flaky.example"))
    assert result.result == "fail" and result.reason == "p=quarantine dis=quarantine"  # not remembered


async def test_from_fields_parse_the_same_from_the_cache(zones: ZoneServer) -> None:
    """The per-value parse cache answers exactly what a fresh parse does, good or bad."""
    from smtpproxy_plugins import dmarc as dmarc_module

    values = ["Alice <a@example.org>", "a@example.org, b@other.example", "not an address",
              "<a@[192.0.2.1]>", "x" * 1200 + " <a@example.org>"]
    for value in values:
        fresh = dmarc_module._from_field.__wrapped__(value)
        for _ in range(2):
            assert dmarc_module.author_domains(message(value)) == (
                (list(dict.fromkeys(fresh[0])), "") if not fresh[1] else ([], fresh[1]))
    assert dmarc_module._from_field.cache_info().currsize >= 4
