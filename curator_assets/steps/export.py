"""Export the curated dataset: the records that passed, resharded, with indexes and one manifest.

``export_dataset(SRC, DST)`` writes ``DST/00000.tar`` + ``DST/00000.idx``, ... (at most N records
each, in input order or a seeded shuffle) and ``DST/manifest.parquet`` (one row per input record:
where it went, or why it was left out). See docs/export.md.

- Kept records are copied member by member, byte for byte, under fixed member metadata (POSIX
  pax/ustar headers, mtime 0, uid/gid 0, mode 0644, no user names): the same input and options
  give the same bytes. Each ``.idx`` is the v1.2 index ``wds2idx`` writes for the tar.
- Each output file is written atomically (:func:`store.atomic.atomic_file`). ``DST/.export/``
  records what each written shard holds (a digest of its records' sources and places: the state
  and its journal, :mod:`steps.export_state`); a run that is killed and run again writes only the
  shards the state does not vouch for, and a run with nothing changed writes nothing. One export
  at a time writes a DST (a lock, or a lease on object stores).
- Without a shuffle, each output shard is written on a second thread (:class:`ShardWriter`) as
  soon as its records are planned, while the next input shards are planned.
- Each input shard's verdicts are cached beside the state, keyed by the shard's fingerprint, so
  a resumed run does not validate or decode it again.
- Memory holds records' names and offsets, never their bytes (a shuffle permutes those).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from curator_assets.formats.idx import format_lines
from curator_assets.formats.report import DEFAULT_MAX_PIXELS
from curator_assets.steps.export_sources import (
    Source,
    SourcePlan,
    SourceRecord,
    Workspace,
    list_sources,
    plan_source,
    readable,
    verdict_fingerprints,
)
from curator_assets.steps.export_state import STATE_DIR, ExportBusy, ExportState, WriterLease, read_or_none
from curator_assets.steps.export_tar import SourceChanged, SourceFiles, Stopped, write_tar
from curator_assets.store.atomic import atomic_file, sync_folder, write_atomic
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError
from curator_assets.store.fs import url_protocol
from curator_assets.store.keys import fingerprint_of

DEFAULT_RECORDS_PER_SHARD = 10_000
MIN_NAME_WIDTH = 5  # digits of output shard names
MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = 1  # of the shard digests (the state's own version: export_state.FORMAT_VERSION)


class ExportOptions(NamedTuple):
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD
    keep_duplicates: bool = False
    include_failed: bool = False
    shuffle_seed: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


class ExportError(RuntimeError):
    """An export that cannot start or go on (DST inside SRC, a source changed mid-export)."""

    def __init__(self, message: str, code: str = "export_failed"):
        super().__init__(message)
        self.code = code


@dataclass
class ExportResult:
    output: str
    shards: int = 0  # output shards
    written: list[str] = field(default_factory=list)  # output shards written by this run
    unchanged: int = 0  # output shards already as they should be
    removed: list[str] = field(default_factory=list)  # output shards of an earlier run no longer wanted
    sources: int = 0
    records: int = 0  # input records
    kept: int = 0
    left_out: dict[str, int] = field(default_factory=dict)  # by reason code (duplicate_of counted as one)
    renamed: int = 0  # kept records whose key was made unique
    errors: list[str] = field(default_factory=list)  # one line per input shard that gave nothing
    notes: list[str] = field(default_factory=list)  # damaged input shards that gave up their readable records
    manifest_written: bool = False
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "ok": self.ok, "shards": self.shards, "written": self.written,
            "unchanged": self.unchanged, "removed": self.removed, "sources": self.sources, "records": self.records,
            "kept": self.kept, "left_out": self.left_out, "renamed": self.renamed, "errors": self.errors,
            "notes": self.notes, "manifest_written": self.manifest_written, "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
        }


# -- where: refuse an output that overlaps the input ---------------------------------------------


def _real(ds: Dataset, root: str) -> str:
    return os.path.realpath(root) if ds.local else root.rstrip("/")


def overlap_problem(src: Dataset, dst: Dataset) -> str | None:
    """Why DST cannot be written (it is SRC, or inside it), or None. The dataset's own output
    folder (``<SRC>/_curator``, never listed as input) may hold an export."""
    if url_protocol(src.url) != url_protocol(dst.url):
        return None
    a, b = _real(src, src.root), _real(dst, dst.root)
    if b == a:
        return f"the output {dst.url} is the dataset folder itself"
    if b.startswith(a.rstrip("/") + "/"):
        out = _real(src, src.output_root)
        if b == out or b.startswith(out + "/"):
            return None
        return f"the output {dst.url} is inside the dataset {src.url}: its shards would be read as input"
    return None


# -- the global plan: what is kept, under which key, in which output shard -----------------------


class Planned(NamedTuple):
    kept: list[tuple[int, int, str]]  # (plan, record, output key), in output order
    reasons: list[list[str | None]]  # per plan, per record: why it is left out (None: kept)
    out_keys: list[list[str | None]]


class Assigner:
    """Decides, source after source in input order, which records are kept and under which key:
    duplicates of an earlier image left out, keys made unique. Without a shuffle every full output
    shard is known as soon as its last record is planned (:meth:`full_shards`), so it can be
    written while the next sources are planned; with one, the order is known only at the end."""

    def __init__(self, options: ExportOptions):
        self.options = options
        self.seen_image: dict[str, str] = {}
        self.used: set[str] = set()
        self.kept: list[tuple[int, int, str]] = []
        self.reasons: list[list[str | None]] = []
        self.out_keys: list[list[str | None]] = []
        self.handed_out = 0  # kept records already given out in full shards

    def add(self, p: int, plan: SourcePlan) -> None:
        options, keep_duplicates = self.options, self.options.keep_duplicates
        plan_reasons: list[str | None] = []
        plan_keys: list[str | None] = []
        for r, rec in enumerate(plan.records):
            reason = _reason(rec, options)
            if reason is None and rec.sha256 and not keep_duplicates:
                where = f"{plan.key}/{rec.key}"
                first = self.seen_image.setdefault(rec.sha256, where)
                if first is not where:  # an earlier record holds this image
                    reason = f"duplicate_of:{first}"
            key = None
            if reason is None:
                key = unique_key(rec.key, plan.key, self.used)
                self.kept.append((p, r, key))
            plan_reasons.append(reason)
            plan_keys.append(key)
        self.reasons.append(plan_reasons)
        self.out_keys.append(plan_keys)

    def full_shards(self) -> list[list[tuple[int, int, str]]]:
        """The output shards filled since the last call (none with a shuffle: it needs every record)."""
        if self.options.shuffle_seed is not None:
            return []
        n = self.options.records_per_shard
        out = []
        while len(self.kept) - self.handed_out >= n:
            out.append(self.kept[self.handed_out : self.handed_out + n])
            self.handed_out += n
        return out

    def finish(self) -> Planned:
        if self.options.shuffle_seed is not None:
            random.Random(self.options.shuffle_seed).shuffle(self.kept)
        return Planned(self.kept, self.reasons, self.out_keys)


def _reason(rec: SourceRecord, options: ExportOptions) -> str | None:
    if rec.reason is None:
        return None
    if options.include_failed and rec.reason.startswith("decode:") and readable(rec):
        return None
    return rec.reason


def unique_key(key: str, shard: str, used: set[str]) -> str:
    """``key`` itself the first time it is kept; a key already kept from an earlier shard becomes
    ``<source shard>/<key>``, then ``<source shard>/<key>-2``, ``-3``... until it is free."""
    candidate = key
    if candidate in used:
        candidate = f"{shard}/{key}"
        n = 2
        while candidate in used:
            candidate = f"{shard}/{key}-{n}"
            n += 1
    used.add(candidate)
    return candidate


def shard_names(n: int) -> list[str]:
    """``00000``, ``00001``, ...: one width for all, wider only past ``10**MIN_NAME_WIDTH`` shards."""
    width = max(MIN_NAME_WIDTH, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def chunks(kept: list, per_shard: int) -> list[list]:
    return [kept[i : i + per_shard] for i in range(0, len(kept), per_shard)]


def shard_digest(plans: list[SourcePlan], entries: list[tuple[int, int, str]]) -> str:
    """What an output shard holds, as a digest: each record's source (its fingerprint), members and key."""
    h = hashlib.sha256(f"curator-export {FORMAT_VERSION}\n".encode())
    for p, r, key in entries:  # repr of str and int tuples: stable across runs and versions
        h.update(repr((plans[p].fingerprint, key, plans[p].records[r].members)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class ShardWriter:
    """Writes the output shards on a thread of its own, in the order they are handed over, while
    the main thread plans the next sources: the copies and fsyncs wait on the kernel with the GIL
    released, planning is Python. Each shard written is recorded in the state's journal by this
    thread; its log lines are passed to the main thread (:meth:`relay_log`), which owns the
    caller's logger."""

    def __init__(self, exporter: Exporter, state: dict[str, Any]):
        self.exporter = exporter
        self.old: dict[str, Any] = dict(state.get("shards", {}))
        self.written: dict[str, dict[str, Any]] = {}  # name -> its state entry
        self.moved: set[str] = set()  # names written this run, then renamed to wider ones
        self.handed: set[str] = set()
        self.streamed = 0
        # Names given while planning: as wide as the last run's (when it had more than 10**5 shards,
        # a rerun then finds them in place), else the narrowest.
        self.width = max([MIN_NAME_WIDTH, *(len(n) for n in self.old if n.isdigit())])
        self.by_digest: dict[str, str] = {}  # digest -> the name a shard of this run was written under
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.stopping = exporter.stopping
        self.thread = threading.Thread(target=self._loop, name="export-writer", daemon=True)
        self.thread.start()

    def submit(self, plans: list[SourcePlan], entries: list[tuple[int, int, str]], name: str | None = None) -> None:
        """Hand over the next output shard (named ``00000``, ``00001``, ... in hand-over order unless
        ``name`` says otherwise)."""
        if self.error is not None:
            raise self.error
        if name is None:  # handed over while planning: the final names, unless there turn out to be more
            name = f"{self.streamed:0{self.width}d}"
            self.streamed += 1
        self.handed.add(name)
        self.jobs.put((plans, name, entries))

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None and self.stopping.is_set():
                self.error = Stopped("the export is stopping")
            if self.error is not None:
                continue
            plans, name, entries = job
            try:
                self._one(plans, name, entries)
            except BaseException as exc:  # noqa: BLE001 - raised in the main thread by close() or submit()
                self.error = exc

    def _one(self, plans: list[SourcePlan], name: str, entries: list) -> None:
        """Output shard ``name``: kept, moved from the narrower name it was written under this run,
        or written; remembered at once (the journal) unless kept."""
        exporter = self.exporter
        digest = shard_digest(plans, entries)
        if exporter.still_there(name, self.old.get(name), digest):
            exporter.result.unchanged += 1
            self.written[name] = self.old[name]
            return
        exporter.state.forget(name)  # from here until record(), nothing vouches for this name's files
        narrow = self.by_digest.get(digest)
        if narrow is not None and exporter.move_shard(narrow, name):
            entry, self.moved = self.written[narrow], self.moved | {narrow}
            action = f"renamed {narrow} to"
        else:
            entry = exporter.write_shard(plans, name, entries, digest)
            action = "wrote"
        exporter.state.record(name, entry)
        self.written[name] = entry
        self.by_digest[digest] = name
        self.lines.put(f"{action} {exporter.dst.url_of(exporter.path(name + '.tar'), exporter.fs)}: "
                       f"{len(entries)} records")

    def relay_log(self) -> None:
        """The writer's log lines, logged on the calling (main) thread; its error raised there."""
        if self.error is not None:
            raise self.error
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            self.exporter.log(line)

    def close(self) -> dict[str, dict[str, Any]]:
        """Wait for every shard handed over; their state entries by name (raises the writer's error)."""
        self.jobs.put(None)
        while self.thread.is_alive():
            self.thread.join(0.2)
            self.relay_log()
        self.relay_log()
        if self.error is not None:
            raise self.error
        return self.written

    def stop(self) -> None:
        """On the way out (an error, an interrupt): no new shard is started, and the one being written
        stops within a few records (its temp file removed: never a partial shard)."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join()



# -- the export as a whole -----------------------------------------------------------------------


class Exporter:
    """One export run: ``run()`` does it all (see the module's docstring)."""

    def __init__(self, src: str, dst: str, options: ExportOptions, *, storage_options: dict | None = None,
                 dst_storage_options: dict | None = None, log: Callable[[str], None] | None = None):
        if options.records_per_shard < 1:
            raise ExportError(f"records per shard must be at least 1, not {options.records_per_shard}", "bad_option")
        self.options = options
        self.src = Dataset(src, storage_options)
        if dst_storage_options is None:
            dst_storage_options = dict(storage_options or {}) if url_protocol(src) == url_protocol(dst) else {}
        self.dst = Dataset(dst, dst_storage_options)
        why = overlap_problem(self.src, self.dst)
        if why:
            raise ExportError(why, "output_inside_input")
        self.fs, self.root = self.dst.fs, self.dst.root
        self.state = ExportState(self.fs, self.root)
        self.log = log or (lambda _msg: None)
        self.result = ExportResult(self.dst.url)
        self._decoder = None
        self.work: Workspace | None = None
        self.sources: list[Source] = []
        self._sources_by_key: dict[str, Source] = {}
        self.stopping = threading.Event()  # set on the way out: the shard being written stops
        # A second thread for what can overlap the copies (which wait on the kernel with the GIL
        # released): the plans' cache files and the manifest's bytes.
        self._pool: ThreadPoolExecutor | None = None
        self._cache_writes: list[Future] = []

    # paths in DST
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run(self) -> ExportResult:
        start = time.perf_counter()
        self.lease = WriterLease(self.fs, self.root, self.dst.url, on_lost=self.stopping.set)
        try:
            self.lease.acquire()
        except ExportBusy as exc:
            raise ExportError(str(exc), "output_busy") from None
        except OSError as exc:  # the output folder cannot be locked (read-only, not a folder)
            if isinstance(exc, StorageError):
                raise
            raise ExportError(f"{self.dst.url}: cannot write the output: {exc.strerror or exc}",
                              "output_unwritable") from exc
        try:
            try:
                self._run()
            finally:
                self.lease.release()
        except ExportBusy as exc:
            raise ExportError(str(exc), "output_busy") from None
        except Stopped:
            if self.lease.lost is not None:  # the lease was lost: say so; else an interrupt stopped it
                raise ExportError(self.lease.lost, "output_busy") from None
            raise
        self.result.seconds = time.perf_counter() - start
        return self.result

    def _run(self) -> None:
        writer = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="export")
        try:
            self.work = Workspace(self._work_root)
            self.state.load()
            writer = ShardWriter(self, self.state.data)
            plans, assigner = self._plan_all(writer)
            self._close_decoder()  # its worker processes are not needed while the last shards are written
            self._finish(plans, assigner, writer, self.state.data)
            for done in self._cache_writes:  # a cache file that could not be written fails the run, as before
                done.result()
        finally:
            try:
                if writer is not None:
                    writer.stop()
            finally:
                self.state.close()
                self._close()

    def _work_root(self) -> str:
        if self.dst.local:
            return os.path.join(self.root, STATE_DIR, "work")
        return tempfile.mkdtemp(prefix="curator-export-")

    def _close_decoder(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _close(self) -> None:
        self._close_decoder()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.work is not None and self.work.created:
            shutil.rmtree(self.work.root, ignore_errors=True)

    def decoder(self):
        if self._decoder is None:
            from curator_assets.steps.decode.shard import DecodeOptions, ShardDecoder

            self._decoder = ShardDecoder(DecodeOptions(max_pixels=self.options.max_pixels))
        return self._decoder

    # -- planning ----------------------------------------------------------------------------------

    def _plan_all(self, writer: ShardWriter) -> tuple[list[SourcePlan], Assigner]:
        """Every source planned in input order; each output shard handed to the writer as soon as
        its records are known (without a shuffle), so shards are written while later sources are
        planned."""
        sources, errors = list_sources(self.src)
        self.result.errors.extend(errors)
        self.sources = sources
        self._sources_by_key = {s.key: s for s in sources}
        assigner = Assigner(self.options)
        plans: list[SourcePlan] = []
        for source in sources:
            plan = self._plan(source)
            if plan.error:
                self.result.errors.append(plan.error)
                self.log(f"error: {plan.error}")
            if plan.notes and plan.records:
                self.result.notes.append(f"{plan.url}: damaged, its readable records go out: {plan.notes[0]}")
            plans.append(plan)
            assigner.add(len(plans) - 1, plan)
            for entries in assigner.full_shards():
                writer.submit(plans, entries)
            writer.relay_log()
            self.lease.check()
        self.result.sources = len(sources)
        self.result.records = sum(len(p.records) for p in plans)
        return plans, assigner

    def _cache_path(self, source: Source) -> str:
        """Where a source's plan is cached: named by what it depends on besides the tar (whose
        fingerprint the plan holds): the pixel limit, and the stored report and manifest it read."""
        token = repr((source.key, self.options.max_pixels, *verdict_fingerprints(self.src, source.key)))
        name = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.path(STATE_DIR, "sources", name + ".json")

    def _plan(self, source: Source) -> SourcePlan:
        cache = self._cache_path(source)
        raw = read_or_none(self.fs, cache)
        if raw is not None:
            try:
                plan = SourcePlan.from_bytes(raw)
            except (ValueError, KeyError, TypeError, IndexError):
                plan = None
            if plan is not None and plan.key == source.key and plan.fingerprint == source.fingerprint \
                    and plan.url == source.url:
                return plan
        self.log(f"reading {source.url}")
        try:
            plan = plan_source(self.src, source, self.work, self.decoder, self.options.max_pixels)
        except Exception as exc:  # noqa: BLE001 - one shard's failure is that shard's error line
            from curator_assets.formats.tar_members import TarError
            from curator_assets.steps.decode.shard import DecodeError

            if not isinstance(exc, (StorageError, OSError, DecodeError, TarError, ValueError)):
                raise
            text = str(exc) if source.url in str(exc) else f"{source.url}: {exc}"
            return SourcePlan(source.key, source.url, source.fingerprint, None, [], [], text)
        if plan.error is None:  # an error is not cached: the next run tries the shard again
            self._cache_writes.append(self._pool.submit(_write_plan, self.fs, cache, plan))
        return plan

    # -- writing -----------------------------------------------------------------------------------

    def _finish(self, plans: list[SourcePlan], assigner: Assigner, writer: ShardWriter, state: dict) -> None:
        """The last shards (all of them with a shuffle), then the stale ones removed and the manifest."""
        planned = assigner.finish()
        groups = chunks(planned.kept, self.options.records_per_shard)
        names = shard_names(len(groups))
        for name, entries in zip(names, groups, strict=True):
            if name not in writer.handed:  # not handed out while planning (or under another width)
                writer.submit(plans, entries, name)
        out_shard = {(p, r): name for name, entries in zip(names, groups, strict=True) for p, r, _k in entries}
        # The manifest is built on a second thread while the shards are written (their copies and
        # fsyncs wait on the kernel with the GIL released); it is written after them, as before.
        manifest = self._pool.submit(_manifest_build, plans, planned, out_shard, state.get("manifest"))
        written = writer.close()
        self.lease.check()  # still this export's output: stale shards may go
        new_shards = {name: written[name] for name in names}
        self._remove_stale(set(state.get("shards", {})) | set(written), new_shards, state, writer.moved)
        self._write_manifest(*manifest.result(), state)
        self._summarize(plans, planned)

    def still_there(self, name: str, entry: dict | None, digest: str) -> bool:
        """Whether shard ``name`` holds what ``entry`` vouches for (these records, these sizes)."""
        if not entry or entry.get("digest") != digest:
            return False
        try:
            tar = self.fs.info(self.path(name + ".tar"))
            idx = self.fs.info(self.path(name + ".idx"))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return int(tar.get("size") or 0) == entry.get("size") and int(idx.get("size") or 0) == entry.get("idx_size")

    def move_shard(self, old: str, new: str) -> bool:
        """Shard ``old``, written this run, renamed to ``new`` (the names grew wider: a shard's bytes
        do not depend on its name). False when it could not be (then it is written again)."""
        self._remove(new + ".idx")  # never a tar beside another tar's index
        try:
            self.fs.mv(self.path(old + ".tar"), self.path(new + ".tar"))
            self.fs.mv(self.path(old + ".idx"), self.path(new + ".idx"))
        except (FileNotFoundError, OSError):
            return False
        if self.dst.local:
            sync_folder(self.path())
        return True

    def write_shard(self, plans: list[SourcePlan], name: str, entries: list, digest: str) -> dict[str, Any]:
        """Shard ``name`` written from its records' sources (on the writer's thread); its state entry."""
        files = SourceFiles(lambda p: self._open_source(plans[p]))
        try:
            with atomic_file(self.fs, self.path(name + ".tar")) as out:
                size, lines = write_tar(out, plans, entries, files, self.stopping)
                idx = format_lines(lines)
                # An earlier run's index goes before the new tar is renamed in: a reader may find a
                # tar without its index for a moment, never a tar with another tar's index.
                self._remove(name + ".idx")
        except SourceChanged as exc:
            raise ExportError(f"{self.path(name + '.tar')}: an input {exc}; it changed while it was being exported: "
                              "run the export again", "source_changed") from exc
        finally:
            files.close()
        write_atomic(self.fs, self.path(name + ".idx"), idx)
        if self.dst.local:  # the renames are on disk before the journal vouches for them
            sync_folder(self.path())
        self.result.written.append(name)
        self.result.bytes_written += size + len(idx)
        return {"digest": digest, "size": size, "idx_size": len(idx), "records": len(entries)}

    def _open_source(self, plan: SourcePlan):
        """The file a plan's records are copied from, once its source is proved unchanged since the
        plan was made (its fingerprint: etag/generation, or mtime and size)."""
        source = self._sources_by_key[plan.key]
        try:
            now = fingerprint_of(self.src.fs.info(source.path))
        except FileNotFoundError:
            now = None
        if now != plan.fingerprint:
            how = "removed" if now is None else "changed"
            raise ExportError(f"{source.url}: {how} while it was being exported; run the export again",
                              "source_changed")
        if plan.compression is not None:
            self.work.spool(self.src, source)
            return open(self.work.spool_path(source.key), "rb")
        return self.src.open(source.path)

    def _remove(self, name: str) -> None:
        try:
            self.fs.rm(self.path(name))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def _remove_stale(self, old: set[str], new: dict, state: dict, moved: set[str]) -> None:
        for name in sorted(old - set(new)):
            self._remove(name + ".idx")
            self._remove(name + ".tar")
            if name not in moved:
                self.result.removed.append(name)
        state["shards"] = new
        self.state.save()

    def _write_manifest(self, digest: str, rows: bytes, data: bytes | None, state: dict) -> None:
        """Written when its rows changed (compared by digest: a rerun builds no Parquet) or it is gone."""
        path = self.path(MANIFEST_NAME)
        self.lease.check()
        if state.get("manifest") != digest or not self.fs.exists(path):
            if data is None:
                from curator_assets.steps.export_manifest import manifest_bytes

                data = manifest_bytes(rows)
            write_atomic(self.fs, path, data)
            self.result.manifest_written = True
            self.result.bytes_written += len(data)
        state["manifest"] = digest
        self.state.save()

    def _summarize(self, plans: list[SourcePlan], planned: Planned) -> None:
        self.result.shards = -(-len(planned.kept) // self.options.records_per_shard)
        self.result.kept = len(planned.kept)
        counts: Counter[str] = Counter()
        for plan_reasons in planned.reasons:
            counts.update(_reason_code(r) for r in plan_reasons if r is not None)
        self.result.left_out = dict(sorted(counts.items()))
        self.result.renamed = sum(1 for p, r, key in planned.kept if key != plans[p].records[r].key)


def _write_plan(fs, path: str, plan: SourcePlan) -> None:
    write_atomic(fs, path, plan.to_bytes())


def _manifest_build(plans: list[SourcePlan], planned: Planned, out_shard: dict, stored: str | None
                    ) -> tuple[str, bytes, bytes | None]:
    """(digest of the rows, the rows, their Parquet bytes or None when the stored digest is theirs)."""
    from curator_assets.steps.export_manifest import manifest_bytes, manifest_rows

    rows = manifest_rows(plans, planned, out_shard)
    digest = hashlib.sha256(rows).hexdigest()
    return digest, rows, None if digest == stored else manifest_bytes(rows)


def _reason_code(reason: str) -> str:
    return "duplicate" if reason.startswith("duplicate_of:") else reason


def export_dataset(src: str, dst: str, options: ExportOptions | None = None, **kwargs: Any) -> ExportResult:
    """Export ``src`` to ``dst`` (see :class:`Exporter`); raises :class:`ExportError` when it cannot start."""
    return Exporter(src, dst, options or ExportOptions(), **kwargs).run()

