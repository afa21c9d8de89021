"""The validation report: its codes and severities, a shard's report and a dataset's summary (JSON)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

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


# Stored beside the dataset's outputs (``dataset``: a :class:`curator_assets.store.dataset.Dataset`)
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
