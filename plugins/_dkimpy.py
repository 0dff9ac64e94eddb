"""Faster dkimpy internals with exactly dkimpy's results, installed by one explicit call.

dkimpy spends most of a verification in a few Python helpers; :func:`install` replaces these
thirteen names (each replacement is compared with dkimpy's own on hypothesis' input in
tests/unit/test_dkim_stream.py, and tests/unit/test_dependency_internals.py checks they still exist):

- ``dkim.crypto.str2int``, ``dkim.crypto.int2str``: int's own conversions;
- ``dkim.crypto.RSASSA_PKCS1_v1_5_verify`` and ``dkim.RSASSA_PKCS1_v1_5_verify``: the RSA
  public operation in OpenSSL (``cryptography``), dkimpy's own for what OpenSSL refuses;
- ``dkim.RE_BTAG``: the b= blanking pattern without nested repetition;
- ``dkim.rfc822_parse``, ``dkim.util.parse_tag_value`` and ``dkim.parse_tag_value``,
  ``dkim.canonicalization.compress_whitespace``, ``dkim.canonicalization.unfold_header_value``:
  bytes methods instead of module-level ``re`` calls;
- ``dkim.validate_signature_fields``: dkimpy's checks with its patterns compiled once;
- ``dkim.select_headers``: each field name lower-cased once;
- ``dkim.hash_headers``: one hash update of the joined pieces rather than three per field.

The DKIM plugin calls :func:`install` when it is imported, so the replacements serve every
user of dkimpy in the process from then on; calling it again changes nothing.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from typing import Any

import dkim
import dkim.canonicalization
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa

__all__ = ["REPLACED", "install"]


# dkimpy's RSA converts between integers and octet strings one octet at a time in Python
# (dkim.crypto.int2str/str2int): more CPU per verification than the modular exponentiation
# itself. These give exactly the same results with int's own conversions; dkim.crypto's RSA
# functions look them up as module globals, so installing them there is enough.


def _str2int(s: bytes | bytearray) -> int:
    return int.from_bytes(s, "big")


def _int2str(n: int, length: int = -1) -> bytearray:
    assert n >= 0
    if length < 0:
        return bytearray(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
    return bytearray((n & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))  # the low octets, as dkimpy


# And the RSA public operation itself: Python's pow() on a 2048-bit modulus costs about 0.15 ms,
# more than all the rest of a verification; OpenSSL (through ``cryptography``)
# does it in a tenth of that. Same answers as dkimpy's RSASSA_PKCS1_v1_5_verify: OpenSSL
# recovers the block under PKCS#1 v1.5 type 1 padding (00 01 FF.. 00, at least 8 FF, else it
# fails, and then dkimpy's expected block, which has that form, cannot match either), and the
# block rebuilt from what it recovered is compared with dkimpy's expected one. What OpenSSL
# would refuse to compute (a signature not exactly as long as the modulus or not below it, a
# key it does not take) goes to dkimpy's own function.
_dkimpy_rsa_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify


@functools.lru_cache(maxsize=1024)
def _openssl_key(modulus: int, exponent: int) -> Any:
    """The OpenSSL public key for (n, e), or None when OpenSSL does not take it."""
    try:
        return _rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except Exception:  # any refusal: dkimpy's own arithmetic decides
        return None


def _rsa_verify(hash: Any, signature: bytes, public_key: Mapping[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify`` with the modular exponentiation in OpenSSL."""
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    modlen = max(1, (modulus.bit_length() + 7) // 8)  # len(int2str(modulus))
    key = _openssl_key(modulus, exponent) if modulus > 0 else None
    if key is None or len(signature) != modlen or int.from_bytes(signature, "big") >= modulus:
        return bool(_dkimpy_rsa_verify(hash, signature, public_key))
    name = hash.name.lower()
    if name not in dkim.crypto.HASH_ID_MAP:
        dkim.crypto.EMSA_PKCS1_v1_5_encode(hash, modlen)  # raises as dkimpy's does
    digest = hash.digest()
    expected = _digest_info_prefix(name, len(digest)) + digest
    if len(expected) + 11 > modlen:
        raise dkim.crypto.DigestTooLargeError()  # as dkimpy's EMSA_PKCS1_v1_5_encode
    try:
        recovered = key.recover_data_from_signature(signature, _padding.PKCS1v15(), None)
    except InvalidSignature:
        return False
    except Exception:  # anything else OpenSSL says: dkimpy's arithmetic decides
        return bool(_dkimpy_rsa_verify(hash, signature, public_key))
    # dkimpy compares 00 01 FF.. 00 DigestInfo with the whole block; OpenSSL checked the
    # padding and returns what follows it, so the blocks are equal exactly when that is the
    # DigestInfo (the separator is the first 00 after the FFs in both).
    return bool(recovered == expected)


@functools.lru_cache(maxsize=16)
def _digest_info_prefix(name: str, size: int) -> bytes:
    """The DER DigestInfo of dkimpy's EMSA_PKCS1_v1_5_encode up to the digest itself: the same
    for every digest of one algorithm (and length), so built once, with dkimpy's own encoder."""
    crypto = dkim.crypto
    info = crypto.asn1_build((crypto.SEQUENCE, [
        (crypto.SEQUENCE, [(crypto.OBJECT_IDENTIFIER, crypto.HASH_ID_MAP[name]), (crypto.NULL, None)]),
        (crypto.OCTET_STRING, b"\0" * size),
    ]))
    return bytes(info[:len(info) - size])


# dkimpy blanks the b= tag of the signature it hashes with RE_BTAG, whose folding-whitespace
# group nested in a repetition makes the regex engine try every base64 octet several ways:
# 40 us per signature. Its FWS, ``(?:(?:\s*\r?\n)?\s+)?``, matches exactly the runs ``\s*``
# matches, so ``(?:FWS[b64])*`` is the longest run of whitespace and base64 octets that ends
# in a base64 octet: the same matches, found in one pass (tests/unit/test_dkim_stream.py compares
# the two on hypothesis' strings).
_DKIMPY_BTAG = dkim.RE_BTAG
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")

# Two more dkimpy helpers that run for every header field or tag of every message, each
# through a module-level ``re`` call: the same results with bytes methods (tests/
# test_dkim_stream.py compares each with dkimpy's own on hypothesis' input).
_dkimpy_parse_tag_value = dkim.util.parse_tag_value
_dkimpy_compress_whitespace = dkim.canonicalization.compress_whitespace
_dkimpy_unfold_header_value = dkim.canonicalization.unfold_header_value


def _parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's ``parse_tag_value`` (RFC 6376 3.2). Its key regex (an ASCII letter, then
    any word characters, not anchored at the end) only tests the first octet: ``isalpha``."""
    if not isinstance(tag_list, bytes):
        return _dkimpy_parse_tag_value(tag_list)
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # trailing semicolons are valid
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, equals, value = tag_spec.partition(b"=")
        key = key.strip()
        if not equals or not key[:1].isalpha():
            raise dkim.util.InvalidTagSpec(tag_spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


def _compress_whitespace(content: bytes) -> bytes:
    """dkimpy's: every run of SP/HTAB becomes one SP (nothing to do without a tab or two spaces)."""
    if b"\t" in content or b"  " in content:
        return _dkimpy_compress_whitespace(content)  # type: ignore[no-any-return]
    return content


def _unfold_header_value(content: bytes) -> bytes:
    """dkimpy's ``re.sub(b"\\r?\\n", b"", content)``: every LF goes, with the CR just before it."""
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


_dkimpy_rfc822_parse = dkim.rfc822_parse
_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` (the header block of every message it verifies), with the
    line split done by ``bytes.split`` (dropping the CR of a CRLF, as ``\r?\n`` does) and the
    name pattern compiled once; the loop is dkimpy's, line for line."""
    if not isinstance(message, bytes):
        return _dkimpy_rfc822_parse(message)
    headers: list[list[bytes]] = []
    lines = message.split(b"\n")
    for index in range(len(lines) - 1):  # the last piece ends the message, not a line
        if lines[index].endswith(b"\r"):
            lines[index] = lines[index][:-1]
    i = 0
    while i < len(lines):
        if len(lines[i]) == 0:
            i += 1
            break
        if lines[i][0] in (0x09, 0x20):
            headers[-1][1] += lines[i] + b"\r\n"
        else:
            m = _HEADER_NAME.match(lines[i])
            if m is not None:
                headers.append([m.group(1), lines[i][m.end(0):] + b"\r\n"])
            elif lines[i].startswith(b"From "):
                pass
            else:
                raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {lines[i]!r}")
        i += 1
    return headers, b"\r\n".join(lines[i:])


_dkimpy_select_headers = dkim.select_headers


def _select_headers(headers: Any, include_headers: Any) -> list[Any]:
    """dkimpy's ``select_headers`` (the signed fields of every signature it verifies, bottom
    up per h= name), with each field name lower-cased once rather than at every step of every
    name's backwards scan; the loop is dkimpy's."""
    names = [header[0].lower() for header in headers]
    sign_headers = []
    lastindex: dict[Any, int] = {}
    for h in include_headers:
        assert h == h.lower()  # dkimpy's own check, kept with its AssertionError
        i = lastindex.get(h, len(headers))
        while i > 0:
            i -= 1
            if h == names[i]:
                sign_headers.append(headers[i])
                break
        lastindex[h] = i
    return sign_headers


_dkimpy_hash_headers = dkim.hash_headers


def _hash_headers(hasher: Any, canonicalize_headers: Any, headers: Any,  # noqa: PLR0917 - dkimpy's signature
                  include_headers: Any, sigheader: Any, sig: Any) -> list[Any]:
    """dkimpy's ``hash_headers`` (the signed fields and the signature field without b=, into
    the header hash) with one ``update`` of the pieces joined instead of three per field:
    the same digest (and the same bytes for dkimpy's debug ``HashThrough``)."""
    sign_headers = dkim.select_headers(headers, include_headers)
    unsigned = dkim.RE_BTAG.sub(b"\\1", sigheader[1])
    cheaders = canonicalize_headers.canonicalize_headers([(sigheader[0], unsigned)])
    hasher.update(b"".join([piece for x, y in sign_headers + [(x, y.rstrip()) for x, y in cheaders]
                            for piece in (x, b":", y)]))
    return sign_headers  # type: ignore[no-any-return]


_dkimpy_validate_signature_fields = dkim.validate_signature_fields
_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what \s matches in a bytes pattern
_DOMAIN_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_LENGTH = re.compile(rb"\d{,76}$")
_DECIMAL = re.compile(rb"\d+$")


def _validate_signature_fields(sig: dict[bytes, bytes],
                               mandatory_fields: Any = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"),
                               arc: bool = False) -> None:
    r"""dkimpy's ``validate_signature_fields`` (every signature it verifies), check for check
    and message for message in its order, with its patterns compiled once and its ``len(re.sub(
    \s+, ...))`` as a ``translate``; anything but bytes values goes to dkimpy's own. (Its
    ``%s`` of a bytes value is the value's repr: ``%r`` here, the same text.)"""
    if not all(type(value) is bytes for value in sig.values()):
        return _dkimpy_validate_signature_fields(sig, list(mandatory_fields), arc)  # type: ignore[no-any-return]
    hashes = dkim.ARC_HASH_ALGORITHMS if arc else dkim.HASH_ALGORITHMS
    for name in mandatory_fields:
        if name not in sig:
            raise dkim.ValidationError("missing %s=" % name)  # noqa: UP031 - dkimpy's message, as it formats it
    if b"a" in sig and sig[b"a"] not in hashes:
        raise dkim.ValidationError("unknown signature algorithm: %r" % sig[b"a"])  # noqa: UP031
    if b"b" in sig:
        if _BASE64.match(sig[b"b"]) is None:
            raise dkim.ValidationError("b= value is not valid base64 (%r)" % sig[b"b"])  # noqa: UP031
        if len(sig[b"b"].translate(None, _WHITESPACE)) % 4 != 0:
            raise dkim.ValidationError("b= value is not valid base64 (%r)" % sig[b"b"])  # noqa: UP031
    if b"bh" in sig:
        if _BASE64.match(sig[b"b"]) is None:  # sic: dkimpy checks b= here
            raise dkim.ValidationError("bh= value is not valid base64 (%r)" % sig[b"bh"])  # noqa: UP031
        if len(sig[b"bh"].translate(None, _WHITESPACE)) % 4 != 0:
            raise dkim.ValidationError("bh= value is not valid base64 (%r)" % sig[b"bh"])  # noqa: UP031
    if b"cv" in sig and sig[b"cv"] not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        raise dkim.ValidationError("cv= value is not valid (%r)" % sig[b"cv"])  # noqa: UP031
    if sig[b"d"].isascii() and _DOMAIN_SPECIALS.search(sig[b"d"]) is not None:
        raise dkim.ValidationError("d= value is not valid (%r)" % sig[b"d"])  # noqa: UP031
    if not arc and b"i" in sig and (
            not sig[b"i"].lower().endswith(sig[b"d"].lower())
            or sig[b"i"][-len(sig[b"d"]) - 1] not in ("@", ".", 64, 46)):
        raise dkim.ValidationError(
            "i= domain is not a subdomain of d= (i=%r d=%r)" % (sig[b"i"], sig[b"d"]))  # noqa: UP031
    if b"l" in sig and _LENGTH.match(sig[b"l"]) is None:
        raise dkim.ValidationError("l= value is not a decimal integer (%r)" % sig[b"l"])  # noqa: UP031
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise dkim.ValidationError("q= value is not dns/txt (%r)" % sig[b"q"])  # noqa: UP031
    t_sign = None
    if b"t" in sig:
        if _DECIMAL.match(sig[b"t"]) is None:
            raise dkim.ValidationError("t= value is not a decimal integer (%r)" % sig[b"t"])  # noqa: UP031
        t_sign = int(sig[b"t"])
        if t_sign > int(time.time()) + 36000:  # dkimpy's 10 hours of leeway
            raise dkim.ValidationError("t= value is in the future (%r)" % sig[b"t"])  # noqa: UP031
    if b"v" in sig and sig[b"v"] != b"1":
        raise dkim.ValidationError("v= value is not 1 (%r)" % sig[b"v"])  # noqa: UP031
    if b"x" in sig:
        if _DECIMAL.match(sig[b"x"]) is None:
            raise dkim.ValidationError("x= value is not a decimal integer (%r)" % sig[b"x"])  # noqa: UP031
        x_sign = int(sig[b"x"])
        if x_sign < int(time.time()) - 36000:
            raise dkim.ValidationError("x= value is past (%r)" % sig[b"x"])  # noqa: UP031
        if t_sign and x_sign < t_sign:
            raise dkim.ValidationError(
                "x= value is less than t= value (x=%r t=%r)" % (sig[b"x"], sig[b"t"]))  # noqa: UP031
    return None


REPLACED = (
    "dkim.crypto.str2int", "dkim.crypto.int2str", "dkim.crypto.RSASSA_PKCS1_v1_5_verify",
    "dkim.RSASSA_PKCS1_v1_5_verify", "dkim.RE_BTAG", "dkim.rfc822_parse",
    "dkim.util.parse_tag_value", "dkim.parse_tag_value", "dkim.canonicalization.compress_whitespace",
    "dkim.canonicalization.unfold_header_value", "dkim.validate_signature_fields", "dkim.select_headers",
    "dkim.hash_headers",
)
"""What :func:`install` replaces, by dotted name."""


def install() -> None:
    """Put the replacements in place (idempotent)."""
    dkim.crypto.str2int = _str2int
    dkim.crypto.int2str = _int2str
    dkim.crypto.RSASSA_PKCS1_v1_5_verify = _rsa_verify
    dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify  # dkim/__init__.py imported the name
    dkim.RE_BTAG = _BTAG
    dkim.rfc822_parse = _rfc822_parse
    dkim.util.parse_tag_value = _parse_tag_value
    dkim.parse_tag_value = _parse_tag_value  # dkim/__init__.py imported the name
    dkim.canonicalization.compress_whitespace = _compress_whitespace
    dkim.canonicalization.unfold_header_value = _unfold_header_value
    dkim.validate_signature_fields = _validate_signature_fields
    dkim.select_headers = _select_headers
    dkim.hash_headers = _hash_headers
