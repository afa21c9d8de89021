"""The DALI ``.idx`` index of a shard (the format ``wds2idx`` writes).

::

    v1.2 <number of records>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]

One line per record. Version ``v1.1`` lines have no name field. For every tar that ``wds2idx``
handles correctly our output is byte-identical; for GNU long-name members (where ``wds2idx``
points at the long-name header instead of the data) ours is correct.

Also "does this index describe this tar" (:func:`describes`, :func:`index_differences`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import NamedTuple

from curator_assets.formats.tar_members import BLOCK, REGULAR_TYPES, Member, Record, group_records, split_key

INDEX_VERSION = "v1.2"
READABLE_VERSIONS = ("v1.1", "v1.2")


class IndexFormatError(ValueError):
    """An index that cannot be written (a name the format cannot hold) or read back."""


class IndexComponent(tuple):
    """``(ext, offset, size, name)``; ``name`` is None in a v1.1 index."""

    __slots__ = ()

    def __new__(cls, ext: str, offset: int, size: int, name: str | None):
        return tuple.__new__(cls, (ext, offset, size, name))

    # itemgetter, not lambdas: these are read per member on the decode hot path.
    ext = property(itemgetter(0))
    offset = property(itemgetter(1))
    size = property(itemgetter(2))
    name = property(itemgetter(3))


class IndexRecord(NamedTuple):
    components: tuple[IndexComponent, ...]

    @property
    def key(self) -> str | None:
        """The record ID, from the member name (v1.2); None for v1.1."""
        name = self.components[0].name
        return None if name is None else split_key(name)[0]


class ShardIndex:
    __slots__ = ("version", "records")

    def __init__(self, version: str, records: tuple[IndexRecord, ...]):
        self.version = version
        self.records = records

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardIndex) and (self.version, self.records) == (other.version, other.records)

    def __repr__(self) -> str:
        return f"ShardIndex({self.version}, {len(self.records)} records)"

    @property
    def has_names(self) -> bool:
        return self.version != "v1.1"

    def __len__(self) -> int:
        return len(self.records)


def _check_field(value: str, what: str, member: str) -> None:
    # The format is space-separated: any whitespace in a field would shift every field after it.
    # str.isprintable() is False for every whitespace character but the ASCII space.
    if not value or " " in value or not value.isprintable():
        if not value:
            shown = "is empty"
        elif any("\udc80" <= c <= "\udcff" for c in value):  # bytes that were not UTF-8
            shown = "is not valid UTF-8"
        else:
            shown = "contains whitespace or a control character"
        raise IndexFormatError(
            f"member {member!r}: its {what} {shown}, which the .idx format cannot hold; "
            "rename it inside the tar"
        )


def format_index(records: Iterable[Record]) -> str:
    """The text of a v1.2 index for these records (raises :class:`IndexFormatError`)."""
    lines = []
    for record in records:
        parts = []
        for ext, m in record.components:
            name = m.name
            if " " in name or not name.isprintable() or not ext:  # an empty one: a name ending in a dot
                _check_field(ext, "extension", name)
                _check_field(name, "name", name)
            parts.append(f"{ext} {m.offset} {m.size} {name}")
        lines.append(" ".join(parts))
    if not lines:
        raise IndexFormatError("the shard has no records to index")
    return f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"


def header_line(n_records: int) -> bytes:
    """The first line of a v1.2 index, without its newline."""
    return f"{INDEX_VERSION} {n_records}".encode()


def format_lines(lines: Iterable[Iterable[tuple[str, int, int, str]]]) -> bytes:
    """A v1.2 index of records given as ``(ext, offset, size, name)`` components (for indexes
    written for a reader, such as decode's index of picked components for DALI)."""
    text = []
    for comps in lines:
        parts = []
        for ext, offset, size, name in comps:
            if not ext or " " in ext or " " in name or not ext.isprintable() or not name.isprintable():
                _check_field(ext, "extension", name)
                _check_field(name, "name", name)
            parts.append(f"{ext} {offset} {size} {name}")
        text.append(" ".join(parts))
    return header_line(len(text)) + b"\n" + "\n".join(text).encode("utf-8", "surrogateescape") + b"\n"


def index_tokens(data: bytes) -> tuple[str, list[bytes]] | None:
    """``(version, fields of every record line)`` of an index, split on whitespace; None when
    the first line is not ``v1.1 N``/``v1.2 N``. A quick view for vectorised readers: the line
    structure is only checked by :func:`parse_index`."""
    newline = data.find(b"\n")
    head = data[: newline if newline >= 0 else len(data)].split(b" ")
    if len(head) != 2 or head[0].decode("ascii", "replace") not in READABLE_VERSIONS:
        return None
    return head[0].decode(), data[newline + 1 :].split() if newline >= 0 else []


def _digits(values):
    """Decimal digits of non-negative integers (0 has one)."""
    import numpy as np

    return np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), values, side="right") + 1


def is_index_of_fields(index_bytes: bytes, tokens: list[bytes] | None, exts: list[bytes], offsets, sizes,
                       names: list[bytes], text_len, per_record) -> bool:
    """Whether ``index_bytes`` is byte for byte the v1.2 index of these members, given as numpy
    arrays and lists by validation's vectorised pass (``tokens``: the index split on whitespace,
    if already done; ``text_len``:
    the length of each member's extension plus its name; ``per_record``: components per
    record). Compares fields rather than formatting the whole text: every token must equal
    the member's field, and the only other bytes must be one space between fields and one
    newline after each record."""
    import numpy as np

    newline = index_bytes.find(b"\n")
    n_records, m = per_record.size, len(names)
    if index_bytes[:newline] != header_line(n_records):
        return False
    body = index_bytes[newline + 1 :]
    if tokens is None:
        tokens = body.split()
    if len(tokens) != 4 * m or tokens[3::4] != names or tokens[0::4] != exts:
        return False
    expected = np.concatenate([offsets, sizes]).tolist()
    if b" ".join(tokens[1::4] + tokens[2::4]) != " ".join(map(str, expected)).encode():
        return False
    digits = _digits(offsets) + _digits(sizes)
    token_len = int(text_len.sum() + digits.sum())
    if len(body) != token_len + 4 * m or body.count(b"\n") != n_records or body.count(b" ") != 4 * m - n_records:
        return False
    # Each newline ends a record: at the cumulative length of the records' lines.
    member_len = text_len + digits + 4  # its four fields and the separator after each
    record_end = np.cumsum(np.add.reduceat(member_len, np.cumsum(per_record) - per_record)) - 1
    return bool((np.frombuffer(body, np.uint8)[record_end] == 10).all())


def build_index_bytes(records: Iterable[Record]) -> bytes:
    return format_index(records).encode("utf-8", "surrogateescape")


def index_bytes_of_members(members: Iterable[Member]) -> tuple[bytes, int, int]:
    """(index bytes, records, components) straight from a tar's members.

    The same grouping as :func:`group_records` and the same text as :func:`format_index`, fused
    into one loop without building Record objects: this is the indexing hot path (about a third
    of ``curator-assets index`` time went to the two separate passes). Tests hold the two
    routes to the same bytes.
    """
    lines: list[str] = []
    append = lines.append
    parts: list[str] = []
    last_key = None
    components = 0
    for name, _header, offset, size, kind, sparse in members:  # unpacking beats 5 attribute reads
        if kind not in REGULAR_TYPES or sparse:
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot <= slash + 1:  # no extension, or a hidden file: not a record component
            continue
        if " " in name or not name.isprintable():
            _check_field(name, "name", name)
        key = name[:dot]
        ext = name[dot + 1 :]
        if not ext:  # a name ending in a dot: the line would be a field short (DALI rejects it)
            _check_field(ext, "extension", name)
        components += 1
        if key != last_key:
            if parts:
                append(" ".join(parts))
            parts = []
            last_key = key
        parts.append(f"{ext} {offset} {size} {name}")
    if parts:
        append(" ".join(parts))
    if not lines:
        raise IndexFormatError("the shard has no records to index")
    text = f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n"
    return text.encode("utf-8", "surrogateescape"), len(lines), components


def parse_index(data: bytes | str, source: str = "index") -> ShardIndex:
    """Read a v1.1 or v1.2 index back; raises :class:`IndexFormatError` naming the line."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise IndexFormatError(f"{source}: empty file")
    head = lines[0].split()
    if len(head) != 2 or head[0] not in READABLE_VERSIONS:
        raise IndexFormatError(f"{source}: line 1: expected 'v1.1 N' or 'v1.2 N', got {lines[0][:80]!r}")
    version = head[0]
    try:
        count = int(head[1])
    except ValueError:
        raise IndexFormatError(f"{source}: line 1: record count {head[1]!r} is not a number") from None
    if count != len(lines) - 1:
        raise IndexFormatError(f"{source}: header says {count} records but the file has {len(lines) - 1} lines")
    width = 4 if version == "v1.2" else 3
    records = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split(" ")
        if not line or len(fields) % width:
            raise IndexFormatError(f"{source}: line {lineno}: expected groups of {width} fields")
        comps = []
        for i in range(0, len(fields), width):
            try:
                offset = int(fields[i + 1])
                size = int(fields[i + 2])
            except ValueError:
                raise IndexFormatError(f"{source}: line {lineno}: offset/size is not a number") from None
            if offset < 0 or size < 0:
                raise IndexFormatError(f"{source}: line {lineno}: negative offset or size")
            comps.append(IndexComponent(fields[i], offset, size, fields[i + 3] if width == 4 else None))
        records.append(IndexRecord(tuple(comps)))
    return ShardIndex(version, tuple(records))


Members = tuple[tuple[str, int, int], ...]  # (name, data offset, size) of a record's members


def index_members(data: bytes, source: str = "index") -> list[tuple[str, Members]]:
    """The records of a v1.2 index as ``(key, ((name, data offset, size), ...))``: the lean form of
    :func:`parse_index` for a reader that needs names and places only (export, planning a shard
    whose index its validation report vouches for). One split and ``int`` per field, no object
    per member: about a quarter of :func:`parse_index`'s time on a 56,000-record index. Raises
    :class:`IndexFormatError` as :func:`parse_index` does (a v1.1 index names no members)."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    head = lines[0].split(" ") if lines else []
    if head[:1] == ["v1.1"]:
        raise IndexFormatError(f"{source}: a v1.1 index names no members")
    out: list[tuple[str, Members]] = []
    try:
        if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != len(lines) - 1:
            raise ValueError
        for line in lines[1:]:
            fields = line.split(" ")
            if not line or len(fields) % 4:
                raise ValueError
            names = fields[3::4]
            members = tuple(zip(names, map(int, fields[1::4]), map(int, fields[2::4]), strict=True))
            if "-" in line and any(off < 0 or size < 0 for _n, off, size in members):
                raise ValueError
            out.append((split_key(names[0])[0], members))
    except ValueError:
        parse_index(data, source)  # raises the error naming the line
        raise IndexFormatError(f"{source}: not a v1.2 index") from None
    return out


def header_starts(index: ShardIndex, tar_size: int) -> list[int] | str:
    """Where the tar headers of each component begin, if ``index`` describes a tar of
    ``tar_size`` bytes: member after member with nothing in between, the first at byte 0 and
    each next one where the data before it ends (rounded up to a block). A member's headers
    (its PAX or GNU long-name ones included) then fill ``[start, offset)``, so a reader that
    finds exactly that member's headers there, for every component, and nothing after the last
    one but the end of the archive, has checked the index against the tar without a scan.
    A string says why no tar can be described so (one entry per component, in index order)."""
    if not index.has_names:
        return "a v1.1 index names no members"
    starts: list[int] = []
    end, last_key = 0, None
    for rec in index.records:
        key = rec.key
        if key == last_key:
            return f"record {key!r} is split over two lines (one record in a tar)"
        for c in rec.components:
            base_key, ext = split_key(c.name)
            if base_key != key or ext != c.ext:
                return f"{c.name!r} is listed as .{c.ext} of record {key!r}"
            gap = c.offset - end
            if gap < BLOCK or gap % BLOCK:
                return f"{c.name!r} at byte {c.offset} leaves no whole header after the member before it"
            if c.offset + c.size > tar_size:
                return f"{c.name!r} ({c.size} bytes at byte {c.offset}) runs past the end of the tar"
            starts.append(end)
            end = c.offset + ((c.size + BLOCK - 1) & -BLOCK)
        last_key = key
    return starts


def index_differences(index: ShardIndex, records: Sequence[Record], limit: int = 20) -> list[str]:
    """How an index fails to describe a tar whose records (from a header scan) are ``records``;
    empty when it describes it exactly: the same records in the same order, each with the same
    components (extension, data offset, size and, in v1.2, member name). This is the one rule
    for "does this index describe this tar": index reuse, validation and decode all ask it.
    It needs the headers only, never the data."""
    diffs: list[str] = []
    for n, (irec, rec) in enumerate(zip(index.records, records, strict=False)):
        why = _record_difference(irec, rec)
        if why is not None:
            diffs.append(f"record {n} ({rec.key}): {why}")
            if len(diffs) >= limit:
                diffs.append("...")
                return diffs
    have, want = len(index.records), len(records)
    if have < want:
        first = records[have].components[0][1]
        diffs.append(f"index has {have} records, tar has {want}: {want - have} record(s) follow the last one it "
                     f"lists (from {first.name!r} at byte {first.offset})" if not diffs else
                     f"index has {have} records, tar has {want}")
    elif have > want:
        diffs.append(f"index has {have} records, tar has {want}")
    return diffs


def _record_difference(irec: IndexRecord, rec: Record) -> str | None:
    if len(irec.components) != len(rec.components):
        return f"{len(irec.components)} components in index, {len(rec.components)} in tar"
    for comp, (ext, m) in zip(irec.components, rec.components, strict=True):
        if comp.ext != ext or comp.offset != m.offset or comp.size != m.size or (
            comp.name is not None and comp.name != m.name
        ):
            return (f"index says {comp.ext} {comp.offset} {comp.size} {comp.name or ''}".rstrip()
                    + f", tar has {ext} {m.offset} {m.size} {m.name}")
    return None


index_matches_members = index_differences  # the earlier name



def index_counts(raw: bytes, idx_url: str) -> tuple[int, int] | None:
    try:
        index = parse_index(raw, idx_url)
    except IndexFormatError:
        return None
    return len(index), sum(len(r.components) for r in index.records)


def describes(raw: bytes, idx_url: str, members: list[Member]
               ) -> tuple[tuple[int, int] | None, tuple[bytes, int, int] | None]:
    """Whether an existing index describes the tar of ``members`` (its counts, or None), and the
    index this tar gives, when it can be built. Byte-identical to it is the common case; any
    other text (a v1.1 index, ``wds2idx``'s) is compared record by record."""
    try:
        built = index_bytes_of_members(members)
    except IndexFormatError:
        built = None
    if built is not None and built[0] == raw:
        return built[1:], built
    try:
        existing = parse_index(raw, idx_url)
    except IndexFormatError:
        return None, built
    if index_differences(existing, group_records(members)):
        return None, built
    return (len(existing), sum(len(r.components) for r in existing.records)), built
