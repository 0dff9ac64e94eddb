"""Attachment file names as the recipient's mail client and operating system will see them.

A name arrives in up to four places (``Content-Disposition`` ``filename``, ``Content-Type``
``name``, each plain, RFC 2231 encoded and continued, or RFC 2047 encoded) and mail clients
differ in which one they prefer, so every candidate is checked. Each is then reduced to the
name Windows opens: the last path component, invisible and direction-changing characters
dropped (a right-to-left override turns ``invoice\\u202efdp.exe`` into what reads as
``invoiceexe.pdf``), NFKC-normalised (fullwidth letters and one-dot leaders become ASCII),
look-alike characters replaced by the ASCII letters they imitate (Unicode's confusables
data, from ``confusable-homoglyphs``), and trailing dots and spaces removed, as Windows
does. Extensions are compared case-folded.
"""

from __future__ import annotations

import email.header
import email.utils
import unicodedata
from dataclasses import dataclass
from email.message import Message as HeaderBlock

from confusable_homoglyphs import confusables

__all__ = ["Name", "candidates", "clean"]

#: Longest name kept: file systems stop at 255, and a longer one is itself suspicious.
MAX_NAME = 1024
#: Where clients look, most common first: the standard places, then the swapped ones some
#: clients (and some malware kits) use.
_PLACES = (("filename", "content-disposition"), ("name", "content-type"),
           ("name", "content-disposition"), ("filename", "content-type"))
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True, slots=True)
class Name:
    """One candidate file name: as sent (decoded), as Windows would treat it, and the tricks."""

    sent: str
    effective: str  # NFKC, look-alikes mapped, invisible characters and trailing dots/spaces gone
    extensions: tuple[str, ...]  # case-folded, last one last; ("pdf", "exe") for invoice.pdf.exe
    tricks: tuple[str, ...]  # "bidi control", "invisible character", "look-alike characters"

    @property
    def extension(self) -> str:
        return self.extensions[-1] if self.extensions else ""


def _decode_2047(value: str) -> str:
    """RFC 2047 encoded words inside a parameter, as most clients decode them anyway."""
    if "=?" not in value:
        return value
    try:
        pieces = email.header.decode_header(value)
        return "".join(
            part.decode(charset or "ascii", errors="replace") if isinstance(part, bytes) else part
            for part, charset in pieces
        )
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        return value


def _param(headers: HeaderBlock, param: str, header: str) -> str | None:
    try:
        value = headers.get_param(param, header=header)
    except (ValueError, IndexError, TypeError, LookupError):  # compat32 on hostile parameters
        return None
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, tuple):  # RFC 2231: (charset, language, value)
        try:
            value = email.utils.collapse_rfc2231_value(value, errors="replace")
        except (LookupError, ValueError, TypeError):
            value = str(value[2])
    return str(value)


def candidates(headers: HeaderBlock) -> list[str]:
    """Every file name a client might show for this part, decoded, without duplicates.

    Every field counts: with two ``Content-Type`` fields, some clients read the first and
    others the last; and ``name`` in ``Content-Disposition`` or ``filename`` in ``Content-Type``
    too, which some clients accept.
    """
    found: list[str] = []
    for param, header in _PLACES:
        for field in headers.get_all(header, ()):
            single = HeaderBlock()
            single[header] = str(field)
            value = _param(single, param, header)
            if value is None:
                continue
            for decoded in (_decode_2047(value), value):
                one = decoded[:MAX_NAME]
                if one and one not in found:
                    found.append(one)
    return found


def _look_alike(char: str) -> str | None:
    """The ASCII character ``char`` imitates, if Unicode's confusables data names one."""
    for entry in confusables.confusables_data.get(char, ()):
        target = entry.get("c", "")
        if len(target) == 1 and target.isascii() and target.isprintable():
            return str(target)
    return None


def _extensions(name: str) -> tuple[str, ...]:
    _stem, *exts = name.split(".")
    return tuple(ext.casefold() for ext in exts if ext)


def clean(sent: str) -> Name:
    """What Windows would make of ``sent``, and which tricks it took to get there."""
    tricks: list[str] = []
    kept: list[str] = []
    for char in sent:
        category = unicodedata.category(char)
        if char in _BIDI:
            _note(tricks, "bidi control")
        elif category in ("Cf", "Cc") or char == "\u00ad":
            _note(tricks, "invisible character")
        else:
            kept.append(char)
    nfkc = unicodedata.normalize("NFKC", "".join(kept))
    nfkc = nfkc.replace("\\", "/").rsplit("/", 1)[-1]
    mapped = "".join(
        char if char.isascii() else (_look_alike(char) or char) for char in nfkc
    )
    effective = mapped.rstrip(" .")
    plain = nfkc.rstrip(" .")
    if _extensions(effective) != _extensions(plain):
        _note(tricks, "look-alike characters")  # only where it changes what the extension is
    return Name(sent, effective, _extensions(effective), tuple(tricks))


def _note(tricks: list[str], trick: str) -> None:
    if trick not in tricks:
        tricks.append(trick)
