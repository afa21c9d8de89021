"""Sniffing encoded images and reading a batch of records out of a shard (the stream reader)."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from curator_assets.formats import schema, sniff
from curator_assets.formats.manifest import ManifestRow
from curator_assets.formats.sniff import ImageProblem, check_image, jpeg_header
from curator_assets.formats.tar_headers import header_name, header_size, parse_number
from curator_assets.formats.tar_members import REGULAR_TYPES, Member, check_header, member_at
from curator_assets.steps.decode.options import DEFAULT_MAX_PIXELS, LOCAL_GAP, REMOTE_GAP, DecodeError, StaleIndexError
from curator_assets.steps.decode.plan import Component, PlannedRecord, ShardPlan
from curator_assets.store.errors import StorageError

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


