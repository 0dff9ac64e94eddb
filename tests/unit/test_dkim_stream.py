"""dkim_verify's fast paths (issue 15): the streamed body hash, the key cache, verifying inline.

The streamed canonicalization must give exactly dkimpy's canonical body for any body and any
way the message is cut into buffers and blocks (Hypothesis against dkimpy itself); a spooled
message must verify without ever being copied whole; found keys are kept for their TTL and
nothing else is kept; small messages never go to a thread.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import mmap
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import dkim
import dkim.canonicalization
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtpproxy_plugins import _dkimpy as dkimpy_internals
from smtpproxy_plugins import dkim as plugin_dkim
from smtpproxy_plugins.dkim import DKIMVerify, KeyLookup, canonical_body, split_at_blank_line

from smtpproxy import Message
from tests.dns_server import ZoneServer
from tests.plugins.test_dkim import MESSAGE, Key, verify
from tests.plugins.test_dkim import rsa2048 as rsa2048  # noqa: PLC0414 - the module-scoped key fixture
from tests.plugins.test_dkim import zone as zone  # noqa: PLC0414 - the DNS fixture

# Lines of text with the whitespace canonicalization cares about: runs of SP and HTAB
# anywhere, whitespace-only lines, empty lines (also at the end), a last line without CRLF.
_line = st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b" \t "]), max_size=8).map(b"".join)
bodies = st.builds(
    lambda lines, last: b"".join(line + b"\r\n" for line in lines) + last,
    st.lists(_line, max_size=12),
    st.sampled_from([b"", b"", b"x", b"x ", b" "]),
)


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (each mod len+1): how Message.parts() may hand it over."""
    offsets = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *offsets, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=400, deadline=None)
@given(body=bodies, points=st.lists(st.integers(0, 200), max_size=4), block=st.integers(1, 40),
       relaxed=st.booleans())
def test_streamed_canonical_body_is_dkimpys(body: bytes, points: list[int], block: int, relaxed: bool) -> None:
    algorithm = dkim.canonicalization.Relaxed if relaxed else dkim.canonicalization.Simple
    expected = algorithm.canonicalize_body(body)
    views = _cut(body, points)
    pieces = b"".join(plugin_dkim.canonical_body(views, relaxed, block))
    assert pieces == expected


@settings(max_examples=300, deadline=None)
@given(head_lines=st.lists(st.sampled_from([b"A: 1", b"B:2", b" folded", b"From x", b"", b"C: \t3"]),
                           max_size=6),
       body=bodies, points=st.lists(st.integers(0, 200), max_size=4))
def test_split_at_blank_line_matches_dkimpys_parser(head_lines: list[bytes], body: bytes,
                                                   points: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in head_lines) + body
    head, rest = split_at_blank_line(_cut(message, points))
    assert head + b"".join(bytes(r) for r in rest) == message
    try:
        headers, expected_body = dkim.rfc822_parse(message)
    except Exception as exc:  # dkimpy refuses odd header blocks (MessageFormatError, IndexError)
        with pytest.raises(type(exc)):
            dkim.rfc822_parse(head)
        return
    assert dkim.rfc822_parse(head) == (headers, b"")
    if head.endswith(b"\r\n\r\n") or head == b"\r\n":
        assert b"".join(bytes(r) for r in rest) == expected_body
    else:  # no empty line at all: everything is header block, as dkimpy sees it
        assert rest == [] and expected_body == b""


def test_canonical_body_of_empty_and_blank_bodies() -> None:
    for body in (b"", b"\r\n", b"\r\n\r\n", b" \r\n\t\r\n"):
        for relaxed, algorithm in ((True, dkim.canonicalization.Relaxed), (False, dkim.canonicalization.Simple)):
            assert b"".join(canonical_body([body], relaxed)) == algorithm.canonicalize_body(body), body


@pytest.fixture
def published(zone: ZoneServer, rsa2048: Key) -> Iterator[tuple[ZoneServer, Key]]:
    zone.txt("sel._domainkey.example.test", rsa2048.txt)
    yield zone, rsa2048


def _spooled(content: bytes) -> mmap.mmap:
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"relaxed"), (b"simple", b"simple")])
async def test_a_spooled_message_verifies_without_being_copied(
    published: tuple[ZoneServer, Key], monkeypatch: pytest.MonkeyPatch, canonicalize: tuple[bytes, bytes],
) -> None:
    _, key = published
    body = b"".join(b"line %d with  two spaces\tand a tab \r\n" % i for i in range(120_000))  # ~4 MB
    signed = key.sign(MESSAGE + body + b"\r\n\r\n", "example.test", "sel", canonicalize=canonicalize)
    message = Message(_spooled(signed))

    def no_copy(self: Message) -> bytes:
        raise AssertionError("message.raw was asked for: the whole message would be copied")

    monkeypatch.setattr(Message, "raw", property(no_copy))
    results = await DKIMVerify().verify(message)
    assert [r.result for r in results] == ["pass"]
    tampered = Message(_spooled(signed[:-200] + b"X" + signed[-199:]))
    assert [r.result for r in await DKIMVerify().verify(tampered)] == ["fail"]


async def test_length_tag_is_measured_on_the_streamed_body(published: tuple[ZoneServer, Key]) -> None:
    _, key = published
    signed = key.sign(MESSAGE, "example.test", "sel", length=True)
    found, _ = await verify(signed + b"appended  after\r\n")
    assert found[0].result == "policy" and "body partly unsigned" in found[0].reason


async def test_found_keys_are_kept_for_their_ttl_and_nothing_else(zone: ZoneServer, rsa2048: Key) -> None:
    signed = rsa2048.sign(MESSAGE, "example.test", "sel")
    zone.txt("sel._domainkey.example.test", rsa2048.txt, ttl=300)
    for _ in range(3):
        assert (await verify(signed))[0][0].result == "pass"
    assert zone.queries.count(("sel._domainkey.example.test", "TXT")) == 1
    assert plugin_dkim.key_cache().get("sel._domainkey.example.test") is not None

    zone.txt("zero._domainkey.example.test", rsa2048.txt, ttl=0)
    zero = rsa2048.sign(MESSAGE, "example.test", "zero")
    for _ in range(2):
        assert (await verify(zero))[0][0].result == "pass"
    assert zone.queries.count(("zero._domainkey.example.test", "TXT")) == 2

    missing = rsa2048.sign(MESSAGE, "example.test", "nokey")
    assert (await verify(missing))[0][0].result == "permerror"
    assert plugin_dkim.key_cache().get("nokey._domainkey.example.test") is None  # (the resolver's
    # own cache may keep the NXDOMAIN for the zone's negative TTL, RFC 2308; that is its business)

    zone.timeout_names.add("slow._domainkey.example.test")
    slow = rsa2048.sign(MESSAGE, "example.test", "slow")
    assert (await verify(slow))[0][0].result == "temperror"
    zone.timeout_names.discard("slow._domainkey.example.test")
    zone.txt("slow._domainkey.example.test", rsa2048.txt)
    assert (await verify(slow))[0][0].result == "pass"  # the failure was not kept


async def test_small_messages_never_go_to_a_thread(published: tuple[ZoneServer, Key],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, key = published
    calls: list[Any] = []
    real = plugin_dkim.run_blocking

    async def spy(function: Any, *args: Any) -> Any:
        calls.append(function)
        return await real(function, *args)

    monkeypatch.setattr(plugin_dkim, "run_blocking", spy)
    assert (await verify(key.sign(MESSAGE, "example.test", "sel")))[0][0].result == "pass"
    assert calls == []
    big = key.sign(MESSAGE + (b"y" * 76 + b"\r\n") * 2000, "example.test", "sel")
    assert len(big) > plugin_dkim.INLINE_LIMIT
    assert (await verify(big))[0][0].result == "pass"
    assert len(calls) == 1


async def test_a_key_not_prefetched_is_looked_up_from_a_thread(published: tuple[ZoneServer, Key],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """If dkimpy asks for a key the event-loop side did not fetch, verification moves to a thread
    (where the blocking lookup is allowed) instead of blocking the loop or failing."""
    _, key = published

    async def nothing(names: Any) -> dict[str, KeyLookup]:
        list(names)
        return {}

    monkeypatch.setattr(plugin_dkim, "fetch_keys", nothing)
    assert (await verify(key.sign(MESSAGE, "example.test", "sel")))[0][0].result == "pass"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, relaxed=st.booleans())
def test_streamed_verification_agrees_with_dkimpy_alone(rsa2048: Key, body: bytes, relaxed: bool) -> None:
    """Sign with dkimpy, damage or not, and compare our verifier's answer with dkimpy's own."""
    canon = (b"relaxed", b"relaxed") if relaxed else (b"simple", b"simple")
    signed = rsa2048.sign(MESSAGE + body, "example.test", "sel", canonicalize=canon)
    record = rsa2048.txt.encode()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return record

    def outcome(verifier: dkim.DKIM) -> tuple[str, str]:
        try:
            return "verified", str(verifier.verify(dnsfunc=dnsfunc))
        except dkim.DKIMException as exc:  # e.g. "body hash mismatch (got ..., expected ...)"
            return type(exc).__name__, str(exc)

    for candidate in (signed, signed + b"tail\r\n", signed + b"\r\n\r\n", signed + b" \r\n"):
        head, rest = split_at_blank_line([candidate])
        assert outcome(plugin_dkim._Verifier(head, rest)) == outcome(dkim.DKIM(candidate))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(min_value=0, max_value=1 << 4200), length=st.integers(-1, 530),
       raw=st.binary(max_size=600))
def test_fast_rsa_conversions_equal_dkimpys(n: int, length: int, raw: bytes) -> None:
    """The int<->octets conversions installed in dkim.crypto answer exactly what dkimpy's do."""
    original = _unpatched_crypto()
    assert dkimpy_internals._int2str(n, length) == original.int2str(n, length)
    assert dkimpy_internals._str2int(raw) == original.str2int(raw)
    assert dkim.crypto.int2str is dkimpy_internals._int2str


@functools.cache
def _unpatched_crypto() -> Any:
    """A fresh copy of dkim.crypto, as dkimpy ships it (the plugin patched the imported one)."""
    spec = importlib.util.find_spec("dkim.crypto")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _rsa_test_key() -> tuple[int, int, int]:
    """(n, e, d) of a 1024-bit RSA key, for signing crafted blocks."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_numbers()
    return numbers.public_numbers.n, numbers.public_numbers.e, numbers.d


@settings(max_examples=300, deadline=None)
@given(
    algorithm=st.sampled_from(["sha256", "sha1"]),
    data=st.binary(max_size=40),
    shape=st.sampled_from(["valid", "few_ff", "bad_byte", "random", "wrong_hash", "plus_n",
                           "short", "long"]),
    where=st.integers(min_value=0, max_value=127),
    noise=st.binary(min_size=128, max_size=128),
)
def test_openssl_rsa_verify_equals_dkimpys(algorithm: str, data: bytes, shape: str, where: int,
                                           noise: bytes) -> None:
    """The RSA verification installed in dkimpy (OpenSSL) answers exactly what dkimpy's pow() does,
    also for blocks that are almost a valid PKCS#1 v1.5 encoding and for non-canonical signatures."""
    import hashlib

    n, e, d = _rsa_test_key()
    modlen = (n.bit_length() + 7) // 8
    original = _unpatched_crypto()
    digest = hashlib.new(algorithm, data)
    block = bytearray(original.EMSA_PKCS1_v1_5_encode(digest, modlen))
    if shape == "few_ff":
        block = bytearray(b"\x00\x01" + b"\xff" * 7 + b"\x00" + bytes(block[-(modlen - 10):]))
    elif shape == "bad_byte":
        block[max(1, where % modlen)] ^= 0x40
    elif shape == "random":
        block = bytearray(noise)
    elif shape == "wrong_hash":
        block = bytearray(original.EMSA_PKCS1_v1_5_encode(hashlib.new(algorithm, data + b"x"), modlen))
    raw = int.from_bytes(block, "big") % n
    signature_int = pow(raw, d, n)
    if shape == "plus_n":
        signature_int += n  # non-canonical: dkimpy reduces it mod n, OpenSSL would refuse it
    signature = signature_int.to_bytes(max(modlen, (signature_int.bit_length() + 7) // 8), "big")
    if shape == "short":
        signature = signature.lstrip(b"\x00") or b"\x00"
    elif shape == "long":
        signature = b"\x00" + signature
    public = {"modulus": n, "publicExponent": e}
    expected = original.RSASSA_PKCS1_v1_5_verify(hashlib.new(algorithm, data), signature, public)
    assert dkimpy_internals._rsa_verify(hashlib.new(algorithm, data), signature, public) == expected
    if shape == "valid":
        assert expected is True
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkimpy_internals._rsa_verify


_DKIMPY_BTAG_PATTERN = rb"([;\s]b" + dkim.FWS + rb"=)(?:" + dkim.FWS + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?"


_BTAG_PIECES = st.lists(st.sampled_from([b"b", b"=", b";", b" ", b"\t", b"\r", b"\n", b"\r\n", b"A", b"z",
                                          b"0", b"+", b"/", b"h", b"bh=", b"-", b"\x0b", b"\xff"]),
                         max_size=30).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(value=st.tuples(
    _BTAG_PIECES,
    st.sampled_from([b"", b" b=", b";b=", b"\tb =", b" b\r\n =", b"; bh=x; b="]),
    _BTAG_PIECES,
    st.sampled_from([b"", b"\r\n", b"\n", b"\r", b" \r\n", b"\r\n ", b";", b"; h=x", b"\r\n\r\n"]),
).map(b"".join))
def test_btag_regex_blanks_what_dkimpys_blanks(value: bytes) -> None:
    """The b= blanking regex installed in dkimpy substitutes exactly what dkimpy's own does."""
    original = re.compile(_DKIMPY_BTAG_PATTERN)
    assert dkimpy_internals._DKIMPY_BTAG.pattern == _DKIMPY_BTAG_PATTERN  # dkimpy's is still this one
    assert dkim.RE_BTAG is dkimpy_internals._BTAG
    assert dkimpy_internals._BTAG.sub(b"\\1", value) == original.sub(b"\\1", value)


@functools.cache
def _unpatched(name: str) -> Any:
    """A fresh copy of a dkimpy module, as dkimpy ships it (the plugin patched the imported one)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outcome(function: Any, value: bytes) -> tuple[str, Any]:
    try:
        return "ok", function(value)
    except Exception as exc:  # the exception dkimpy raises is part of the answer
        return type(exc).__name__, exc.args


_TAG_PIECES = st.lists(st.sampled_from([b"v", b"a", b"bh", b"b", b"=", b";", b" ", b"\t", b"\r\n", b"\n",
                                        b"1", b"_", b"-", b"\xc3\xa9", b"x=y", b"A", b"9"]),
                       max_size=30).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(value=_TAG_PIECES)
def test_tag_value_parsing_equals_dkimpys(value: bytes) -> None:
    """The parse_tag_value installed in dkimpy answers (or refuses) exactly as dkimpy's own."""
    original = _unpatched("dkim.util")
    ours = _outcome(dkimpy_internals._parse_tag_value, value)
    theirs = _outcome(original.parse_tag_value, value)
    assert ours == theirs
    assert dkim.util.parse_tag_value is dkim.parse_tag_value is dkimpy_internals._parse_tag_value


@settings(max_examples=1000, deadline=None)
@given(value=st.lists(st.sampled_from([b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"\xff", b"\x0b"]),
                      max_size=30).map(b"".join))
def test_header_canonicalization_helpers_equal_dkimpys(value: bytes) -> None:
    """compress_whitespace and unfold_header_value as installed give dkimpy's own results."""
    original = _unpatched("dkim.canonicalization")
    assert dkimpy_internals._compress_whitespace(value) == original.compress_whitespace(value)
    assert dkimpy_internals._unfold_header_value(value) == original.unfold_header_value(value)
    assert dkim.canonicalization.compress_whitespace is dkimpy_internals._compress_whitespace
    headers = [(b"Subject", value), (b"X-A ", b" x\r\n\ty  z")]
    assert dkim.canonicalization.Relaxed.canonicalize_headers(headers) == \
        original.Relaxed.canonicalize_headers(headers)


async def test_fetch_keys_answers_cached_and_invalid_names_and_looks_up_the_rest(
    zone: ZoneServer, rsa2048: Key,
) -> None:
    """Cached keys and invalid names need no lookup; the others are looked up, in the given order."""
    zone.txt("a._domainkey.example.test", rsa2048.txt, ttl=300)
    zone.txt("b._domainkey.example.test", rsa2048.txt, ttl=300)
    zone.txt("c._domainkey.example.test", rsa2048.txt, ttl=300)
    await plugin_dkim.fetch_keys(["a._domainkey.example.test"])  # now in the key cache
    names = ["b._domainkey.example.test", "a._domainkey.example.test", "bad..name",
             "none._domainkey.example.test", "b._domainkey.example.test", "c._domainkey.example.test"]
    found = await plugin_dkim.fetch_keys(names)
    assert list(found) == [*dict.fromkeys(names)]
    assert [found[n].status for n in found] == ["found", "found", "invalid", "missing", "found"]
    assert zone.queries.count(("a._domainkey.example.test", "TXT")) == 1
    assert zone.queries.count(("b._domainkey.example.test", "TXT")) == 1
    one = await plugin_dkim.fetch_keys(["none._domainkey.example.test"])  # a single miss, awaited directly
    assert one["none._domainkey.example.test"].status == "missing"


@settings(max_examples=1000, deadline=None)
@given(value=st.lists(st.sampled_from([b"From: a@b", b"Subject:", b"X-A : v", b"From x", b"bad line", b"\t",
                                       b" cont", b"\r\n", b"\n", b"\r", b"a", b":", b"\x7f", b"\xc3\xa9"]),
                      max_size=25).map(b"".join))
def test_rfc822_parse_equals_dkimpys(value: bytes) -> None:
    """The header-block parser installed in dkimpy answers (or refuses) exactly as dkimpy's own."""
    original = _unpatched("dkim").rfc822_parse
    assert _outcome(dkimpy_internals._rfc822_parse, value) == _outcome(original, value)
    assert dkim.rfc822_parse is dkimpy_internals._rfc822_parse


@settings(max_examples=500, deadline=None)
@given(head_lines=st.lists(st.sampled_from([b"A: 1", b"B:2", b" folded", b"\t", b"From x", b">From : y",
                                            b"C : 3", b"D\t:4", b"", b"no colon", b"E:", b"F::x", b"\xc3\xa9: x",
                                            b"G\x01: z", b"Date: a:b"]), max_size=7),
       edit=st.booleans())
def test_headers_from_the_message_fields_are_dkimpys_parse(head_lines: list[bytes], edit: bool) -> None:
    """Where the dkim plugin hands dkimpy the header list built from Message.raw_fields, it is the
    one dkimpy's own (unpatched) rfc822_parse makes of the header block; elsewhere dkimpy parses."""
    message = Message(b"".join(line + b"\r\n" for line in head_lines) + b"body\r\n")
    if edit:
        message.add_header("X-Added", "by a plugin  before dkim")
    head, _ = split_at_blank_line(message.parts())
    headers = plugin_dkim._dkimpy_headers(head, message.raw_fields)
    if headers is None:
        return
    assert (headers, b"") == _unpatched("dkim").rfc822_parse(head) == dkim.rfc822_parse(head)
    verifier = plugin_dkim._Verifier(head, [], message.raw_fields)
    assert verifier.headers == dkim.DKIM(head).headers


def test_dkimpy_parses_when_the_fields_are_not_its_field_lines() -> None:
    for raw in (b"X-Obs : y\r\nA: 1\r\n\r\nbody\r\n", b"From x\r\nA: 1\r\n\r\nbody\r\n",
                b"A: 1\r\nnot a field\r\n\r\nbody\r\n", b"A: 1\r\n"):
        message = Message(raw)
        head, _ = split_at_blank_line(message.parts())
        assert plugin_dkim._dkimpy_headers(head, message.raw_fields) is None
    message = Message(b"A: 1\r\n folded\r\nB:2\r\n\r\nbody\r\n")
    head, _ = split_at_blank_line(message.parts())
    assert plugin_dkim._dkimpy_headers(head, message.raw_fields) == [[b"A", b" 1\r\n folded\r\n"], [b"B", b"2\r\n"]]


_NOW = int(__import__("time").time())
_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_SIG_VALUES = {
    b"v": [b"1", b"2", b""], b"a": [b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256", b"rsa-md5"],
    b"b": [b"AbCd", b"AbC", b"Ab Cd\r\n ef==", b"A=B", b"!!", b"", b"AAAA\t=="],
    b"bh": [b"AbCd", b"AbCde", b"Ab\r\n Cd", b"", b"===="],
    b"d": [b"example.org", b"ex(ample).org", b"\xc3\xa9.test", b"a@b", b"ORG"],
    b"i": [b"@example.org", b"a@sub.example.org", b"@other.test", b"x", b"@EXAMPLE.ORG", b"example.org"],
    b"h": [b"from:to"], b"s": [b"sel"], b"cv": [b"pass", b"none", b"bad"],
    b"l": [b"12", b"x", b"1" * 80, b""], b"q": [b"dns/txt", b"dns"],
    b"t": [b"0", b"12a", str(_NOW - 10**6).encode(), str(_NOW + 10**6).encode(), str(_NOW + 1000).encode()],
    b"x": [str(_NOW + 10**6).encode(), b"1", b"z", str(_NOW - 10**6).encode(), str(_NOW + 500).encode()],
}


def _sig_value(key: bytes) -> st.SearchStrategy[bytes]:
    """Mostly the first (valid) value, so that the later checks are reached too."""
    return st.one_of(st.just(_SIG_VALUES[key][0]), st.just(_SIG_VALUES[key][0]), st.sampled_from(_SIG_VALUES[key]))


@settings(max_examples=1000, deadline=None)
@given(sig=st.fixed_dictionaries({k: _sig_value(k) for k in _SIG_VALUES if k in _MANDATORY},
                                 optional={k: _sig_value(k) for k in _SIG_VALUES if k not in _MANDATORY}),
       drop=st.one_of(st.none(), st.sampled_from([b"v", b"b", b"d"])),
       mandatory=st.sampled_from([None, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"],
                                  [b"i", b"a", b"b", b"cv", b"d", b"s"]]))
def test_signature_field_checks_equal_dkimpys(sig: dict[bytes, bytes], drop: bytes | None,
                                             mandatory: list[bytes] | None) -> None:
    """The validate_signature_fields installed in dkimpy accepts or refuses (with the same
    error and message) exactly as dkimpy's own, for DKIM and for ARC's two calls."""
    sig.pop(drop, None)
    original = _unpatched("dkim").validate_signature_fields
    args = (sig,) if mandatory is None else (sig, mandatory, True)
    ours = _outcome(lambda s: dkimpy_internals._validate_signature_fields(*args), b"")
    theirs = _outcome(lambda s: original(*args), b"")
    assert ours[0] == theirs[0] and str(ours[1]) == str(theirs[1])
    assert dkim.validate_signature_fields is dkimpy_internals._validate_signature_fields


_VALID_SIG = {k: v[0] for k, v in _SIG_VALUES.items() if k in _MANDATORY}


@pytest.mark.parametrize("tweak", [
    {}, {b"i": b"a@sub.example.org"}, {b"i": b"@other.test"}, {b"i": b"x"}, {b"l": b"1" * 80}, {b"q": b"dns"},
    {b"cv": b"bad"}, {b"t": str(_NOW + 10**6).encode()}, {b"t": b"12a"}, {b"x": str(_NOW - 10**6).encode()},
    {b"t": str(_NOW + 1000).encode(), b"x": str(_NOW + 500).encode()}, {b"x": b"z"}, {b"v": b"2"},
    {b"d": b"ex(ample).org"}, {b"d": b"\xc3\xa9.test"}, {b"a": b"rsa-md5"}, {b"b": b"AbC"}, {b"bh": b"AbCde"},
], ids=str)
def test_each_signature_field_check_equals_dkimpys(tweak: dict[bytes, bytes]) -> None:
    """Each of dkimpy's checks, reached from a valid signature: the same answer and message."""
    sig = {**_VALID_SIG, **tweak}
    original = _unpatched("dkim").validate_signature_fields
    for args in ((sig,), (sig, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"], True)):
        ours = _outcome(lambda _: dkimpy_internals._validate_signature_fields(*args), b"")  # noqa: B023
        theirs = _outcome(lambda _: original(*args), b"")  # noqa: B023
        assert ours[0] == theirs[0] and str(ours[1]) == str(theirs[1])


_NAMES = st.sampled_from([b"From", b"from", b"FROM", b"To", b"Subject", b"X-A", b"X-A ", b"x-a", b"Date",
                          b"DKIM-Signature", b"\xc3\x89", b"Received"])
_FIELD_VALUES = st.sampled_from([b" a\r\n", b"b\r\n", b" c\r\n\t d  e \r\n", b"\r\n", b" \xff\r\n"])


@settings(max_examples=1000, deadline=None)
@given(headers=st.lists(st.tuples(_NAMES, _FIELD_VALUES).map(list), max_size=10),
       include=st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-a", b"x-a ", b"date", b"cc",
                                         b"received", b"\xc3\x89", b"From"]), max_size=8),
       relaxed=st.booleans())
def test_signed_fields_are_dkimpys_selection(headers: list[list[bytes]], include: list[bytes],
                                             relaxed: bool) -> None:
    """The select_headers installed in dkimpy picks (or refuses, for a name not in lower case)
    exactly as dkimpy's own; and from the fields signable_fields keeps it picks the same fields
    as from all of them, canonicalized either way: what _Verifier hands dkimpy to hash."""
    original = _unpatched("dkim").select_headers
    algorithm = dkim.canonicalization.Relaxed if relaxed else dkim.canonicalization.Simple
    canonical = algorithm.canonicalize_headers(headers)
    theirs = _outcome(lambda names: original(canonical, names), include)
    assert _outcome(lambda names: dkimpy_internals._select_headers(canonical, names), include) == theirs
    kept = algorithm.canonicalize_headers(plugin_dkim.signable_fields(headers, include))
    assert _outcome(lambda names: original(kept, names), include) == theirs
    assert dkim.select_headers is dkimpy_internals._select_headers


_SIG_FIELD_VALUES = st.sampled_from([b" v=1; b=abc\r\n", b" v=1; b=\r\n\tab c=; h=from\r\n", b" b=x\r\n y;\r\n",
                                     b"no b tag\r\n", b" a=1;b=2\r\n", b"\r\n"])


@settings(max_examples=1000, deadline=None)
@given(headers=st.lists(st.tuples(_NAMES, _FIELD_VALUES).map(list), max_size=10),
       include=st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-a", b"date", b"cc"]), max_size=8),
       sig_value=_SIG_FIELD_VALUES, relaxed=st.booleans())
def test_header_hash_equals_dkimpys(headers: list[list[bytes]], include: list[bytes], sig_value: bytes,
                                    relaxed: bool) -> None:
    """The hash_headers installed in dkimpy hashes exactly the bytes dkimpy's own does (the same
    digest and, for dkimpy's debug HashThrough, the same bytes) and returns the same fields."""
    import hashlib

    original = _unpatched("dkim").hash_headers
    policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(
        b"relaxed/simple" if relaxed else b"simple/simple")
    canonical = policy.canonicalize_headers(headers)
    sig_header = (b"DKIM-Signature", sig_value)
    ours, theirs = dkim.HashThrough(hashlib.sha256(), True), dkim.HashThrough(hashlib.sha256(), True)
    picked = dkimpy_internals._hash_headers(ours, policy, canonical, list(include), sig_header, {})
    assert picked == original(theirs, policy, canonical, list(include), sig_header, {})
    assert ours.digest() == theirs.digest() and ours.hashed() == theirs.hashed()
    assert dkim.hash_headers is dkimpy_internals._hash_headers
