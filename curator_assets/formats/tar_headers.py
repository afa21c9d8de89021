"""Tar header fields and the block reader: the rules every module uses to read one 512-byte
header (numbers, names, checksums, PAX records), the headers of members written with fixed
metadata (what export writes), and a lean positional reader of blocks at absolute offsets (a
read-only map of a local file; seek/read for anything else).

The scan over a whole tar, its recovery and the members it yields are
:mod:`curator_assets.formats.tar_members`, which re-exports the public names here.
"""

from __future__ import annotations

import mmap
import os
import zlib
from typing import BinaryIO

BLOCK = 512

# ---------------------------------------------------------------------------------------------
# Header fields: the one set of rules every module uses to read a tar header.

# The numeric fields tarfile (and so the webdataset library) parses, with their offsets.
NUMERIC_FIELDS = (("mode", 100, 108), ("uid", 108, 116), ("gid", 116, 124), ("size", 124, 136),
                  ("mtime", 136, 148))
_OCTAL = b"01234567"
_PADDING = b" \0\t\n\r\x0b\x0c"
# Everything a plain octal field holds; a header with any other byte in mode, uid, gid, size or
# mtime takes the exact path. A translation table and one compare: the cheapest check in C.
FIELD_BYTE_CLASS = bytes(0 if c in _OCTAL + b" \0" else 1 for c in range(256))
PLAIN_FIELDS = bytes(148 - 100)
MAX_EXTENDED_HEADER = 16 << 20  # a PAX or long-name header larger than this is damage, not a name


def nts(field_bytes: bytes) -> bytes:
    """A null-terminated string field, up to its first NUL."""
    return field_bytes.partition(b"\0")[0]


def parse_number(field_bytes: bytes) -> int:
    """A numeric header field, as tarfile reads it: GNU base-256 when the first byte is 0x80
    (0xFF: negative), else octal digits up to the first NUL, padded with spaces. Anything else
    raises ``ValueError`` (tarfile stops reading the archive there)."""
    if field_bytes[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] == 0xFF:  # negative base-256
            value -= 1 << (8 * (len(field_bytes) - 1))
        return value
    text = nts(field_bytes).strip(_PADDING)
    if text.translate(None, _OCTAL):
        raise ValueError(f"not an octal number: {field_bytes!r}")
    return int(text, 8) if text else 0


def numeric_problem(header: bytes) -> str | None:
    """Why the numeric fields of a header are unreadable (None: they are fine). A negative size
    is refused: it would send a reader backwards."""
    for what, start, end in NUMERIC_FIELDS:
        try:
            value = parse_number(header[start:end])
        except ValueError:
            return f"unreadable {what} field {bytes(header[start:end])!r}"
        if what == "size" and value < 0:
            return f"negative size ({value})"
    return None


def header_size(header: bytes) -> int | None:
    """The size field of a header, or None when it is unreadable or negative."""
    try:
        size = parse_number(header[124:136])
    except ValueError:
        return None
    return size if size >= 0 else None


def header_name(header: bytes) -> str:
    """The name a ustar/GNU header itself holds (the POSIX prefix joined on). Only the name
    when no PAX ``path`` or GNU long-name record precedes the header: see :func:`member_at`."""
    raw = nts(header[0:100])
    if header[257:263] == b"ustar\x00":
        prefix = nts(header[345:500])
        if prefix:
            raw = prefix + b"/" + raw
    return decode_name(raw)


_CHKSUM_BLANK = b" " * 8
ADLER_MOD = 65521
adler32_of = zlib.adler32


def checksum_ok(header: bytes) -> bool:
    """The header checksum rule: the unsigned (or, as old tars wrote it, signed) byte sum with
    the checksum field read as blanks."""
    # Hot path (one call per member): Adler-32's low half is 1 + the byte sum mod 65521,
    # computed in C. For ustar/GNU headers we accept a match of the sum modulo 65521, which
    # with the magic check is as strong as needed to tell a header from payload, and 10x
    # cheaper than summing 512 bytes in Python. Anything else takes the exact path below.
    if header[257:262] == b"ustar":
        try:
            stored = int(header[148:155].strip(b" \0") or b"0", 8)
        except ValueError:
            return False
        unsigned = (adler32_of(header) & 0xFFFF) - 1 - sum(header[148:156]) + 256
        if (unsigned - stored) % ADLER_MOD == 0:
            return True
    return _checksum_exact(header)


def _checksum_exact(header: bytes) -> bool:
    try:
        stored = parse_number(header[148:156])
    except ValueError:
        return False
    blanked = header[:148] + _CHKSUM_BLANK + header[156:]
    unsigned = sum(blanked)
    if stored == unsigned:
        return True
    # Some old tars sum signed bytes; tarfile accepts both.
    signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
    return stored == signed


def decode_name(raw: bytes) -> str:
    # tarfile's default for non-UTF-8 names keeps the bytes round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def parse_pax(data: bytes) -> tuple[dict[str, str], str | None]:
    """PAX extended header records, ``"<len> <key>=<value>\\n"``, and why they stop early (None
    when they do not). The records before a damaged one are kept, as tarfile keeps them: each
    record's length delimits it, so damage cannot reach back into the ones before."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        digits = data[pos:space] if space >= 0 else b""
        if not digits.isdigit():
            return records, f"record at byte {pos} has no length"
        length = int(digits)
        if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            return records, f"record at byte {pos} has a length out of range ({length})"
        key, sep, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not sep:
            return records, f"record at byte {pos} has no '='"
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records, None


# ---------------------------------------------------------------------------------------------
# Writing: the headers of members written with fixed metadata (what export writes).

# The fields of a ustar header that are the same for every output member (mode 0644, uid/gid 0,
# mtime 0, no user names, no device), around the name, size and checksum.
_MODE_TO_SIZE = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_AFTER_CHKSUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 155 + 12)  # no device numbers, as tarfile
_USTAR_MAX_SIZE = 8**11 - 1
_FIXED_SUM = sum(_AFTER_CHKSUM) + 8 * ord(" ")  # the checksum field counts as eight spaces


def member_header(name: str, size: int) -> bytes:
    """The header(s) of a member written with fixed metadata, pax records where ustar cannot hold the
    name (what ``tarfile`` writes in its PAX format, byte for byte; a plain ASCII name that fits is
    one ustar header, built here without a TarInfo: this runs once per member)."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else None
    if raw is not None and len(raw) <= 100 and size <= _USTAR_MAX_SIZE and name.isprintable():
        head = raw.ljust(100, b"\0") + _MODE_TO_SIZE + b"%011o\0" % size + _MTIME
        chksum = sum(head) + _FIXED_SUM
        return head + b"%06o\0 " % chksum + _AFTER_CHKSUM
    return _pax_header(name, size)


def _pax_header(name: str, size: int) -> bytes:
    import tarfile  # rare (a long or non-ASCII name): not on every reader's import path

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# Readers: a lean positional reader for local files, seek/read for anything else.


class BlockReader:
    """Reads blocks at absolute offsets; skips forward by seeking when it can."""

    def __init__(self, fileobj: BinaryIO):
        self.f = fileobj
        self.pos = 0
        self.fd: int | None = None
        self.mm: mmap.mmap | None = None
        self.last_at, self.last = 0, b""  # a stream's last read, for the steps back a scan takes
        try:
            self.seekable = bool(fileobj.seekable())
        except (AttributeError, OSError, ValueError):
            self.seekable = False
        if self.seekable:
            try:
                self.pos = fileobj.tell()
            except (OSError, ValueError):
                self.pos = 0
            # os.pread on a real file descriptor: one syscall per header, no buffer churn.
            try:
                fd = fileobj.fileno()
                os.fstat(fd)
                self.fd = fd
            except (AttributeError, OSError, ValueError):
                self.fd = None
        if self.fd is not None:
            # A read-only map makes each header a slice: no syscall per member. Only the pages
            # holding headers are touched; payloads are never read.
            try:
                self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
                self.read_at = self._read_mapped  # type: ignore[method-assign]
            except (OSError, ValueError):  # empty file, or a descriptor that cannot be mapped
                self.mm = None

    def _read_mapped(self, offset: int, n: int) -> bytes:
        return self.mm[offset : offset + n]  # type: ignore[index]

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    def size(self) -> int | None:
        if self.fd is not None:
            return os.fstat(self.fd).st_size
        size = getattr(self.f, "size", None)
        if isinstance(size, int):
            return size
        if self.seekable:
            here = self.f.tell()
            end = self.f.seek(0, os.SEEK_END)
            self.f.seek(here)
            return end
        return None

    def read_at(self, offset: int, n: int) -> bytes:
        """Read up to n bytes at offset (a stream can step back only within its last read)."""
        if self.fd is not None:
            data = os.pread(self.fd, n, offset)
            self.pos = offset + len(data)
            return data
        if self.seekable:
            if offset != self.pos:
                self.f.seek(offset)
            data = self._read_fully(n)
            self.pos = offset + len(data)
            return data
        # Stream: discard bytes up to offset, then read. A scan steps back only inside its last
        # read (the header where the fast loop stopped, a header found by resync in a window).
        if offset < self.pos:
            start = offset - self.last_at
            if start < 0:
                raise ValueError(f"cannot read a stream backwards (byte {offset}, already at {self.pos})")
            data = self.last[start : start + n]
            if len(data) == n:
                return data
            more = self._read_fully(n - len(data))  # the last read ended where the stream is
            data += more
        else:
            self._discard(offset - self.pos)
            more = data = self._read_fully(n)
        self.last_at, self.last = offset, data
        self.pos += len(more)
        return data

    def _read_fully(self, n: int) -> bytes:
        chunks = []
        remaining = n
        while remaining > 0:
            chunk = self.f.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                return
            self.pos += len(chunk)
            n -= len(chunk)
