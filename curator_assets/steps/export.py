"""Export the curated dataset: the records that passed, resharded, with indexes and one manifest.

``export_dataset(SRC, DST)`` writes ``DST/00000.tar`` + ``DST/00000.idx``, ... (at most N records
each, in input order or a seeded shuffle) and ``DST/manifest.parquet`` (one row per input record:
where it went, or why it was left out). See docs/export.md.

- Kept records are copied member by member, byte for byte, under fixed member metadata (POSIX
  pax/ustar headers, mtime 0, uid/gid 0, mode 0644, no user names): the same input and options
  give the same bytes. Each ``.idx`` is the v1.2 index ``wds2idx`` writes for the tar.
- Each output file is written atomically (:func:`storage.atomic_file`). ``DST/.export/state.json``
  records what each written shard holds (a digest of its records' sources and places); a run
  that is killed and run again writes only the shards the state does not vouch for, and a run
  with nothing changed writes nothing. Each input shard's verdicts are cached beside the state,
  keyed by the shard's fingerprint, so a resumed run does not validate or decode it again.
- Memory holds records' names and offsets, never their bytes (a shuffle permutes those).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import random
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from curator_assets.formats.idx import format_lines
from curator_assets.formats.report import DEFAULT_MAX_PIXELS
from curator_assets.formats.tar_members import BLOCK
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
from curator_assets.store.atomic import atomic_file, write_atomic
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError
from curator_assets.store.fs import url_protocol
from curator_assets.store.keys import fingerprint_of

DEFAULT_RECORDS_PER_SHARD = 10_000
STATE_DIR = ".export"
STATE_NAME = "state.json"
MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = 1
RECORD_SIZE = 20 * BLOCK  # the archive is padded to this, as tarfile and GNU tar pad it
COPY_CHUNK = 1 << 20
_ZEROS = bytes(RECORD_SIZE)


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


def assign(plans: list[SourcePlan], options: ExportOptions) -> Planned:
    """Kept records in input order, duplicates of an earlier image left out, keys made unique;
    then spread in a seeded random order with ``shuffle_seed``."""
    seen_image: dict[str, str] = {}
    used: set[str] = set()
    kept: list[tuple[int, int, str]] = []
    reasons: list[list[str | None]] = []
    out_keys: list[list[str | None]] = []
    for p, plan in enumerate(plans):
        plan_reasons: list[str | None] = []
        plan_keys: list[str | None] = []
        for r, rec in enumerate(plan.records):
            reason = _reason(rec, options)
            if reason is None and rec.sha256 and not options.keep_duplicates:
                first = seen_image.setdefault(rec.sha256, f"{plan.key}/{rec.key}")
                if first != f"{plan.key}/{rec.key}":
                    reason = f"duplicate_of:{first}"
            key = None
            if reason is None:
                key = unique_key(rec.key, plan.key, used)
                kept.append((p, r, key))
            plan_reasons.append(reason)
            plan_keys.append(key)
        reasons.append(plan_reasons)
        out_keys.append(plan_keys)
    if options.shuffle_seed is not None:
        random.Random(options.shuffle_seed).shuffle(kept)
    return Planned(kept, reasons, out_keys)


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
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def chunks(kept: list, per_shard: int) -> list[list]:
    return [kept[i : i + per_shard] for i in range(0, len(kept), per_shard)]


def shard_digest(plans: list[SourcePlan], entries: list[tuple[int, int, str]]) -> str:
    """What an output shard holds, as a digest: each record's source (its fingerprint), members and key."""
    h = hashlib.sha256(f"curator-export {FORMAT_VERSION}\n".encode())
    for p, r, key in entries:  # repr of str and int tuples: stable across runs and versions
        h.update(repr((plans[p].fingerprint, key, plans[p].records[r].members)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# -- writing one output shard --------------------------------------------------------------------


# The fields of a ustar header that are the same for every output member (mode 0644, uid/gid 0,
# mtime 0, no user names, no device), around the name, size and checksum.
_MODE_TO_SIZE = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_AFTER_CHKSUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 155 + 12)  # no device numbers, as tarfile
_USTAR_MAX_SIZE = 8**11 - 1
_FIXED_SUM = sum(_AFTER_CHKSUM) + 8 * ord(" ")  # the checksum field counts as eight spaces


def member_header(name: str, size: int) -> bytes:
    """The header(s) of an output member: fixed metadata, pax records where ustar cannot hold the
    name (what ``tarfile`` writes in its PAX format, byte for byte; a plain ASCII name that fits is
    one ustar header, built here without a TarInfo: this runs once per member)."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else None
    if raw is not None and len(raw) <= 100 and size <= _USTAR_MAX_SIZE and name.isprintable():
        head = raw.ljust(100, b"\0") + _MODE_TO_SIZE + b"%011o\0" % size + _MTIME
        chksum = sum(head) + _FIXED_SUM
        return head + b"%06o\0 " % chksum + _AFTER_CHKSUM
    return _pax_header(name, size)


def _pax_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class SourceFiles:
    """The input files one output shard is copied from: at most ``MAX_OPEN`` open at once (a
    shuffled shard draws from every input; the least recently used is closed). Members read in
    order are sliced out of one reused window buffer (no allocation, no fresh pages per read)."""

    MAX_OPEN = 64
    WINDOW = 4 << 20  # bytes read at once from an input read in order

    def __init__(self, opener: Callable[[int], Any]):
        from collections import OrderedDict

        self.opener = opener
        self.files: OrderedDict[int, tuple[Any, int | None]] = OrderedDict()
        self.ends: dict[int, int] = {}  # input -> where its last read ended
        self.buffer = memoryview(bytearray(self.WINDOW))
        self.owner: int | None = None  # the input whose bytes the buffer holds ...
        self.start = self.length = 0  # ... from this offset, this many
        self.before_read: Callable[[], None] = lambda: None  # called before the buffer is overwritten

    def get(self, p: int) -> tuple[Any, int | None]:
        """(file, its descriptor or None)."""
        entry = self.files.get(p)
        if entry is not None:
            self.files.move_to_end(p)
            return entry
        if len(self.files) >= self.MAX_OPEN:
            old, (f, _fd) = self.files.popitem(last=False)
            self.ends.pop(old, None)
            if self.owner == old:
                self.owner = None
            f.close()
        f = self.opener(p)
        entry = self.files[p] = (f, fileno_of(f))
        return entry

    def small(self, p: int, fd: int, offset: int, size: int) -> memoryview:
        """A small member's bytes. Reading on from where the last read of that input ended (records
        in input order), ``WINDOW`` bytes are read into the buffer at once (after ``before_read``:
        the bytes sliced from it before must be written first) and the members are sliced out of
        it; a jump (a shuffle) reads just the member."""
        if p == self.owner and self.start <= offset and offset + size <= self.start + self.length:
            return self.buffer[offset - self.start : offset - self.start + size]
        end = self.ends.get(p)
        if end is not None and end - 4 * BLOCK <= offset <= end + TarSink.SMALL and size <= self.WINDOW:
            self.before_read()
            self.owner = None
            n = os.preadv(fd, [self.buffer], offset)
            if n < size:
                raise ExportError(f"input ended {size - n} bytes early at byte {offset + n}", "source_changed")
            self.owner, self.start, self.length = p, offset, n
            self.ends[p] = offset + n
            return self.buffer[:size]
        data = os.pread(fd, size, offset)
        if len(data) < size:
            raise ExportError(f"input ended {size - len(data)} bytes early at byte {offset + len(data)}",
                              "source_changed")
        self.ends[p] = offset + size
        return memoryview(data)

    def close(self) -> None:
        for f, _fd in self.files.values():
            f.close()
        self.files.clear()
        self.ends.clear()
        self.owner = None


class TarSink:
    """Writes an output tar through its file descriptor: headers, padding and small members
    (:meth:`SourceFiles.small`) gathered and written together by ``writev``; large members copied by
    the kernel from a local input (``copy_file_range``: their bytes never enter this process);
    anything else read and written in chunks."""

    SMALL = 256 << 10  # members up to this size are read, and written with the headers around them
    BATCH = 4 << 20  # gathered bytes written at once

    def __init__(self, out):
        out.flush()
        self.fd = out.fileno()
        self.pos = 0
        self.pending: list[bytes] = []  # bytes gathered, not yet written
        self.pending_size = 0
        self.kernel_copy = hasattr(os, "copy_file_range")

    def put(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        self.pos += len(data)
        if self.pending_size >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:512], self.pending[512:]
            _write_all(self.fd, batch)
        self.pending_size = 0

    def copy(self, source: tuple[Any, int | None], offset: int, size: int) -> None:
        """A large member (or one from a file without a descriptor): written straight through."""
        f, fd = source
        self.flush()
        done = self._kernel_copy(fd, offset, size) if fd is not None and self.kernel_copy else 0
        if done < size:
            self._read_copy(f, offset + done, size - done)
        self.pos += size

    def _kernel_copy(self, fd: int, offset: int, size: int) -> int:
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fd, self.fd, size - done, offset + done)
                if n == 0:
                    raise ExportError(f"input ended {size - done} bytes early at byte {offset + done}",
                                      "source_changed")
                done += n
        except OSError as exc:  # another file system, or a kernel without it: copy by reading
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            self.kernel_copy = False
        return done

    def _read_copy(self, f, offset: int, size: int) -> None:
        f.seek(offset)
        left = size
        while left:
            data = f.read(min(left, COPY_CHUNK))
            if not data:
                raise ExportError(f"input ended {left} bytes early at byte {offset + size - left}", "source_changed")
            _write_all(self.fd, [data])
            left -= len(data)


def fileno_of(f) -> int | None:
    """The descriptor of a real file (for ``pread`` and kernel copies), None for anything else."""
    try:
        fd = f.fileno()
        os.fstat(fd)
        return fd
    except (AttributeError, OSError, ValueError):
        return None


def _write_all(fd: int, buffers: list) -> None:
    """Write every buffer, in order (``writev`` may write fewer bytes than asked)."""
    i, n_buffers = 0, len(buffers)
    while i < n_buffers:
        n = os.writev(fd, buffers[i:] if i else buffers)
        while i < n_buffers and n >= len(buffers[i]):
            n -= len(buffers[i])
            i += 1
        if n:
            buffers[i] = buffers[i][n:]


def write_tar(out, plans: list[SourcePlan], entries: list[tuple[int, int, str]], files: SourceFiles
              ) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """Stream the records into ``out``: its size, and the index lines (ext, data offset, size,
    name) of each record."""
    sink = TarSink(out)
    files.before_read = sink.flush
    lines = []
    small = sink.SMALL
    for p, r, key in entries:
        rec = plans[p].records[r]
        f, fd = source = files.get(p)
        cut = len(rec.key)
        comps = []
        for name, offset, size in rec.members:
            out_name = key + name[cut:]
            header = member_header(out_name, size)
            data_at = sink.pos + len(header)
            comps.append((name[cut + 1 :], data_at, size, out_name))
            if fd is not None and size <= small:  # the common case, inline: header, data, padding at once
                data = files.small(p, fd, offset, size)  # first: it may flush what is pending
                sink.pending += (header, data, _ZEROS[: -size % BLOCK])
                sink.pos = data_at + size + (-size % BLOCK)
                sink.pending_size += len(header) + size
                if sink.pending_size >= sink.BATCH:
                    sink.flush()
                continue
            sink.put(header)
            sink.copy(source, offset, size)
            sink.put(_ZEROS[: -size % BLOCK])
        lines.append(comps)
    end = 2 * BLOCK
    sink.put(_ZEROS[: end + -(sink.pos + end) % RECORD_SIZE])
    sink.flush()
    return sink.pos, lines


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
        self.log = log or (lambda _msg: None)
        self.result = ExportResult(self.dst.url)
        self._decoder = None
        self.work: Workspace | None = None
        self.sources: list[Source] = []
        # A second thread for what can overlap the copies (which wait on the kernel with the GIL
        # released): the plans' cache files and the manifest's bytes.
        self._pool: ThreadPoolExecutor | None = None
        self._cache_writes: list[Future] = []

    # paths in DST
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def run(self) -> ExportResult:
        start = time.perf_counter()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="export")
        try:
            self.work = Workspace(self._work_root)
            plans = self._plans()
            self._close_decoder()  # its worker processes are not needed while the shards are written
            self._write(plans)
            for done in self._cache_writes:  # a cache file that could not be written fails the run, as before
                done.result()
        finally:
            self._close()
        self.result.seconds = time.perf_counter() - start
        return self.result

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

    def _plans(self) -> list[SourcePlan]:
        sources, errors = list_sources(self.src)
        self.result.errors.extend(errors)
        plans = []
        for source in sources:
            plan = self._plan(source)
            if plan.error:
                self.result.errors.append(plan.error)
                self.log(f"error: {plan.error}")
            if plan.notes and plan.records:
                self.result.notes.append(f"{plan.url}: damaged, its readable records go out: {plan.notes[0]}")
            plans.append(plan)
        self.sources = sources
        self.result.sources = len(sources)
        self.result.records = sum(len(p.records) for p in plans)
        return plans

    def _cache_path(self, source: Source) -> str:
        """Where a source's plan is cached: named by what it depends on besides the tar (whose
        fingerprint the plan holds): the pixel limit, and the stored report and manifest it read."""
        token = repr((source.key, self.options.max_pixels, *verdict_fingerprints(self.src, source.key)))
        name = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.path(STATE_DIR, "sources", name + ".json")

    def _plan(self, source: Source) -> SourcePlan:
        cache = self._cache_path(source)
        raw = self._read(cache)
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

    def _write(self, plans: list[SourcePlan]) -> None:
        planned = assign(plans, self.options)
        groups = chunks(planned.kept, self.options.records_per_shard)
        names = shard_names(len(groups))
        state = self._load_state()
        old = state.get("shards", {})
        out_shard = {(p, r): name for name, entries in zip(names, groups, strict=True) for p, r, _k in entries}
        # The manifest is built on a second thread while the shards are written (their copies and
        # fsyncs wait on the kernel with the GIL released); it is written after them, as before.
        manifest = self._pool.submit(_manifest_build, plans, planned, out_shard, state.get("manifest"))
        self._write_shards(plans, names, groups, state, old)
        self._write_manifest(*manifest.result(), state)
        self._summarize(plans, planned)

    def _write_shards(self, plans: list[SourcePlan], names: list[str], groups: list[list], state: dict,
                      old: dict) -> None:
        new_shards: dict[str, dict[str, Any]] = {}
        for name, entries in zip(names, groups, strict=True):
            digest = shard_digest(plans, entries)
            if self._still_there(name, old.get(name), digest):
                new_shards[name] = old[name]
                self.result.unchanged += 1
                continue
            new_shards[name] = self._write_shard(plans, name, entries, digest)
            state["shards"] = {**old, **new_shards}
            self._save_state(state)
        self._remove_stale(old, new_shards, state)
        state["shards"] = new_shards

    def _load_state(self) -> dict[str, Any]:
        raw = self._read(self.path(STATE_DIR, STATE_NAME))
        try:
            state = json.loads(raw) if raw else {}
        except ValueError:
            state = {}
        if state.get("version") != FORMAT_VERSION:
            state = {"version": FORMAT_VERSION, "shards": {}}
        self._saved_state = json.dumps(state, sort_keys=True)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        text = json.dumps(state, sort_keys=True)
        if text != self._saved_state:
            write_atomic(self.fs, self.path(STATE_DIR, STATE_NAME), text.encode())
            self._saved_state = text

    def _still_there(self, name: str, entry: dict | None, digest: str) -> bool:
        if not entry or entry.get("digest") != digest:
            return False
        try:
            tar = self.fs.info(self.path(name + ".tar"))
            idx = self.fs.info(self.path(name + ".idx"))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return int(tar.get("size") or 0) == entry.get("size") and int(idx.get("size") or 0) == entry.get("idx_size")

    def _write_shard(self, plans: list[SourcePlan], name: str, entries: list, digest: str) -> dict[str, Any]:
        files = SourceFiles(lambda p: self._open_source(plans[p]))
        try:
            with atomic_file(self.fs, self.path(name + ".tar")) as out:
                size, lines = write_tar(out, plans, entries, files)
                idx = format_lines(lines)
                # An earlier run's index goes before the new tar is renamed in: a reader may find a
                # tar without its index for a moment, never a tar with another tar's index.
                self._remove(name + ".idx")
        finally:
            files.close()
        write_atomic(self.fs, self.path(name + ".idx"), idx)
        self.result.written.append(name)
        self.result.bytes_written += size + len(idx)
        self.log(f"wrote {self.dst.url_of(self.path(name + '.tar'), self.fs)}: {len(entries)} records")
        return {"digest": digest, "size": size, "idx_size": len(idx), "records": len(entries)}

    def _open_source(self, plan: SourcePlan):
        """The file a plan's records are copied from, once its source is proved unchanged since the
        plan was made (its fingerprint: etag/generation, or mtime and size)."""
        source = next(s for s in self.sources if s.key == plan.key)
        if fingerprint_of(self.src.fs.info(source.path)) != plan.fingerprint:
            raise ExportError(f"{source.url}: changed while it was being exported; run the export again",
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

    def _remove_stale(self, old: dict, new: dict, state: dict) -> None:
        for name in sorted(set(old) - set(new)):
            self._remove(name + ".idx")
            self._remove(name + ".tar")
            self.result.removed.append(name)
        if self.result.removed:
            state["shards"] = new
            self._save_state(state)

    def _write_manifest(self, digest: str, rows: bytes, data: bytes | None, state: dict) -> None:
        """Written when its rows changed (compared by digest: a rerun builds no Parquet) or it is gone."""
        path = self.path(MANIFEST_NAME)
        if state.get("manifest") != digest or not self.fs.exists(path):
            if data is None:
                from curator_assets.steps.export_manifest import manifest_bytes

                data = manifest_bytes(rows)
            write_atomic(self.fs, path, data)
            self.result.manifest_written = True
            self.result.bytes_written += len(data)
        state["manifest"] = digest
        self._save_state(state)

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

