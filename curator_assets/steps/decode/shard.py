"""Decode the images of WebDataset shards with NVIDIA DALI, one batch at a time, in tar order.

The shape of it:

* **Plan** (:func:`plan_shard`): a scan of every tar header (512 bytes per member, seeking over
  the data) gives the records, with IDs from the member names; the shard's ``.idx``, when it has
  one, must describe exactly those records (:func:`~curator_assets.steps.index.index_differences`)
  or the shard stops as stale. A damaged tar is planned from the recovering scan.
* **Read**: two readers, chosen by :attr:`DecodeOptions.reader`.

  - ``stream`` (every store: local, ``s3://``, ``gs://``, ``az://``): a background thread reads
    the byte ranges of each batch through the :class:`~curator_assets.store.dataset.Dataset` (one
    ``pread``/ranged GET per run of adjacent members), checks each member's tar header (its
    real name, from a PAX or GNU long-name header when it has one) against the plan, hashes the encoded
    image, sniffs it, and keeps the caption and JSON. DALI gets the bytes through
    ``fn.external_source``.
  - ``dali`` (local files): DALI's own ``fn.readers.webdataset`` reads the tar through an index
    written for it from the plan (image, caption and JSON components only, under fixed names so
    ``.jpeg``/``.JPG`` match). It hashes what the reader hands back.

* **Decode**: ``fn.decoders.image`` with ``device="mixed"`` (nvJPEG and the hardware JPEG
  decoder) when a CUDA device is usable, else ``device="cpu"`` (libjpeg-turbo), always to RGB.
  EXIF orientation is applied (``adjust_orientation``); grayscale and CMYK come out as RGB.
* **Guard**: before DALI sees an image, its header is read by the rules of
  :mod:`curator_assets.formats.sniff` (the ones validation applies): bytes that are no image fail the
  record, and so does an image whose header declares more than :attr:`DecodeOptions.max_pixels`
  (``image_too_large``), so a decompression bomb never reaches the decoder, with or without a
  validation report. A complete JPEG followed by a trailer (a Motion Photo's video) is decoded
  from the bytes up to its end marker.
* **Verdict**: when the shard has a validation report made from this very tar (same
  fingerprint), every record it lists with a record-level problem is failed with the report's
  code and detail instead of being decoded. A record whose components' extensions differ only
  in case (``.JPG`` and ``.jpg``) is failed as ``ambiguous_extension`` (see
  :mod:`curator_assets.formats.schema`).
* **Isolate**: one undecodable image makes DALI fail the whole batch. A JPEG without its end
  marker is decoded on its own; when a batch still fails, its records are decoded one at a time
  on a fresh pipeline, so only the bad ones fail, each with its error.
* **Stream**: two DALI pipelines (:attr:`DecodeOptions.pipelines`) decode batches side by side,
  each one batch at a time, so one keeps the cores busy while the other starts or ends a batch;
  batches come out in tar order. At most a few batches of encoded bytes and decoded images
  exist at a time.

Every record of the shard comes out: decoded, or with ``decoded=False`` and an error (no image
member, not an image, too large, flagged by validation, a decode failure, data past the end of
a truncated tar). A shard that is no tar at all, or an empty one, raises :class:`DecodeError`
(code ``not_a_tar`` / ``tar_truncated``); a damaged tar is decoded as far as it can be read and
its result says ``ok: False`` with the shard-level problems.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import os
import queue
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from curator_assets.formats import schema, sniff
from curator_assets.formats.manifest import ManifestRow, manifest_table, manifest_url, write_manifest
from curator_assets.formats.sniff import ImageProblem, check_image, jpeg_header, not_a_tar
from curator_assets.formats.tar_members import (
    REGULAR_TYPES,
    Member,
    check_header,
    group_records,
    header_name,
    header_size,
    member_at,
    parse_number,
    scan_tar,
)
from curator_assets.steps.index import (
    IndexComponent,
    IndexFormatError,
    format_lines,
    header_starts,
    index_differences,
    parse_index,
)
from curator_assets.store.dataset import StorageError

# The record schema's roles (whole extension, any case); kept here under their old names.
IMAGE_EXTENSIONS = schema.IMAGE_EXTENSIONS
CAPTION_EXTENSIONS = schema.CAPTION_EXTENSIONS
METADATA_EXTENSIONS = schema.METADATA_EXTENSIONS
DEFAULT_MAX_PIXELS = 100_000_000  # as validation's --max-pixels: larger images are never decoded

DEVICES = ("auto", "cpu", "gpu")
READERS = ("auto", "stream", "dali")
DEFAULT_BATCH_SIZE = 64  # on the CPU: enough to keep every core busy, small enough to stream
DEFAULT_GPU_BATCH_SIZE = 256  # nvJPEG and the hardware decoder want many images per call
DEFAULT_HW_DECODER_LOAD = 0.65  # DALI's own default share for the A100/H100 hardware JPEG decoder

# Reads closer than this are merged into one request: a gap costs less than another round trip.
LOCAL_GAP = 64 << 10
REMOTE_GAP = 1 << 20


class DecodeError(RuntimeError):
    """A shard that cannot be decoded at all (the message names it); records never raise this.
    ``code`` is a stable code (``not_a_tar``, ``tar_truncated``, ``idx_stale``, ...)."""

    code = "decode_failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class StaleIndexError(DecodeError):
    """The shard's ``.idx`` does not describe its tar (the tar changed after indexing)."""

    code = "idx_stale"


class DeviceUnavailableError(DecodeError):
    """``device="gpu"`` was asked for on a machine without a usable CUDA device."""

    code = "device_unavailable"


# ---------------------------------------------------------------------------------------------
# Options and the device


@dataclass(frozen=True)
class DecodeOptions:
    device: str = "auto"  # auto | cpu | gpu
    batch_size: int | None = None  # None: 64 on the CPU, 256 on a GPU
    num_threads: int | None = None  # DALI worker threads in all (split between the pipelines); None: one per core
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
    # libjpeg-turbo's fast integer IDCT on the CPU path (and for images the GPU hands back to
    # it): ~7% more images/s measured here, at a small loss of accuracy (pixel values may
    # differ by a few levels). Off by default so that pixels match Pillow's decode.
    fast_idct: bool = False
    reader: str = "auto"  # auto (= stream) | stream | dali
    device_id: int = 0  # which GPU, when decoding on one
    prefetch: int = 2  # batches read ahead of the decoder
    # DALI pipelines decoding batches side by side, each with its share of the threads. One
    # pipeline leaves cores idle while a batch starts and ends (parsing, output allocation,
    # the last images of the batch); two keep them busy: +8-10% images/s measured on 2 cores.
    pipelines: int = 2
    # Images whose header declares more pixels are failed as image_too_large, never decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Decode in supervised worker processes (curator_assets.steps.decode.worker), so that a decoder
    # that dies on a corrupt image (SIGSEGV in a codec) fails that record, not the caller.
    # Decoded pixels come back through shared memory, on the host. Off: DALI runs in this
    # process (GPU images stay on the device). decode_shard and the CLI: on; iter_batches: off.
    contain_crashes: bool = True
    # Seconds a contained worker may spend on one batch (2 minutes more to start) without answering
    # before it is taken as hung (a codec in an endless loop): it is killed and the batch is
    # replayed one record at a time, so the record that hangs again fails "decoder hung".
    # Generous by default: a batch of large images on a few CPU cores takes tens of seconds.
    worker_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, not {self.reader!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {self.batch_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"threads must be at least 1, not {self.num_threads}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be between 0 and 1, not {self.hw_decoder_load}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {self.prefetch}")
        if self.pipelines < 1:
            raise ValueError(f"pipelines must be at least 1, not {self.pipelines}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be 0 or more, not {self.device_id}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be at least 1, not {self.max_pixels}")
        if not self.worker_timeout > 0:
            raise ValueError(f"worker_timeout must be more than 0 seconds, not {self.worker_timeout}")

    @property
    def threads(self) -> int:
        return self.num_threads or available_cores()

    @property
    def threads_per_pipeline(self) -> int:
        return max(1, -(-self.threads // self.pipelines))

    def for_device(self, device: DeviceChoice) -> DecodeOptions:
        """These options with the batch size settled for ``device``."""
        if self.batch_size is not None:
            return self
        size = DEFAULT_GPU_BATCH_SIZE if device.name == "gpu" else DEFAULT_BATCH_SIZE
        return dataclasses.replace(self, batch_size=size)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class DeviceChoice:
    name: str  # "cpu" | "gpu"
    device_id: int | None  # None for the CPU: DALI then never touches CUDA
    reason: str  # why this device, for logs and the asset metadata

    @property
    def decoder_backend(self) -> str:
        return "mixed" if self.name == "gpu" else "cpu"


def cuda_device_count() -> int:
    """CUDA devices the driver shows this process (``CUDA_VISIBLE_DEVICES`` applies); 0 on a
    machine without a driver or GPU (never raises).

    Asked of the driver API (``libcuda``, which DALI loads too) rather than through DALI: the
    process that chooses the device need not import DALI at all when the decoders run in worker
    processes, and importing it only to count devices cost ~1.1 s of CPU per process here."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    try:
        import ctypes

        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except Exception:  # noqa: BLE001 - no driver, no libcuda, a broken install: all mean "no GPU"
        return 0


def resolve_device(device: str = "auto", device_id: int = 0) -> DeviceChoice:
    """The device to decode on. ``auto`` takes the GPU when one is usable; ``gpu`` insists."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return DeviceChoice("cpu", None, "CPU requested")
    count = cuda_device_count()
    if count > device_id:
        why = "GPU requested" if device == "gpu" else f"{count} CUDA device(s) found"
        return DeviceChoice("gpu", device_id, why)
    if device == "gpu":
        raise DeviceUnavailableError(
            f"--device gpu: no usable CUDA device {device_id} ({count} found); use --device auto or cpu"
        )
    return DeviceChoice("cpu", None, "no CUDA device found: CPU decoder")


# ---------------------------------------------------------------------------------------------
# Sniffing encoded images (cheap: the first bytes, and a walk over the JPEG markers)


@dataclass(frozen=True)
class Sniff:
    format: str | None  # jpeg, png, ... or None when the bytes are no image DALI can decode
    error: str | None = None  # why the bytes must not go to the decoder (None: looks decodable)
    width: int | None = None
    height: int | None = None
    channels: int | None = None  # components in the encoded image
    progressive: bool = False
    suspect: bool = False  # probably fails (e.g. a JPEG without its end marker): decode it alone
    end: int | None = None  # where the image ends, when a trailer follows it (a Motion Photo's video)
    code: str | None = None  # the validation code of ``error`` (not_image, image_too_large, ...)


def sniff_image(data: bytes | memoryview, max_pixels: int | None = None) -> Sniff:
    """What an encoded image is, by the rules of :func:`curator_assets.formats.sniff.check_image`
    (magic number, header, pixel limit, JPEG end marker). Costs a few small slices of ``data``."""
    size = len(data)

    def get(pos: int, n: int) -> bytes:
        return bytes(data[pos : pos + n])

    # Hot path (measured: this runs per decoded image): a JPEG that ends with its end marker needs
    # only its frame header; that is what check_image would conclude, without its general steps.
    if data[:3] == b"\xff\xd8\xff" and data[size - 2 :] == b"\xff\xd9":
        try:
            h = jpeg_header(get, size)
        except ImageProblem:
            pass
        else:
            if max_pixels is None or h.width * h.height <= max_pixels:
                return Sniff("jpeg", None, h.width, h.height, h.components, h.progressive)
    found = check_image(get, size, max_pixels=max_pixels)
    header = found.header
    fmt = header.format if header is not None else None
    if header is None:
        code, detail = found.problems[0]
        if code == "not_image":
            error = "empty image member" if size == 0 else f"not an image: {detail}"
            return Sniff(None, error, code=code)
        return Sniff("jpeg" if code.startswith("jpeg") else None, f"{code}: {detail}", code=code)
    sniff = Sniff(fmt, None, header.width, header.height, header.components, header.progressive)
    for code, detail in found.problems:
        if code == "image_too_large":
            return dataclasses.replace(sniff, error=f"{code}: {detail}", code=code)
        if code == "jpeg_truncated":  # libjpeg stops early and DALI fails the sample: decode it alone
            sniff = dataclasses.replace(sniff, suspect=True)
        elif code == "jpeg_trailing_data":
            sniff = dataclasses.replace(sniff, end=found.end)
    return sniff


# ---------------------------------------------------------------------------------------------
# The plan: records and where their components are


# ``(ext, offset, size, name)`` of one member of a record: the index's own component type.
Component = IndexComponent


class PlannedRecord(NamedTuple):  # a tuple: one is made and read per record on the hot path
    position: int
    record_id: str
    components: tuple[Component, ...]
    image: Component | None
    caption: Component | None
    metadata: Component | None
    needed: tuple[Component, ...]  # the image, caption and JSON that the record has, in that order
    verdict: str | None = None  # "code: detail" when the record is failed without decoding


@dataclass
class ShardPlan:
    key: str
    shard_url: str
    shard_size: int
    records: list[PlannedRecord]
    source: str  # "index" | "scan"
    verify_headers: bool  # check each member's tar header (the plan came from an index)
    bytes_read: int = 0  # what planning read (index bytes, or tar headers)
    problems: list[str] = field(default_factory=list)  # shard-level notes (a damaged tar, ...)
    # Shard-level problems that make the result not ok: (code, detail), e.g. a truncated tar.
    errors: list[tuple[str, str]] = field(default_factory=list)
    report: str = "none"  # the validation report: "used" | "stale" | "none" | "unreadable"
    flagged: int = 0  # records failed by the report's verdict
    # Data offset -> first header offset, for members whose name or size is in a PAX or GNU
    # long-name header before their own (their ustar name field is not their name).
    header_at: dict[int, int] = field(default_factory=dict)
    # Planned from the index alone (a remote shard): the reads of the batches check every
    # needed member's headers, and the bytes after the last record, against it; a mismatch
    # raises StaleIndexError and the shard is planned again from a scan.
    checked_in_reads: bool = False
    tail: int = 0  # where the end of the archive should begin (checked_in_reads)

    def first_header(self, comp: Component) -> int:
        return self.header_at.get(comp.offset, comp.offset - 512)


_SLOTS = {schema.IMAGE: 0, schema.CAPTION: 1, schema.METADATA: 2}
_ROLES = {ext: (_SLOTS[role], rank) for ext, (role, rank) in schema.ROLES.items()}


def _planned(position: int, record_id: str, comps: tuple[Component, ...]) -> PlannedRecord:
    """The record with its image, caption and JSON picked out (by the schema's roles, any case).
    Two components of one role whose extensions differ only in case make it ambiguous."""
    picked: list = [None, None, None]
    ranks = [len(IMAGE_EXTENSIONS)] * 3
    verdict = None
    for c in comps:
        role = _ROLES.get(c[0]) or _ROLES.get(c[0].lower())
        if role is None:
            continue
        slot, rank = role
        if rank < ranks[slot]:
            ranks[slot] = rank
            picked[slot] = c
        elif rank == ranks[slot] and c[0] != picked[slot][0]:
            verdict = (f"ambiguous_extension: .{picked[slot][0]} and .{c[0]} differ only in case; rename one "
                       "(lower-casing readers refuse the record)")
    return PlannedRecord(position, record_id, comps, *picked, tuple(c for c in picked if c is not None), verdict)


def apply_report(plan: ShardPlan, report, fingerprint: str | None) -> None:
    """Fail the records that ``report`` (a :class:`~curator_assets.steps.validate.ShardReport`)
    lists with record-level problems, with its code and detail; only when the report was made
    from this tar (``fingerprint``), else it is stale and ignored."""
    if report is None:
        return
    if not report.describes(fingerprint):
        plan.report = "stale"
        plan.problems.append("the validation report describes an older version of the tar: not used")
        return
    plan.report = "used"
    flagged = report.problem_records()
    if not flagged:
        return
    records = plan.records
    for n, rec in enumerate(records):
        problems = flagged.get(rec.record_id)
        if problems and rec.verdict is None:
            text = "; ".join(f"{p.code}: {p.detail}" for p in problems[:3])
            records[n] = rec._replace(verdict=f"{text} (validation report)")
            plan.flagged += 1


AUTO = "auto"  # plan_shard's report: read the shard's stored validation report, if any


def plan_shard(dataset, key: str, report: Any = AUTO, *, scan: bool = True) -> ShardPlan:
    """The records of shard ``key``, from a scan of every header (never the data), checked
    against the shard's ``.idx`` when it has one.

    An index that does not describe the tar exactly (a record missing, duplicated, moved or
    added; another shard's index) raises :class:`StaleIndexError`: decoding from it would put
    one member's bytes under another record's ID. A damaged tar is planned from the
    recovering scan (its problems listed, and kept as shard errors), so every record it can
    find is decoded. ``report``: the shard's :class:`~curator_assets.steps.validate.ShardReport`
    whose verdict fails records (see :func:`apply_report`); ``"auto"`` reads the stored one,
    None uses none. Raises :class:`DecodeError` for a file that is no tar at all, or holds
    nothing readable.

    ``scan=False``: a remote shard with a named index is planned from the index alone (see
    :func:`_plan_from_index`): the header scan would read the whole object once more before the
    batches read it again. The caller must plan again with a scan on :class:`StaleIndexError`.
    """
    shard = dataset.shard(key)
    try:
        raw = dataset.read_index_bytes(key)
    except StorageError:
        raise
    except OSError as exc:
        raise DecodeError(f"{shard.url}: cannot read its index: {exc}") from exc
    plan = None if scan or dataset.local or not raw else _plan_from_index(dataset, shard, raw)
    if plan is None:
        plan = _plan_from_scan(dataset, shard, raw)
    if report == AUTO:
        report = _stored_report(dataset, key, plan)
    apply_report(plan, report, shard.fingerprint)
    return plan


def _plan_from_index(dataset, shard, raw: bytes) -> ShardPlan | None:
    """The records as the index lists them, with where each member's headers must begin
    (:func:`~curator_assets.steps.index.header_starts`); None when the index cannot describe the tar
    (the scan then decides how it is wrong)."""
    try:
        index = parse_index(raw)
    except IndexFormatError:
        return None
    starts = header_starts(index, shard.size)
    if isinstance(starts, str) or not index.records:
        return None
    planned = [_planned(n, rec.key, rec.components) for n, rec in enumerate(index.records)]
    comps = [c for rec in index.records for c in rec.components]
    header_at = {c.offset: at for c, at in zip(comps, starts, strict=True) if at != c.offset - 512}
    last = comps[-1]
    plan = ShardPlan(shard.key, shard.url, shard.size, planned, "index", True, len(raw), header_at=header_at)
    plan.checked_in_reads, plan.tail = True, last.offset + ((last.size + 511) & -512)
    return plan


def _plan_from_scan(dataset, shard, raw: bytes | None) -> ShardPlan:
    scan, read = _scan_shard(dataset, shard)
    problems = [f"{p.code} at byte {p.offset}: {p.detail}" for p in scan.problems]
    records = group_records(scan.members)
    header_at = {m.offset: m.header_offset for m in scan.members if m.header_offset != m.offset - 512}
    bytes_read = (512 * len(scan.members) if read is None else read) + len(raw or b"")
    source = "scan"
    if raw:
        source = _check_index(dataset, shard, raw, scan, records, problems)
    planned = [
        _planned(n, rec.key, tuple(Component(ext, m.offset, m.size, m.name) for ext, m in rec.components))
        for n, rec in enumerate(records)
    ]
    plan = ShardPlan(shard.key, shard.url, shard.size, planned, source, source == "index", bytes_read, problems,
                     header_at=header_at)
    plan.errors += [(p.code, f"{p.detail} (at byte {p.offset})") for p in scan.problems]
    return plan


def _scan_shard(dataset, shard):
    """Every header of the shard (recovering past damage), and the bytes that took from a remote
    store (None for a local file); a file with nothing readable is refused, saying what it is
    (``not_a_tar``) or where it broke."""
    with dataset.open_shard(shard.key) as f:
        scan = scan_tar(f, recover=True, total_size=shard.size)
        if scan.problems and not scan.members:
            f.seek(0)
            why = not_a_tar(f.read(512))
            first = scan.problems[0]
            if why is not None:
                raise DecodeError(f"{shard.url}: {why}", "not_a_tar")
            raise DecodeError(f"{shard.url}: {first.detail} (at byte {first.offset}): nothing to decode", first.code)
        read = getattr(f, "bytes_read", None)
    return scan, read


def _check_index(dataset, shard, raw: bytes, scan, records, problems: list[str]) -> str:
    """"index" when the shard's ``.idx`` describes the scanned tar exactly (and has names), else
    "scan"; raises :class:`StaleIndexError` for an index of another tar."""
    idx_url = dataset.url_of(dataset.index_path(shard.key), dataset.index_fs)
    try:
        index = parse_index(raw, idx_url)
    except IndexFormatError as exc:
        raise DecodeError(f"{shard.url}: unreadable index: {exc}", "idx_unreadable") from exc
    if scan.problems:
        problems.append(f"{idx_url} not used: the tar is damaged, its records come from a recovering header scan")
        return "scan"
    _refuse_stale(shard.url, index, records)
    if index.has_names:
        return "index"
    problems.append(f"{idx_url} is a v1.1 index (no member names): record IDs come from a header scan")
    return "scan"


def _stored_report(dataset, key: str, plan: ShardPlan):
    from curator_assets.steps.validate import read_report

    try:
        return read_report(dataset, key)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        plan.report = "unreadable"
        plan.problems.append(f"the validation report cannot be read ({exc}): not used")
        return None


def _refuse_stale(shard_url: str, index, records) -> None:
    diffs = index_differences(index, records, limit=3)
    if diffs:
        raise StaleIndexError(
            f"{shard_url}: its .idx does not match the tar: {'; '.join(diffs)}; "
            "rebuild the index (curator-assets index --force) (idx_stale)"
        )


# ---------------------------------------------------------------------------------------------
# Reading a batch of records (the stream reader)


@dataclass
class EncodedRecord:
    """A planned record with its bytes read and checked; ``row`` is its manifest row so far."""

    plan: PlannedRecord
    row: ManifestRow
    image: np.ndarray | None = None  # the encoded image bytes, when they may decode
    sniff: Sniff | None = None


@dataclass
class EncodedBatch:
    records: list[EncodedRecord]
    bytes_read: int


def _header_problem(headers: bytes, comp: Component, start: int) -> str | None:
    """Why the headers read from ``start`` up to a member's data are not that member's (None:
    they are). ``headers`` holds the member's own header last, any PAX or GNU long-name headers
    before it: the name compared is the real one, never the ustar field alone."""
    header = headers[-512:]
    if len(headers) < 512 or check_header(header) is not None:
        return "no tar header there"
    if chr(header[156]) not in REGULAR_TYPES:
        return f"a member of type {chr(header[156])!r} is there"
    if len(headers) == 512:
        name, size = header_name(header), header_size(header)
    else:
        found = member_at(headers, start)
        if not isinstance(found, Member):
            return f"an unreadable header is there ({found.detail})"
        if found.offset != comp.offset:
            return f"member {found.name!r} starts at byte {found.offset}"
        name, size = found.name, found.size
    if size is None:
        return "an unreadable header is there"
    if size != comp.size or name != comp.name:
        return f"member {name!r} ({size} bytes) is there"
    return None


def _header_agrees(header: memoryview, comp: Component) -> bool:
    """Fast path of :func:`_header_problem` for a member without extension headers whose name
    fits the ustar name field: the name and size fields say this member."""
    expected = comp.name.encode("utf-8", "surrogateescape")
    n = len(expected)
    if n >= 100 or header[:n] != expected or header[n] != 0:
        return False
    try:
        return parse_number(bytes(header[124:136])) == comp.size
    except ValueError:
        return False


def _stale_message(plan: ShardPlan, comp: Component, why: str) -> str:
    return (
        f"{plan.shard_url}: its .idx does not match the tar: the index puts {comp.name!r} "
        f"({comp.size} bytes) at byte {comp.offset}, but {why}; rebuild the index (curator-assets index --force) "
        "(idx_stale)"
    )


class ShardReader:
    """Reads the needed components of a shard's records, batch by batch, in tar order."""

    def __init__(self, dataset, plan: ShardPlan, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.dataset = dataset
        self.plan = plan
        self.max_pixels = max_pixels
        self.local = bool(dataset.local)
        self.path = dataset.shard_path(plan.key)
        self._file = None
        self.gap = LOCAL_GAP if self.local else REMOTE_GAP

    def __enter__(self) -> ShardReader:
        if self.local:
            self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self, start: int, end: int) -> bytes:
        if self._file is not None:
            return os.pread(self._file.fileno(), end - start, start)
        try:
            return self.dataset.fs.cat_file(self.path, start=start, end=end)
        except StorageError:
            raise  # already names the shard, with its code
        except OSError as exc:
            raise DecodeError(f"{self.plan.shard_url}: read of bytes {start}-{end} failed: {exc}") from exc

    def spot_check(self) -> None:
        """Check the headers of the first, middle and last members against the index (for readers
        that take the index on trust)."""
        comps = [c for r in self.plan.records for c in r.needed]
        for c in [comps[i] for i in sorted({0, len(comps) // 2, len(comps) - 1}) if comps]:
            start = self.plan.first_header(c)
            if start < 0 or c.offset + c.size > self.plan.shard_size:
                why = "the tar ends before it"
            else:
                why = _header_problem(self._read(start, c.offset), c, start)
            if why is not None:
                raise StaleIndexError(_stale_message(self.plan, c, why))

    def guard_images(self) -> None:
        """Fail (in the plan) every image whose header is unreadable or declares more than
        ``max_pixels``, reading only its first bytes: for readers that hand DALI whole members."""
        records = self.plan.records
        size = self.plan.shard_size
        for n, rec in enumerate(records):
            img = rec.image
            if img is None or rec.verdict is not None or img.offset + img.size > size:
                continue
            _, problems = sniff.check_header(self._member_get(img), img.size, max_pixels=self.max_pixels)
            if problems:
                records[n] = rec._replace(verdict="{}: {}".format(*problems[0]))

    def _member_get(self, comp: Component):
        """``get(pos, n)`` over one member's bytes, through a 4 KiB read-ahead: a header walk
        usually costs one read."""
        cache = [0, b""]
        limit = comp.size

        def get(pos: int, n: int) -> bytes:
            n = min(n, limit - pos)
            if n <= 0:
                return b""
            start, buf = cache
            if start <= pos and pos + n <= start + len(buf):
                return buf[pos - start : pos - start + n]
            buf = self._read(comp.offset + pos, comp.offset + pos + min(max(n, 4096), limit - pos))
            cache[0], cache[1] = pos, buf
            return buf[:n]

        return get

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[EncodedBatch]:
        records = self.plan.records[start:stop]
        for i in range(0, len(records), batch_size):
            yield self.read_batch(records[i : i + batch_size])

    def read_batch(self, records: Sequence[PlannedRecord]) -> EncodedBatch:
        size = self.plan.shard_size
        # Each needed member with its header block: [offset - 512, offset + size).
        first = self.plan.first_header
        spans = sorted((first(c), c.offset + c.size) for r in records for c in r.needed)
        runs: list[list[int]] = []  # [start, end] of merged runs
        for s, e in spans:
            s, e = max(s, 0), min(e, size)
            if s >= e:
                continue
            if runs and s - runs[-1][1] <= self.gap:
                runs[-1][1] = max(e, runs[-1][1])
            else:
                runs.append([s, e])
        buffers: list[tuple[int, int, memoryview]] = []  # (start, end, data)
        bytes_read = 0
        for s, e in runs:
            data = self._read(s, e)
            bytes_read += len(data)
            buffers.append((s, s + len(data), memoryview(data)))
        starts = [b[0] for b in buffers]

        def view(start: int, end: int) -> memoryview | None:
            """Bytes [start, end) of the shard, or None when the tar ends before ``end``."""
            i = bisect.bisect_right(starts, start) - 1 if len(buffers) > 1 else 0
            if i < 0 or not buffers:
                return None
            s, e, data = buffers[i]
            if end > e or start < s:
                return None
            return data[start - s : end - s]

        if self.plan.checked_in_reads and records and records[-1].position == len(self.plan.records) - 1:
            bytes_read += self._check_tail()
        return EncodedBatch([self._encoded(rec, view) for rec in records], bytes_read)

    def _check_tail(self) -> int:
        """After the last record of an index-planned shard, only the end of the archive (zero
        blocks, or nothing): a member there is one the index does not list. Returns bytes read."""
        start, size = self.plan.tail, self.plan.shard_size
        data = self._read(start, min(size, start + 1024)) if start < size else b""
        if data.strip(b"\0"):
            raise StaleIndexError(
                f"{self.plan.shard_url}: its .idx does not match the tar: a member the index does not list "
                f"follows its last record at byte {start}; rebuild the index (curator-assets index --force) (idx_stale)"
            )
        return len(data)

    def _encoded(self, rec: PlannedRecord, view) -> EncodedRecord:
        # Per record on the hot path: kept lean (one view per component, helpers only when
        # something is wrong), ~15 us of Python per record besides hashing.
        img = rec.image
        row = ManifestRow(rec.position, rec.record_id, self.plan.key, extensions=[c.ext for c in rec.components])
        enc = EncodedRecord(rec, row)
        if img is not None:
            row.member, row.offset, row.size = img.name, img.offset, img.size
        if self.plan.verify_headers:
            for comp in rec.needed:
                start = self.plan.first_header(comp)
                header = view(start, comp.offset) if start >= 0 else None
                if header is None and self.plan.checked_in_reads:
                    raise StaleIndexError(_stale_message(self.plan, comp, "the tar ends before it"))
                # The fast check reads only the name and size fields: enough against a scan that
                # has proven every header; an index-planned shard has its headers proven here.
                fast = start == comp.offset - 512 and not self.plan.checked_in_reads
                if header is not None and not (fast and _header_agrees(header, comp)):
                    why = _header_problem(bytes(header), comp, start)
                    if why is not None:
                        raise StaleIndexError(_stale_message(self.plan, comp, why))
        if rec.caption is not None:
            data = view(rec.caption.offset, rec.caption.offset + rec.caption.size)
            if data is not None:
                row.caption = str(data, "utf-8", "replace")
        if rec.metadata is not None:
            data = view(rec.metadata.offset, rec.metadata.offset + rec.metadata.size)
            if data is None:
                row.metadata_error = "the .json runs past the end of the shard"
            else:
                row.metadata, row.metadata_error = check_metadata(data)
        if img is None:
            found = ", ".join(row.extensions) or "none"
            row.error = rec.verdict or f"no image member (components: {found})"
            return enc
        data = view(img.offset, img.offset + img.size)
        if data is None:
            row.error = f"image data runs past the end of the shard ({self.plan.shard_size} bytes): tar truncated"
            return enc
        row.sha256 = hashlib.sha256(data).hexdigest()
        sniff = sniff_image(data, self.max_pixels)
        enc.sniff = sniff
        row.format = sniff.format
        row.source_channels = sniff.channels
        if sniff.error or rec.verdict:
            row.error = rec.verdict or sniff.error
            return enc
        if sniff.end is not None:  # a trailer after the image (a Motion Photo's video): not for the decoder
            data = data[: sniff.end]
        enc.image = np.frombuffer(data, dtype=np.uint8)
        return enc


# The .json rule lives in the record schema (one rule for validation and the manifest).
check_metadata = schema.parse_metadata


# ---------------------------------------------------------------------------------------------
# DALI


def _dali():
    from nvidia.dali import fn, pipeline_def, types

    return fn, pipeline_def, types


def import_dali() -> None:
    """Import what building a decoder needs of DALI (no pipeline, no thread, no CUDA call)."""
    _dali()
    _tensor_list_cpu()


def _tensor_list_cpu():
    from nvidia.dali.tensors import TensorListCPU

    return TensorListCPU


def _decoder_args(device: DeviceChoice, options: DecodeOptions) -> dict[str, Any]:
    """``fn.decoders.image`` arguments: RGB out, EXIF orientation applied (DALI's default, stated
    here because the manifest's width and height depend on it)."""
    _, _, types = _dali()
    args: dict[str, Any] = {"device": device.decoder_backend, "output_type": types.RGB, "adjust_orientation": True}
    if device.decoder_backend == "mixed":
        args["hw_decoder_load"] = options.hw_decoder_load
    if options.fast_idct:
        args["use_fast_idct"] = True
    return args


class BatchDecodeFailed(RuntimeError):
    """DALI failed a run; the message is DALI's, shortened."""

    crashed = False  # True: the decoder process died on the batch (see curator_assets.steps.decode.worker)


def _short_dali_error(exc: BaseException) -> str:
    text = str(exc)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if "no longer valid" not in ln and not ln.startswith("Critical error")]
    first = lines[0] if lines else type(exc).__name__
    # The sample number is the position in DALI's batch, which means nothing to the reader.
    return re.sub(r"\s*sample #\d+\s*:?", " sample", first).strip()[:300]


def explain_failure(data: bytes | memoryview) -> str:
    """A readable reason for bytes DALI could not decode (DALI only reports a status code)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder error is the explanation we want
        return f"{type(exc).__name__}: {exc}"[:300]
    return "Pillow decodes it"


class ImageDecoder:
    """A DALI pipeline that decodes one batch of encoded images at a time, fed from Python."""

    def __init__(self, device: DeviceChoice, options: DecodeOptions):
        self.device = device
        self.options = options
        self.pipe = None
        self.builds = 0

    def build(self) -> None:
        fn, pipeline_def, types = _dali()
        kwargs = _decoder_args(self.device, self.options)

        # prefetch_queue_depth=1 and the dynamic executor: a failed run leaves the pipeline
        # usable, and outputs stay valid while referenced.
        @pipeline_def(batch_size=self.options.batch_size, num_threads=self.options.threads_per_pipeline,
                      device_id=self.device.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline():
            # no_copy: the batch handed in is a TensorListCPU made for this run alone.
            encoded = fn.external_source(name="encoded", device="cpu", no_copy=True, dtype=types.UINT8)
            return fn.decoders.image(encoded, **kwargs)

        self.pipe = pipeline()
        self.pipe.build()
        self._tensor_list = _tensor_list_cpu()
        self.builds += 1

    def run(self, arrays: Sequence[np.ndarray], keep_pixels: bool = True):
        """Decode; returns DALI's output batch or raises :class:`BatchDecodeFailed`.
        (``keep_pixels`` matters to a contained decoder only: its pixels cross a process.)"""
        if self.pipe is None:
            self.build()
        try:
            # One copy into one buffer, in C++: a list of arrays costs DALI ~5 us of Python per sample.
            self.pipe.feed_input("encoded", self._tensor_list(list(arrays), ""))
            (out,) = self.pipe.run()
        except RuntimeError as exc:
            # Start again from a fresh pipeline: cheap (milliseconds), and nothing carries over.
            self.pipe = None
            raise BatchDecodeFailed(_short_dali_error(exc)) from exc
        return out


def _failure_reason(exc: BatchDecodeFailed, image: np.ndarray) -> str:
    """A record's error when it failed on its own. A crashed decoder says only that (and the
    signal): nothing else may touch bytes that kill a codec."""
    if exc.crashed:
        return str(exc)
    return f"DALI could not decode the image ({exc}); Pillow: {explain_failure(image)}"


def _shapes(out) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s) for s in out.shape()]


def _images(out, device: DeviceChoice) -> list:
    if device.name == "gpu":
        return [out[i] for i in range(len(out))]  # TensorGPU: __dlpack__ / __cuda_array_interface__
    # Views, no copy: with DALI's dynamic executor an output buffer lives as long as a view of it.
    return [np.asarray(out[i]) for i in range(len(out))]


# ---------------------------------------------------------------------------------------------
# Decoding a shard


@dataclass
class DecodedBatch:
    """One stretch of a shard (at most ``batch_size`` records, in tar order) after decoding."""

    shard: str  # the shard key
    shard_url: str
    device: str  # "cpu" | "gpu"
    rows: list[ManifestRow]  # every record of the stretch, decoded or not
    images: dict[int, Any]  # position -> decoded image (only when images were asked for)
    bytes_read: int

    @property
    def record_ids(self) -> list[str]:
        """IDs of the decoded records, aligned with :attr:`image_list`."""
        return [r.record_id for r in self.rows if r.decoded]

    @property
    def image_list(self) -> list:
        return [self.images[r.position] for r in self.rows if r.decoded and r.position in self.images]


class ShardDecoder:
    """Decodes one shard batch by batch; holds the DALI pipeline between shards."""

    def __init__(self, options: DecodeOptions | None = None, device: DeviceChoice | None = None):
        self.created_at = time.time()  # when its build began (a run may begin it early)
        self.requested = options or DecodeOptions()
        self.device = device or resolve_device(self.requested.device, self.requested.device_id)
        self.options = self.requested.for_device(self.device)
        self._ensure_pipelines()

    def _ensure_pipelines(self) -> None:
        """Build the pipelines now; on ``auto`` a GPU pipeline that cannot be built falls back to CPU."""
        try:
            self._build_pipelines()
        except RuntimeError as exc:
            if self.device.name == "gpu" and self.requested.device == "auto":
                reason = f"GPU pipeline failed ({_short_dali_error(exc)}): CPU decoder"
                self.device = DeviceChoice("cpu", None, reason)
                self._build_pipelines()
            else:
                why = _short_dali_error(exc)
                raise DecodeError(f"cannot build the DALI {self.device.name} pipeline: {why}") from exc

    def _build_pipelines(self) -> None:
        self.options = self.requested.for_device(self.device)
        self.decoders = [self._image_decoder() for _ in range(self.options.pipelines)]
        with ThreadPoolExecutor(len(self.decoders)) as pool:  # the workers start side by side
            for done in [pool.submit(d.build) for d in self.decoders]:
                done.result()

    def _image_decoder(self):
        """An in-process :class:`ImageDecoder`, or one in a supervised worker process."""
        if not self.options.contain_crashes:
            return ImageDecoder(self.device, self.options)
        from curator_assets.steps.decode.worker import ContainedDecoder

        return ContainedDecoder(self.device, self.options)  # takes an idle worker's process if one waits

    @property
    def contained(self) -> bool:
        """Whether a decoder crash is contained (DALI runs in worker processes)."""
        return self.options.contain_crashes

    def close(self) -> None:
        """Hand the worker processes, if any, to the next decoder with these options (idle ones
        stop when this process ends). The decoder stays usable: it takes workers again."""
        if not self.contained:
            return
        from curator_assets.steps.decode.worker import release

        done, self.decoders = self.decoders, [self._image_decoder() for _ in self.decoders]  # started on use
        for decoder in done:
            release(decoder)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the pool may be gone; the workers exit anyway
            pass

    def reader_for(self, dataset, plan: ShardPlan) -> str:
        """``stream`` (decoded in the worker processes when crashes are contained) or ``dali``
        (DALI's own reader and decoder in one pipeline, in this process: not contained)."""
        want = self.options.reader
        if want == "dali":
            if not dataset.local:
                raise DecodeError(
                    f"{plan.shard_url}: reader 'dali' reads local files only; use reader 'stream' for object stores"
                )
            return "dali"
        return "stream"

    # -- the stream reader -------------------------------------------------------------------

    def stream_batches(self, dataset, plan: ShardPlan, *, keep_images: bool) -> Iterator[DecodedBatch]:
        with ShardReader(dataset, plan, self.options.max_pixels) as reader:
            source = _prefetched(reader.batches(self.options.batch_size), self.options.prefetch)
            try:
                yield from self._in_order(plan, source, keep_images)
            finally:
                source.close()

    def _in_order(self, plan: ShardPlan, batches: Iterator[EncodedBatch], keep_images: bool
                  ) -> Iterator[DecodedBatch]:
        """Decode the batches on every pipeline at once, one batch per pipeline at a time, and
        hand them out in tar order. At most one batch per pipeline, plus one, is in flight."""
        free: queue.SimpleQueue[ImageDecoder] = queue.SimpleQueue()
        for decoder in self.decoders:
            free.put(decoder)

        def work(batch: EncodedBatch) -> DecodedBatch:
            decoder = free.get()
            try:
                return self._decode(decoder, plan, batch, keep_images)
            finally:
                free.put(decoder)

        pending: deque[Future] = deque()
        # Leaving the block waits for the batches still decoding: no pipeline outlives its shard
        # half-used, even when the caller stops early.
        with ThreadPoolExecutor(len(self.decoders), thread_name_prefix="curator-decode") as pool:
            try:
                for batch in batches:
                    pending.append(pool.submit(work, batch))
                    if len(pending) > len(self.decoders):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _decode(self, decoder: ImageDecoder, plan: ShardPlan, batch: EncodedBatch, keep_images: bool
                ) -> DecodedBatch:
        """One batch through ``decoder``: rows (and images) of every record of it. When DALI
        fails the batch, and for records the sniff found suspect, records go one at a time, so
        only the bad ones fail, each with its error."""
        ready = [r for r in batch.records if r.image is not None and not r.sniff.suspect]
        alone = [r for r in batch.records if r.image is not None and r.sniff.suspect]
        images: dict[int, Any] = {}
        if ready:
            try:
                out = decoder.run([r.image for r in ready], keep_images)
            except BatchDecodeFailed:
                alone += ready
            else:
                self._take(ready, out, images, keep_images)
        for rec in sorted(alone, key=lambda r: r.plan.position):
            try:
                single = decoder.run([rec.image], keep_images)
            except BatchDecodeFailed as exc:
                rec.row.error = _failure_reason(exc, rec.image)
            else:
                self._take([rec], single, images, keep_images)
        for rec in batch.records:
            rec.image = None  # the encoded bytes are done with: free them with the batch
        rows = [r.row for r in batch.records]
        return DecodedBatch(plan.key, plan.shard_url, self.device.name, rows, images, batch.bytes_read)

    def _take(self, recs: list[EncodedRecord], out, images: dict[int, Any], keep_images: bool) -> None:
        shapes = _shapes(out)
        pixels = _images(out, self.device) if keep_images else None
        for n, (rec, shape) in enumerate(zip(recs, shapes, strict=True)):
            rec.row.height, rec.row.width = shape[0], shape[1]
            rec.row.channels = shape[2] if len(shape) > 2 else 1
            rec.row.decoded = True
            if pixels is not None:
                images[rec.plan.position] = pixels[n]

    # -- DALI's webdataset reader --------------------------------------------------------------

    def native_batches(self, dataset, plan: ShardPlan, *, keep_images: bool) -> Iterator[DecodedBatch]:
        """DALI reads the tar itself, through an index of the image/caption/JSON components only.

        Records without an image are answered from the plan (their caption and JSON read
        directly). When a run fails, that stretch of records is read by the stream reader and
        decoded one record at a time, and DALI's reader starts again after it.
        """
        tar_path = dataset.shard_path(plan.key)
        bs = self.options.batch_size
        records = plan.records
        position = 0
        with ShardReader(dataset, plan, self.options.max_pixels) as reader, \
                tempfile.TemporaryDirectory(prefix="curator-decode-") as tmp:
            if plan.verify_headers:
                reader.spot_check()
            reader.guard_images()  # DALI's reader decodes all it is given: no bomb may be in its index
            run: _NativeRun | None = None
            while position < len(records):
                chunk = records[position : position + bs]
                want = [r for r in chunk if r.image is not None and r.verdict is None]
                if want and run is None:
                    idx = os.path.join(tmp, f"from-{position}.idx")
                    _write_native_index(idx, [r for r in records[position:]
                                              if r.image is not None and r.verdict is None])
                    run = _NativeRun(self.device, self.options, tar_path, idx)
                try:
                    outs = run.take(len(want)) if want else []
                except BatchDecodeFailed:
                    run = None  # a fresh reader starts after this stretch
                    enc = reader.read_batch(chunk)
                    for rec in enc.records:  # each on its own: DALI said one of them is bad
                        if rec.image is not None:
                            rec.sniff = dataclasses.replace(rec.sniff, suspect=True)
                    yield self._decode(self.decoders[0], plan, enc, keep_images)
                else:
                    yield self._native_rows(plan, reader, chunk, outs, keep_images)
                position += len(chunk)

    def _native_rows(self, plan: ShardPlan, reader: ShardReader, chunk: Sequence[PlannedRecord],
                     outs: list[tuple], keep_images: bool) -> DecodedBatch:
        images: dict[int, Any] = {}
        rows = []
        bytes_read = 0
        samples = iter(outs)
        for rec in chunk:
            if rec.image is None or rec.verdict is not None:
                enc = reader.read_batch([rec])  # its caption and JSON, if any; the row says why no image
                bytes_read += enc.bytes_read
                rows.append(enc.records[0].row)
                continue
            shape, pixels, encoded, caption, meta = next(samples)
            img = rec.image
            row = ManifestRow(
                position=rec.position, record_id=rec.record_id, shard=plan.key, member=img.name,
                offset=img.offset, size=img.size, extensions=[c.ext for c in rec.components],
            )
            bytes_read += len(encoded) + len(caption) + len(meta)
            row.sha256 = hashlib.sha256(encoded).hexdigest()
            sniff = sniff_image(memoryview(encoded))
            row.format, row.source_channels = sniff.format, sniff.channels
            row.height, row.width = shape[0], shape[1]
            row.channels = shape[2] if len(shape) > 2 else 1
            row.decoded = True
            if rec.caption is not None:
                row.caption = bytes(caption).decode("utf-8", "replace")
            if rec.metadata is not None:
                row.metadata, row.metadata_error = check_metadata(bytes(meta))
            if keep_images:
                images[rec.position] = pixels
            rows.append(row)
        return DecodedBatch(plan.key, plan.shard_url, self.device.name, rows, images, bytes_read)

    # -- whole shards --------------------------------------------------------------------------

    def batches(self, dataset, key: str, *, keep_images: bool, plan: ShardPlan | None = None
                ) -> Iterator[DecodedBatch]:
        plan = plan or plan_shard(dataset, key)
        if self.reader_for(dataset, plan) == "dali":
            yield from self.native_batches(dataset, plan, keep_images=keep_images)
        else:
            yield from self.stream_batches(dataset, plan, keep_images=keep_images)


def _write_native_index(path: str, records: Sequence[PlannedRecord]) -> None:
    """An index for DALI's reader: per record the image as ``img``, the caption as ``txt``, the
    JSON as ``json``. Fixed names make ``.jpeg``/``.JPG``/``.png`` all match one output."""
    lines = (
        [(ext, comp.offset, comp.size, ext) for ext, comp in (("img", r.image), ("txt", r.caption),
                                                              ("json", r.metadata)) if comp is not None]
        for r in records
    )
    with open(path, "wb") as f:
        f.write(format_lines(lines))


class _NativeRun:
    """DALI's ``fn.readers.webdataset`` over one tar, handing out samples in index order."""

    def __init__(self, device: DeviceChoice, options: DecodeOptions, tar_path: str, idx_path: str):
        fn, pipeline_def, types = _dali()
        kwargs = _decoder_args(device, options)
        self.device = device

        @pipeline_def(batch_size=options.batch_size, num_threads=options.threads, device_id=device.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipeline():
            img, txt, meta = fn.readers.webdataset(
                paths=[tar_path], index_paths=[idx_path], ext=["img", "txt", "json"],
                missing_component_behavior="empty", name="reader", prefetch_queue_depth=2,
            )
            return fn.decoders.image(img, **kwargs), img, txt, meta

        self.pipe = pipeline()
        try:
            self.pipe.build()
        except RuntimeError as exc:
            raise DecodeError(f"{tar_path}: DALI's reader failed: {_short_dali_error(exc)}") from exc
        self.total = int(next(iter(self.pipe.epoch_size().values())))
        self.served = 0
        self.pending: list[tuple] = []

    def take(self, need: int) -> list[tuple]:
        """The next ``need`` samples, each (shape, pixels, encoded, txt, json)."""
        while len(self.pending) < need:
            try:
                decoded, img, txt, meta = self.pipe.run()
            except RuntimeError as exc:
                raise BatchDecodeFailed(_short_dali_error(exc)) from exc
            shapes = _shapes(decoded)
            take = min(len(shapes), self.total - self.served - len(self.pending))
            if take <= 0:
                raise DecodeError(f"DALI's reader ran out after {self.served} of {self.total} samples")
            pixels = _images(decoded, self.device)
            for i in range(take):
                self.pending.append((shapes[i], pixels[i], np.asarray(img[i]), np.asarray(txt[i]),
                                     np.asarray(meta[i])))
        out, self.pending = self.pending[:need], self.pending[need:]
        self.served += len(out)
        return out


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """Run ``source`` in a thread, at most ``depth`` items ahead; errors come out in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put((done, exc))

    thread = threading.Thread(target=work, name="curator-shard-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# ---------------------------------------------------------------------------------------------
# The two entry points: a shard to a manifest, and shards to a stream of image batches


@dataclass
class DecodeResult:
    key: str
    shard_url: str
    manifest_url: str | None
    records: int
    decoded: int
    failed: int  # records with an image member that did not decode
    no_image: int  # records without an image member (also decoded=False in the manifest)
    device: str
    device_reason: str
    reader: str
    plan_source: str  # "index" | "scan"
    seconds: float
    bytes_read: int
    problems: list[str]
    preview: list[ManifestRow]  # the first few rows, for a glance
    errors: list[tuple[str, str]]  # (record_id, error) of the first records that did not decode
    # Shard-level problems (code, detail), e.g. a truncated tar: the readable records are in the
    # manifest, but the shard is not whole, so the result is not ok.
    shard_errors: list[tuple[str, str]] = field(default_factory=list)
    report: str = "none"  # the validation report: used | stale | none | unreadable
    flagged: int = 0  # records failed by the validation report's verdict

    @property
    def ok(self) -> bool:
        return not self.shard_errors

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard_url, "key": self.key, "manifest": self.manifest_url, "records": self.records,
            "decoded": self.decoded, "failed": self.failed, "no_image": self.no_image, "device": self.device,
            "device_reason": self.device_reason, "reader": self.reader, "plan": self.plan_source,
            "seconds": round(self.seconds, 6), "images_per_s": round(self.images_per_second, 1),
            "bytes_read": self.bytes_read, "problems": self.problems,
            "errors": [{"record_id": r, "error": e} for r, e in self.errors],
            "ok": self.ok, "shard_errors": [{"code": c, "detail": d} for c, d in self.shard_errors],
            "report": self.report, "flagged": self.flagged,
        }


def decode_shard(
    dataset,
    key: str,
    options: DecodeOptions | None = None,
    *,
    decoder: ShardDecoder | None = None,
    write: bool = True,
    preview_rows: int = 5,
    report: Any = AUTO,
) -> tuple[DecodeResult, list[ManifestRow]]:
    """Decode every image of shard ``key`` and (with ``write``) write its Parquet manifest.

    Returns the summary and the manifest rows (one per record, in tar order). Raises
    :class:`DecodeError` (or ``StorageError``) for a shard that cannot be decoded at all; a record
    that cannot be decoded is a row with ``decoded=False`` and its error, never an exception.
    ``report``: the validation verdict to apply (``"auto"``: the shard's stored report, trusted
    only while the tar keeps the fingerprint it was made from; None: none).
    """
    if decoder is None:  # a decoder of its own, stopped (its workers too) when the shard is done
        decoder = ShardDecoder(options)
        try:
            return decode_shard(dataset, key, decoder=decoder, write=write, preview_rows=preview_rows, report=report)
        finally:
            decoder.close()
    start, read_at_start = time.perf_counter(), _bytes_so_far(dataset)
    plan = plan_shard(dataset, key, report, scan=False)
    reader = decoder.reader_for(dataset, plan)
    try:
        rows, bytes_read = _decode_planned(decoder, dataset, plan)
    except StaleIndexError:
        if not plan.checked_in_reads:
            raise
        # The index did not hold where the batches read the tar: the header scan decides whether
        # it is stale (raised again, as for a local shard) or the tar damaged (planned from the scan).
        first_try = _bytes_so_far(dataset) - read_at_start
        plan = plan_shard(dataset, key, report)
        plan.problems.append("the index did not match the tar where it was read: planned again from a header scan")
        rows, bytes_read = _decode_planned(decoder, dataset, plan)
        bytes_read += first_try
    if len(rows) != len(plan.records):  # every record in, every record out
        raise DecodeError(f"{plan.shard_url}: {len(plan.records)} records planned but {len(rows)} came out")
    seconds = time.perf_counter() - start
    decoded = sum(r.decoded for r in rows)
    no_image = sum(r.member is None for r in rows)
    url = None
    result = DecodeResult(
        key, plan.shard_url, None, len(rows), decoded, len(rows) - decoded - no_image, no_image,
        decoder.device.name, decoder.device.reason, reader, plan.source, seconds, bytes_read,
        plan.problems, rows[:preview_rows], [(r.record_id, r.error or "") for r in rows if not r.decoded][:20],
        list(plan.errors), plan.report, plan.flagged,
    )
    if write:
        write_manifest(dataset, key, manifest_table(rows, _manifest_info(result, plan)))
        url = manifest_url(dataset, key)
        result.manifest_url = url
    return result, rows


def _manifest_info(result: DecodeResult, plan: ShardPlan) -> dict[str, Any]:
    """The shard-level facts a manifest carries beside its rows."""
    return {
        "shard": result.key, "shard_url": plan.shard_url, "device": result.device, "reader": result.reader,
        "plan": plan.source, "records": result.records, "decoded": result.decoded, "failed": result.failed,
        "no_image": result.no_image, "seconds": round(result.seconds, 4), "problems": plan.problems,
        "dali": dali_version(), "ok": result.ok, "shard_errors": [f"{c}: {d}" for c, d in plan.errors],
        "report": plan.report, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _decode_planned(decoder: ShardDecoder, dataset, plan: ShardPlan) -> tuple[list[ManifestRow], int]:
    """Every row of ``plan``, and the bytes planning and decoding read."""
    rows: list[ManifestRow] = []
    bytes_read = plan.bytes_read
    for batch in decoder.batches(dataset, plan.key, keep_images=False, plan=plan):
        rows.extend(batch.rows)
        bytes_read += batch.bytes_read
    return rows, bytes_read


def _bytes_so_far(dataset) -> int:
    """What the dataset's store has returned so far (0 for local disk, which it does not count)."""
    return int(getattr(dataset.fs, "bytes_read", 0) or 0)


# DALI's wheels, one per CUDA major version (the package inside is always ``nvidia.dali``).
DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")


@functools.cache
def dali_version() -> str:
    """The installed DALI's version, for the manifest. Read from the package metadata: this
    process may never import DALI (its decoders run in worker processes), and importing it only
    for the version cost ~1.2 s of CPU per command."""
    dali = sys.modules.get("nvidia.dali")
    if dali is not None:
        return str(getattr(dali, "__version__", "unknown"))
    from importlib import metadata

    for name in DALI_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


ShardRef = Any  # a str/PathLike (a .tar or a folder of them, local or URL) or a (Dataset, key) pair


def resolve_shards(shards: Iterable[ShardRef], storage_options: dict | None = None) -> Iterator[tuple[Any, str]]:
    """``(dataset, key)`` for each shard reference: a ``(Dataset, key)`` pair as it is; a path or
    URL of a ``.tar`` as that shard; a folder (or prefix) as every shard under it, in key order."""
    from curator_assets.store.dataset import Dataset

    if isinstance(shards, (str, os.PathLike)) or (isinstance(shards, tuple) and len(shards) == 2
                                                   and isinstance(shards[1], str) and not isinstance(shards[0], str)):
        shards = [shards]
    for ref in shards:
        if isinstance(ref, tuple):
            yield ref[0], ref[1]
            continue
        dataset = Dataset(os.fspath(ref), storage_options)
        for shard in dataset.list_shards().shards:
            yield dataset, shard.key


def iter_batches(
    shards: ShardRef | Iterable[ShardRef],
    *,
    batch_size: int | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
    fast_idct: bool = False,
    reader: str = "auto",
    storage_options: dict | None = None,
    device_id: int = 0,
    pipelines: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    contain_crashes: bool = False,
) -> Iterator[DecodedBatch]:
    """Decoded images of one or more shards, batch by batch, in tar order.

    ``shards``: paths or URLs of ``.tar`` files (or of folders of them), or ``(Dataset, key)``
    pairs; ``storage_options`` are fsspec options for the paths and URLs; ``device_id`` picks the
    GPU on a machine with several. Each batch covers at
    most ``batch_size`` consecutive records of one shard: ``batch.record_ids`` and
    ``batch.image_list`` hold the decoded ones (IDs from the member names), ``batch.rows`` every
    record of the stretch with its manifest row (caption, JSON, error). Images are HWC ``uint8``
    RGB: numpy arrays on the CPU; on the GPU, DALI ``TensorGPU`` objects that any DLPack consumer
    takes (``torch.from_dlpack(t)``, ``cupy.from_dlpack(t)``). Both are DALI's own output
    buffers, not copies: they stay valid for as long as they are referenced, and a kept image
    keeps its batch's buffer alive (copy the few you keep out of many). Only a few batches are in
    memory at any time, whatever the shard size.

    ``contain_crashes``: decode in supervised worker processes, so that a decoder crash on a
    corrupt image fails that record instead of killing this process (see
    :mod:`curator_assets.steps.decode.worker`). Images then come back as numpy arrays on the host
    (mapped from shared memory), even when decoded on a GPU. Off by default here, so that GPU
    images stay on the device; turn it on for untrusted data.
    """
    options = DecodeOptions(device=device, batch_size=batch_size, num_threads=num_threads,
                            hw_decoder_load=hw_decoder_load, fast_idct=fast_idct, reader=reader,
                            device_id=device_id, pipelines=pipelines, max_pixels=max_pixels,
                            contain_crashes=contain_crashes)
    decoder = ShardDecoder(options)
    try:
        for dataset, key in resolve_shards(shards, storage_options):
            yield from decoder.batches(dataset, key, keep_images=True)
    finally:
        decoder.close()


# ---------------------------------------------------------------------------------------------
# One decoder per process: building DALI pipelines costs ~0.3-1 s (more on a GPU), so every
# shard decoded in a process (a Dagster run's steps, `curator-assets run`) shares them.

_SHARED: dict[tuple, ShardDecoder] = {}
_SHARED_LOCK = threading.Lock()
_PREPARING: set[tuple] = set()  # options whose decoder a background thread is building
_PREPARING_LOCK = threading.Lock()


def shared_decoder(options: DecodeOptions | None = None) -> ShardDecoder:
    """The process's :class:`ShardDecoder` for these options, built on first use."""
    options = options or DecodeOptions()
    key = dataclasses.astuple(options)
    with _SHARED_LOCK:
        decoder = _SHARED.get(key)
        if decoder is None:
            decoder = _SHARED[key] = ShardDecoder(options)
        return decoder


def prepare_shared_decoder(options: DecodeOptions | None = None) -> None:
    """Build the process's shared decoder for these options in a background thread, so that it
    is ready when the first shard is decoded; a later :func:`shared_decoder` call waits for it.
    A build that fails here is left to that call, which raises it."""
    options = options or DecodeOptions()
    key = dataclasses.astuple(options)
    with _PREPARING_LOCK:  # not _SHARED_LOCK: a build holds that one for seconds
        if key in _SHARED or key in _PREPARING:
            return
        _PREPARING.add(key)

    def build() -> None:
        try:
            shared_decoder(options)
        except Exception:  # noqa: BLE001 - raised again, with its context, where it is needed
            pass
        finally:
            with _PREPARING_LOCK:
                _PREPARING.discard(key)

    threading.Thread(target=build, name="curator-decoder-build", daemon=True).start()


def shared_decoder_wanted(options: DecodeOptions) -> bool:
    """Whether this process has the shared decoder for these options, or is building it."""
    key = dataclasses.astuple(options)
    with _PREPARING_LOCK:
        return key in _SHARED or key in _PREPARING


def shared_decoders_built() -> int:
    """How many shared decoders this process has built (one per distinct set of options)."""
    return len(_SHARED)
