"""dkim_verify and dkim_sign: DKIM (RFC 6376, RSA and RFC 8463 Ed25519) at ``data``.

    plugins:
      - name: dkim_verify          # early: DMARC and auth_results read what it records
        settings:
          require_valid_for: [bank.example]
          actions: {fail: 1.0, permerror: 0.5}
      - name: dkim_sign            # last: anything a later plugin changes is not covered
        settings:
          relay_networks: [192.0.2.0/24]
          keys:
            - {domain: example.com, selector: rsa2024, key_file: keys/example.com.rsa.pem}
            - {domain: example.com, selector: ed2024, key_file: keys/example.com.ed.pem,
               algorithm: ed25519-sha256}

**Verifying.** Every DKIM-Signature (up to ``max_signatures``) is verified and recorded as an
:class:`~smtpproxy.authresults.AuthCheck` (``dkim``, with ``header.d``, ``header.s``,
``header.i``, ``header.a`` and ``header.b``) for DMARC and the Authentication-Results writer;
a message without any is recorded once as ``none``. The overall result (the best of the
signatures' results) picks the configured action. Policy belongs to DMARC, so by default a
failed signature only adds a point and nothing is refused (RFC 6376 section 6.3: a broken
signature must be treated like none at all); ``require_valid_for`` is the exception for
domains known to sign all their mail.

**Sync and async.** The key lookups run on the event loop through the shared resolver
(:func:`smtpproxy.dns.get_resolver`), all concurrently, before dkimpy runs: a lookup that
times out or fails gives ``temperror``. Found keys are kept for their DNS TTL
(:func:`key_cache`) and parsed once per distinct record. dkimpy checks the header hash and the
signature with a ``dnsfunc`` that answers from those lookups; the body hash is computed here,
streamed over the message's buffers in blocks of lines (a spooled message is never copied),
with dkimpy's canonicalization. Messages up to :data:`INLINE_LIMIT` are verified on the
event loop (cheaper than a thread hand-off); larger ones in ``run_blocking``.

**Signing.** Mail from authenticated clients or from ``relay_networks`` whose From: (or
envelope sender) domain has keys gets one signature per key, relaxed/relaxed, prepended. RSA
signatures end up above Ed25519 ones, so a verifier that only checks the first signature (or
cannot do Ed25519) sees RSA. Ed25519 needs the PyNaCl package.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import importlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
import dns.exception
import dns.name
import dns.resolver
from pydantic import Field, ValidationInfo, field_validator

from smtpproxy import (
    Action,
    AuthCheck,
    Buffer,
    EventLog,
    Message,
    Network,
    PluginSettings,
    Resolver,
    Session,
    SettingsError,
    Transaction,
    TTLCache,
    Verdict,
    get_resolver,
    hookimpl,
    ip_in_networks,
    run_blocking,
)
from smtpproxy import record_auth_check as record

from ._dkimpy import install as install_dkimpy_replacements
from ._policy import ActionSpec, verdict_for

__all__ = [
    "DEFAULT_SIGN_HEADERS",
    "DKIMPY_LOG",
    "INLINE_LIMIT",
    "PARTIAL_BODY_NOTE",
    "DKIMResult",
    "DKIMSign",
    "DKIMVerify",
    "KeyLookup",
    "KeySource",
    "SignatureResult",
    "SigningKey",
    "canonical_body",
    "fetch_keys",
    "ignored_for_from",
    "key_cache",
    "load_private_key",
    "partial_body_checks",
    "signature_key_name",
    "signed_fields",
    "split_at_blank_line",
]

log = EventLog(__name__)

DKIMResult = Literal["pass", "fail", "neutral", "policy", "temperror", "permerror", "none"]

DEFAULT_ACTIONS: dict[DKIMResult, ActionSpec] = {
    "fail": 1.0,
    "none": "continue",
    "temperror": "continue",
}

#: ``transaction.notes`` key: the AuthChecks recorded as pass although their ``l=`` leaves part
#: of the body unsigned (``partial_body: pass``); dmarc does not align on them by default.
PARTIAL_BODY_NOTE = "dkim.partial_body"


def partial_body_checks(transaction: Transaction) -> list[AuthCheck]:
    """The dkim passes recorded on ``transaction`` that sign only part of the body."""
    found: list[AuthCheck] = transaction.notes.get(PARTIAL_BODY_NOTE, [])
    return found


#: The overall result is the first of these that any signature has: one good signature is
#: enough, a temporary error may still turn into a pass, and so on down.
_PRECEDENCE: tuple[DKIMResult, ...] = (
    "pass", "temperror", "fail", "policy", "permerror", "neutral", "none",
)

# RFC 7372 enhanced status codes.
NO_PASSING = ("5.7.20", "No passing DKIM signature found")
NO_ACCEPTABLE = ("5.7.21", "No acceptable DKIM signature found")
NO_AUTHOR_MATCHED = ("5.7.22", "No valid author-matched DKIM signature found")
# RFC 3463 X.7.5 "Cryptographic failure": the key was not available (here: not yet).
TEMPORARY = ("4.7.5", "DKIM key lookup failed temporarily, try again later")
TEMPFAIL_OTHER = ("4.7.1", "DKIM check failed, try again later")

DEFAULT_SIGN_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
#: RFC 6376 section 5.4: fields that must not be signed (dkimpy refuses them too).
_NEVER_SIGN = frozenset(x.decode() for x in dkim.DKIM.SHOULD_NOT)

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
# PKCS#8 Ed25519 private key: AlgorithmIdentifier OID 1.3.101.112, then OCTET STRING(OCTET STRING(32)).
_ED25519_PKCS8 = re.compile(rb"\x06\x03\x2b\x65\x70\x04\x22\x04\x20(.{32})", re.S)
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


# --------------------------------------------------------------------------- helpers


def normalize_domain(value: str, what: str = "domain") -> str:
    """Lower-case A-label form without a trailing dot; ValueError if it is not a domain name."""
    text = value.strip().rstrip(".").lower()
    try:
        ascii_form = text.encode("idna").decode("ascii") if text else ""
    except UnicodeError:
        raise ValueError(f"not a valid {what}: {value!r}") from None
    labels = ascii_form.split(".")
    if not ascii_form or len(ascii_form) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a valid {what}: {value!r}")
    return ascii_form


def _domain_of(address: str) -> str | None:
    """The normalized domain of an address, or None when there is none to use."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    try:
        return normalize_domain(domain)
    except ValueError:
        return None


def author_domains(message: Message) -> list[str]:
    """The RFC5322.From domains, in order, without duplicates (usually exactly one)."""
    found: list[str] = []
    for _, address in email.utils.getaddresses(message.get_all("From")):
        domain = _domain_of(address)
        if domain is not None and domain not in found:
            found.append(domain)
    return found


class _DebugOnly(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs problems with attacker-controlled input at ERROR; they are results here."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


#: The logger to hand dkimpy (``logger=``): its messages about hostile input go out at DEBUG.
#: Public because ``arc`` drives dkimpy too; DKIM-specific, so it lives here, not in smtpproxy.
DKIMPY_LOG = _DebugOnly(logging.getLogger(f"{__name__}.dkimpy"), {})


# --------------------------------------------------------------------------- key lookups


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """What DNS said for one ``<selector>._domainkey.<domain>`` name."""

    status: Literal["found", "missing", "temperror", "invalid"]
    record: bytes | None = None
    detail: str = ""


def _key_name(selector: bytes | str, domain: bytes | str) -> str:
    s = selector.decode("ascii", "replace") if isinstance(selector, bytes) else selector
    d = domain.decode("ascii", "replace") if isinstance(domain, bytes) else domain
    return f"{s}._domainkey.{d}".rstrip(".").lower()


@functools.lru_cache(maxsize=4096)
def _check_name(name: str) -> KeyLookup | None:
    if not name.isascii():
        return KeyLookup("invalid", detail=f"key name {name!r} is not ASCII")
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        return KeyLookup("invalid", detail=f"key name {name!r} is not a valid DNS name ({exc})")
    return None


KEY_CACHE = "dkim-keys"
"""The resolver's derived cache of found key records by ``<selector>._domainkey.<domain>``,
each until its DNS TTL runs out: a hit costs no DNS round at all. A missing key or a failed
lookup is never kept, so a key published or a server recovered counts at once."""


def key_cache(resolver: Resolver | None = None) -> TTLCache[str, KeyLookup]:
    """The key cache that goes with ``resolver`` (default: the shared one)."""
    return (resolver or get_resolver()).derived_cache(KEY_CACHE)


async def fetch_key(name: str) -> KeyLookup:
    """Look up one key record with the shared resolver (the first TXT record, as dkimpy does).

    Found records are kept in :func:`key_cache` for their TTL.
    """
    invalid = _check_name(name)
    if invalid is not None:
        return invalid
    resolver = get_resolver()
    cache = key_cache(resolver)
    cached = cache.get(name)
    if cached is not None:
        return cached
    try:
        answer = await resolver.answer(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.name.EmptyLabel):
        return KeyLookup("missing", detail=f"no key published at {name}")
    except dns.exception.DNSException as exc:
        return KeyLookup("temperror", detail=f"key lookup failed: TXT {name}: {exc}")
    records = [b"".join(r.strings) for r in answer.rrset] if answer.rrset is not None else []
    if not records:
        return KeyLookup("missing", detail=f"no key published at {name}")
    lookup = KeyLookup("found", records[0])
    cache.put(name, lookup, float(answer.expiration))
    return lookup


async def fetch_keys(names: Iterable[str]) -> dict[str, KeyLookup]:
    """Look up every distinct name concurrently.

    Invalid names and keys in :func:`key_cache` are answered at once; only the others are
    looked up (one directly, several side by side), so a message whose keys are all cached
    costs no task and no suspension.
    """
    cache = key_cache()
    found: dict[str, KeyLookup | None] = {}
    for name in names:
        if name not in found:
            found[name] = _check_name(name) or cache.get(name)
    missing = [name for name, lookup in found.items() if lookup is None]
    if len(missing) == 1:
        found[missing[0]] = await fetch_key(missing[0])
    elif missing:
        found.update(zip(missing, await asyncio.gather(*(fetch_key(name) for name in missing)), strict=True))
    return {name: lookup for name, lookup in found.items() if lookup is not None}


def _fetch_key_blocking(name: str) -> KeyLookup:
    """The same lookup from a worker thread (only for a name that was not prefetched)."""
    invalid = _check_name(name)
    if invalid is not None:
        return invalid
    try:
        answer = get_resolver().sync_resolver().resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return KeyLookup("missing", detail=f"no key published at {name}")
    except dns.exception.DNSException as exc:
        return KeyLookup("temperror", detail=f"key lookup failed: TXT {name}: {exc}")
    records = [b"".join(r.strings) for r in answer]
    return KeyLookup("found", records[0]) if records else KeyLookup("missing", detail=f"no key at {name}")


class KeySource:
    """A dkimpy ``dnsfunc`` answering from prefetched lookups; remembers what it was asked."""

    def __init__(self, lookups: MutableMapping[str, KeyLookup], blocking: bool = True):
        self.lookups = lookups
        self.blocking = blocking
        self.asked: list[str] = []

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        key = _plain(name)
        self.asked.append(key)
        lookup = self.lookups.get(key)
        if lookup is None:
            if not self.blocking:
                raise _NotPrefetched(key)
            lookup = self.lookups[key] = _fetch_key_blocking(key)
        if lookup.status == "temperror":
            raise dkim.DnsTimeoutError(lookup.detail)
        return lookup.record if lookup.status == "found" else None

    def temporary_failures(self) -> list[str]:
        return [self.lookups[n].detail for n in dict.fromkeys(self.asked)
                if self.lookups[n].status == "temperror"]


def _plain(name: bytes) -> str:
    return name.decode("ascii", "replace").rstrip(".").lower()


# --------------------------------------------------------------------------- verifying

_WHITESPACE = b" \t\n\r\x0b\x0c"
"""What ``\\s`` matches in a bytes pattern."""


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """The outcome for one DKIM-Signature header field."""

    result: DKIMResult
    reason: str = ""
    domain: str = ""
    selector: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    partial_body: bool = False
    """A pass whose ``l=`` leaves part of the body unsigned (only with ``partial_body: pass``)."""


@dataclass(slots=True)
class _Signature:
    """What the event-loop side parsed out of one DKIM-Signature header field."""

    tags: dict[bytes, bytes] | None
    key_name: str | None
    without_from: str = ""
    """:func:`ignored_for_from` of the tags, worked out once (asked before the key lookups and
    again before dkimpy runs)."""

    @property
    def properties(self) -> dict[str, str]:
        tags = self.tags or {}
        props: dict[str, str] = {}
        for tag, prop in ((b"d", "header.d"), (b"s", "header.s"), (b"i", "header.i"), (b"a", "header.a")):
            if tags.get(tag):
                props[prop] = tags[tag].decode("ascii", "replace")
        b = tags.get(b"b", b"").translate(None, _WHITESPACE)  # re.sub(rb"\s+", b"", ...), without re
        if b:
            props["header.b"] = b[:8].decode("ascii", "replace")
        return props


def _parse_signature(value: str) -> _Signature:
    try:
        tags = dkim.util.parse_tag_value(value.encode("utf-8", "replace"))
    except dkim.util.InvalidTagValueList:
        return _Signature(None, None)
    without_from = ignored_for_from(tags)
    if not tags.get(b"s") or not tags.get(b"d"):
        return _Signature(tags, None, without_from)
    return _Signature(tags, _key_name(tags[b"s"], tags[b"d"]), without_from)


def signature_key_name(value: str) -> str | None:
    """The ``<s=>._domainkey.<d=>`` name whose key verifies a DKIM-Signature or ARC field
    value (lower case), or None when its tags cannot be parsed or lack ``s=``/``d=``.

    What ``dkim_verify`` and ``arc`` prefetch through the shared resolver before dkimpy runs.
    """
    return _parse_signature(value).key_name


def _key_problem(name: str, key_record: bytes, sig: Mapping[bytes, bytes],
                 ) -> tuple[DKIMResult, str, int | None]:
    """Check a key record against a signature: (result, reason, RSA bits); result "pass" if usable."""
    try:
        tags = _key_tags(key_record)
    except dkim.util.InvalidTagValueList as exc:
        return "permerror", f"key record at {name} has a syntax error ({exc})", None
    if b"p" not in tags:
        return "permerror", f"key record at {name} has no p= tag", None
    if not tags[b"p"]:
        return "permerror", f"key revoked (empty p= at {name})", None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return "permerror", f"key record at {name} is not v=DKIM1", None
    ktype = tags.get(b"k", b"rsa").lower()
    algorithm = sig.get(b"a", b"").lower()
    if ktype not in (b"rsa", b"ed25519"):
        return "permerror", f"unknown key type k={ktype.decode('ascii', 'replace')}", None
    if algorithm.partition(b"-")[0] != ktype:
        return ("permerror", f"key type k={ktype.decode()} does not fit "
                f"a={algorithm.decode('ascii', 'replace')}", None)
    if b"h" in tags:
        hashes = [h.strip().lower() for h in tags[b"h"].split(b":")]
        if algorithm.partition(b"-")[2] not in hashes:
            return "permerror", f"key at {name} does not allow {algorithm.decode()}", None
    services = [s.strip().lower() for s in tags.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        return "permerror", f"key at {name} is not for email (s={tags[b's'].decode()})", None
    flags = [t.strip().lower() for t in tags.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in sig:
        identity = sig[b"i"].rpartition(b"@")[2].lower()
        if identity != sig.get(b"d", b"").lower():
            return "permerror", "key has t=s but i= is a subdomain of d=", None
    try:
        _, bits, _, _ = _public_key(key_record)
    except dkim.NaClNotFoundError:
        return "neutral", "Ed25519 signature, but PyNaCl is not installed", None
    except (dkim.KeyFormatError, binascii.Error, ValueError) as exc:
        return "permerror", f"unusable key at {name}: {exc}", None
    return "pass", "", bits if ktype == b"rsa" else None


@dataclass(frozen=True, slots=True)
class _Options:
    min_key_bits: int
    partial_body: Literal["policy", "pass"]


#: Messages up to this size are verified on the event loop: their canonicalization, hashing and
#: RSA check take well under a millisecond, less than handing them to a thread (which, under
#: the GIL, also competes with the loop). Larger ones go to ``run_blocking``.
INLINE_LIMIT = 128 * 1024


class _NotPrefetched(BaseException):
    """dkimpy asked, on the event loop, for a key that was not prefetched: verify in a thread."""


# --------------------------------------------------------------------------- streamed body hash
#
# dkimpy wants the whole message as one bytes object, splits it into lines and canonicalizes
# the body with whole-body regular expressions: several copies of a spooled 50 MB message. The
# verifier below hands dkimpy only the header block and checks the body hash itself, streaming
# the body in blocks of whole lines with exactly dkimpy's canonicalization (RFC 6376 3.4.3 and
# 3.4.4 as dkimpy 1.1 implements them; tests/plugins/test_dkim.py compares the two on odd bodies).

BODY_BLOCK = 1024 * 1024
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")  # every WSP run but a lone SP (which stays as it is)
_BLANK_LINE = re.compile(rb"\r\n\r\n")
_CRLFS = b"\r\n" * 32768


def _line_blocks(views: Sequence[Buffer], size: int = BODY_BLOCK) -> Iterator[bytes]:
    """The concatenated buffers in blocks that end at a line end (the last one may not)."""
    carry = b""
    for part in views:
        view = memoryview(part)
        for start in range(0, len(view), size):
            block = carry + bytes(view[start:start + size])
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block  # one line longer than a block: keep collecting it
                continue
            carry = block[cut:]
            yield block[:cut]
    if carry:
        yield carry


def canonical_body(views: Sequence[Buffer], relaxed: bool, block_size: int = BODY_BLOCK) -> Iterator[bytes]:
    """The canonicalized body (simple or relaxed), in pieces, as dkimpy computes it whole.

    Both drop trailing empty lines and end a non-empty body with exactly one CRLF; simple
    makes an empty body one CRLF, relaxed leaves it empty.
    """
    held = 0  # CRLFs at the end of what was read so far: emitted only if content follows
    emitted = False
    for lines in _line_blocks(views, block_size):
        block = lines
        if relaxed:
            if b"\t" in block or b"  " in block:  # C-speed tests; the regex costs per space
                block = _WSP_RUN.sub(b" ", block)
            block = block.replace(b" \r\n", b"\r\n")
        content = block.rstrip(b"\r\n")
        if not content:
            held += len(block) // 2
            continue
        while held:
            count = min(held, len(_CRLFS) // 2)
            yield _CRLFS[:2 * count]
            held -= count
        yield content
        emitted = True
        held = (len(block) - len(content)) // 2
    if emitted or not relaxed:
        yield b"\r\n"


def split_at_blank_line(parts: Sequence[Buffer]) -> tuple[bytes, list[Buffer]]:
    """(the lines up to and including the first empty one, the rest) of the concatenated
    buffers, without copying the rest: where dkimpy's parser ends the header block.

    Without an empty line everything is header block (dkimpy's view too).
    """
    views: list[Buffer] = [memoryview(p) for p in parts if len(p)]
    if b"".join(bytes(v[:2]) for v in views[:2])[:2] == b"\r\n":  # the first line is empty
        skip = 2
        while skip:
            taken = min(skip, len(views[0]))
            views[0] = views[0][taken:]
            skip -= taken
            if not len(views[0]):
                views.pop(0)
        return b"\r\n", views
    head = b""
    for index, view in enumerate(views):
        tail = head[-3:]
        edge = _BLANK_LINE.search(tail + bytes(view[:3]))
        if edge is not None and edge.start() < len(tail):  # an empty line across the boundary
            cut = edge.end() - len(tail)
        else:
            found = _BLANK_LINE.search(view)
            if found is None:
                head += bytes(view)
                continue
            cut = found.end()
        return head + bytes(view[:cut]), [view[cut:], *views[index + 1:]]
    return head, []


install_dkimpy_replacements()  # faster, equivalent dkimpy internals: plugins/_dkimpy.py says which


@functools.lru_cache(maxsize=1024)
def _public_key(record: bytes) -> tuple[Any, int, bytes, bool]:
    """dkimpy's evaluate_pk of a key record, parsed once per distinct record."""
    return dkim.evaluate_pk(b"", record)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1024)
def _key_tags(record: bytes) -> dict[bytes, bytes]:
    return dkim.util.parse_tag_value(record)  # type: ignore[no-any-return]


class _Verifier(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkimpy's DKIM verification over the header block, with the body hash streamed here.

    Overrides two dkimpy 1.1 methods (tests/unit/test_dependency_internals.py names them):
    ``verify_sig`` takes the parsed public key from a cache, ``verify_sig_process`` checks
    ``bh=`` against :func:`canonical_body` and lets dkimpy do the rest with the tag removed
    and only the header fields it can sign.
    """

    def __init__(self, head: bytes, body: Sequence[Buffer], fields: Sequence[bytes] = ()):
        headers = _dkimpy_headers(head, fields)
        super().__init__(head if headers is None else None, logger=DKIMPY_LOG, minkey=0)
        if headers is not None:  # what dkimpy's rfc822_parse(head) gives, without parsing again
            self.headers, self.body = headers, b""
        self._body_parts = body
        self._digests: dict[tuple[bool, bytes, int | None], bytes] = {}
        self._lengths: dict[bool, int] = {}

    def body_digest(self, relaxed: bool, algorithm: bytes, limit: int | None) -> bytes:
        key = (relaxed, algorithm, limit)
        if key not in self._digests:
            hasher = dkim.HASH_ALGORITHMS[algorithm]()
            total = 0
            for piece in canonical_body(self._body_parts, relaxed):
                if limit is None or total < limit:
                    hasher.update(piece if limit is None else piece[:limit - total])
                total += len(piece)
            self._lengths[relaxed] = total
            self._digests[key] = hasher.digest()
        return self._digests[key]

    def body_length(self, relaxed: bool) -> int:
        """Octets of the canonical body (computed along with a digest, or now)."""
        if relaxed not in self._lengths:
            self._lengths[relaxed] = sum(len(p) for p in canonical_body(self._body_parts, relaxed))
        return self._lengths[relaxed]

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., bytes | None]) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            record = dnsfunc(name, timeout=self.timeout)
            if not record:
                dkim.evaluate_pk(name, record)  # raises dkimpy's "missing public key"
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = _public_key(bytes(record))  # type: ignore[arg-type]
        except (dkim.KeyFormatError, binascii.Error, dkim.DnsTimeoutError) as exc:
            self.logger.error("%s", exc)
            return False
        return bool(self.verify_sig_process(sig, include_headers, sig_header, dnsfunc))

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., bytes | None]) -> bool:
        if b"bh" in sig and (self.tlsrpt or not self.seqtlsrpt):  # dkimpy's own checks come first
            canonicalization = dkim.canonicalization
            try:
                policy = canonicalization.CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            except canonicalization.InvalidCanonicalizationPolicyError as exc:
                raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from None
            relaxed = policy.body_algorithm is canonicalization.Relaxed
            limit = int(sig[b"l"]) if b"l" in sig and not self.tlsrpt else None
            digest = self.body_digest(relaxed, sig[b"a"], limit)
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            if digest != expected:
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(digest)!r}, expected {sig[b'bh']!r})")
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        every_field = self.headers
        self.headers = signable_fields(every_field, include_headers)
        try:
            return bool(super().verify_sig_process(sig, include_headers, sig_header, dnsfunc))
        finally:
            self.headers = every_field


def signable_fields(headers: list[list[bytes]], include_headers: Sequence[bytes]) -> list[list[bytes]]:
    """The header fields (dkimpy's [name, value] pairs) whose names are in ``h=``, in order.

    dkimpy canonicalizes every field of the message, then hashes those its select_headers
    picks by name (From too, which it adds only when h= has it); from these it picks the same
    ones, so it is handed only these (tests/unit/test_dkim_stream.py compares the two ways)."""
    wanted = set(include_headers)
    return [field for field in headers if (name := field[0].lower()) in wanted or name.rstrip() in wanted]


_DKIMPY_NAME = re.compile(rb"([\x21-\x7e]+?):")
"""dkimpy's rfc822_parse: a field line is a name of these octets up to the first colon."""


def _dkimpy_headers(head: bytes, fields: Sequence[bytes]) -> list[list[bytes]] | None:
    """dkimpy's ``rfc822_parse(head)[0]`` built from the message's own fields (``raw_fields``),
    or None when they may differ (dkimpy parses then): when the fields joined with the empty
    line are exactly ``head`` and each first line is a dkimpy field line, dkimpy would find the
    same fields, each as [name, the rest of its first line and its continuation lines]."""
    if not fields or len(head) != sum(map(len, fields)) + 2 or b"".join(fields) + b"\r\n" != head:
        return None
    headers = []
    for raw in fields:
        match = _DKIMPY_NAME.match(raw)
        if match is None:
            return None
        headers.append([match.group(1), raw[match.end():]])
    return headers


def _verify_blocking(parts: Sequence[Buffer], signatures: Sequence[_Signature],
                     lookups: MutableMapping[str, KeyLookup], options: _Options,
                     *, inline: bool = False, fields: Sequence[bytes] = (),
                     ) -> list[tuple[DKIMResult, str, bool]]:
    """Verify signature 0..n-1 with dkimpy: (result, reason, partial body).

    In a worker thread, or with ``inline`` on the event loop (then a key that was not
    prefetched raises :class:`_NotPrefetched` instead of being looked up blocking).
    *fields*: the message's ``raw_fields``, which spare dkimpy parsing the header block again.
    """
    head, body = split_at_blank_line(parts)
    try:
        verifier = _Verifier(head, body, fields)
    except dkim.DKIMException as exc:
        return [("permerror", f"message cannot be parsed for DKIM: {exc}", False)] * len(signatures)
    results: list[tuple[DKIMResult, str, bool]] = []
    for idx, sig in enumerate(signatures):
        result, reason = _verify_one(verifier, idx, sig, lookups, options.min_key_bits, inline=inline)
        unsigned = _unsigned_body(verifier, sig.tags) if result == "pass" and sig.tags else None
        if unsigned is not None and options.partial_body == "policy":
            results.append(("policy", unsigned, False))
        else:
            results.append((result, unsigned or reason, unsigned is not None))
    return results


def _unsigned_body(verifier: _Verifier, tags: Mapping[bytes, bytes]) -> str | None:
    """Why a verified signature does not cover the whole body (its l= is shorter), or None.

    dkimpy hashes only the first l= octets of the canonical body and says nothing about the
    rest (RFC 6376 section 6.1.3 allows that), so anything appended after the signed part, or
    a whole body under l=0, verifies. This measures the canonical body the same way dkimpy does.
    """
    if b"l" not in tags:
        return None
    try:
        policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        length = int(tags[b"l"])
    except (dkim.canonicalization.InvalidCanonicalizationPolicyError, ValueError):
        return None  # dkimpy refused these already
    total = verifier.body_length(policy.body_algorithm is dkim.canonicalization.Relaxed)
    if length >= total:
        return None
    return (f"body partly unsigned: l={length} signs {length} of {total} body octets "
            "(RFC 6376 8.2: content may have been appended)")


def signed_fields(tags: Mapping[bytes, bytes]) -> list[str]:
    """The lower-cased field names of a signature's ``h=`` tag, in order ([] without one)."""
    return [name.strip().lower().decode("ascii", "replace")
            for name in tags.get(b"h", b"").split(b":") if name.strip()]


def ignored_for_from(tags: Mapping[bytes, bytes]) -> str:
    """Why a signature must be ignored because it does not sign From, or "" if it does.

    RFC 6376 section 6.1.1: "If the "h=" tag does not include the From header field, the
    Verifier MUST ignore the DKIM-Signature header field". dkimpy enforces this only when it
    signs, not when it verifies, so this plugin checks it before dkimpy runs: such a signature
    would otherwise pass while the author (the field DMARC aligns with) can be anything.
    A signature without any ``h=`` is left to dkimpy (a permerror: the tag is required).
    """
    if b"h" not in tags or "from" in signed_fields(tags):
        return ""
    return "signature does not cover the From field (h= lacks from, RFC 6376 6.1.1): ignored"


def _verify_one(verifier: _Verifier, idx: int, sig: _Signature, lookups: MutableMapping[str, KeyLookup],
                min_key_bits: int, *, inline: bool = False) -> tuple[DKIMResult, str]:
    if sig.tags is None:
        return "permerror", "signature has a syntax error (not a tag=value list)"
    if sig.without_from:
        return "policy", sig.without_from
    source = KeySource(lookups, blocking=not inline)
    verifier.signature_fields = {}
    error: tuple[DKIMResult, str] | None = None
    ok = False
    try:
        ok = bool(verifier.verify(idx=idx, dnsfunc=source))
    except dkim.ValidationError as exc:
        text = str(exc)
        if text.startswith("body hash mismatch"):
            error = ("fail", "body hash did not verify")
        else:
            error = ("permerror", f"invalid signature: {text}")
    except dkim.NaClNotFoundError:
        error = ("neutral", "Ed25519 signature, but PyNaCl is not installed")
    except dkim.DKIMException as exc:
        error = ("permerror", f"invalid signature: {exc or type(exc).__name__}")
    except Exception as exc:  # dkimpy on hostile input: a result, never a crash
        log.info("dkim_unprocessable", signature=idx, error=f"{type(exc).__name__}: {exc}")
        error = ("permerror", f"signature could not be processed ({type(exc).__name__})")
    if not source.asked:  # the signature itself is broken: never got as far as the key
        return error or ("permerror", "signature could not be processed")
    name = source.asked[-1]
    lookup = lookups[name]
    if lookup.status == "temperror":
        return "temperror", lookup.detail
    if lookup.status != "found" or lookup.record is None:
        return "permerror", lookup.detail
    sig_fields = verifier.signature_fields or sig.tags
    problem, reason, bits = _key_problem(name, lookup.record, sig_fields)
    if problem != "pass":
        return problem, reason
    if error is not None:
        return error
    if not ok:
        return "fail", "signature did not verify"
    if sig_fields.get(b"a", b"").lower() == b"rsa-sha1":
        return "policy", "rsa-sha1 signatures are not accepted (RFC 8301)"
    if bits is not None and bits < min_key_bits:
        return "policy", f"key too short ({bits} bits, at least {min_key_bits} required)"
    return "pass", ""


def overall_result(results: Iterable[SignatureResult]) -> DKIMResult:
    """The best result of all signatures (see the precedence above); ``none`` without any."""
    seen = {r.result for r in results}
    return next((r for r in _PRECEDENCE if r in seen), "none")


def _combine(verdicts: Iterable[Verdict | None]) -> Verdict | None:
    """The first final verdict, else one continue carrying every score, tag and reason."""
    present = [v for v in verdicts if v is not None]
    for verdict in present:
        if verdict.action is not Action.CONTINUE:
            return verdict
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return Verdict.cont(
        score=sum(v.score for v in present),
        reason="; ".join(v.reason for v in present if v.reason),
        tags=tuple(dict.fromkeys(t for v in present for t in v.tags)),
    )


class DKIMVerify:
    """Verify every DKIM-Signature at ``data``; place it before ``dmarc`` and ``auth_results``."""

    class Settings(PluginSettings):
        actions: dict[DKIMResult, ActionSpec] = Field(
            default_factory=lambda: dict(DEFAULT_ACTIONS),
            description=(
                "What to do for the overall result (the best of all signatures: pass, then "
                "temperror, fail, policy, permerror, neutral, none): continue, reject, tempfail, "
                "quarantine, or a number (continue and add that score). Results not given keep "
                "their defaults: fail: 1.0, every other result continues. Refusing is DMARC's job."
            ),
        )
        require_valid_for: list[str] = Field(
            default=[],
            description=(
                "Author domains that sign all their mail: a message whose From: domain is one of "
                "these must carry a passing signature with exactly that d=, else missing_required."
            ),
        )
        missing_required: ActionSpec = Field(
            default="reject",
            description=(
                "What to do when require_valid_for is not met. A reject answers 550 5.7.20 (no "
                "passing signature at all), 5.7.21 (the domain's signature was not acceptable) or "
                "5.7.22 (only other domains' signatures passed); if the domain's key lookup failed "
                "temporarily, a reject becomes 451 4.7.5 instead."
            ),
        )
        max_signatures: int = Field(
            default=10, strict=True, ge=1, le=100,
            description="Signatures verified per message, from the top; more are ignored (DoS guard).",
        )
        partial_body: Literal["policy", "pass"] = Field(
            default="policy",
            description=(
                "A signature that verifies but whose l= leaves part of the body unsigned (text "
                "appended after the signed part, or any body under l=0): policy (the default, "
                "not a pass) or pass (the leniency RFC 6376 6.1.3 allows; dmarc still does not "
                "align on it unless its align_partial_body is set)."
            ),
        )
        min_key_bits: int = Field(
            default=1024, strict=True, ge=1024, le=16384,
            description=(
                "Shortest RSA key accepted; a signature with a shorter key that verifies is "
                "recorded as policy (RFC 8301 forbids less than 1024)."
            ),
        )

        @field_validator("actions")
        @classmethod
        def _with_defaults(cls, value: dict[DKIMResult, ActionSpec]) -> dict[DKIMResult, ActionSpec]:
            return {**DEFAULT_ACTIONS, **value}

        @field_validator("require_valid_for")
        @classmethod
        def _domains(cls, value: list[str]) -> list[str]:
            return list(dict.fromkeys(normalize_domain(d) for d in value))

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        self.required = frozenset(self.settings.require_valid_for)

    async def verify(self, message: Message) -> list[SignatureResult]:
        """Verify the message's signatures (up to max_signatures); [] when it has none."""
        values = message.get_all("DKIM-Signature")
        if not values:
            return []
        limit = self.settings.max_signatures
        if len(values) > limit:
            log.info("dkim_too_many", signatures=len(values), verified=limit)
        signatures = [_parse_signature(v) for v in values[:limit]]
        lookups = await fetch_keys(s.key_name for s in signatures
                                   if s.key_name is not None and s.tags is not None
                                   and not s.without_from)
        options = _Options(self.settings.min_key_bits, self.settings.partial_body)
        parts = message.parts()  # no copy, also of a spooled message
        outcomes = None
        if message.size <= INLINE_LIMIT:
            try:
                outcomes = _verify_blocking(parts, signatures, lookups, options, inline=True,
                                            fields=message.raw_fields)
            except _NotPrefetched:
                outcomes = None  # dkimpy wants a key we do not have: look it up from a thread
        if outcomes is None:
            outcomes = await run_blocking(_verify_blocking, parts, signatures, lookups, options)
        results = []
        for sig, (result, reason, partial) in zip(signatures, outcomes, strict=True):
            props = sig.properties
            results.append(SignatureResult(
                result, reason, props.get("header.d", "").lower(), props.get("header.s", ""), props,
                partial,
            ))
        return results

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        results = await self.verify(message)
        if not results:
            record(transaction, AuthCheck("dkim", "none", "message not signed"))
            log.info("dkim", result="none")
        for r in results:
            check = AuthCheck("dkim", r.result, r.reason, dict(r.properties))
            record(transaction, check)
            if r.partial_body:
                transaction.notes.setdefault(PARTIAL_BODY_NOTE, []).append(check)
            log.info("dkim", result=r.result, d=r.domain or None, s=r.selector or None, reason=r.reason)
        overall = overall_result(results)
        detail = next((r.reason for r in results if r.result == overall and r.reason), "")
        reason = f"dkim={overall}" + (f" ({detail})" if detail else "")
        code, text = NO_ACCEPTABLE if overall == "policy" else NO_PASSING
        temp_code, temp_text = TEMPORARY if overall == "temperror" else TEMPFAIL_OTHER
        verdict = verdict_for(
            self.settings.actions.get(overall, "continue"),
            reject_text=text, reject_enhanced=code,
            tempfail_text=temp_text, tempfail_enhanced=temp_code,
            reason=reason, tags=(f"dkim:{overall}",),
        )
        return _combine([self._required(message, results), verdict])

    def _required(self, message: Message, results: Sequence[SignatureResult]) -> Verdict | None:
        """The missing_required verdict when a required author domain lacks a passing signature."""
        if not self.required:
            return None
        for domain in author_domains(message):
            if domain not in self.required:
                continue
            own = [r for r in results if r.domain == domain]
            if any(r.result == "pass" for r in own):
                continue
            action = self.settings.missing_required
            temporary = any(r.result == "temperror" for r in own)
            if temporary and action == "reject":
                action = "tempfail"
            temp_code, temp_text = TEMPORARY if temporary else TEMPFAIL_OTHER
            if any(r.result == "policy" for r in own):
                code, text = NO_ACCEPTABLE
            elif not any(r.result == "pass" for r in results):
                code, text = NO_PASSING
            else:
                code, text = NO_AUTHOR_MATCHED
            found = ", ".join(f"{r.result}" for r in own) or "none"
            return verdict_for(
                action, reject_text=text, reject_enhanced=code,
                tempfail_text=temp_text, tempfail_enhanced=temp_code,
                reason=f"no passing DKIM signature with d={domain} (required; its signatures: {found})",
                tags=("dkim:missing-required",),
            )
        return None


# --------------------------------------------------------------------------- signing


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    return value if value.is_absolute() or base is None else Path(base) / value


def _ed25519_seed(data: bytes) -> bytes | None:
    """The 32-byte seed from a PKCS#8 PEM (openssl genpkey -algorithm ed25519) or bare base64."""
    pem = _PEM.search(data)
    if pem is not None:
        try:
            der = base64.b64decode(b"".join(pem.group(2).split()), validate=True)
        except binascii.Error:
            return None
        match = _ED25519_PKCS8.search(der)
        return match.group(1) if match else None
    try:
        raw = base64.b64decode(b"".join(data.split()), validate=True)
    except binascii.Error:
        return None
    return raw if len(raw) == 32 else None


def load_private_key(path: Path, algorithm: str) -> bytes:
    """Read and check a private key file; return it in the form dkimpy signs with.

    Raises ValueError naming the file when it is missing, unreadable or not a usable key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"DKIM key file {path}: cannot read it ({exc.strerror or exc})") from None
    if algorithm == "ed25519-sha256":
        seed = _ed25519_seed(data)
        if seed is None:
            raise ValueError(
                f"DKIM key file {path}: not an Ed25519 private key (expected a PKCS#8 PEM "
                "'BEGIN PRIVATE KEY' as written by 'openssl genpkey -algorithm ed25519', or the "
                "base64 seed dknewkey writes)"
            )
        try:
            signing = importlib.import_module("nacl.signing")
        except ImportError:
            raise ValueError(
                f"DKIM key file {path}: Ed25519 signing needs the PyNaCl package (pip install pynacl)"
            ) from None
        signing.SigningKey(seed)  # what dkimpy will build from it
        return base64.b64encode(seed)
    pem = data.replace(b"\r\n", b"\n")
    try:
        parsed = dkim.crypto.parse_pem_private_key(pem)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"DKIM key file {path}: not an unencrypted RSA private key in PEM format "
            f"(PKCS#1 or PKCS#8): {first}"
        ) from None
    bits = int(parsed["modulus"]).bit_length()
    if bits < 1024:
        raise ValueError(
            f"DKIM key file {path}: the RSA key has {bits} bits; use at least 1024 (2048 recommended)"
        )
    return pem


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private: bytes
    file: Path


def header_from_dkimpy(line: bytes) -> tuple[str, str]:
    """Turn a folded ``Name: value CRLF`` field from dkimpy into (name, unfolded value).

    Unfolding removes each CRLF (RFC 5322 3.2.2) and nothing else; the signatures are made
    with relaxed header canonicalization, so :class:`Message` may refold it as it likes.
    """
    name, colon, value = line.partition(b":")
    if not colon:
        raise ValueError(f"dkimpy returned a header without a colon: {line[:40]!r}")
    unfolded = value.replace(b"\r\n", b"")
    if b"\r" in unfolded or b"\n" in unfolded:
        raise ValueError(f"dkimpy returned {name!r} with a bare CR or LF")
    return name.decode("ascii"), unfolded.decode("ascii").strip(" \t")


def _sign_blocking(raw: bytes, keys: Sequence[SigningKey], include: Sequence[str]) -> list[tuple[str, str]]:
    fields = []
    for key in keys:
        signer = dkim.DKIM(raw, logger=DKIMPY_LOG, signature_algorithm=key.algorithm.encode())
        line = signer.sign(
            key.selector.encode(), key.domain.encode(), key.private,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=[h.encode() for h in include],
        )
        fields.append(header_from_dkimpy(line))
    return fields


def _header_list(value: list[str], what: str) -> list[str]:
    names = []
    for name in value:
        lowered = name.strip().lower()
        if not _FIELD_NAME.match(lowered):
            raise ValueError(f"{name!r} is not a header field name")
        if lowered in _NEVER_SIGN:
            raise ValueError(f"{lowered} must not be {what} (RFC 6376 5.4): it changes in transit")
        names.append(lowered)
    return list(dict.fromkeys(names))


class KeyLocation(PluginSettings):
    """A domain, a selector and a private key file: what DKIM signing and ARC sealing share."""

    domain: str = Field(description="Signing domain (d=).")
    selector: str = Field(
        description="Selector (s=): the public key is published as TXT at <selector>._domainkey.<domain>."
    )
    key_file: Path = Field(
        description="Private key file (PEM), read at startup; relative to the config file."
    )

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return normalize_domain(value)

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        return normalize_domain(value, "selector")

    @field_validator("key_file")
    @classmethod
    def _path(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)


class SigningKeySettings(KeyLocation):
    """One signing key of ``dkim_sign``."""

    domain: str = Field(description="Signing domain (d=); mail from exactly this domain is signed.")
    key_file: Path = Field(
        description=(
            "Private key file, read at startup; relative to the config file. RSA: PEM, PKCS#1 or "
            "PKCS#8, at least 1024 bits (2048 recommended). Ed25519: PKCS#8 PEM."
        )
    )
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = Field(
        default="rsa-sha256", description="Signature algorithm (a=); must fit the key."
    )


class DKIMSign:
    """Sign outgoing mail for configured domains at ``data``; place it last in the plugin list."""

    class Settings(PluginSettings):
        keys: list[SigningKeySettings] = Field(
            min_length=1,
            description=(
                "Signing keys: {domain, selector, key_file, algorithm}. A domain may have several "
                "(e.g. rsa-sha256 and ed25519-sha256); the message gets one signature per key."
            ),
        )
        headers: list[str] = Field(
            default=list(DEFAULT_SIGN_HEADERS),
            description=(
                "Header fields to sign, those present in the message (each occurrence); must "
                "include from. Received, Return-Path, Bcc and the like are refused."
            ),
        )
        oversign: list[str] = Field(
            default=["from"],
            description=(
                "Fields signed once more than they occur, so that none can be added later "
                "without breaking the signature (RFC 6376 8.15)."
            ),
        )
        relay_networks: list[Network] = Field(
            default=[],
            description=(
                "Client networks whose mail is signed (besides authenticated clients, which "
                "always are); e.g. your own submission servers."
            ),
        )
        match: Literal["from", "sender"] = Field(
            default="from",
            description=(
                "Which domain selects the keys: the From: header's (the one DMARC aligns with) "
                "or the envelope sender's."
            ),
        )

        @field_validator("headers")
        @classmethod
        def _headers(cls, value: list[str]) -> list[str]:
            names = _header_list(value, "signed")
            if "from" not in names:
                raise ValueError("must include from (RFC 6376 5.4: From is always signed)")
            return names

        @field_validator("oversign")
        @classmethod
        def _oversign(cls, value: list[str]) -> list[str]:
            return _header_list(value, "signed")

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys: dict[str, list[SigningKey]] = {}
        for index, spec in enumerate(settings.keys):
            try:
                private = load_private_key(spec.key_file, spec.algorithm)
            except ValueError as exc:
                raise SettingsError(str(exc), key=("keys", index, "key_file")) from None
            key = SigningKey(spec.domain, spec.selector, spec.algorithm, private, spec.key_file)
            self.keys.setdefault(spec.domain, []).append(key)
        for domain, keys in self.keys.items():
            # Prepended one after another: Ed25519 first, so RSA ends up on top.
            keys.sort(key=lambda k: k.algorithm != "ed25519-sha256")
            self.keys[domain] = keys

    def _may_sign(self, session: Session) -> bool:
        return session.auth_user is not None or ip_in_networks(
            session.client.ip, self.settings.relay_networks
        )

    def _domain(self, transaction: Transaction, message: Message) -> str | None:
        if self.settings.match == "sender":
            sender = transaction.envelope.sender
            return None if sender.is_null else _domain_of(sender.text)
        domains = author_domains(message)
        return domains[0] if len(domains) == 1 else None

    def include_headers(self, message: Message) -> list[str]:
        """The h= list for this message: configured fields as often as present, plus oversigning."""
        counts = Counter(name.lower() for name, _ in message.headers)
        include = [name for name in self.settings.headers for _ in range(counts[name])]
        return include + list(self.settings.oversign)

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        if not self._may_sign(session):
            return None
        domain = self._domain(transaction, message)
        keys = self.keys.get(domain) if domain else None
        if not keys or domain is None:
            return None
        if "From" not in message:
            return Verdict.cont(reason="not DKIM signed: the message has no From: header")
        try:
            fields = await run_blocking(_sign_blocking, message.raw, keys, self.include_headers(message))
        except (dkim.DKIMException, ValueError) as exc:
            log.warning("dkim_sign", result="error", d=domain, error=str(exc))
            return Verdict.cont(reason=f"not DKIM signed: {exc}", tags=("dkim:sign-error",))
        for name, value in fields:
            message.add_header(name, value)
        selectors = ", ".join(f"s={k.selector} a={k.algorithm}" for k in reversed(keys))
        log.info("dkim_sign", result="signed", d=domain, s=[k.selector for k in reversed(keys)],
                 a=[k.algorithm for k in reversed(keys)])
        return Verdict.cont(reason=f"DKIM signed d={domain} ({selectors})", tags=("dkim:signed",))
