"""Tar members and WebDataset records.

One forward pass over the tar headers. On a seekable file the member payloads are never read:
the scanner reads a 512-byte header, then seeks over the data. It understands ustar, GNU
(``././@LongLink`` long names, base-256 sizes) and PAX (``x``/``g``) headers.

This is a lean hand-written parser rather than :mod:`tarfile` because it is the hot path of
indexing and validation: ``tarfile`` builds a full ``TarInfo`` per member and cannot report
where and why an archive stops being valid. It still follows ``tarfile``'s rules for which
member types carry data, so both always agree on offsets.
"""

from __future__ import annotations

import gc
import mmap
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

BLOCK = 512

# Member types (the tar typeflag byte).
REGULAR_TYPES = frozenset("0\x007")  # regular, old-style regular, contiguous
LINK_TYPES = frozenset("12")
NO_DATA_TYPES = frozenset("123456")  # tarfile skips no data for these, whatever the size says
GNU_LONGNAME = "L"
GNU_LONGLINK = "K"
GNU_SPARSE = "S"
PAX_HEADER = "x"
PAX_GLOBAL = "g"
PAX_SPARSE_KEYS = ("GNU.sparse.major", "GNU.sparse.size", "GNU.sparse.realsize", "GNU.sparse.map")
# PAX keywords that change a member's name, size or kind. A global header without them (git
# archive's commit id, a comment) leaves the plain headers after it to the fast path.
MEMBER_PAX_KEYS = frozenset({"path", "size", "GNU.sparse.name", *PAX_SPARSE_KEYS})

TYPE_NAMES = {
    "0": "file", "\x00": "file", "7": "contiguous file", "1": "hard link", "2": "symlink",
    "3": "character device", "4": "block device", "5": "directory", "6": "fifo",
    "S": "GNU sparse file", "V": "volume label", "M": "multi-volume continuation",
    "D": "GNU dump directory",
}


class Member(NamedTuple):
    """One tar member, as far as the headers describe it."""

    name: str
    header_offset: int  # offset of the member's first header (long-name/PAX headers included)
    offset: int  # offset of the member's data, always a multiple of 512
    size: int  # bytes stored in the tar (for a sparse file, its map and data, not the expanded size)
    type: str  # the typeflag character
    sparse: bool = False

    @property
    def is_file(self) -> bool:
        return self.type in REGULAR_TYPES and not self.sparse

    @property
    def type_name(self) -> str:
        if self.sparse:
            return "sparse file"
        return TYPE_NAMES.get(self.type, f"type {self.type!r}")


class TarProblem(NamedTuple):
    """Why a scan stopped or what it had to skip. ``code`` is a stable validation code."""

    code: str  # tar_truncated | tar_bad_header | tar_empty
    offset: int
    detail: str


class TarError(ValueError):
    """A shard that is not a readable tar."""

    def __init__(self, problem: TarProblem, shard: str | None = None):
        self.problem = problem
        self.shard = shard
        where = f"{shard}: " if shard else ""
        super().__init__(f"{where}{problem.detail} (at byte {problem.offset}, {problem.code})")


class TarScan:
    """The outcome of one pass over a tar: its members and anything that went wrong."""

    # A plain class rather than a dataclass: importing dataclasses costs ~5 ms of CLI start-up.
    __slots__ = ("members", "problems", "end_offset", "total_size")

    def __init__(self, members: list[Member] | None = None, problems: list[TarProblem] | None = None,
                 end_offset: int = 0, total_size: int | None = None):
        self.members = members if members is not None else []
        self.problems = problems if problems is not None else []
        self.end_offset = end_offset  # where the end-of-archive blocks start (or where reading stopped)
        self.total_size = total_size

    def __repr__(self) -> str:
        return f"TarScan({len(self.members)} members, problems={self.problems!r})"

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# Header fields


def _nts(field_bytes: bytes) -> bytes:
    """Null-terminated string field."""
    return field_bytes.partition(b"\0")[0]


def _number(field_bytes: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] == 0xFF:  # negative base-256
            value -= 1 << (8 * (len(field_bytes) - 1))
        return value
    text = _nts(field_bytes).strip(b" \0")
    if not text:
        return 0
    return int(text, 8)


_CHKSUM_BLANK = b" " * 8
_ADLER_MOD = 65521
_adler32 = zlib.adler32


def _checksum_ok(header: bytes) -> bool:
    # Hot path (one call per member): Adler-32's low half is 1 + the byte sum mod 65521,
    # computed in C. For ustar/GNU headers we accept a match of the sum modulo 65521, which
    # with the magic check is as strong as needed to tell a header from payload, and 10x
    # cheaper than summing 512 bytes in Python. Anything else takes the exact path below.
    if header[257:262] == b"ustar":
        try:
            stored = int(header[148:155].strip(b" \0") or b"0", 8)
        except ValueError:
            return False
        unsigned = (_adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 256
        if (unsigned - stored) % _ADLER_MOD == 0:
            return True
    return _checksum_exact(header)


def _checksum_exact(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    blanked = header[:148] + _CHKSUM_BLANK + header[156:]
    unsigned = sum(blanked)
    if stored == unsigned:
        return True
    # Some old tars sum signed bytes; tarfile accepts both.
    signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
    return stored == signed


def _decode_name(raw: bytes) -> str:
    # tarfile's default for non-UTF-8 names keeps the bytes round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes) -> dict[str, str]:
    """PAX extended header records: ``"<len> <key>=<value>\\n"``."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise ValueError("PAX record without a length")
        length = int(data[pos:space])
        if length <= 0 or pos + length > len(data):
            raise ValueError("PAX record length out of range")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, sep, value = record.partition(b"=")
        if not sep:
            raise ValueError("PAX record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


# ---------------------------------------------------------------------------------------------
# Readers: a lean positional reader for local files, seek/read for anything else.


class _Reader:
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


# ---------------------------------------------------------------------------------------------
# The scan


ZERO_BLOCK = bytes(BLOCK)


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def scan_members(
    fileobj: BinaryIO,
    *,
    recover: bool = False,
    total_size: int | None = None,
) -> Iterator[Member | TarProblem]:
    """Yield every member of a tar in order, and a :class:`TarProblem` where it is damaged.

    Without ``recover`` the scan ends at the first problem. With it, a bad header makes the
    scanner look for the next block that is a valid header, so members after a damaged spot
    are still found (each skip is reported).
    """
    for item in _batches(fileobj, recover, total_size):
        if type(item) is list:
            yield from item
        else:
            yield item


def _batches(fileobj: BinaryIO, recover: bool, total_size: int | None) -> Iterator[list[Member] | Member | TarProblem]:
    reader = _Reader(fileobj)
    try:
        yield from _scan(reader, recover, total_size)
    finally:
        reader.close()


_PLAIN_TYPES = frozenset(b"0\x0057")  # regular, old regular, directory, contiguous


def _plain_run(reader: _Reader, base: int, pos: int, total_size: int | None, out: list[Member]) -> int:
    """Append members for as long as the headers are plain ustar/GNU files or directories.

    The common case of every shard, so it is one tight loop that builds the list directly; it
    stops (returning the position) at the first header needing more care (end blocks, long
    names, PAX, links, a bad checksum, truncation) and the general scanner takes over there.
    Measured at ~1.3 us a member (benchmarks/bench_index.py); every line here counts.
    """
    append = out.append
    adler32 = _adler32
    new = tuple.__new__  # skips NamedTuple's Python-level __new__
    mm = reader.mm
    read_at = reader.read_at
    while True:
        at = base + pos
        header = mm[at : at + BLOCK] if mm is not None else read_at(at, BLOCK)
        magic = header[257:263]
        if (magic != b"ustar\x00" and magic != b"ustar ") or len(header) < BLOCK:
            return pos
        t = header[156]
        if t not in _PLAIN_TYPES or header[135] not in (0, 32) or header[154] not in (0, 32):
            return pos
        try:
            stored = int(header[148:154], 8)
            size = int(header[124:135], 8)
        except ValueError:
            return pos
        if ((adler32(header) & 0xFFFF) + 255 - sum(header[148:156]) - stored) % _ADLER_MOD:
            return pos
        raw = header[0:100].partition(b"\0")[0]
        if magic == b"ustar\x00" and header[345]:
            raw = header[345:500].partition(b"\0")[0] + b"/" + raw
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return pos
        data = pos + BLOCK
        # A directory: no data, reported without the trailing slash as tarfile does. Pre-POSIX
        # tars mark one as an old-style regular file ('\0') whose name ends in a slash.
        if t != 48 and (t == 53 or (t == 0 and name[-1:] == "/")):
            if len(name) > 1:
                name = name.rstrip("/")
            t = 53
            end = data
        else:
            if total_size is not None and data + size > total_size:
                return pos
            end = data + ((size + 511) & -512)
        append(new(Member, (name, pos, data, size, _TYPE_CHARS[t], False)))
        pos = end


_TYPE_CHARS = {t: chr(t) for t in _PLAIN_TYPES}


def _scan(reader: _Reader, recover: bool, total_size: int | None) -> Iterator[Member | TarProblem]:
    read_at = reader.read_at
    base = reader.pos
    if total_size is None:
        total_size = reader.size()
        if total_size is not None:
            total_size -= base
    pos = 0  # relative to base
    pending_name: str | None = None
    pending_pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    global_changes_members = False
    first_header: int | None = None
    seen_any = False

    while True:
        if pending_name is None and not pending_pax and not global_changes_members:
            batch: list[Member] = []
            pos = _plain_run(reader, base, pos, total_size, batch)
            if batch:
                seen_any = True
                yield batch
        header = read_at(base + pos, BLOCK)
        magic = header[257:263]
        if magic == b"ustar\x00" or magic == b"ustar ":
            # Hot path, inlined from _checksum_ok(): see there for why the sum is taken mod 65521.
            try:
                stored = int(header[148:155].strip(b" \0") or b"0", 8)
                good = ((_adler32(header) & 0xFFFF) + 255 - sum(header[148:156]) - stored) % _ADLER_MOD == 0
            except ValueError:
                good = False
            problem = None if good or _checksum_exact(header) else "checksum mismatch"
        elif len(header) < BLOCK:
            if not header and not seen_any and pos == 0:
                yield TarProblem("tar_truncated", pos, "file is empty (no tar end blocks)")
            else:
                what = "mid-header" if header else "without the two zero end-of-archive blocks"
                yield TarProblem("tar_truncated", pos, f"archive ends {what}")
            return
        elif header == ZERO_BLOCK:
            nxt = reader.read_at(base + pos + BLOCK, BLOCK)
            if nxt == ZERO_BLOCK:
                if pending_name is not None or pending_pax:
                    yield TarProblem("tar_bad_header", pos, "long-name/PAX header with no member after it")
                return
            if len(nxt) < BLOCK and not nxt:
                # A single zero block then EOF: GNU tar and tarfile accept it; so do we.
                return
            if len(nxt) < BLOCK:
                yield TarProblem("tar_truncated", pos, "archive ends inside the end-of-archive blocks")
                return
            # A lone zero block in the middle: tarfile stops here; report it so nothing hides.
            yield TarProblem("tar_bad_header", pos, "zero block in the middle of the archive")
            if not recover:
                return
            pos += BLOCK
            continue
        else:
            problem = _check_header(header)

        if problem is not None:
            if not seen_any and pos == 0:
                why = _compressed_hint(header) or f"first header is invalid: {problem}"
                detail = f"not a tar archive ({why})"
            else:
                detail = f"invalid header: {problem}"
            yield TarProblem("tar_bad_header", pos, detail)
            if not recover:
                return
            found = _resync(reader, base, pos + BLOCK, total_size)
            if found is None:
                return
            pos = found
            pending_name, pending_pax = None, {}
            first_header = None
            continue

        seen_any = True
        if first_header is None:
            first_header = pos
        typeflag = chr(header[156])
        try:
            # Fast path: 11 octal digits and a terminator; base-256 and odd padding go the long way.
            size = int(header[124:135], 8) if header[135] in (0, 32) else _number(header[124:136])
        except ValueError:
            try:
                size = _number(header[124:136])
            except ValueError:
                yield TarProblem("tar_bad_header", pos, "unreadable size field")
                return
        data_offset = pos + BLOCK

        if typeflag in (GNU_LONGNAME, GNU_LONGLINK, PAX_HEADER, PAX_GLOBAL):
            data = reader.read_at(base + data_offset, size)
            if len(data) < size:
                yield TarProblem("tar_truncated", data_offset, "archive ends inside an extended header")
                return
            if typeflag == GNU_LONGNAME:
                pending_name = _decode_name(_nts(data))
            elif typeflag == PAX_HEADER or typeflag == PAX_GLOBAL:
                try:
                    records = _parse_pax(data)
                except ValueError as exc:
                    yield TarProblem("tar_bad_header", pos, f"bad PAX header: {exc}")
                    if not recover:
                        return
                    records = {}
                if typeflag == PAX_HEADER:
                    pending_pax.update(records)
                else:
                    global_pax.update(records)
                    global_changes_members = not MEMBER_PAX_KEYS.isdisjoint(global_pax)
                    if pending_name is None and not pending_pax:
                        first_header = None  # the archive's header, not the next member's (as tarfile)
            pos = data_offset + _blocks(size)
            continue

        # A real member header.
        pax = {**global_pax, **pending_pax} if (pending_pax or global_pax) else None
        if pending_name is not None:
            name = pending_name
        elif pax and "GNU.sparse.name" in pax:  # GNU's PAX sparse formats: "path" is a placeholder
            name = pax["GNU.sparse.name"]
        elif pax and "path" in pax:
            name = pax["path"]
        else:
            raw = _nts(header[0:100])
            if header[257:263] == b"ustar\x00":  # POSIX ustar: name may have a prefix
                prefix = _nts(header[345:500])
                if prefix:
                    raw = prefix + b"/" + raw
            try:
                name = raw.decode()
            except UnicodeDecodeError:
                name = _decode_name(raw)
        sparse = typeflag == GNU_SPARSE
        if pax:
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    yield TarProblem("tar_bad_header", pos, "bad PAX size")
                    return
            sparse = sparse or any(k in pax for k in PAX_SPARSE_KEYS)
        if typeflag == "\x00" and name.endswith("/"):
            typeflag = "5"  # a pre-POSIX directory, as tarfile and GNU tar read it
        if typeflag == "5" and len(name) > 1:
            name = name.rstrip("/")  # as tarfile reports directories
        # GNU old-style sparse headers may be followed by extension blocks.
        ext_blocks = 0
        if typeflag == GNU_SPARSE and header[482]:
            ext_blocks = _gnu_sparse_ext_blocks(reader, base, data_offset)
            data_offset += ext_blocks * BLOCK
        if typeflag in NO_DATA_TYPES:
            end = data_offset
        else:
            end = data_offset + ((size + 511) & -512)
        if total_size is not None and data_offset + size > total_size and typeflag not in NO_DATA_TYPES:
            yield Member(name, first_header, data_offset, size, typeflag, sparse)
            yield TarProblem(
                "tar_truncated", data_offset,
                f"archive ends inside member {name!r} ({total_size - data_offset} of {size} bytes)",
            )
            return
        yield Member(name, first_header, data_offset, size, typeflag, sparse)
        if pending_pax:
            pending_pax = {}
        pending_name, first_header = None, None
        pos = end


def _gnu_sparse_ext_blocks(reader: _Reader, base: int, offset: int) -> int:
    count = 0
    while True:
        block = reader.read_at(base + offset + count * BLOCK, BLOCK)
        count += 1
        if len(block) < BLOCK or not block[504]:
            return count


_COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"),
)


def _compressed_hint(header: bytes) -> str | None:
    for magic, kind in _COMPRESSED_MAGIC:
        if header.startswith(magic):
            return f"it is {kind}-compressed; shards must be plain, uncompressed tar files"
    return None


def _check_header(header: bytes) -> str | None:
    """None if the block is a plausible tar header, else why not."""
    if not _checksum_ok(header):
        return "checksum mismatch"
    magic = header[257:263]
    # Pre-POSIX (v7) headers have an empty magic field; anything else is not a tar header.
    if magic not in (b"ustar\x00", b"ustar ") and magic != b"\0" * 6:
        return f"unknown format magic {magic!r}"
    return None


def _resync(reader: _Reader, base: int, start: int, total_size: int | None) -> int | None:
    """Find the next block at or after ``start`` that is a valid header."""
    pos = start
    window = 64 * BLOCK
    while total_size is None or pos < total_size:
        chunk = reader.read_at(base + pos, window)
        if not chunk:
            return None
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            block = chunk[i : i + BLOCK]
            if block[257:262] == b"ustar" and _check_header(block) is None:
                return pos + i
        if len(chunk) < window:
            return None
        pos += window
    return None


def scan_tar(fileobj: BinaryIO, *, recover: bool = False, total_size: int | None = None) -> TarScan:
    """Scan a whole tar into a :class:`TarScan` (members plus problems)."""
    scan = TarScan()
    for item in _batches(fileobj, recover, total_size):
        if type(item) is list:
            scan.members.extend(item)
        elif isinstance(item, Member):
            scan.members.append(item)
        else:
            scan.problems.append(item)
    if scan.members:
        last = scan.members[-1]
        scan.end_offset = last.offset + (0 if last.type in NO_DATA_TYPES else _blocks(last.size))
    scan.total_size = total_size
    return scan


def read_members(fileobj: BinaryIO, shard: str | None = None) -> list[Member]:
    """All members of a valid tar; raises :class:`TarError` at the first problem."""
    members: list[Member] = []
    # The scan allocates one tuple per member and no reference cycles: pausing the cyclic GC
    # saves its repeated passes over the growing list (~7% of an index build, measured).
    paused = gc.isenabled()
    gc.disable()
    try:
        for item in _batches(fileobj, False, None):
            if type(item) is list:
                members.extend(item)
            elif isinstance(item, TarProblem):
                raise TarError(item, shard)
            else:
                members.append(item)
    finally:
        if paused:
            gc.enable()
    return members


# ---------------------------------------------------------------------------------------------
# Records


def split_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension: the key runs to the FIRST dot of the basename.

    ``a/b.c/000031.seg.jpg`` -> (``a/b.c/000031``, ``seg.jpg``). No dot: (name, "").
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def is_component(member: Member) -> bool:
    """Whether a member belongs to a record: a regular file with a key and an extension,
    whose basename does not start with a dot."""
    if not member.is_file:
        return False
    name = member.name
    slash = name.rfind("/")
    base = name[slash + 1 :]
    return bool(base) and base[0] != "." and "." in base


class Record:
    """A WebDataset record: consecutive component members that share a key."""

    __slots__ = ("key", "components")

    def __init__(self, key: str, components: list[tuple[str, Member]]):
        self.key = key
        self.components = components  # (extension, member), in tar order

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and (self.key, self.components) == (other.key, other.components)

    def __repr__(self) -> str:
        return f"Record({self.key!r}, {self.extensions!r})"

    def get(self, ext: str, *, case_sensitive: bool = True) -> Member | None:
        for e, m in self.components:
            if e == ext or (not case_sensitive and e.lower() == ext.lower()):
                return m
        return None

    @property
    def extensions(self) -> list[str]:
        return [e for e, _ in self.components]


def group_records(members: Iterable[Member]) -> list[Record]:
    """Group component members into records by the WebDataset key rule.

    Only *consecutive* members with the same key form one record, exactly as DALI and the
    webdataset library read a tar; a key that reappears later starts a new record.
    """
    records: list[Record] = []
    last_key: str | None = None
    last: list[tuple[str, Member]] = []
    for m in members:
        # is_component() and split_key() inlined: this runs once per member of every shard.
        if m.type not in REGULAR_TYPES or m.sparse:
            continue
        name = m.name
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot <= slash + 1:  # no dot in the basename, or a hidden file
            continue
        key = name[:dot]
        if key == last_key:
            last.append((name[dot + 1 :], m))
        else:
            last = [(name[dot + 1 :], m)]
            records.append(Record(key, last))
            last_key = key
    return records


def open_records(fileobj: BinaryIO, shard: str | None = None) -> list[Record]:
    """Records of a valid tar (raises :class:`TarError` on a damaged one)."""
    return group_records(read_members(fileobj, shard))
