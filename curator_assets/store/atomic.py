"""Atomic writes (a temp file renamed into place) and the sweep of temp files that dead writers left."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from curator_assets.store.errors import STORE_DENIED, STORE_WRITE_FAILED, StorageError
from curator_assets.store.fs import is_local

# Temp files of atomic writes: a short hidden name of their own (a 255-byte target name must fit),
# ".curator-tmp-<host>-<pid>-<random>": the next write to the folder removes those of dead writers.
TEMP_PREFIX = ".curator-tmp-"
STALE_TEMP_S = 15 * 60  # older than this, a temp file is stale whoever wrote it (a write takes seconds)
_TEMP_RE = re.compile(r"^\.curator-tmp-([0-9a-f]{8})-(\d+)-[0-9a-f]+$")
_OLD_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")  # the name earlier versions used
_swept: dict[str, float] = {}  # folder -> when this process last swept it
SWEEP_EVERY_S = 60.0


def _host_tag() -> str:
    import zlib

    return f"{zlib.crc32(os.uname().nodename.encode()):08x}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def sweep_stale_temps(folder: str, now: float | None = None) -> list[str]:
    """Remove temp files that crashed writers left in ``folder``: ones written on this host by a
    process that is gone, and any older than ``STALE_TEMP_S`` (a writer elsewhere). A live
    writer's temp file is never touched. Returns the names removed."""
    now = time.time() if now is None else now
    host, removed = _host_tag(), []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        old = None if m else _OLD_TEMP_RE.match(entry.name)
        if not (m or old):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int((m or old).group(2 if m else 1))
        dead_here = (old is not None or m.group(1) == host) and pid != os.getpid() and not _pid_alive(pid)
        if dead_here or age > STALE_TEMP_S:
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        now = time.monotonic()
        if now - _swept.get(folder, -SWEEP_EVERY_S) >= SWEEP_EVERY_S:  # a big folder is not rescanned per write
            _swept[folder] = now
            sweep_stale_temps(folder)
        # O_EXCL on a unique name (tempfile costs start-up time).
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write here: {exc.strerror or exc}", STORE_WRITE_FAILED) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"{path}: cannot write: {exc.strerror or exc}", STORE_WRITE_FAILED) from exc
        raise


def sync_folder(folder: str) -> None:
    """The entries of a local folder (a rename into it) made durable: fsync of the folder itself."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old object or the new one, never half.

    Local: a temp file in the same folder, fsync, then ``os.replace`` (temp files that a killed
    writer left there are removed by the next write to the folder). Object stores: one PUT
    (``pipe_file``), which the stores make visible only once complete.
    """
    if is_local(fs):
        _write_local(path, data)
        return
    try:
        fs.pipe_file(path, data)
    except PermissionError as exc:
        raise StorageError(f"{fs.unstrip_protocol(path)}: permission denied writing", STORE_DENIED) from exc


@contextmanager
def atomic_file(fs, path: str) -> Iterator[IO[bytes]]:
    """A file to stream a large object into; ``path`` shows it only once the block ends without
    an error (readers see the old object or the whole new one, never part of it).

    Local: a temp file in the target's folder (named as :func:`write_atomic`'s, so a killed
    writer's is swept), fsync, then ``os.replace``. Object stores: a local temp file uploaded in one
    ``put_file`` at the end (a multipart upload becomes visible only once complete). On an error
    the temp file is removed and nothing is written.
    """
    import tempfile

    local = is_local(fs)
    folder = (os.path.dirname(path) or ".") if local else None
    try:
        if local:
            os.makedirs(folder, exist_ok=True)
            sweep_stale_temps(folder)
            tmp = os.path.join(folder, f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{os.urandom(4).hex()}")
            f = open(tmp, "xb")
        else:
            f = tempfile.NamedTemporaryFile(prefix=TEMP_PREFIX, delete=False)
            tmp = f.name
    except OSError as exc:
        raise StorageError(f"{path}: cannot write here: {exc.strerror or exc}", STORE_WRITE_FAILED) from exc
    try:
        with f:
            yield f
            f.flush()
            if local:
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            try:
                fs.put_file(tmp, path)
            except PermissionError as exc:
                raise StorageError(f"{fs.unstrip_protocol(path)}: permission denied writing", STORE_DENIED) from exc
    except BaseException as exc:
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"{path}: cannot write: {exc.strerror or exc}", STORE_WRITE_FAILED) from exc
        raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
