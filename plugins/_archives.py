"""Listing archives in memory, with caps against bombs; nothing is ever written to disk.

zip (stdlib ``zipfile``), tar (stdlib ``tarfile``), gzip, bzip2 and xz single-file
compression (stdlib, decompressed with an output bound), 7z (``py7zr``) and RAR (``rarfile``,
which reads RAR headers in pure Python: listing needs no ``unrar``). zip and tar entries, and
the content of a compressed file, are read into memory up to ``max_read`` bytes each, so the
caller can check what they are and open nested archives; 7z and RAR entries are checked by
name, size and encryption only (their content is not decompressed).

A bomb is caught before it is inflated: declared sizes are summed and compared first, a
decompressor is never asked for more than the cap, and the entry count is global to the
message. Anything a library raises on a damaged archive is reported as unreadable.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

import py7zr
import py7zr.exceptions
import rarfile

from ._mime_tree import Limits

__all__ = ["KINDS", "ArchiveLimits", "Budget", "Entry", "Listing", "kind_of", "listing"]

#: Ratios are only judged for entries at least this big: a small text of zeros compresses
#: a thousandfold and is no bomb.
RATIO_FLOOR = 1024 * 1024

KINDS = {
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/x-tar": "tar",
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-bzip2": "bzip2",
    "application/x-xz": "xz",
    "application/x-7z-compressed": "7z",
    "application/x-rar": "rar",
    "application/vnd.rar": "rar",
}
"""libmagic's MIME types for the formats listed here."""


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    max_depth: int = 3
    max_entries: int = 1000
    max_size: int = 100 * 1024 * 1024
    max_ratio: float = 100.0
    max_read: int = 16 * 1024 * 1024


@dataclass(slots=True)
class Budget:
    """What the whole message may still list and inflate (shared by every archive in it)."""

    entries: int
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    size: int  # declared (or, for gzip/bzip2/xz, actual) uncompressed size
    data: bytes | None  # the content, when read (not encrypted, not too big, zip/tar/gzip only)
    encrypted: bool


@dataclass(slots=True)
class Listing:
    entries: list[Entry] = field(default_factory=list)
    encrypted: bool = False  # the archive as a whole (encrypted 7z/RAR headers)
    bomb: str | None = None
    unreadable: str | None = None


def kind_of(mime: str) -> str | None:
    return KINDS.get(mime)


def _bomb(
    listing: Listing, budget: Budget, limits: ArchiveLimits, name: str, *, size: int, packed: int
) -> bool:
    """Charge one entry to the budget; True (and listing.bomb set) when a cap is passed."""
    budget.entries -= 1
    budget.size -= max(size, 0)
    if budget.entries < 0:
        listing.bomb = f"more than {limits.max_entries} archive entries"
    elif budget.size < 0:
        listing.bomb = f"more than {limits.max_size} bytes uncompressed"
    elif size >= RATIO_FLOOR and size > limits.max_ratio * max(packed, 1):
        listing.bomb = f"{name!r} expands {size // max(packed, 1)} times (over {limits.max_ratio:g})"
    return listing.bomb is not None


def _zip(data: bytes, limits: ArchiveLimits, budget: Budget, scan: Limits, listing: Listing) -> None:
    if data.count(b"PK\x05\x06") > 1:
        # Two archives in one file: Windows Explorer, 7-Zip and WinRAR do not list the same one.
        listing.unreadable = "more than one zip archive in one file"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            scan.check_time()
            if _bomb(listing, budget, limits, info.filename, size=info.file_size, packed=info.compress_size):
                return
            if info.is_dir():
                continue
            encrypted = bool(info.flag_bits & 0x1)
            content: bytes | None = None
            if not encrypted and info.file_size <= limits.max_read:
                try:
                    with archive.open(info) as member:
                        content = member.read(limits.max_read + 1)
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError,
                        OSError, ValueError):
                    listing.unreadable = f"entry {info.filename!r} does not decompress"
            listing.entries.append(Entry(info.filename, info.file_size, content, encrypted))


def _tar(data: bytes, limits: ArchiveLimits, budget: Budget, scan: Limits, listing: Listing) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive:
            scan.check_time()
            if _bomb(listing, budget, limits, member.name, size=member.size, packed=member.size):
                return
            if not member.isfile():
                continue
            content = None
            if member.size <= limits.max_read:
                extracted = archive.extractfile(member)
                content = extracted.read(limits.max_read + 1) if extracted is not None else None
            listing.entries.append(Entry(member.name, member.size, content, False))


def _stream(
    kind: str, data: bytes, name: str, *, limits: ArchiveLimits, budget: Budget, listing: Listing
) -> None:
    """gzip, bzip2, xz: one compressed file, inflated no further than the caps allow."""
    cap = min(limits.max_read, max(budget.size, 0)) + 1
    inflater: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor
    if kind == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif kind == "bzip2":
        inflater = bz2.BZ2Decompressor()
    else:
        inflater = lzma.LZMADecompressor()
    content = inflater.decompress(data, cap)
    inner = name
    for suffix in (".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz"):
        if inner.lower().endswith(suffix):
            inner = inner[: -len(suffix)] + (".tar" if suffix.startswith(".t") else "")
            break
    # The cap is one byte past what may be read: reaching it means the content goes on. Past
    # the message's budget that is a bomb; past max_read only, the file is checked by name.
    truncated = len(content) >= cap
    size = max(budget.size, 0) + 1 if truncated and cap - 1 >= max(budget.size, 0) else len(content)
    if _bomb(listing, budget, limits, inner or "(compressed)", size=size, packed=len(data)):
        return
    listing.entries.append(Entry(inner, len(content), None if truncated else content, False))


def _7z(data: bytes, limits: ArchiveLimits, budget: Budget, scan: Limits, listing: Listing) -> None:
    try:
        with py7zr.SevenZipFile(io.BytesIO(data), mode="r") as archive:
            encrypted = archive.needs_password()
            infos = archive.list()
    except py7zr.exceptions.PasswordRequired:
        listing.encrypted = True  # the file names themselves are encrypted
        return
    total = sum(info.uncompressed or 0 for info in infos)
    for info in infos:
        scan.check_time()
        size = info.uncompressed or 0
        # Solid 7z blocks have no per-file packed size: judge the archive's ratio overall.
        packed = len(data) * size // total if total else len(data)
        if _bomb(listing, budget, limits, info.filename, size=size, packed=packed):
            return
        if not info.is_directory:
            listing.entries.append(Entry(info.filename, size, None, encrypted))


def _rar(data: bytes, limits: ArchiveLimits, budget: Budget, scan: Limits, listing: Listing) -> None:
    try:
        archive = rarfile.RarFile(io.BytesIO(data))
    except rarfile.PasswordRequired:
        listing.encrypted = True
        return
    with archive:
        for info in archive.infolist():
            scan.check_time()
            size = info.file_size or 0
            if _bomb(listing, budget, limits, info.filename or "", size=size, packed=info.compress_size or 0):
                return
            if not info.is_dir():
                listing.entries.append(Entry(info.filename or "", size, None, info.needs_password()))


def listing(
    kind: str, data: bytes, name: str, *, limits: ArchiveLimits, budget: Budget, scan: Limits
) -> Listing:
    """What the archive holds; never raises for damaged input (only :class:`ScanTimeout`)."""
    result = Listing()
    try:
        if kind == "zip":
            _zip(data, limits, budget, scan, result)
        elif kind == "tar":
            _tar(data, limits, budget, scan, result)
        elif kind in ("gzip", "bzip2", "xz"):
            _stream(kind, data, name, limits=limits, budget=budget, listing=result)
        elif kind == "7z":
            _7z(data, limits, budget, scan, result)
        elif kind == "rar":
            _rar(data, limits, budget, scan, result)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, OSError, EOFError, ValueError, KeyError,
            IndexError, TypeError, NotImplementedError, RuntimeError, MemoryError, lzma.LZMAError,
            py7zr.exceptions.ArchiveError, rarfile.Error, struct.error) as exc:
        result.unreadable = f"damaged {kind} archive ({type(exc).__name__})"
    return result

