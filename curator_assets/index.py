"""The DALI ``.idx`` index of a shard (the format ``wds2idx`` writes).

::

    v1.2 <number of records>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]

One line per record. Version ``v1.1`` lines have no name field. For every tar that ``wds2idx``
handles correctly our output is byte-identical; for GNU long-name members (where ``wds2idx``
points at the long-name header instead of the data) ours is correct.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter
from typing import NamedTuple

from curator_assets.storage import modified_at
from curator_assets.tar_members import REGULAR_TYPES, Member, Record, group_records, split_key

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


def index_matches_members(index: ShardIndex, records: list[Record]) -> list[str]:
    """Differences between an index and the records of the tar it claims to describe."""
    diffs: list[str] = []
    if len(index.records) != len(records):
        diffs.append(f"index has {len(index.records)} records, tar has {len(records)}")
    for n, (irec, rec) in enumerate(zip(index.records, records, strict=False)):
        if len(irec.components) != len(rec.components):
            diffs.append(f"record {n} ({rec.key}): {len(irec.components)} components in index, "
                         f"{len(rec.components)} in tar")
            continue
        for comp, (ext, m) in zip(irec.components, rec.components, strict=False):
            if comp.ext != ext or comp.offset != m.offset or comp.size != m.size or (
                comp.name is not None and comp.name != m.name
            ):
                diffs.append(
                    f"record {n} ({rec.key}): index says {comp.ext} {comp.offset} {comp.size} "
                    f"{comp.name or ''}, tar has {ext} {m.offset} {m.size} {m.name}".rstrip()
                )
                break
        if len(diffs) >= 20:
            diffs.append("...")
            break
    return diffs


# ---------------------------------------------------------------------------------------------
# Building an index for a shard of a dataset


class IndexResult(NamedTuple):
    key: str
    shard_url: str
    index_url: str
    records: int
    members: int
    bytes: int  # size of the shard
    seconds: float
    reused: bool
    tar_fingerprint: str
    index_fingerprint: str | None


def _spot_check(f, index: ShardIndex, shard_size: int) -> bool:
    """Cheap freshness check of an existing index: the first, middle and last components must
    sit inside the tar and be preceded by a header that agrees on size (and short names)."""
    from curator_assets.tar_members import _nts, _number

    comps = [c for r in index.records for c in r.components]
    if not comps:
        return False
    picks = {0, len(comps) // 2, len(comps) - 1}
    for i in picks:
        c = comps[i]
        if c.offset < 512 or c.offset % 512 or c.offset + c.size > shard_size:
            return False
        f.seek(c.offset - 512)
        header = f.read(512)
        if len(header) < 512:
            return False
        try:
            size = _number(header[124:136])
        except ValueError:
            return False
        if size != c.size:
            return False
        name = _nts(header[0:100]).decode("utf-8", "surrogateescape")
        if c.name is not None and len(c.name) < 100 and not c.name.endswith(name):
            return False
    return True


def ensure_index(
    dataset,
    key: str,
    *,
    force: bool = False,
    previous: dict[str, str] | None = None,
) -> IndexResult:
    """Build (or reuse) the ``.idx`` of one shard of ``dataset``.

    Reuse rules, cheapest first: ``previous`` fingerprints (what the last run recorded) equal
    to the current tar and index fingerprints; else an index newer than the tar whose spot
    check passes (or, when the tar may have been rewritten after the index while keeping an
    older mtime, that describes every record exactly). ``force`` always rebuilds. Raises
    ``TarError``/``IndexFormatError``/``StorageError`` naming the shard.
    """
    import time

    from curator_assets.storage import fingerprint_of
    from curator_assets.tar_members import read_members

    start = time.perf_counter()
    shard = dataset.shard(key)
    idx_info = dataset.index_info(key)
    idx_fp = fingerprint_of(idx_info) if idx_info else None
    idx_url = dataset.url_of(dataset.index_path(key), dataset.index_fs)

    members = None
    if not force and idx_info is not None:
        fresh = False
        existing: ShardIndex | None = None
        idx_time = modified_at(idx_info)
        tar_info = shard.info or dataset.fs.info(shard.path)
        try:
            if previous and previous.get("tar_fingerprint"):
                # What the last run recorded decides: an unchanged tar and index are reused, a
                # changed tar is always re-indexed (store timestamps can be whole seconds).
                fresh = previous["tar_fingerprint"] == shard.fingerprint and previous.get("index_fingerprint") == idx_fp
            elif idx_time is not None and idx_time >= (modified_at(tar_info) or 0):
                existing = parse_index(dataset.read_index_bytes(key) or b"", idx_url)
                if idx_time >= _changed_at(tar_info):
                    with dataset.open_shard(key) as f:
                        fresh = _spot_check(f, existing, shard.size)
                else:
                    # The tar changed after the index while keeping an older mtime (rsync -a, cp -p,
                    # a rename over it), or came with it in one download: a few spots cannot tell.
                    with dataset.open_shard(key) as f:
                        members = read_members(f, shard.url)
                    fresh = not index_matches_members(existing, group_records(members))
            if fresh and existing is None:
                existing = parse_index(dataset.read_index_bytes(key) or b"", idx_url)
        except IndexFormatError:
            fresh = False
        if fresh:
            return IndexResult(
                key, shard.url, idx_url, len(existing),
                sum(len(r.components) for r in existing.records), shard.size,
                time.perf_counter() - start, True, shard.fingerprint, idx_fp,
            )

    if members is None:
        with dataset.open_shard(key) as f:
            members = read_members(f, shard.url)
    try:
        data, n_records, n_components = index_bytes_of_members(members)
    except IndexFormatError as exc:
        raise IndexFormatError(f"{shard.url}: {exc}") from None
    dataset.write_index(key, data)
    new_info = dataset.index_info(key)
    return IndexResult(
        key, shard.url, idx_url, n_records, n_components,
        shard.size, time.perf_counter() - start, False, shard.fingerprint,
        fingerprint_of(new_info) if new_info else None,
    )


def _changed_at(info: dict) -> float:
    """When a shard last changed: its mtime, or its ctime (fsspec's local "created") when later.
    A rewrite that restores an older mtime (``rsync -a``, ``cp -p``, an extracted archive) or a
    rename over the shard leaves the mtime behind, never the ctime."""
    created = info.get("created")
    times = (modified_at(info), modified_at({"mtime": created}) if created is not None else None)
    return max((t for t in times if t is not None), default=0.0)
