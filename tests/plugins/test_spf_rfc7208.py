"""The openspf.org RFC 7208 test suite, run through the SPF plugin against a real DNS server.

The suite (``rfc7208-tests.yml``) is someone else's work and is not in this repository: it ships
in pyspf's source distribution, and ``.ci/run`` extracts it to ``.ci/cache/rfc7208-tests.yml``.
Set ``SMTPPROXY_SPF_SUITE`` to use another copy; without one the test is skipped, saying so.

Each scenario's zone data is served by the loopback DNS server (``tests/dns_server.py``), and
each case goes through ``SPF.check_host``, the code path of the plugin's hook (pyspf in the
bounded pool, its DNS through the shared resolver). Translation of the suite's zone data, as
pyspf's own driver (test/testspf.py) does it:

- ``TXT``/``SPF`` values are strings or lists of character-strings, encoded as UTF-8. ``SPF``
  records are also published as TXT unless the name lists a ``TXT`` of its own; ``TXT: NONE``
  means no TXT at all. Type SPF (99) is served too, though RFC 7208 no longer looks it up.
- ``A``, ``AAAA``, ``MX: [preference, host]``, ``PTR`` and ``CNAME`` are served as such.
- ``TIMEOUT`` makes queries time out, except for record types listed before it. A name with
  only TIMEOUT (or only type-SPF records before it) never answers (``timeout_names``). When
  other records precede TIMEOUT, those are served and the test checks that no query for
  another type of that name was made (the server would answer it rather than time out).
- ``RCODE: 2`` (SERVFAIL) and ``RCODE: 3`` (NXDOMAIN) are supported, if a suite uses them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import spf as pyspf
import yaml
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RR, TXT, A, DNSLabel
from smtpproxy_plugins.spf import SPF, SPFOutcome

import smtpproxy.dns
from smtpproxy.dns import Resolver
from tests.dns_server import ZoneServer

ROOT = Path(__file__).parents[2]
SUITE = Path(os.environ.get("SMTPPROXY_SPF_SUITE") or ROOT / ".ci" / "cache" / "rfc7208-tests.yml")

# Cases this implementation does not pass, and why. The test fails if any other case fails
# (a regression) and reports when one of these starts passing (update the list).
KNOWN_FAILURES: dict[str, str] = {}

RESOLVER_TIMEOUT = 0.4  # seconds per lookup: the suite's TIMEOUT names cost this much each


@dataclass
class Zone:
    records: list[RR] = field(default_factory=list)
    timeout_names: set[str] = field(default_factory=set)
    servfail_names: set[str] = field(default_factory=set)
    partial_timeouts: dict[str, set[str]] = field(default_factory=dict)
    """Names served only for these types; other types should time out (see the module doc)."""


def _strings(value: Any) -> list[bytes]:
    texts = [value] if isinstance(value, str) else list(value)
    return [str(t).encode("utf-8") for t in texts]


def _rdata_entries(name: str, entries: list[Any]) -> list[tuple[str, Any]]:
    """(type, value) in the driver's order, SPF copied to TXT when there is no TXT, TIMEOUT kept."""
    out: list[tuple[str, Any]] = []
    generated: list[tuple[str, Any]] = []
    has_txt = False
    for entry in entries:
        if entry == "TIMEOUT":
            out.append(("TIMEOUT", None))
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: unexpected zone entry {entry!r}")
        for rtype, value in entry.items():
            if rtype == "TXT":
                has_txt = True
            elif rtype == "SPF":
                generated.append(("TXT", value))
            if value != "NONE":
                out.append((rtype, value))
    if not has_txt:
        out.extend(generated)
    return out


def _chunks(text: bytes) -> list[bytes]:
    """One character-string holds 255 bytes at most; an empty string stays one empty string."""
    return [text[i:i + 255] for i in range(0, len(text), 255)] or [text]


def _rr(name: str, rtype: str, value: Any) -> RR | None:
    label = DNSLabel(name)
    if rtype in ("TXT", "SPF"):
        strings = [chunk for s in _strings(value) for chunk in _chunks(s)]
        if not strings:
            return None  # a TXT record needs one string at least; the driver ignores it too
        return RR(label, getattr(QTYPE, rtype), rdata=TXT(strings), ttl=300)
    if rtype == "A":
        return RR(label, QTYPE.A, rdata=A(value), ttl=300)
    if rtype == "AAAA":
        return RR(label, QTYPE.AAAA, rdata=AAAA(value), ttl=300)
    if rtype == "MX":
        preference, host = value
        return RR(label, QTYPE.MX, rdata=MX(host, int(preference)), ttl=300)
    if rtype == "PTR":
        return RR(label, QTYPE.PTR, rdata=PTR(value), ttl=300)
    if rtype == "CNAME":
        return RR(label, QTYPE.CNAME, rdata=CNAME(value), ttl=300)
    raise ValueError(f"{name}: unsupported record type {rtype}")


def translate(zonedata: dict[str, list[Any]]) -> Zone:
    zone = Zone()
    for raw_name, entries in zonedata.items():
        name = raw_name.rstrip(".").lower()
        rdata = _rdata_entries(name, entries or [])
        if ("TIMEOUT", None) in rdata:
            before = rdata[: rdata.index(("TIMEOUT", None))]
            answered = {t for t, _ in before if t != "SPF"}
            if not answered:
                zone.timeout_names.add(name)
                continue
            zone.partial_timeouts[name] = answered | {"SPF"}
            rdata = before
        for rtype, value in rdata:
            if rtype == "RCODE":
                if int(value) == 2:
                    zone.servfail_names.add(name)
                elif int(value) != 3:  # 3: NXDOMAIN, what an unknown name gets anyway
                    raise ValueError(f"{name}: RCODE {value} is not supported by the test server")
                continue
            rr = _rr(name, rtype, value)
            if rr is not None:
                zone.records.append(rr)
    return zone


@dataclass
class Case:
    id: str
    scenario: str
    spec: str
    host: str
    mailfrom: str
    helo: str
    results: list[str]
    explanation: str | None


Scenarios = list[tuple[str, dict[str, list[Any]], list[Case]]]


def load_suite(path: Path) -> Scenarios:
    scenarios = []
    with path.open("rb") as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            description = str(doc.get("description", ""))
            cases = []
            for case_id, t in doc["tests"].items():
                expected = t["result"]
                cases.append(Case(
                    case_id, description, str(t.get("spec", "")), str(t["host"]), str(t.get("mailfrom") or ""),
                    str(t.get("helo") or ""), [expected] if isinstance(expected, str) else list(expected),
                    t.get("explanation"),
                ))
            scenarios.append((description, doc.get("zonedata") or {}, cases))
    return scenarios


def verdict_on(case: Case, outcome: SPFOutcome) -> str | None:
    """None when the outcome is what the suite expects, else what differs."""
    if outcome.result not in case.results:
        return f"result {outcome.result} (expected {'/'.join(case.results)}): {outcome.explanation}"
    if case.explanation is not None:
        # the driver sets the default explanation to "DEFAULT"; the plugin keeps pyspf's
        expected = pyspf.EXPLANATIONS[outcome.result] if case.explanation == "DEFAULT" else case.explanation
        if outcome.explanation != expected:
            return f"explanation {outcome.explanation!r} (expected {expected!r})"
    return None


@pytest.fixture
def suite() -> Scenarios:
    if not SUITE.is_file():
        pytest.skip(
            f"RFC 7208 test suite not found at {SUITE}: .ci/run downloads it (pyspf's sdist, "
            "test/rfc7208-tests.yml); or set SMTPPROXY_SPF_SUITE to a copy"
        )
    return load_suite(SUITE)


async def test_rfc7208_suite(suite: Scenarios, dns_server: ZoneServer, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    monkeypatch.setattr(smtpproxy.dns, "_resolver", smtpproxy.dns._resolver)  # restored afterwards
    plugin = SPF(SPF.Settings(timeout=10))
    failures: dict[str, str] = {}
    unfaithful: list[str] = []
    total = 0
    for _description, zonedata, cases in suite:
        zone = translate(zonedata)
        dns_server.clear()
        dns_server.records.extend(zone.records)
        dns_server.timeout_names.update(zone.timeout_names)
        dns_server.servfail_names.update(zone.servfail_names)
        # a fresh resolver (and cache) per scenario: names repeat with other data in the next one
        smtpproxy.dns.configure(Resolver(["127.0.0.1"], port=dns_server.port, timeout=RESOLVER_TIMEOUT))
        for case in cases:
            total += 1
            dns_server.queries.clear()
            outcome = await plugin.check_host(case.host, case.mailfrom, case.helo)
            problem = verdict_on(case, outcome)
            if problem is not None:
                failures[case.id] = f"{case.id} ({case.spec}): {problem}"
            unfaithful += [
                f"{case.id}: {qtype} {qname} would have timed out"
                for qname, qtype in dns_server.queries
                if qtype not in zone.partial_timeouts.get(qname, {qtype})
            ]
    passed = total - len(failures)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\nRFC 7208 suite: {passed}/{total} passed ({elapsed:.1f} s)")
        for line in failures.values():
            print(f"  FAILED {line}")
    assert unfaithful == [], "the translated zone data did not behave like the suite's"
    assert total >= 200, f"only {total} cases loaded from {SUITE}"
    unexpected = {k: v for k, v in failures.items() if k not in KNOWN_FAILURES}
    assert unexpected == {}, "cases failing that are not in KNOWN_FAILURES"
    fixed = sorted(set(KNOWN_FAILURES) - set(failures))
    assert fixed == [], f"now passing, remove from KNOWN_FAILURES: {fixed}"
    assert passed >= total - len(KNOWN_FAILURES)


def test_zone_translation_follows_the_suite_driver() -> None:
    zone = translate({
        "both.example": [{"TXT": "v=spf1 -all"}, {"SPF": "v=spf1 -all"}],
        "spfonly.example": [{"SPF": "v=spf1 -all"}, {"TXT": "NONE"}],
        "generated.example": [{"SPF": ["v=spf1", " mx"]}, {"A": "192.0.2.1"}],
        "dead.example": ["TIMEOUT"],
        "txttimeout.example": [{"SPF": "v=spf1 -all"}, {"TXT": "NONE"}, "TIMEOUT"],
        "spftimeout.example": [{"TXT": "v=spf1 -all"}, "TIMEOUT"],
        "Mixed.Example.": [{"MX": [10, "mx.example"]}, {"CNAME": "x.example"}],
    })
    shown = sorted((str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in zone.records)
    assert shown == [
        ("both.example.", "SPF", '"v=spf1 -all"'),
        ("both.example.", "TXT", '"v=spf1 -all"'),
        ("generated.example.", "A", "192.0.2.1"),
        ("generated.example.", "SPF", '"v=spf1"," mx"'),
        ("generated.example.", "TXT", '"v=spf1"," mx"'),
        ("mixed.example.", "CNAME", "x.example."),
        ("mixed.example.", "MX", "10 mx.example."),
        ("spfonly.example.", "SPF", '"v=spf1 -all"'),
        ("spftimeout.example.", "TXT", '"v=spf1 -all"'),
    ]
    assert zone.timeout_names == {"dead.example", "txttimeout.example"}
    assert zone.partial_timeouts == {"spftimeout.example": {"TXT", "SPF"}}

