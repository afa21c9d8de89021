"""The input side of export: which shards there are, and what each record of one shard is worth.

Every shard becomes a :class:`SourcePlan`: its records in tar order, each with its members
(name, data offset, size), the sha256 and size of its image, and why it is left out (None when
it passes). The verdicts come from the shard's validation report and decode manifest under the
dataset's output location when they describe the tar as it is now; otherwise the shard is
validated and decoded here, through the same public functions (nothing is written beside the
source: a read-only bucket exports as well as a local folder).

Compressed shards (recognised by their bytes, whatever their name: a plain tar named .tar.gz is
read in place) are first spooled, streamed, into a plain tar in a local work folder.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from curator_assets.formats.compressed import SNIFF_BYTES, CompressedInputError, compression_of, spool_plain
from curator_assets.formats.idx import Members
from curator_assets.formats.report import ERROR, INFO, RECORD_CODES, ShardReport
from curator_assets.formats.tar_members import group_records, scan_tar
from curator_assets.steps.state import ShardState, load_shard_state
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError

PLAN_VERSION = 1
# Record-ID problems that leave every record with that ID out: written again, they would give a
# reader two samples with one ID, or an index line it cannot parse.
ID_CODES = frozenset({"bad_record_id", "duplicate_record_id", "split_record"})


class SourceRecord(NamedTuple):
    position: int  # in the tar, as DALI and webdataset count records
    key: str
    members: tuple[tuple[str, int, int], ...]  # (name, data offset, size), in tar order
    sha256: str | None  # of the image member's bytes
    width: int | None
    height: int | None
    decoded: bool
    reason: str | None  # "validation:<code>" or "decode:<code>"; None: it passes
    detail: str | None  # the report's or the manifest's words for the reason
    image: int | None = None  # which member is the image (its sha256 is checked as it is copied)


class Source(NamedTuple):
    """One input shard: read in place from the dataset (``spool`` None), or from a local plain
    tar that its bytes are spooled into first."""

    key: str
    url: str
    path: str  # the store path of the file
    fingerprint: str
    size: int


class SourcePlan(NamedTuple):
    key: str
    url: str
    fingerprint: str
    compression: str | None  # what the file's bytes are (None: a plain tar)
    records: list[SourceRecord]
    notes: list[str]  # shard-level problems (a truncated tar, ...): its readable records still go out
    error: str | None  # why nothing of the shard can be exported (no tar at all, unreadable)

    def to_bytes(self) -> bytes:
        body = {"version": PLAN_VERSION, "key": self.key, "url": self.url, "fingerprint": self.fingerprint,
                "compression": self.compression, "notes": self.notes, "error": self.error,
                "records": [list(r) for r in self.records]}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")

    @classmethod
    def from_bytes(cls, data: bytes) -> SourcePlan | None:
        d = json.loads(data.decode("utf-8", "surrogateescape"))
        if d.get("version") != PLAN_VERSION:
            return None
        records = [SourceRecord(r[0], r[1], tuple(tuple(m) for m in r[2]), *r[3:]) for r in d["records"]]
        return cls(d["key"], d["url"], d["fingerprint"], d["compression"], records, d["notes"], d["error"])


# -- listing -------------------------------------------------------------------------------------


def list_sources(dataset: Dataset) -> tuple[list[Source], list[str]]:
    """Every shard of ``dataset``, sorted by key (the listing judges names: ``.tar`` and the
    compressed-tar names; export judges bytes), and the one-line errors of paths that cannot be
    shards."""
    listing = dataset.list_shards()
    sources = [Source(s.key, s.url, s.path, s.fingerprint, s.size) for s in listing.shards]
    errors = [why if url in why else f"{url}: {why}" for url, why in listing.rejected]
    return sources, errors


# -- the plan of one shard -----------------------------------------------------------------------


class Workspace:
    """Local folders export works in: spooled plain tars, and an empty index folder (so that a
    stale ``.idx`` beside a source cannot stop its records being read: export writes new ones)."""

    def __init__(self, root: Callable[[], str]):
        self._make_root = root
        self._root: str | None = None
        self._lock = threading.RLock()  # the planning thread and the shard writer both spool

    @property
    def root(self) -> str:
        """Made on first use: a run with nothing to read creates nothing."""
        with self._lock:
            if self._root is None:
                self._root = self._make_root()
                for folder in (self.spool_root, self.no_index, self.scratch):
                    os.makedirs(folder, exist_ok=True)
        return self._root

    @property
    def created(self) -> bool:
        return self._root is not None

    @property
    def spool_root(self) -> str:
        return os.path.join(self.root, "spool")

    @property
    def no_index(self) -> str:
        return os.path.join(self.root, "no-index")

    @property
    def scratch(self) -> str:
        return os.path.join(self.root, "scratch")

    def spool_path(self, key: str) -> str:
        return os.path.join(self.spool_root, key + ".tar")

    def spool(self, dataset: Dataset, source: Source) -> str | None:
        """The local plain tar of a spooled source (written once per export, and kept by a killed
        run for the next: reused only when the source's fingerprint is the one it was spooled from);
        its compression."""
        path = self.spool_path(source.key)
        kind_file = path + ".kind"
        try:
            with open(kind_file) as f:
                kind, _, spooled_from = f.read().partition("\n")
            if spooled_from == source.fingerprint and os.path.exists(path):
                return kind or None
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with dataset.open(source.path) as raw:
            kind = compression_of(raw.read(SNIFF_BYTES))
            raw.seek(0)
            with open(path + ".part", "wb") as out:
                if kind is None:
                    _copy(raw, out)
                else:
                    spool_plain(raw, kind, out)
        os.replace(path + ".part", path)
        with open(kind_file, "w") as f:
            f.write(f"{kind or ''}\n{source.fingerprint}")
        return kind


def _copy(src, dst, chunk: int = 1 << 20) -> None:
    while True:
        data = src.read(chunk)
        if not data:
            return
        dst.write(data)


class Unmapped:
    """A local file read by ``seek`` and ``read`` only. The header scanner maps a file it can, and
    every page it touches counts as the process's resident memory: a whole shard's worth, 2 GB for
    a 2 GB shard. Without a descriptor it reads each header instead; decode reads by ``pread``."""

    def __init__(self, f):
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Unmapped:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ReadingView(Dataset):
    """The source dataset without its indexes (or the spool folder), whose local shards open
    unmapped: what export validates, scans and decodes through, in bounded memory."""

    def open(self, path: str, *, fs=None, block_size: int | None = None, size: int | None = None):
        f = super().open(path, fs=fs, block_size=block_size, size=size)
        return Unmapped(f) if self.local and (fs is None or fs is self.fs) else f


def reading_view(dataset: Dataset, source: Source, work: Workspace, spooled: bool) -> Dataset:
    """A dataset through which the source's records are read, validated and decoded: the source
    dataset without its indexes, or the spool folder."""
    if spooled:
        return ReadingView(work.spool_root, index_url=work.no_index, output_url=work.scratch)
    return ReadingView(dataset.url, dataset.storage_options, index_url=work.no_index, output_url=work.scratch)


def needs_spool(dataset: Dataset, source: Source) -> bool:
    """Whether the source's bytes are compressed (whatever its name says)."""
    with dataset.open(source.path) as f:
        return compression_of(f.read(SNIFF_BYTES)) is not None


def plan_source(dataset: Dataset, source: Source, work: Workspace, decoder: Callable[[], Any],
                max_pixels: int) -> SourcePlan:
    """What every record of ``source`` is worth (see the module's docstring). Errors that leave
    nothing to export are the plan's ``error``, never raised, except the store's own."""
    kind = None
    spooled = needs_spool(dataset, source)
    if spooled:
        try:
            kind = work.spool(dataset, source)
        except CompressedInputError as exc:
            return SourcePlan(source.key, source.url, source.fingerprint, None, [], [], f"{source.url}: {exc}")
    view = reading_view(dataset, source, work, spooled)
    # In place, the shard's state (its info, index and stored report) is read once; the view reads
    # the same tar without its index.
    state = None if spooled else load_shard_state(dataset, source.key, report=True)
    shard = view.shard(source.key) if state is None else state.info
    report = None if state is None else _fresh_report(state, source)
    records = None if report is None else _records_from_index(state, report)
    notes: list[str] = []
    if records is None:
        records, notes, error = _records_from_scan(view, source, shard.size)
        if error:
            return SourcePlan(source.key, source.url, source.fingerprint, kind, [], notes, error)
    if report is None:
        report = validate_shard(view, source.key, max_pixels=max_pixels)
    rows = None if spooled else _fresh_manifest(dataset, source.key, records)
    if rows is None:
        from curator_assets.steps.decode.shard import decode_shard

        _result, manifest_rows = decode_shard(view, source.key, decoder=decoder(), write=False, report=report)
        rows = [_row_facts(r) for r in manifest_rows]
    out = [_source_record(n, rec, rows[n], shard.size) for n, rec in enumerate(records)]
    out = _apply_report(out, report)
    return SourcePlan(source.key, source.url, source.fingerprint, kind, out, notes, None)


def _records_from_scan(view: Dataset, source: Source, size: int) -> tuple[list[tuple[str, Members]], list[str],
                                                                          str | None]:
    """(records, shard-level notes, why nothing can be exported) from a recovering header scan."""
    with view.open_shard(source.key) as f:
        scan = scan_tar(f, recover=True, total_size=size)
    records = [(r.key, tuple((m.name, m.offset, m.size) for _e, m in r.components))
               for r in group_records(scan.members)]
    notes = [f"{p.code}: {p.detail} (at byte {p.offset})" for p in scan.problems]
    if records:
        return records, notes, None
    why = scan.problems[0].detail if scan.problems else "a readable tar without a single record"
    code = scan.problems[0].code if scan.problems else "no_records"
    return records, notes, f"{source.url}: nothing to export: {why} ({code})"


def _records_from_index(state: ShardState, report: ShardReport) -> list[tuple[str, Members]] | None:
    """The records as the shard's ``.idx`` lists them, when the fresh validation report found that
    index exact (and it is unchanged since) and the tar whole: no header scan needed."""
    from curator_assets.formats.idx import IndexFormatError, index_members

    if report.index != "fresh" or any(p.code.startswith("tar_") for p in report.problems):
        return None
    if state.index_bytes is None or state.index_fingerprint != report.index_fingerprint:
        return None
    try:
        return index_members(state.index_bytes, state.index_url)
    except IndexFormatError:
        return None


def verdict_fingerprints(dataset: Dataset, key: str) -> tuple[str | None, str | None]:
    """The fingerprints of the shard's stored validation report and decode manifest (None: none)."""
    from curator_assets.formats.manifest import MANIFEST_KIND, MANIFEST_SUFFIX
    from curator_assets.formats.report import REPORT_KIND, REPORT_SUFFIX
    from curator_assets.store.keys import fingerprint_of

    out = []
    for kind, suffix in ((REPORT_KIND, REPORT_SUFFIX), (MANIFEST_KIND, MANIFEST_SUFFIX)):
        try:
            out.append(fingerprint_of(dataset.output_fs.info(dataset.output_path(kind, key, suffix))))
        except (FileNotFoundError, NotADirectoryError):
            out.append(None)
    return out[0], out[1]


def _fresh_report(state: ShardState, source: Source) -> ShardReport | None:
    """The stored validation report, when it describes the source as listed."""
    report = state.report
    return report if report is not None and report.describes(source.fingerprint) else None


_MANIFEST_COLUMNS = ["record_id", "member", "offset", "sha256", "width", "height", "decoded", "error"]


def _fresh_manifest(dataset: Dataset, key: str, records: list[tuple[str, Members]]) -> list[tuple] | None:
    """The rows of the shard's stored decode manifest when they describe these records (same
    IDs in the same order, each image at its offset), else None: decode it again."""
    import pyarrow.parquet as pq  # ParquetFile, not read_table: that one imports pyarrow.dataset and pandas

    from curator_assets.formats.manifest import MANIFEST_KIND, MANIFEST_SUFFIX

    try:
        data = dataset.read_bytes(dataset.output_path(MANIFEST_KIND, key, MANIFEST_SUFFIX), fs=dataset.output_fs)
        table = pq.ParquetFile(io.BytesIO(data)).read(columns=_MANIFEST_COLUMNS)
    except (OSError, ValueError, KeyError, StorageError):
        return None
    cols = table.to_pydict()
    if cols["record_id"] != [key for key, _members in records]:
        return None
    for (_key, members), member, offset in zip(records, cols["member"], cols["offset"], strict=True):
        if member is not None and (member, offset) not in {(name, off) for name, off, _n in members}:
            return None
    return list(zip(cols["member"], cols["sha256"], cols["width"], cols["height"], cols["decoded"], cols["error"],
                    strict=True))


def _row_facts(row) -> tuple:
    return (row.member, row.sha256, row.width, row.height, row.decoded, row.error)


def _source_record(position: int, rec: tuple[str, Members], facts: tuple, size: int) -> SourceRecord:
    member, sha256, width, height, decoded, error = facts
    key, members = rec
    image = truncated = None
    for i, (name, off, n) in enumerate(members):  # a loop, not generators: this runs once per record
        if image is None and name == member:
            image = i
        if off + n > size:
            truncated = True
    reason = detail = None
    if truncated:
        reason, detail = "validation:tar_truncated", "a member's data runs past the end of the shard"
    elif not decoded:
        from curator_assets.steps.summary import error_code

        reason, detail = f"decode:{error_code(error)}", error
    return SourceRecord(position, key, members, sha256, width, height, bool(decoded), reason, detail, image)


def _apply_report(records: list[SourceRecord], report: ShardReport) -> list[SourceRecord]:
    """Leave out the records the validation report flags: record-level problems (not info) and
    record-ID problems; a verdict about the bytes (tar_truncated) found here stands first."""
    flagged: dict[str, tuple[str, str]] = {}
    for p in report.problems:
        if p.record_id is None or p.record_id in flagged:
            continue
        if (p.code in RECORD_CODES and p.severity != INFO) or (p.code in ID_CODES and p.severity == ERROR):
            flagged[p.record_id] = (p.code, p.detail)
    out = []
    for r in records:
        hit = flagged.get(r.key)
        if hit is not None and (r.reason is None or r.reason.startswith("decode:")):
            r = r._replace(reason=f"validation:{hit[0]}", detail=hit[1])
        out.append(r)
    return out


def readable(record: SourceRecord) -> bool:
    """Whether every byte of the record can be read (what --include-failed may keep)."""
    return record.reason is None or record.reason.startswith("decode:")

