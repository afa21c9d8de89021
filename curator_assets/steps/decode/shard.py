"""Decode the images of WebDataset shards with NVIDIA DALI, one batch at a time, in tar order.

The shape of it:

* **Plan** (:func:`plan_shard`): a scan of every tar header (512 bytes per member, seeking over
  the data) gives the records, with IDs from the member names; the shard's ``.idx``, when it has
  one, must describe exactly those records (:func:`~curator_assets.formats.idx.index_differences`)
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

import dataclasses
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curator_assets.formats.idx import format_lines
from curator_assets.formats.manifest import ManifestRow, manifest_table, manifest_url, write_manifest
from curator_assets.steps.decode.engine import (
    BatchDecodeFailed,
    ImageDecoder,
    dali_api,
    dali_version,
    decoder_args,
    failure_reason,
    output_images,
    output_shapes,
    short_dali_error,
)
from curator_assets.steps.decode.options import (
    DecodeError,
    DecodeOptions,
    DeviceChoice,
    StaleIndexError,
    resolve_device,
)
from curator_assets.steps.decode.plan import AUTO, PlannedRecord, ShardPlan, load_plan_state, plan_shard
from curator_assets.steps.decode.reader import EncodedBatch, EncodedRecord, ShardReader, check_metadata, sniff_image

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
                reason = f"GPU pipeline failed ({short_dali_error(exc)}): CPU decoder"
                self.device = DeviceChoice("cpu", None, reason)
                self._build_pipelines()
            else:
                why = short_dali_error(exc)
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
        aborted = False
        # Leaving the block waits for the batches still decoding: no pipeline outlives its shard
        # half-used, even when the caller stops early.
        try:
            with ThreadPoolExecutor(len(self.decoders), thread_name_prefix="curator-decode") as pool:
                try:
                    for batch in batches:
                        pending.append(pool.submit(work, batch))
                        if len(pending) > len(self.decoders):
                            yield pending.popleft().result()
                    while pending:
                        yield pending.popleft().result()
                except (GeneratorExit, Exception):
                    raise  # the batches in flight end as usual (a fraction of a second)
                except BaseException:
                    # Interrupted (a terminated run's DagsterExecutionInterruptedError, Ctrl-C): the
                    # batches in flight are not wanted, so their workers are killed rather than
                    # waited for (a hung one would hold the step for worker_timeout).
                    aborted = True
                    self._abort_workers()
                    raise
                finally:
                    for future in pending:
                        future.cancel()
        finally:
            if aborted:
                for decoder in self.decoders:
                    getattr(decoder, "resume", lambda: None)()

    def _abort_workers(self) -> None:
        for decoder in self.decoders:
            abort = getattr(decoder, "abort", None)  # contained decoders; DALI in process cannot be
            if abort is not None:
                abort()

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
                rec.row.error = failure_reason(exc, rec.image)
            else:
                self._take([rec], single, images, keep_images)
        for rec in batch.records:
            rec.image = None  # the encoded bytes are done with: free them with the batch
        rows = [r.row for r in batch.records]
        return DecodedBatch(plan.key, plan.shard_url, self.device.name, rows, images, batch.bytes_read)

    def _take(self, recs: list[EncodedRecord], out, images: dict[int, Any], keep_images: bool) -> None:
        shapes = output_shapes(out)
        pixels = output_images(out, self.device) if keep_images else None
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
        fn, pipeline_def, types = dali_api()
        kwargs = decoder_args(device, options)
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
            raise DecodeError(f"{tar_path}: DALI's reader failed: {short_dali_error(exc)}") from exc
        self.total = int(next(iter(self.pipe.epoch_size().values())))
        self.served = 0
        self.pending: list[tuple] = []

    def take(self, need: int) -> list[tuple]:
        """The next ``need`` samples, each (shape, pixels, encoded, txt, json)."""
        while len(self.pending) < need:
            try:
                decoded, img, txt, meta = self.pipe.run()
            except RuntimeError as exc:
                raise BatchDecodeFailed(short_dali_error(exc)) from exc
            shapes = output_shapes(decoded)
            take = min(len(shapes), self.total - self.served - len(self.pending))
            if take <= 0:
                raise DecodeError(f"DALI's reader ran out after {self.served} of {self.total} samples")
            pixels = output_images(decoded, self.device)
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
    state = load_plan_state(dataset, key, report)  # read once: a second plan below reuses it
    plan = plan_shard(dataset, key, report, scan=False, state=state)
    reader = decoder.reader_for(dataset, plan)
    try:
        rows, bytes_read = _decode_planned(decoder, dataset, plan)
    except StaleIndexError:
        if not plan.checked_in_reads:
            raise
        # The index did not hold where the batches read the tar: the header scan decides whether
        # it is stale (raised again, as for a local shard) or the tar damaged (planned from the scan).
        first_try = _bytes_so_far(dataset) - read_at_start
        plan = plan_shard(dataset, key, report, state=state)
        plan.bytes_read -= len(state.index_bytes or b"")  # read once, by the first try
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
