"""Shard validation: tar structure, record IDs, the ``.idx``, image headers and side files.

Two passes, one report. The precise pass goes member by member: the recovering tar scanner
(so records after a damaged spot are still found and counted), then per record a few small
ranged reads: the head of each image (its header; for JPEG a marker walk up to the frame
header), a JPEG's last bytes (its end-of-image marker) and the side files. Image payloads are
never read whole, except a JPEG that does not end with its marker: its markers are walked to
tell a trailer after a complete image (``jpeg_trailing_data``) from a cut (``jpeg_truncated``).
Nothing is decoded. On a local file a vectorised pass runs first and proves most shards clean
at several times the speed; it hands anything it cannot prove to the precise pass (see below).

Every problem has a stable code and a severity. Shard-level problems (the tar, the index,
record IDs) are errors: a reader would return wrong or shifted data, so the shard must not
be decoded. Record-level problems (image bytes, side files) are warnings. Informational ones
(``jpeg_trailing_data``) change nothing. Severities can be overridden per code.

The report records the fingerprints of the tar and the index it describes. Decode reads it
(:func:`read_report`, :meth:`ShardReport.describes`): while the tar is unchanged, every record
with a record-level problem (:meth:`ShardReport.problem_records`) is marked failed with the
report's code and detail instead of being decoded; a stale report is not trusted.

What a component is and means comes from :mod:`curator_assets.formats.schema`; what image bytes are,
and their header rules, from :mod:`curator_assets.formats.sniff`.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, BinaryIO, NamedTuple

from curator_assets.formats import schema
from curator_assets.formats.sniff import JPEG_MODES, PROGRESSIVE_SOF, SOF_PROCESS, ImageHeader, check_image, not_a_tar
from curator_assets.formats.tar_members import (
    BLOCK,
    NO_DATA_TYPES,
    Member,
    Record,
    TarProblem,
    group_records,
    is_component,
    scan_members,
    split_key,
)
from curator_assets.steps.index import (
    IndexFormatError,
    build_index_bytes,
    index_differences,
    index_tokens,
    is_index_of_fields,
    parse_index,
)

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITY_LEVELS = (ERROR, WARNING, INFO)

DEFAULT_MAX_PIXELS = 100_000_000

# code -> (default severity, what it means). The codes are stable: reports, manifests and
# dashboards key on them.
CODES: dict[str, tuple[str, str]] = {
    # tar structure
    "tar_truncated": (ERROR, "the tar ends mid-member or lacks its end-of-archive blocks"),
    "tar_bad_header": (ERROR, "a header with a bad checksum or format"),
    "not_a_tar": (ERROR, "not a tar archive at all: a compressed archive, a Git LFS pointer, text"),
    "tar_hole": (ERROR, "zero blocks (or bytes that are no header) at a member boundary with members after them: "
                 "readers stop there; the records after it are still listed"),
    "unsupported_member": (ERROR, "a hard link, symlink, device, fifo, sparse file or other non-regular member"),
    "no_records": (ERROR, "a readable tar without a single record"),
    "shard_unreadable": (ERROR, "the shard cannot be listed, opened or read"),
    # records
    "duplicate_record_id": (ERROR, "the same record ID (key) twice in the shard"),
    "split_record": (ERROR, "a record's members are not adjacent, so readers see two records"),
    "bad_record_id": (ERROR, "an empty, '..', absolute, non-UTF-8 or whitespace-containing record ID"),
    "missing_image": (WARNING, "a record without an image member (.jpg, .jpeg, .png, .webp, ... in any case)"),
    "ambiguous_extension": (WARNING, "two members of a record whose extensions differ only in case (.JPG and "
                            ".jpg): lower-casing readers refuse the record"),
    "stray_member": (WARNING, "a file that belongs to no record (no extension, a hidden file) or a volume label"),
    # index
    "idx_missing": (WARNING, "the shard has no .idx"),
    "idx_unreadable": (ERROR, "the .idx cannot be parsed"),
    "idx_stale": (ERROR, "the .idx disagrees with the tar (count, offset, size or name), e.g. another shard's"),
    # image bytes
    "not_jpeg": (WARNING, "a .jpg/.jpeg member that is not JPEG data (wrong magic, zero bytes)"),
    "not_image": (WARNING, "a .png/.webp/... member whose bytes are no image format decode accepts"),
    "jpeg_bad_header": (WARNING, "JPEG markers before the frame header are malformed"),
    "image_bad_header": (WARNING, "a PNG/WebP/TIFF/BMP/JPEG 2000/PNM header that gives no image size"),
    "jpeg_truncated": (WARNING, "the JPEG has no end-of-image marker (FFD9)"),
    "jpeg_trailing_data": (INFO, "bytes after a complete JPEG's end-of-image marker (a Motion Photo's video): "
                           "the image decodes"),
    "image_too_large": (WARNING, "the image has more pixels than the limit (decompression bomb)"),
    # side files
    "bad_json": (WARNING, "a .json member that is not valid JSON"),
    "bad_text": (WARNING, "a text member that is not UTF-8"),
}

DEFAULT_SEVERITIES: dict[str, str] = {code: sev for code, (sev, _) in CODES.items()}

# Problems of one record's contents: what decode fails that record for (whatever their severity,
# except info). The others concern the shard as a whole (its tar, index or record IDs).
RECORD_CODES = frozenset({
    "missing_image", "ambiguous_extension", "not_jpeg", "not_image", "jpeg_bad_header", "image_bad_header",
    "jpeg_truncated", "jpeg_trailing_data", "image_too_large", "bad_json", "bad_text",
})

IMAGE_EXTS = frozenset(schema.IMAGE_EXTENSIONS)
JSON_EXTS = frozenset({"json"})
TEXT_EXTS = frozenset(schema.TEXT_SUFFIXES)

# Ranged reads: the marker walk reads segment by segment through a one-block cache, so large
# APP segments (EXIF, ICC) before the frame header cost a read or two, never the whole image.
_WINDOW = 16384  # one read covers an image's tail, the side files and the next image's head

_BAD_NAME_CHARS = re.compile(r"[\s\x00-\x1f\x7f\udc80-\udcff]")


def resolve_severities(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """The default severities with ``overrides`` (code -> "error" | "warning") applied."""
    severities = dict(DEFAULT_SEVERITIES)
    for code, level in (overrides or {}).items():
        if code not in CODES:
            raise ValueError(f"unknown validation code {code!r}; known: {', '.join(sorted(CODES))}")
        level = str(level).lower()
        if level not in SEVERITY_LEVELS:
            raise ValueError(f"severity of {code!r} must be 'error', 'warning' or 'info', not {level!r}")
        severities[code] = level
    return severities


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Problem:
    code: str
    severity: str
    record_id: str | None
    member: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "record_id": self.record_id,
            "member": self.member, "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Problem:
        return cls(d["code"], d["severity"], d.get("record_id"), d.get("member"), d.get("detail", ""))


class ImageInfo(NamedTuple):
    """Header facts of one JPEG member."""

    record_id: str
    member: str
    width: int
    height: int
    mode: str  # as Pillow names it: L, RGB, CMYK
    progressive: bool
    process: str  # baseline, extended, progressive, lossless (arithmetic/differential variants too)

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


class ImageColumns(Sequence[ImageInfo]):
    """Image facts kept column by column (cheap to build for a whole shard); reads as a
    sequence of :class:`ImageInfo`."""

    def __init__(self, *columns: list):
        self._columns = columns
        self._n = len(columns[0])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        return ImageInfo(*(c[i] for c in self._columns))

    def __iter__(self) -> Iterator[ImageInfo]:
        return map(tuple.__new__, repeat(ImageInfo), zip(*self._columns, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class ShardReport:
    shard: str | None  # URL (or name) of the tar; None when a path could not even be listed
    key: str | None = None  # the partition key, when validated as part of a dataset
    records: int = 0  # records as DALI / webdataset read them (consecutive members sharing a key)
    members: int = 0  # tar members found (damaged ones excluded)
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    images: Sequence[ImageInfo] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)  # in tar order, as many as `records`
    index: str = "missing"  # missing | fresh | stale | unreadable | not checked
    max_pixels: int = DEFAULT_MAX_PIXELS
    seconds: float = 0.0
    # What was validated (storage fingerprints: etag/generation, or mtime and size): a reader of
    # the report trusts it only while the tar still has this fingerprint.
    fingerprint: str | None = None
    index_fingerprint: str | None = None

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(1 for p in self.problems if p.severity == WARNING)

    @property
    def infos(self) -> int:
        return sum(1 for p in self.problems if p.severity == INFO)

    @property
    def ok(self) -> bool:
        """No errors: the shard may be decoded (records with warnings are skipped)."""
        return self.errors == 0

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(p.code for p in self.problems).items()))

    def problem_records(self) -> dict[str, list[Problem]]:
        """Record-level problems (:data:`RECORD_CODES`) by record ID: what a decoder marks failed
        instead of decoding. Informational ones change nothing."""
        out: dict[str, list[Problem]] = {}
        for p in self.problems:
            if p.code in RECORD_CODES and p.severity != INFO and p.record_id is not None:
                out.setdefault(p.record_id, []).append(p)
        return out

    def describes(self, fingerprint: str | None) -> bool:
        """Whether this report was made from the tar that now has ``fingerprint`` (a report
        without a fingerprint, or of a tar changed since, is stale and not to be trusted)."""
        return self.fingerprint is not None and fingerprint is not None and self.fingerprint == fingerprint

    def summary_json(self) -> dict[str, Any]:
        """The one-line shape of ``curator-assets validate --json``."""
        return {
            "shard": self.shard, "ok": self.ok, "records": self.records,
            "problems": [p.to_json() for p in self.problems],
        }

    def to_json(self) -> dict[str, Any]:
        """The full report: the summary plus counts, image facts and record IDs."""
        return {
            **self.summary_json(),
            "key": self.key,
            "members": self.members,
            "bytes": self.bytes,
            "errors": self.errors,
            "warnings": self.warnings,
            "infos": self.infos,
            "counts": self.counts(),
            "index": self.index,
            "max_pixels": self.max_pixels,
            "seconds": round(self.seconds, 6),
            "fingerprint": self.fingerprint,
            "index_fingerprint": self.index_fingerprint,
            "images": [i.to_json() for i in self.images],
            "record_ids": self.record_ids,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardReport:
        return cls(
            shard=d["shard"], key=d.get("key"), records=d["records"], members=d.get("members", 0),
            bytes=d.get("bytes", 0), problems=[Problem.from_json(p) for p in d["problems"]],
            images=[ImageInfo(i["record_id"], i["member"], i["width"], i["height"], i["mode"], i["progressive"],
                              i["process"]) for i in d.get("images", [])],
            record_ids=list(d.get("record_ids", [])), index=d.get("index", "missing"),
            max_pixels=d.get("max_pixels", DEFAULT_MAX_PIXELS), seconds=d.get("seconds", 0.0),
            fingerprint=d.get("fingerprint"), index_fingerprint=d.get("index_fingerprint"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardReport:
        return cls.from_json(json.loads(data))

    def metadata(self, report_url: str | None = None) -> dict[str, Any]:
        """Plain values for asset metadata (the Dagster shell wraps the path)."""
        meta: dict[str, Any] = {
            "ok": self.ok, "records": self.records, "members": self.members, "errors": self.errors,
            "warnings": self.warnings, "index": self.index, "seconds": round(self.seconds, 4),
            "counts": self.counts(),
        }
        if report_url is not None:
            meta["report_path"] = report_url
        return meta


# ---------------------------------------------------------------------------------------------
# Ranged reads


def _reader(fileobj: BinaryIO) -> Callable[[int, int], bytes]:
    """``read_at(offset, n)``: os.pread on a real file, seek + read otherwise."""
    try:
        fd = fileobj.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        def pread_at(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        pread_at.fd = fd  # type: ignore[attr-defined]
        return pread_at

    def read_at(offset: int, n: int) -> bytes:
        fileobj.seek(offset)
        chunks, remaining = [], n
        while remaining > 0:
            chunk = fileobj.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    return read_at


class _Window:
    """A one-block read cache: records lie in file order, so one read usually serves an image's
    tail, its side files and the next image's head."""

    __slots__ = ("read_at", "buf", "start", "end")

    def __init__(self, read_at: Callable[[int, int], bytes]):
        self.read_at = read_at
        self.buf = b""
        self.start = self.end = 0

    def get(self, offset: int, n: int) -> bytes:
        if offset >= self.start and offset + n <= self.end:
            i = offset - self.start
            return self.buf[i : i + n]
        if n >= _WINDOW:
            return self.read_at(offset, n)
        self.buf = self.read_at(offset, _WINDOW)
        self.start, self.end = offset, offset + len(self.buf)
        return self.buf[:n]


# ---------------------------------------------------------------------------------------------
# The validation


class _Collector:
    def __init__(self, severities: Mapping[str, str]):
        self.severities = severities
        self.problems: list[Problem] = []
        self.members: list[Member] = []  # what the scan found so far

    def add(self, code: str, detail: str, record_id: str | None = None, member: str | None = None) -> None:
        self.problems.append(Problem(code, self.severities[code], record_id, member, detail))


def _record_id_problem(key: str) -> str | None:
    if not key:
        return "empty record ID"
    if key[0] == "/":
        return "absolute path"
    if ".." in key and ".." in key.split("/"):
        return "'..' path segment"
    bad = _BAD_NAME_CHARS.search(key)
    if bad:
        ch = bad.group()
        if "\udc80" <= ch <= "\udcff":
            return "not valid UTF-8"
        return f"contains {ch!r}, which the .idx format and many tools cannot hold"
    return None


def _opened(fileobj: BinaryIO, total_size: int | None):
    """(seekable file, ranged reader, fd or None, size): a stream is read into memory first."""
    try:
        seekable = bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    if not seekable:
        data = fileobj.read()
        fileobj, total_size = io.BytesIO(data), len(data)
    fileobj.seek(0)
    read_at = _reader(fileobj)
    fd = getattr(read_at, "fd", None)
    if total_size is None:
        if fd is not None:
            total_size = os.fstat(fd).st_size
        else:
            size_attr = getattr(fileobj, "size", None)
            total_size = size_attr if isinstance(size_attr, int) else fileobj.seek(0, os.SEEK_END)
            fileobj.seek(0)
    return fileobj, read_at, fd, total_size


def _scanned_members(fileobj: BinaryIO, read_at, total_size: int, out: _Collector) -> Iterator[Member]:
    """Every member the recovering scanner finds, as it finds them (also appended to ``out.members``);
    each damaged spot becomes a problem. A last member whose data is cut off is taken back out of
    ``out.members`` (it is not readable, not counted)."""
    members: list[Member] = out.members
    # A stride of 1 MB keeps the contents check a few records behind the scan on a stream read
    # ahead in blocks (a remote shard); a mapped local file is not affected.
    for item in scan_members(fileobj, recover=True, total_size=total_size, stride=1 << 20):
        if isinstance(item, Member):
            members.append(item)
            yield item
            continue
        problem: TarProblem = item
        member = None
        if problem.code == "tar_truncated" and members and members[-1].type not in NO_DATA_TYPES and (
            members[-1].offset + members[-1].size > total_size
        ):
            member = members.pop().name  # its data is cut off: not readable, not counted
        code = problem.code if problem.code in CODES else "tar_bad_header"
        detail = f"{problem.detail} (at byte {problem.offset})"
        if problem.offset == 0 and not members and not out.problems:
            why = not_a_tar(read_at(0, BLOCK))
            if why is not None:
                code, detail = "not_a_tar", why
        out.add(code, detail, split_key(member)[0] if member else None, member)


def _keeping_position(fileobj: BinaryIO, read_at):
    """``read_at`` that leaves the file where it was: the scanner reading the same file keeps
    its own idea of the position. (``os.pread`` never moves it.)"""
    if getattr(read_at, "fd", None) is not None:
        return read_at

    def read_back(offset: int, n: int) -> bytes:
        here = fileobj.tell()
        try:
            return read_at(offset, n)
        finally:
            fileobj.seek(here)

    return read_back


def _scan_and_check(fileobj: BinaryIO, read_at, total_size: int, out: _Collector,
                    max_pixels: int) -> tuple[list[Member], list[ImageInfo], list[Problem]]:
    """One pass over the tar: the members, and each record's contents checked as soon as the scan
    has passed it, while its bytes are still in the reader's read-ahead block, so a remote shard
    is read once rather than once for the headers and again for the contents. Records group as
    :func:`group_records` groups them (consecutive components of one key); the content problems
    are returned apart, to follow the structural ones in the report."""
    contents = _Collector(out.severities)
    window = _Window(_keeping_position(fileobj, read_at))
    images: list[ImageInfo] = []
    pending: list[Member] = []  # the record being scanned (and non-components among its members)
    pending_key: str | None = None
    for m in _scanned_members(fileobj, read_at, total_size, out):
        key = split_key(m.name)[0] if is_component(m) else None
        if key is not None and key != pending_key:
            images += _check_contents(window, group_records(pending), max_pixels, contents)
            pending, pending_key = [], key
        pending.append(m)
    if pending and pending[-1] is not (out.members[-1] if out.members else None):
        pending.pop()  # the cut-off last member, taken back out by the scan
    images += _check_contents(window, group_records(pending), max_pixels, contents)
    return out.members, images, contents.problems


def _check_non_components(members: list[Member], out: _Collector) -> None:
    """Members that are no record component: stray files, volume labels, links, devices."""
    for m in members:
        if m.is_file:
            if is_component(m):
                continue
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith(".") and base[1:].lower() in IMAGE_EXTS:
                out.add("bad_record_id", "empty record ID: the name starts with a dot, so readers disagree "
                        "on whether it is a record", "", m.name)
            elif base:
                why = "hidden file" if base.startswith(".") else "no extension"
                out.add("stray_member", f"{why}: not part of any record", None, m.name)
        elif m.type == "V":  # a GNU volume label: every reader skips it, so no reason to block a shard
            out.add("stray_member", f"volume label {m.name!r}: readers skip it", None, m.name)
        elif m.type not in ("5", "D"):  # directories (GNU incremental dumps write them as 'D') are normal
            out.add("unsupported_member", f"{m.type_name} member: readers cannot use it", None, m.name)


def validate_file(
    fileobj: BinaryIO,
    *,
    shard: str = "<shard>",
    key: str | None = None,
    index_bytes: bytes | None = None,
    expect_index: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    severities: Mapping[str, str] | None = None,
    total_size: int | None = None,
    fast: bool = True,
) -> ShardReport:
    """Validate one tar read from ``fileobj`` (seekable; a stream is read into memory first).

    ``index_bytes`` is the shard's ``.idx``, if any; with ``expect_index`` a missing one is
    reported as ``idx_missing``. On a local file a vectorised pass first tries to prove the
    shard clean; whatever it cannot prove (any tar, record-ID or index problem) is left to the
    precise member-by-member pass, so ``fast`` changes the speed, never the report.
    """
    start = time.perf_counter()
    levels = resolve_severities(severities)
    fileobj, read_at, fd, total_size = _opened(fileobj, total_size)

    if fast and fd is not None:
        report = _fast_validate(
            fd, read_at, total_size, shard=shard, key=key, index_bytes=index_bytes, expect_index=expect_index,
            max_pixels=max_pixels, levels=levels,
        )
        if report is not None:
            report.seconds = time.perf_counter() - start
            return report

    out = _Collector(levels)
    report = ShardReport(shard=shard, key=key, bytes=total_size, max_pixels=max_pixels)

    # 1. Tar structure: every member the recovering scanner finds; damaged ones are reported.
    #    The contents of each record are checked in the same pass (their problems come last).
    members, images, content_problems = _scan_and_check(fileobj, read_at, total_size, out, max_pixels)
    tar_damaged = bool(out.problems)
    report.members = len(members)

    # 2. Members that are no record component.
    _check_non_components(members, out)

    # 3. Records and their IDs.
    records = group_records(members)
    report.records = len(records)
    report.record_ids = [r.key for r in records]
    if not records and not tar_damaged:
        out.add("no_records", "the tar holds no record (no regular file with a key and an extension)")
    _check_record_ids(records, out)

    # 4. The index.
    report.index = _index_state(index_bytes, expect_index, records, out)

    # 5. Image headers and side files (read during the scan).
    report.images = images
    report.problems = out.problems + content_problems
    report.seconds = time.perf_counter() - start
    return report


def _index_state(index_bytes: bytes | None, expect_index: bool, records: list[Record], out: _Collector) -> str:
    """The report's ``index`` field; a missing index (when one is expected) or one that does not
    describe the records is a problem."""
    if index_bytes is None:
        if expect_index:
            out.add("idx_missing", "no .idx beside the shard: readers must scan the whole tar first")
        return "missing"
    return _check_index(index_bytes, records, out)


def _check_contents(window: _Window, records: list[Record], max_pixels: int, out: _Collector) -> list[ImageInfo]:
    """Each component's bytes by the schema's content rules; the facts of every readable image."""
    images: list[ImageInfo] = []
    for record in records:
        has_image = False
        for ext, m in record.components:
            kind = schema.content_kind(ext)
            if kind is None:
                continue
            if kind == "image":
                has_image = has_image or schema.role(ext) == schema.IMAGE
                info = _check_image(window, record.key, m, max_pixels, out, jpeg=schema.is_jpeg_extension(ext))
                if info is not None:
                    images.append(info)
            else:
                _check_side(kind, window.get(m.offset, m.size), record.key, m.name, out)
        if not has_image:
            out.add("missing_image", f"no image member (has: {', '.join(record.extensions)})", record.key,
                    record.components[0][1].name)
    return images


def _check_side(kind: str, data: bytes, record_id: str, member: str, out: _Collector) -> None:
    if kind == "json":
        _, why = schema.parse_metadata(data)
        if why is not None:
            out.add("bad_json", why, record_id, member)
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.add("bad_text", f"not UTF-8: byte {exc.start} is {data[exc.start]:#04x}", record_id, member)


def _check_record_ids(records: list[Record], out: _Collector) -> None:
    where: dict[str, list[int]] = {}
    for n, record in enumerate(records):
        where.setdefault(record.key, []).append(n)
        why = _record_id_problem(record.key)
        if why is None:
            for ext in record.extensions:
                if _BAD_NAME_CHARS.search(ext):
                    why = f"extension {ext!r} contains whitespace or control characters"
                    break
                if not ext:
                    why = "a member name ends in a dot: an empty extension, which the .idx format cannot hold"
                    break
        if why is not None:
            out.add("bad_record_id", why, record.key, record.components[0][1].name)
        exts = record.extensions
        for group in schema.ambiguous_extensions(exts):
            shown = " and ".join(f".{e}" for e in group)
            out.add("ambiguous_extension", f"{shown} differ only in case: lower-casing readers (webdataset) refuse "
                    "the record, case-sensitive ones see both", record.key, f"{record.key}.{group[0]}")
        # The same member name twice inside one record: a file appended to the tar again.
        if len(set(exts)) != len(exts):
            dup = sorted({e for e in exts if exts.count(e) > 1})
            out.add("duplicate_record_id", f"member(s) {', '.join(dup)} appear twice in a row", record.key,
                    f"{record.key}.{dup[0]}")
    for key, positions in where.items():
        if len(positions) < 2:
            continue
        seen: set[str] = set()
        overlap = False
        for p in positions:
            exts = set(records[p].extensions)
            overlap = overlap or bool(seen & exts)
            seen |= exts
        first = records[positions[0]].components[0][1].name
        places = ", ".join(str(p) for p in positions[:10])
        if overlap:
            out.add("duplicate_record_id", f"record ID appears {len(positions)} times (records {places})", key, first)
        else:
            out.add("split_record", f"the record's members are not adjacent: readers see {len(positions)} "
                    f"records (at {places})", key, first)


def _check_index(index_bytes: bytes, records: list[Record], out: _Collector) -> str:
    # Fast path: the index is exactly what this tar produces.
    try:
        if records and build_index_bytes(records) == index_bytes:
            return "fresh"
    except IndexFormatError:
        pass
    try:
        index = parse_index(index_bytes, ".idx")
    except IndexFormatError as exc:
        out.add("idx_unreadable", str(exc))
        return "unreadable"
    diffs = index_differences(index, records)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")
        out.add("idx_stale", f"the .idx does not describe this tar: {shown}")
        return "stale"
    return "fresh"


def _check_image(window: _Window, record_id: str, m: Member, max_pixels: int, out: _Collector, *,
                 jpeg: bool = True) -> ImageInfo | None:
    """The image rules of :func:`curator_assets.formats.sniff.check_image` on one member (ranged reads)."""
    base = m.offset
    size = m.size

    def get(pos: int, n: int) -> bytes:
        n = min(n, size - pos)
        return window.get(base + pos, n) if n > 0 else b""

    found = check_image(get, size, max_pixels=max_pixels, jpeg_expected=jpeg)
    for code, detail in found.problems:
        out.add(code, detail, record_id, m.name)
    return _image_info(record_id, m.name, found.header)


def _image_info(record_id: str, member: str, header: ImageHeader | None) -> ImageInfo | None:
    if header is None:
        return None
    return ImageInfo(record_id, member, header.width, header.height, header.mode, header.progressive, header.process)


# ---------------------------------------------------------------------------------------------
# The vectorised pass
#
# Python costs about a microsecond per member however lean the loop, which on a shard of small
# images is several times what the kernel needs to copy the whole file. So this pass does the
# one inherently sequential step (following the header chain: each header's size says where
# the next one is) in a minimal loop, and everything else with numpy over all headers at once.
# It only ever proves a shard clean: anything unusual makes it return None and the precise pass
# (the recovering scanner, member by member) runs instead, so both always give one report.

_FAST_HEAD = 512  # bytes of each member read with its header: a side file, or a JPEG's markers
_FAST_ROW = BLOCK + _FAST_HEAD
_FAST_CHUNK = 4096
_FAST_MAX_MEMBERS = 65_536  # the rows take 1.5 KB a member; bigger shards go member by member
_ZERO_BLOCK = bytes(BLOCK)

# Markers that carry a length and may come before the frame header (everything else, or any
# surprise, is left to the precise parser).
_SEGMENT_MARKERS = frozenset(range(0xC0, 0xFF)) - frozenset(SOF_PROCESS) - frozenset(range(0xD0, 0xDB))


def _pack(word: str) -> int:
    return int.from_bytes(word.encode().ljust(8, b"\0"), "little")


_IMAGE_WORDS = [_pack(w) for w in IMAGE_EXTS]
_JPEG_WORDS = [_pack(w) for w in schema.JPEG_EXTENSIONS]
_JSON_WORDS = [_pack(w) for w in JSON_EXTS]
_TEXT_WORDS = [_pack(w) for w in TEXT_EXTS]


def _fast_validate(
    fd: int,
    read_at: Callable[[int, int], bytes],
    total_size: int,
    *,
    shard: str,
    key: str | None,
    index_bytes: bytes | None,
    expect_index: bool,
    max_pixels: int,
    levels: Mapping[str, str],
) -> ShardReport | None:
    import numpy as np

    # 1. The header chain, as rows of [the block before a header | the header | the first
    # bytes of the member's data]; the last row is the end-of-archive block's.
    rows = _rows_from_index(fd, index_bytes, total_size) if index_bytes else None
    if rows is None:
        rows = _rows_by_walking(fd, total_size)
        if rows is None:
            return None
    buf, table, starts_in_buf, header_at, size_arr, index_tokens = rows
    n = header_at.size - 1
    if n == 0:
        return None
    hdr = table[:n, BLOCK : 2 * BLOCK]
    head_of = table[:n, 2 * BLOCK :]
    block_before_next = table[1:, :BLOCK]
    offsets = header_at[:n] + BLOCK

    # 2. Headers: ustar/GNU magic, plain files or directories, octal fields, checksums. A
    # vectorised form of tar_members' rules for the common case only: whatever it cannot prove
    # clean is judged by the scanner (tar_members.check_header) in the precise pass.
    if not (hdr[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all():
        return None
    version = hdr[:, 262]
    if not ((version == 0) | (version == 32)).all():
        return None
    typeflag = hdr[:, 156]
    is_dir = typeflag == ord("5")
    if not ((typeflag == ord("0")) | (typeflag == 0) | is_dir).all():
        return None
    if (size_arr[is_dir] != 0).any():  # readers skip no data for a directory, whatever its size says
        return None
    # mode, uid, gid and mtime: plain octal (anything else is the precise pass's to judge).
    numeric = np.concatenate([hdr[:, 100:124], hdr[:, 136:148]], 1)
    if not (((numeric >= 48) & (numeric <= 55)) | (numeric == 0) | (numeric == 32)).all():
        return None
    if not _zero_tail(fd, int(header_at[-1]) + 2 * BLOCK, total_size):
        return None  # members after the end blocks (a hole), or bytes there: the precise pass says which
    digits = hdr[:, 124:135]
    if not ((digits >= 48) & (digits <= 55)).all():
        return None
    chk = hdr[:, 148:154]
    if not (((chk >= 48) & (chk <= 55)).all() and ((hdr[:, 154] == 0) | (hdr[:, 154] == 32)).all()):
        return None
    stored = ((chk.astype(np.int64) - 48) * (8 ** np.arange(5, -1, -1))).sum(1)
    computed = hdr.sum(1, dtype=np.uint32).astype(np.int64) - hdr[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    if not (stored == computed).all():
        return None
    if ((version == 0) & (hdr[:, 345] != 0)).any():  # a POSIX name prefix
        return None

    # 3. Names: printable ASCII without spaces; every file a component with a plain key.
    if (hdr[:, 99] != 0).any():
        return None  # a name filling all 100 bytes: rare, left to the precise pass
    length = (hdr[:, :100] == 0).argmax(1)
    width = int(length.max()) + 1  # work on the used columns only: names are usually short
    names = hdr[:, :width]
    col = np.arange(width)
    in_name = col < length[:, None]
    if (length == 0).any() or (((names <= 32) | (names >= 127)) & in_name).any():
        return None
    files = np.flatnonzero(~is_dir)
    if files.size == 0:
        return None
    fnames = names[files]
    f_in = in_name[files]
    f_len = length[files]
    slashes = (fnames == ord("/")) & f_in
    if slashes.any():
        last_slash = width - 1 - slashes[:, ::-1].argmax(1)
        last_slash[~slashes.any(1)] = -1
        dots = (fnames == ord(".")) & f_in & (col > last_slash[:, None])
    else:
        last_slash = np.full(files.size, -1)
        dots = (fnames == ord(".")) & f_in
    if not dots.any(1).all():
        return None  # a file without an extension
    first_dot = dots.argmax(1)
    last_dot = width - 1 - dots[:, ::-1].argmax(1)
    if (first_dot == last_slash + 1).any() or (fnames[:, 0] == ord("/")).any():
        return None  # hidden file or absolute path
    in_key = col < first_dot[:, None]
    if ((fnames[:, :-1] == ord(".")) & (fnames[:, 1:] == ord(".")) & in_key[:, 1:]).any():
        return None  # '..' in a record ID
    ext_len = f_len - first_dot - 1
    if ((ext_len > 16) | (ext_len == 0)).any():  # long, or empty (a name ending in a dot)
        return None
    keys = (fnames * in_key).view(f"S{width}").ravel()
    name_list = (fnames * f_in).view(f"S{width}").ravel().tolist()
    starts = np.ones(files.size, bool)
    starts[1:] = keys[1:] != keys[:-1]
    record_of = np.cumsum(starts) - 1
    key_list = keys[starts].tolist()
    if len(set(key_list)) != len(key_list) or len(set(name_list)) != len(name_list):
        return None  # duplicate or split records
    in_ext = f_in & (col > first_dot[:, None])
    upper = (fnames >= 65) & (fnames <= 90) & in_ext
    if upper.any():  # extensions differing only in case (ambiguous_extension) are the precise pass's
        lowered = (fnames * f_in + upper * np.uint8(32)).view(f"S{width}").ravel().tolist()
        if len(set(lowered)) != len(lowered):
            return None
    n_records = len(key_list)

    # Kinds, by the last suffix, lower-cased; a record needs an image extension as its full extension.
    take = np.minimum(last_dot[:, None] + 1 + np.arange(8), width - 1)
    suffix = np.take_along_axis(fnames, take, 1)
    suffix = np.where(take < f_len[:, None], suffix, 0)
    suffix = suffix | (((suffix >= 65) & (suffix <= 90)) * np.uint8(32))
    words = np.ascontiguousarray(suffix).view(np.uint64).ravel()
    short = (f_len - last_dot - 1) <= 8
    is_image = np.isin(words, _IMAGE_WORDS) & short
    is_jpeg = np.isin(words, _JPEG_WORDS) & short
    is_json = np.isin(words, _JSON_WORDS) & short
    is_text = np.isin(words, _TEXT_WORDS) & short
    has_image = np.zeros(n_records, bool)
    has_image[record_of[is_image & (first_dot == last_dot)]] = True
    if not has_image.all():
        return None  # missing_image is reported by the precise pass

    out = _Collector(levels)
    report = ShardReport(shard=shard, key=key, bytes=total_size, max_pixels=max_pixels, members=n,
                         records=n_records, record_ids=list(map(bytes.decode, key_list)))

    # 4. The index: byte for byte what this tar produces, or the precise pass explains why not.
    if index_bytes is None:
        report.index = "missing"
        if expect_index:
            out.add("idx_missing", "no .idx beside the shard: readers must scan the whole tar first")
    else:
        take = np.minimum(first_dot[:, None] + 1 + np.arange(16), width - 1)
        ext = np.where(take < f_len[:, None], np.take_along_axis(fnames, take, 1), 0)
        ext_list = np.ascontiguousarray(ext).view("S16").ravel().tolist()
        per_record = np.diff(np.append(np.flatnonzero(starts), files.size))
        if not is_index_of_fields(index_bytes, index_tokens, ext_list, offsets[files], size_arr[files], name_list,
                               (f_len - first_dot - 1) + f_len, per_record):
            return None
        report.index = "fresh"

    # 5. JPEG headers: walk the markers of every image at once, up to its frame header.
    suspects: list[tuple[int, str]] = []  # (file number, kind) for the precise checks
    img = np.flatnonzero(is_image)
    head = head_of[files[img]]
    img_size = size_arr[files[img]]
    room = np.minimum(img_size, _FAST_HEAD)
    n_img = img.size
    suspect = ~((head[:, 0] == 0xFF) & (head[:, 1] == 0xD8) & (head[:, 2] == 0xFF) & (img_size >= 4))
    active = ~suspect
    at = np.full(n_img, 2, np.int64)
    width = np.zeros(n_img, np.int64)
    height = np.zeros(n_img, np.int64)
    comps = np.zeros(n_img, np.int64)
    sof = np.zeros(n_img, np.int64)
    is_sof_marker = np.zeros(256, bool)
    is_sof_marker[list(SOF_PROCESS)] = True
    is_segment = np.zeros(256, bool)
    is_segment[list(_SEGMENT_MARKERS)] = True
    for _ in range(32):
        live = np.flatnonzero(active)
        if live.size == 0:
            break
        p = at[live]
        fits = p + 10 <= room[live]
        suspect[live[~fits]] = True
        live, p = live[fits], p[fits]
        ff = head[live, p] == 0xFF
        marker = head[live, p + 1]
        seg_len = head[live, p + 2].astype(np.int64) * 256 + head[live, p + 3]
        found = ff & is_sof_marker[marker]
        step = ff & is_segment[marker] & (seg_len >= 2)
        f_live, f_p = live[found], p[found]
        height[f_live] = head[f_live, f_p + 5].astype(np.int64) * 256 + head[f_live, f_p + 6]
        width[f_live] = head[f_live, f_p + 7].astype(np.int64) * 256 + head[f_live, f_p + 8]
        comps[f_live] = head[f_live, f_p + 9]
        sof[f_live] = marker[found]
        at[live[step]] = p[step] + 2 + seg_len[step]
        suspect[live[~(found | step)]] = True
        active[:] = False
        active[live[step]] = True
    suspect |= active | (width == 0) | (height == 0) | (width * height > max_pixels)
    # The end-of-image marker: the last two bytes, found in the block before the next header.
    end_in_block = BLOCK - (-img_size % BLOCK)  # where the data ends within its last block
    last = block_before_next[files[img]]
    rows = np.arange(n_img)
    tail_ok = (end_in_block >= 2) & (img_size >= 2)
    safe = np.where(tail_ok, end_in_block, 2)
    tail_ok &= (last[rows, safe - 2] == 0xFF) & (last[rows, safe - 1] == 0xD9)
    suspect |= ~tail_ok
    suspects += [(int(img[i]), "image") for i in np.flatnonzero(suspect)]

    # 6. Side files: all JSON documents through one decoder call each, all texts in one decode.
    for kind, which in (("json", np.flatnonzero(is_json)), ("text", np.flatnonzero(is_text))):
        if which.size == 0:
            continue
        w_size = size_arr[files[which]]
        inline = w_size <= _FAST_HEAD
        suspects += [(int(i), kind) for i in which[~inline]]
        which, w_size = which[inline], w_size[inline]
        starts_at = (starts_in_buf[files[which]] + 2 * BLOCK).tolist()
        docs = [buf[a : a + s] for a, s in zip(starts_at, w_size.tolist(), strict=True)]
        bad = _side_suspects(kind, docs)
        suspects += [(int(which[i]), kind) for i in bad]

    # 7. The precise checks for whatever the vectorised ones could not clear, in tar order.
    images: dict[int, ImageInfo | None] = {}
    window = _Window(read_at)
    record_ids = report.record_ids
    for i, kind in sorted(suspects):
        member = Member(name_list[i].decode("ascii"), int(offsets[files[i]]) - BLOCK, int(offsets[files[i]]),
                        int(size_arr[files[i]]), "0")
        rid = record_ids[record_of[i]]
        if kind == "image":
            images[i] = _check_image(window, rid, member, max_pixels, out, jpeg=bool(is_jpeg[i]))
        else:
            _check_side(kind, window.get(member.offset, member.size), rid, member.name, out)

    # Image facts, built column-wise: one C-level constructor call per image.
    modes = {c: JPEG_MODES.get(c, f"{c} components") for c in set(comps.tolist())}
    names_of = np.array(name_list, dtype=object)[img] if n_img else []
    ids_of = np.array(record_ids, dtype=object)[record_of[img]] if n_img else []
    sof_list = sof.tolist()
    report.images = ImageColumns(
        ids_of.tolist() if n_img else [], list(map(bytes.decode, names_of)), width.tolist(), height.tolist(),
        [modes[c] for c in comps.tolist()], [m in PROGRESSIVE_SOF for m in sof_list],
        [SOF_PROCESS.get(m, "") for m in sof_list],
    )
    if images:  # the precisely checked ones: their facts, or none when the header is unreadable
        where = {i: n for n, i in enumerate(img.tolist())}
        merged: list[ImageInfo | None] = list(report.images)
        for i, info in images.items():
            merged[where[i]] = info
        report.images = [info for info in merged if info is not None]
    report.problems = out.problems
    return report


def _zero_tail(fd: int, start: int, total_size: int) -> bool:
    """Whether everything from ``start`` to the end of the file is zeros (the end blocks' padding)."""
    pos = start
    while pos < total_size:
        chunk = os.pread(fd, min(total_size - pos, 1 << 20), pos)
        if not chunk or chunk.count(0) != len(chunk):
            return bool(not chunk and pos >= total_size)
        pos += len(chunk)
    return True


# Rows: (joined bytes, rows as an (n + 1, 1536) array, where each row starts in the bytes,
# header positions, member sizes).
_RowsResult = tuple[bytes, Any, Any, Any, Any]


def _rows_by_walking(fd: int, total_size: int) -> _RowsResult | None:
    """Follow the header chain from the start: the one sequential step, in a minimal loop.
    One read serves several headers when members are small. None when anything is unusual."""
    import numpy as np

    pread = os.pread
    zero, row_len, chunk_len = _ZERO_BLOCK, _FAST_ROW, _FAST_CHUNK  # locals: this loop runs per member
    chunks: list[bytes] = [zero]  # the block "before" the first header
    chunk_starts: list[int] = []  # file offset of each chunk read
    chunk_done: list[int] = []  # where each chunk begins in the joined chunks
    positions: list[int] = []
    sizes: list[int] = []
    add_pos, add_size = positions.append, sizes.append
    limit = total_size - 2 * BLOCK  # the two end-of-archive blocks must fit after the last member
    pos = 0
    done = 0  # bytes of the chunks before the current one
    chunk, chunk_start, chunk_end = zero, 0, 0
    while True:
        if pos + row_len > chunk_end:
            if pos > limit or len(positions) > _FAST_MAX_MEMBERS:
                return None
            done += len(chunk)
            chunk_start = pos - 512 if pos >= 512 else 0
            chunk = pread(fd, chunk_len, chunk_start)
            chunks.append(chunk)
            chunk_starts.append(chunk_start)
            chunk_done.append(done)
            chunk_end = chunk_start + len(chunk)
        i = pos - chunk_start
        if chunk[i] == 0 and chunk[i : i + 512] == zero:
            if pos > limit or chunk[i + 512 : i + 1024] != zero:
                return None
            break
        try:
            size = int(chunk[i + 124 : i + 135], 8)
        except ValueError:
            return None
        if size < 0:  # int() takes a sign: a negative size would walk back, or stay put, forever
            return None
        add_pos(pos)
        add_size(size)
        pos += 512 + ((size + 511) & -512)
    add_pos(pos)  # the end row

    header_at = np.array(positions, np.int64)
    starts = np.array(chunk_starts, np.int64)
    # Each header lies in the last chunk read before it: the one with the largest start <= it.
    which = np.searchsorted(starts, header_at, side="right") - 1
    starts_in_buf = np.array(chunk_done, np.int64)[which] + header_at - starts[which] - BLOCK
    buf, rows = _table(chunks, starts_in_buf)
    return buf, rows, starts_in_buf, header_at, np.array(sizes, np.int64), None


def _rows_from_index(fd: int, index_bytes: bytes, total_size: int) -> _RowsResult | None:
    """The same rows with the header positions taken from the shard's .idx, so without the
    sequential step. The .idx is only a hint: the chain is verified from the headers read
    (each header's size says where the next one is) and the .idx is compared byte for byte
    later. None when the hint does not hold (a stale index, or members it does not list)."""
    import numpy as np

    seen = index_tokens(index_bytes)
    if seen is None:
        return None
    version, tokens = seen
    width = 4 if version == "v1.2" else 3
    if not tokens or len(tokens) % width:
        return None
    try:
        data_at = np.array(tokens[1::width]).astype(np.int64)
        last_size = int(tokens[-width + 2])
    except ValueError:
        return None
    header_at = np.append(data_at - BLOCK, data_at[-1] + ((last_size + 511) & -512))
    if header_at.size > _FAST_MAX_MEMBERS or header_at[0] != 0 or (np.diff(header_at) < BLOCK).any() or (
        header_at[-1] > total_size - 2 * BLOCK
    ):
        return None
    # Rows close together share one read: a record's side files and the next image's header.
    row_start = header_at - BLOCK
    new_read = np.ones(header_at.size, bool)
    new_read[1:] = np.diff(row_start) > _FAST_CHUNK - BLOCK - _FAST_ROW
    first = np.flatnonzero(new_read)
    last = np.append(first[1:] - 1, header_at.size - 1)
    read_start = row_start[first]  # the first is -512: the zero block stands in front of the file
    read_len = row_start[last] + BLOCK + _FAST_ROW - read_start
    buf_at = np.cumsum(read_len) - read_len
    pread = os.pread
    chunks = [_ZERO_BLOCK + pread(fd, int(read_len[0]) - BLOCK, 0),
              *map(pread, repeat(fd), read_len[1:].tolist(), read_start[1:].tolist())]
    if sum(map(len, chunks)) != int(read_len.sum()):
        return None
    group = np.cumsum(new_read) - 1
    starts_in_buf = buf_at[group] + row_start - read_start[group]
    buf, rows = _table(chunks, starts_in_buf)
    fields = rows[:-1, BLOCK + 124 : BLOCK + 135]
    if not ((fields >= 48) & (fields <= 55)).all():
        return None
    sizes = ((fields.astype(np.int64) - 48) * (8 ** np.arange(10, -1, -1))).sum(1)
    chained = header_at[:-1] + BLOCK + ((sizes + 511) & -512) == header_at[1:]
    if not chained.all() or (rows[-1, BLOCK:] != 0).any():
        return None
    return buf, rows, starts_in_buf, header_at, sizes, tokens if width == 4 else None


def _table(chunks: list[bytes], starts_in_buf) -> tuple[bytes, Any]:
    import numpy as np

    chunks.append(bytes(_FAST_ROW))  # every row whole, even the last
    buf = b"".join(chunks)
    view = np.lib.stride_tricks.sliding_window_view(np.frombuffer(buf, np.uint8), BLOCK + _FAST_ROW)
    return buf, view[starts_in_buf]


_scan_json = json.JSONDecoder().scan_once


def _side_suspects(kind: str, docs: list[bytes]) -> list[int]:
    """Positions of the documents that one batched check cannot clear (they get the precise one)."""
    joined = b"\n".join(docs)
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return list(range(len(docs)))
    if kind != "json":
        return []  # a newline cannot complete a broken UTF-8 sequence: all of them decode
    if len(text) != len(joined):  # non-ASCII: string and byte positions differ
        return list(range(len(docs)))
    import numpy as np

    lengths = np.fromiter(map(len, docs), np.int64, len(docs))
    ends = np.cumsum(lengths + 1) - 1
    starts = (ends - lengths).tolist()
    # map() runs the C scanner without a Python frame per document. A StopIteration from a
    # broken one would silently end map() early, hence the length check.
    try:
        found = [end for _, end in map(_scan_json, repeat(text), starts)]
    except ValueError:
        found = []
    if len(found) != len(docs):  # one of them is broken: find which, one by one
        found = []
        for start in starts:
            try:
                found.append(_scan_json(text, start)[1])
            except (StopIteration, ValueError):
                found.append(-1)
    bad = np.flatnonzero(np.array(found, np.int64) != ends).tolist()
    return bad


# ---------------------------------------------------------------------------------------------
# Shards of a dataset


def validate_shard(
    dataset,
    key: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    severities: Mapping[str, str] | None = None,
) -> ShardReport:
    """Validate shard ``key`` of a :class:`~curator_assets.store.dataset.Dataset` (tar and its .idx).

    Raises :class:`~curator_assets.store.dataset.StorageError` only when the shard cannot be opened;
    everything wrong inside it is a problem in the report.
    """
    from curator_assets.store.dataset import fingerprint_of

    start = time.perf_counter()
    info = dataset.shard(key)
    index_info = dataset.index_info(key)
    index_bytes = dataset.read_index_bytes(key)
    # Remote stores: read ahead in large blocks (RemoteFile.DEFAULT_BLOCK), so the one pass
    # over headers and contents costs few requests.
    with dataset.open_shard(key) as f:
        report = validate_file(
            f, shard=info.url, key=key, index_bytes=index_bytes, expect_index=True, max_pixels=max_pixels,
            severities=severities, total_size=info.size,
        )
    report.fingerprint = info.fingerprint
    if index_info is not None and index_bytes is not None:
        report.index_fingerprint = fingerprint_of(index_info)
    report.seconds = time.perf_counter() - start
    return report


def unreadable_report(shard: str | None, detail: str, severities: Mapping[str, str] | None = None) -> ShardReport:
    """The report of a shard that could not be read at all (one ``shard_unreadable`` problem)."""
    level = resolve_severities(severities)["shard_unreadable"]
    return ShardReport(shard=shard, problems=[Problem("shard_unreadable", level, None, None, detail)])


REPORT_KIND = "validation"
REPORT_SUFFIX = ".json"


def write_report(dataset, report: ShardReport) -> str:
    """Write the report through the dataset's output location (atomically); returns its URL."""
    if report.key is None:
        raise ValueError("a report written to a dataset needs the shard's key")
    return dataset.write_output(REPORT_KIND, report.key, REPORT_SUFFIX, report.to_bytes())


def read_report(dataset, key: str) -> ShardReport | None:
    """The stored report of shard ``key``, or None when it has not been validated."""
    path = dataset.output_path(REPORT_KIND, key, REPORT_SUFFIX)
    try:
        data = dataset.read_bytes(path, fs=dataset.output_fs)
    except FileNotFoundError:
        return None
    return ShardReport.from_bytes(data)


# ---------------------------------------------------------------------------------------------
# The dataset as a whole


@dataclass
class DatasetSummary:
    shards: int = 0
    validated: int = 0
    ok: int = 0
    records: int = 0
    errors: int = 0
    warnings: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # problems by code, over all shards
    shards_by_code: dict[str, list[str]] = field(default_factory=dict)
    not_validated: list[str] = field(default_factory=list)  # shard keys without a report
    failed_shards: list[str] = field(default_factory=list)  # shard keys with errors
    # record ID -> the shard keys holding it, for IDs found in more than one shard
    cross_shard_duplicates: dict[str, list[str]] = field(default_factory=dict)

    @property
    def duplicate_ids(self) -> int:
        return len(self.cross_shard_duplicates)

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards, "validated": self.validated, "ok": self.ok, "records": self.records,
            "errors": self.errors, "warnings": self.warnings, "counts": self.counts,
            "shards_by_code": self.shards_by_code, "not_validated": self.not_validated,
            "failed_shards": self.failed_shards, "duplicate_ids": self.duplicate_ids,
            "cross_shard_duplicates": self.cross_shard_duplicates,
        }


def summarize(reports: Iterable[tuple[str, ShardReport | None]]) -> DatasetSummary:
    """Fold shard reports ``(key, report or None)`` into a dataset summary, finding record IDs
    that occur in more than one shard (readers would hand out two samples with one ID)."""
    summary = DatasetSummary()
    first_shard: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for key, report in reports:
        summary.shards += 1
        if report is None:
            summary.not_validated.append(key)
            continue
        summary.validated += 1
        summary.records += report.records
        summary.errors += report.errors
        summary.warnings += report.warnings
        if report.ok:
            summary.ok += 1
        else:
            summary.failed_shards.append(key)
        for code in report.counts():
            summary.shards_by_code.setdefault(code, []).append(key)
        counts.update(p.code for p in report.problems)
        for rid in dict.fromkeys(report.record_ids):  # within-shard repeats are the shard's own problem
            other = first_shard.setdefault(rid, key)
            if other != key:
                holders = summary.cross_shard_duplicates.setdefault(rid, [other])
                if holders[-1] != key:
                    holders.append(key)
    summary.counts = dict(sorted(counts.items()))
    return summary


def summarize_dataset(dataset) -> DatasetSummary:
    """Summarise the stored reports of every shard in ``dataset``."""
    listing = dataset.list_shards()
    return summarize((s.key, read_report(dataset, s.key)) for s in listing.shards)


SUMMARY_KIND = "dataset"
SUMMARY_NAME = "validation_summary"


def write_summary(dataset, summary: DatasetSummary) -> str:
    data = json.dumps(summary.to_json(), separators=(",", ":"), sort_keys=True).encode()
    return dataset.write_output(SUMMARY_KIND, SUMMARY_NAME, ".json", data)
