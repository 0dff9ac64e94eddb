"""What a file really is: libmagic's answer, and oletools' and msoffcrypto's for Office files.

libmagic (Debian's ``libmagic1``, through ``python-magic``) is the ``file`` command's
database: it knows PE, ELF and Mach-O executables, ISO 9660 and VHD images, Windows
shortcuts, OLE and OOXML documents and every archive format, so no signature table is kept
here. Office documents are opened with ``msoffcrypto-tool`` (encrypted or not) and
``oletools``' olevba (VBA or Excel 4 macros), in memory. Neither library's failure on a
damaged file escapes: it is reported as unreadable.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import warnings

import magic
import msoffcrypto

with warnings.catch_warnings():  # olevba builds its pyparsing grammar with deprecated names
    warnings.simplefilter("ignore", DeprecationWarning)
    from oletools.olevba import VBA_Parser

__all__ = ["GENERIC", "OfficeCheck", "detect", "is_office", "office_check", "same_type", "type_of_name"]

#: libmagic needs at most this much (ISO 9660's signature is at 32 KiB).
SNIFF = 1024 * 1024
GENERIC = frozenset({
    "", "application/octet-stream", "application/x-empty", "inode/x-empty", "text/plain",
    "application/x-download", "application/force-download", "application/unknown", "binary/octet-stream",
    "application/binary",
})
"""Types that say nothing about content: never a mismatch either way."""
ACTIVE_TEXT = frozenset({"text/html", "text/x-shellscript", "text/x-msdos-batch", "image/svg+xml"})
"""Text that does something when opened: never a harmless kind of text."""
_OFFICE_EXTENSIONS = frozenset({
    "doc", "dot", "docx", "docm", "dotx", "dotm", "xls", "xlt", "xlsx", "xlsm", "xltx", "xltm", "xlsb",
    "xlam", "ppt", "pot", "pps", "pptx", "pptm", "potx", "potm", "ppsx", "ppsm", "ppam", "sldm",
})
_OLE = frozenset({
    "application/msword", "application/x-ole-storage", "application/cdfv2", "application/encrypted",
})
_ZIP_BASED = frozenset({
    "office", "application/zip", "application/java-archive", "application/epub+zip",
    "application/vnd.oasis.opendocument.text", "application/vnd.oasis.opendocument.spreadsheet",
    "application/vnd.oasis.opendocument.presentation", "application/vnd.android.package-archive",
})
_ALIASES = {
    "application/x-zip-compressed": "application/zip",
    "application/x-zip": "application/zip",
    "application/x-gzip": "application/gzip",
    "application/x-pdf": "application/pdf",
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "application/x-msdownload": "application/vnd.microsoft.portable-executable",
    "application/x-dosexec": "application/vnd.microsoft.portable-executable",
    "application/x-msdos-program": "application/vnd.microsoft.portable-executable",
    "application/x-rar-compressed": "application/x-rar",
    "application/vnd.rar": "application/x-rar",
}

# oletools reports what it dislikes through logging; the plugin reports through its findings.
for _name in ("olevba", "oletools", "msoffcrypto"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def detect(data: bytes) -> str:
    """libmagic's MIME type for ``data`` (lower case; ``application/octet-stream`` if unknown)."""
    if not data:
        return "application/x-empty"
    try:
        return str(magic.from_buffer(data[:SNIFF], mime=True)).lower()
    except (magic.MagicException, ValueError):
        return "application/octet-stream"


def _family(mime: str) -> str:
    mime = _ALIASES.get(mime, mime)
    if mime.startswith(("application/vnd.openxmlformats-officedocument.", "application/vnd.ms-")):
        return "office"  # libmagic names OOXML by content, clients by extension: same family
    if mime in _OLE:
        return "office"
    return mime


def same_type(declared: str, detected: str) -> bool:
    """Whether a declared type and libmagic's agree (generic types agree with anything)."""
    if declared in GENERIC or detected in GENERIC:
        return True
    if detected.startswith("text/") and detected not in ACTIVE_TEXT:
        return True  # CSV sent as Excel, XML as text, RTF as .doc: text content is no disguise
    if "application/zip" in (declared, detected) and (_family(declared) in _ZIP_BASED or
                                                        _family(detected) in _ZIP_BASED):
        return True  # libmagic names a zip-based format by its first entries, which are not always there
    return _family(declared) == _family(detected)


def type_of_name(extension: str) -> str:
    """The type a file name promises, from the system's MIME table (``""`` if unknown)."""
    if not extension:
        return ""
    guessed, _ = mimetypes.guess_type(f"x.{extension}", strict=False)
    return (guessed or "").lower()


def is_office(detected: str, extension: str) -> bool:
    if _family(detected) == "office":
        return True
    return detected == "application/zip" and extension in _OFFICE_EXTENSIONS


class OfficeCheck:
    """The result of opening an Office document: encrypted, macros, or unreadable."""

    __slots__ = ("encrypted", "macros", "unreadable")

    def __init__(self, *, encrypted: bool = False, macros: bool = False, unreadable: str | None = None):
        self.encrypted = encrypted
        self.macros = macros
        self.unreadable = unreadable


def office_check(data: bytes, name: str) -> OfficeCheck:
    """Open an Office document in memory; never raises for a damaged one."""
    try:
        if msoffcrypto.OfficeFile(io.BytesIO(data)).is_encrypted():
            return OfficeCheck(encrypted=True)
    except Exception:  # not a format msoffcrypto knows: olevba may still
        pass
    try:
        parser = VBA_Parser(name or "attachment", data=data)
        try:
            return OfficeCheck(macros=bool(parser.detect_macros()))
        finally:
            parser.close()
    except Exception as exc:  # olevba raises many types for damaged files
        return OfficeCheck(unreadable=f"Office document olevba cannot read ({type(exc).__name__})")
