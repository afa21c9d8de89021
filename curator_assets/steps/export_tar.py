"""Writing one output tar of an export: the input files its records come from, and the sink its
bytes go through (see :mod:`curator_assets.steps.export`).

Members are copied byte for byte under fixed metadata (:func:`formats.tar_headers.member_header`);
the index lines of each record are collected as they are written.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from curator_assets.formats.tar_headers import BLOCK, member_header
from curator_assets.steps.export_sources import SourcePlan

RECORD_SIZE = 20 * BLOCK  # the archive is padded to this, as tarfile and GNU tar pad it
COPY_CHUNK = 1 << 20
_ZEROS = bytes(RECORD_SIZE)


class SourceChanged(RuntimeError):
    """An input that ended before a member it was planned to hold (it changed after planning)."""


def _ended_early(missing: int, at: int) -> SourceChanged:
    return SourceChanged(f"input ended {missing} bytes early at byte {at}")


class Stopped(RuntimeError):
    """The export is stopping (an error elsewhere, an interrupt): the shard being written is dropped."""


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
                raise _ended_early(size - n, offset + n)
            self.owner, self.start, self.length = p, offset, n
            self.ends[p] = offset + n
            return self.buffer[:size]
        data = os.pread(fd, size, offset)
        if len(data) < size:
            raise _ended_early(size - len(data), offset + len(data))
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
    anything else read and written in chunks.

    Every ``WRITEBACK`` bytes written, the kernel is asked to start writing them to disk
    (``posix_fadvise(DONTNEED)`` starts the writeback of dirty pages without waiting for it): the
    disk then works while the next bytes are gathered, and the ``fsync`` that makes the shard
    durable waits for the last stretch only, not for the whole shard (measured: see
    benchmarks/RESULTS.md, export)."""

    SMALL = 256 << 10  # members up to this size are read, and written with the headers around them
    BATCH = 4 << 20  # gathered bytes written at once
    WRITEBACK = 32 << 20  # written bytes handed to the disk at once (0: leave it to the kernel)

    def __init__(self, out):
        out.flush()
        self.fd = out.fileno()
        self.pos = 0
        self.pending: list[bytes] = []  # bytes gathered, not yet written
        self.pending_size = 0
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.written_back = 0  # bytes before this offset were handed to the disk

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
        self._write_back()

    def _write_back(self) -> None:
        """Start the disk writing what was written since the last call, every ``WRITEBACK`` bytes."""
        if self.WRITEBACK and self.pos - self.written_back >= self.WRITEBACK:
            try:
                os.posix_fadvise(self.fd, self.written_back, self.pos - self.written_back, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):  # not on this system: the fsync does it all, as before
                self.WRITEBACK = 0
            self.written_back = self.pos

    def copy(self, source: tuple[Any, int | None], offset: int, size: int) -> None:
        """A large member (or one from a file without a descriptor): written straight through."""
        f, fd = source
        self.flush()
        done = self._kernel_copy(fd, offset, size) if fd is not None and self.kernel_copy else 0
        if done < size:
            self._read_copy(f, offset + done, size - done)
        self.pos += size
        self._write_back()

    def _kernel_copy(self, fd: int, offset: int, size: int) -> int:
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fd, self.fd, size - done, offset + done)
                if n == 0:
                    raise _ended_early(size - done, offset + done)
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
                raise _ended_early(left, offset + size - left)
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


def write_tar(out, plans: list[SourcePlan], entries: list[tuple[int, int, str]], files: SourceFiles,
              stop: threading.Event | None = None) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """Stream the records into ``out``: its size, and the index lines (ext, data offset, size,
    name) of each record. ``stop`` set: :class:`Stopped` is raised within a few records."""
    sink = TarSink(out)
    files.before_read = sink.flush
    lines = []
    small = sink.SMALL
    for n, (p, r, key) in enumerate(entries):
        if not n & 15 and stop is not None and stop.is_set():
            raise Stopped("the export is stopping")
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
