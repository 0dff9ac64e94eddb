"""Files and messages for the attachments tests, made at test time (nothing downloaded).

The samples are the smallest files libmagic, olevba and msoffcrypto recognise for what they
are: a PE header, an ISO 9660 volume descriptor, a shortcut's header, a compound file holding
a VBA project (MS-OVBA 2.2.1: a ``VBA`` storage with ``dir`` and ``_VBA_PROJECT``, and a
``PROJECT`` stream) and an agile-encrypted OOXML package made by msoffcrypto-tool itself.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from email.message import EmailMessage
from email.policy import SMTP

import msoffcrypto.format.ooxml

ENDOFCHAIN, FREESECT, FATSECT, NOSTREAM = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF


def pe() -> bytes:
    """A PE32 header: DOS stub pointing at a COFF header and an optional header (magic 0x10b)."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 64)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x14C, 1, 0, 0, 0, 0xE0, 0x0102)
    optional = struct.pack("<H", 0x10B) + bytes(0xE0 - 2)
    return bytes(dos) + coff + optional + bytes(512)


def iso() -> bytes:
    """An ISO 9660 primary volume descriptor at 32 KiB."""
    return bytes(0x8000) + b"\x01CD001\x01" + bytes(2041)


def lnk() -> bytes:
    """A Windows shortcut: header size 0x4C and the shell link CLSID."""
    return bytes.fromhex("4C0000000114020000000000C000000000000046") + bytes(56)


def _dir_entry(name: str, kind: int, *, right: int = NOSTREAM, child: int = NOSTREAM, start: int = ENDOFCHAIN,
               size: int = 0) -> bytes:
    encoded = (name + "\0").encode("utf-16-le") if name else b""
    return struct.pack("<64sHBBIII16sIQQIQ", encoded, len(encoded), kind, 1, NOSTREAM, right, child, bytes(16),
                       0, 0, 0, start, size)


def vba_project() -> bytes:
    """A compound file (MS-CFB v3) holding a VBA project's storages and streams, 4 KiB each."""
    streams = 8  # sectors per stream: 4096 bytes, at the mini-stream cutoff, so no mini FAT
    first = 3  # sector 0: FAT, 1-2: directory
    fat = [FATSECT, 2, ENDOFCHAIN]
    for index in range(3):
        start = first + index * streams
        fat += [*range(start + 1, start + streams), ENDOFCHAIN]
    fat += [FREESECT] * (128 - len(fat))
    entries = [
        _dir_entry("Root Entry", 5, child=1),
        _dir_entry("VBA", 1, right=2, child=3),
        _dir_entry("PROJECT", 2, start=first, size=4096),
        _dir_entry("dir", 2, right=4, start=first + streams, size=4096),
        _dir_entry("_VBA_PROJECT", 2, start=first + 2 * streams, size=4096),
    ]
    directory = b"".join(entries).ljust(1024, b"\0")
    header = struct.pack("<8s16sHHHHH6sIIIIIIIII", bytes.fromhex("D0CF11E0A1B11AE1"), bytes(16), 0x3E, 3, 0xFFFE,
                         9, 6, bytes(6), 0, 1, 1, 0, 4096, ENDOFCHAIN, 0, ENDOFCHAIN, 0)
    header += struct.pack("<109I", 0, *([FREESECT] * 108))
    project = b'ID="{00000000-0000-0000-0000-000000000000}"\r\nDocument=ThisDocument/&H00000000\r\n'
    body = project.ljust(4096, b"\0") + bytes(4096) + bytes(4096)
    return header + struct.pack("<128I", *fat) + directory + body


def ooxml(*, macros: bool = False) -> bytes:
    """A Word package; with macros, its word/vbaProject.bin is :func:`vba_project`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.'
                         'openxmlformats.org/package/2006/content-types"><Override PartName="/word/'
                         'document.xml" ContentType="application/vnd.openxmlformats-officedocument.'
                         'wordprocessingml.document.main+xml"/></Types>')
        package.writestr("word/document.xml", "<w:document/>")
        if macros:
            package.writestr("word/vbaProject.bin", vba_project())
    return out.getvalue()


def encrypted_ooxml() -> bytes:
    out = io.BytesIO()
    msoffcrypto.format.ooxml.OOXMLFile(io.BytesIO(ooxml())).encrypt("secret", out)
    return out.getvalue()


def zipped(*entries: tuple[str, bytes], encrypted: bool = False, compress: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``entries``; ``encrypted`` sets the traditional-encryption flag of each entry, in
    its local and its central directory header (zipfile itself cannot write encrypted entries)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compress
            archive.writestr(info, data)
    data = bytearray(out.getvalue())
    if encrypted:
        for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(signature)
            while at != -1:
                data[at + flags] |= 0x1
                at = data.find(signature, at + 4)
    return bytes(data)


def _vint(number: int) -> bytes:
    """RAR 5's variable-length integer: 7 bits a byte, low first, high bit set while more follow."""
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _rar_block(kind: int, body: bytes, data: bytes = b"", extra: bytes = b"") -> bytes:
    flags = (0x1 if extra else 0) | (0x2 if data else 0)
    fields = (_vint(kind) + _vint(flags) + (_vint(len(extra)) if extra else b"")
              + (_vint(len(data)) if data else b"") + body + extra)
    size = _vint(len(fields))
    return struct.pack("<I", zlib.crc32(size + fields)) + size + fields + data


def rar5(*entries: tuple[str, bytes], encrypted: bool = False) -> bytes:
    """A RAR 5 archive of stored entries (no RAR writer is packaged): the signature, a main
    header, one file header per entry (with an encryption record when ``encrypted``), the end
    header; each header with its CRC32, as the RAR 5 format documentation lays them out."""
    out = b"Rar!\x1a\x07\x01\x00" + _rar_block(1, _vint(0))
    for name, data in entries:
        encoded = name.encode("utf-8")
        body = (_vint(0x4) + _vint(len(data)) + _vint(0x20) + struct.pack("<I", zlib.crc32(data))
                + _vint(0) + _vint(0) + _vint(len(encoded)) + encoded)
        extra = b""
        if encrypted:  # record type 1: AES-256, 2^15 rounds, salt and IV (zeros: never decrypted)
            record = _vint(1) + _vint(0) + _vint(0) + bytes([15]) + bytes(16) + bytes(16)
            extra = _vint(len(record)) + record
        out += _rar_block(2, body, data, extra)
    return out + _rar_block(5, _vint(0))


def tarred(*entries: tuple[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def message(*attachments: tuple[str, bytes, str], text: str = "Please see the attachment.\n") -> bytes:
    """A multipart/mixed message with a text part and each (filename, data, content type)."""
    msg = EmailMessage()
    msg["From"] = "Alice <alice@sender.test>"
    msg["To"] = "bob@dest.test"
    msg["Subject"] = "documents"
    msg["Message-ID"] = "<attachments-1@sender.test>"
    msg.set_content(text)
    for filename, data, ctype in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)


def raw_message(headers: str, body: bytes) -> bytes:
    """A message from literal header lines and body (LF turned into CRLF)."""
    head = headers.strip("\n").replace("\n", "\r\n").encode("utf-8")
    return b"From: alice@sender.test\r\nTo: bob@dest.test\r\n" + head + b"\r\n\r\n" + body.replace(b"\n", b"\r\n")
