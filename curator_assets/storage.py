"""Shard storage over fsspec: local disk, ``file://``, ``s3://``, ``gs://``, ``az://``/``abfs://``.

A dataset is a folder of ``*.tar`` shards (any case, any depth). Each shard gets a stable
partition key: its path relative to the dataset root without the ``.tar`` suffix
(``00000``, ``part-a/00000``). Indexes go beside the tar (``00000.idx``) or under a separate
index location for read-only datasets; reports and manifests go under an output location.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

# Characters and substrings that break Dagster partition selection or the UI.
_UNSAFE_KEY_SUBSTRINGS = ("...", ",", "|", "[", "]")
OUTPUT_DIRNAME = "_curator"
LOCAL_PROTOCOLS = ("file", "local")


class StorageError(OSError):
    """A dataset location that cannot be listed, read or written; the message names it."""


class UnsafeKeyError(ValueError):
    """A shard path that cannot be a Dagster partition key."""


# Names of compressed tar archives -> the compression. They are listed so that they are
# reported, never silently skipped: a shard must be a plain tar (offsets into it are the index).
COMPRESSED_SUFFIXES = {
    ".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tzst": "zstd",
    ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tbz": "bzip2", ".tar.xz": "xz", ".txz": "xz", ".tar.lz4": "lz4",
}


def compressed_kind(path: str) -> str | None:
    """The compression a file name says (``00000.tar.gz`` -> ``gzip``), or None."""
    lower = path.lower()
    for suffix, kind in COMPRESSED_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def compressed_reason(kind: str) -> str:
    return (f"a {kind}-compressed shard, not decoded or indexed: shards must be plain .tar files (an index "
            f"holds byte offsets into the uncompressed tar); decompress it first")


def partition_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a safe partition key, or None when it can."""
    if not key:
        return "empty key"
    for bad in _UNSAFE_KEY_SUBSTRINGS:
        if bad in key:
            return f"contains {bad!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "contains a control character"
    if key != key.strip():
        return "starts or ends with whitespace"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "has an empty, '.' or '..' path segment"
    return None


def key_for_relpath(relpath: str) -> str:
    """Partition key for a shard path relative to the dataset root (raises UnsafeKeyError)."""
    if relpath.lower().endswith(".tar"):
        relpath = relpath[:-4]
    problem = partition_key_problem(relpath)
    if problem:
        raise UnsafeKeyError(f"shard {relpath + '.tar'!r} cannot be a partition key: {problem}; rename it")
    return relpath


def fingerprint_of(info: dict[str, Any]) -> str:
    """A change-detection token for an object: its etag/generation where the store has one,
    else modification time and size."""
    size = info.get("size")
    for name in ("ETag", "etag", "generation", "md5Hash", "content_md5", "crc32c"):
        value = info.get(name)
        if value:
            if isinstance(value, (bytes, bytearray)):
                value = value.hex()
            return f"{name.lower()}:{str(value).strip(chr(34))}:{size}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"mtime:{mtime}:{size}"


def modified_at(info: dict[str, Any]) -> float | None:
    """An object's modification time in seconds, whichever way the store reports it (a number,
    a datetime, or an ISO 8601 string such as GCS's ``updated``); None when it does not."""
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        from datetime import datetime

        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class ShardInfo(NamedTuple):
    key: str
    path: str  # the fsspec path of the tar (no protocol)
    url: str  # the same, protocol-qualified, for logs and manifests
    size: int
    fingerprint: str
    info: dict[str, Any] | None = None  # the store's own details (times), where already fetched


class Listing:
    __slots__ = ("shards", "rejected")

    def __init__(self, shards: list[ShardInfo] | None = None, rejected: list[tuple[str, str]] | None = None):
        self.shards = shards if shards is not None else []
        self.rejected = rejected if rejected is not None else []  # (path, why)


def url_protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


class LocalFS:
    """The few local-disk calls that indexing needs, answered with ``os`` directly.

    Importing fsspec costs ~45 ms, most of the start-up of a ``curator-assets index`` run over a
    local folder (measured in benchmarks/bench_index.py). Everything else is delegated to
    fsspec's LocalFileSystem on first use, and the info dicts match fsspec's, so fingerprints
    are the same either way.
    """

    protocol = ("file", "local")

    def __init__(self) -> None:
        self._fsspec = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._fsspec is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fsspec = LocalFileSystem()
        return getattr(self._fsspec, name)

    @staticmethod
    def _info(path: str, st: os.stat_result) -> dict[str, Any]:
        import stat as stat_mod

        kind = "directory" if stat_mod.S_ISDIR(st.st_mode) else "file" if stat_mod.S_ISREG(st.st_mode) else "other"
        # "created" is the ctime, as fsspec reports it: index reuse checks it (a rewrite can restore the mtime).
        return {"name": path, "size": st.st_size, "type": kind, "mtime": st.st_mtime, "created": st.st_ctime,
                "ino": st.st_ino}

    def info(self, path: str) -> dict[str, Any]:
        return self._info(path, os.stat(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def ls(self, path: str, detail: bool = False) -> list:
        names = sorted(os.path.join(path, n) for n in os.listdir(path))
        return [self.info(n) for n in names] if detail else names

    def find(self, path: str, detail: bool = False, withdirs: bool = False) -> Any:
        out: dict[str, dict[str, Any]] = {}
        # Symlinked folders are followed (datasets assembled from links to other disks), except
        # links to folders inside the dataset, listed under their own path anyway; each real
        # folder is listed once, so a link back up the tree cannot loop.
        root = os.path.realpath(path)
        listed: set[str] = set()
        for folder, dirs, files in os.walk(path, followlinks=True):
            real = os.path.realpath(folder)
            if real in listed or (folder != path and os.path.islink(folder) and real.startswith(root + os.sep)):
                dirs.clear()
                continue
            listed.add(real)
            dirs.sort()
            for n in sorted(files):
                full = os.path.join(folder, n)
                try:
                    out[full] = self._info(full, os.stat(full))
                except FileNotFoundError:
                    if os.path.islink(full):  # dangling: reported by list_shards, not silently dropped
                        out[full] = {"name": full, "size": 0, "type": "link", "islink": True,
                                     "destination": os.readlink(full)}
                    continue  # else removed while listing
        return out if detail else sorted(out)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(path, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        if kwargs or "b" not in mode:
            return self.__getattr__("open")(path, mode, **kwargs)
        return open(path, mode)

    def unstrip_protocol(self, path: str) -> str:
        return "file://" + path


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://"):])
    if "://" not in url and "::" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return None


def _split_url(url: str, storage_options: dict[str, Any]):
    local = _local_path(url)
    if local is not None and not storage_options:
        return LocalFS(), local
    import fsspec.core  # imported lazily: keeps `curator-assets index` start-up lean

    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: cannot open this location: {exc}") from exc


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in LOCAL_PROTOCOLS


def _fresh_info(fs, path: str) -> dict[str, Any]:
    # fsspec shares filesystem instances and answers info() from cached folder listings: without
    # this, a long-lived process (the sensor's daemon) would keep seeing a rewritten object's old etag.
    if not _is_local(fs):
        fs.invalidate_cache(path)
        fs.invalidate_cache(posixpath.dirname(path))  # adlfs drops only the exact path, not its folder
    return fs.info(path)


class Dataset:
    """A folder of shards plus where its indexes and outputs live.

    ``url`` may also name one ``.tar`` file: the dataset is then that shard alone.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        index_url: str | None = None,
        output_url: str | None = None,
    ):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._index_url, self._output_url = index_url, output_url
        self.fs, path = _split_url(url, self.storage_options)
        self.local = _is_local(self.fs)
        path = path.rstrip("/") or "/"
        self.single: str | None = None
        if (path.lower().endswith(".tar") or compressed_kind(path)) and not self._isdir(path):
            self.single = path
            path = posixpath.dirname(path) or "/"
        self.root = path
        if index_url:
            self.index_fs, self.index_root = _split_url(index_url, self._options_for(index_url))
            self.index_root = self.index_root.rstrip("/")
        else:
            self.index_fs, self.index_root = self.fs, None
        if output_url:
            self.output_fs, self.output_root = _split_url(output_url, self._options_for(output_url))
            self.output_root = self.output_root.rstrip("/")
        else:
            self.output_fs = self.index_fs
            base = self.index_root if self.index_root is not None else self.root
            self.output_root = posixpath.join(base, OUTPUT_DIRNAME)
        self._paths: dict[str, str] = {}

    @property
    def all_local(self) -> bool:
        """Shards, indexes and outputs all on local disk."""
        return self.local and _is_local(self.index_fs) and _is_local(self.output_fs)

    def _options_for(self, url: str) -> dict[str, Any]:
        # Credentials belong to the dataset's store; another store gets its own defaults.
        return self.storage_options if url_protocol(url) == url_protocol(self.url) else {}

    # -- naming ------------------------------------------------------------------------------

    def _isdir(self, path: str) -> bool:
        try:
            return self.fs.isdir(path)
        except Exception:  # noqa: BLE001 - any store error means "not a folder we can list"
            return False

    def url_of(self, path: str, fs=None) -> str:
        """A protocol-qualified URL in the scheme the user wrote (adlfs would say abfs:// for az://)."""
        fs = fs or self.fs
        if _is_local(fs):
            return path
        bases = ((self.url, self.fs), (self._index_url, self.index_fs), (self._output_url, self.output_fs))
        for base_url, base_fs in bases:
            if base_url and base_fs is fs and "://" in base_url:
                return f"{url_protocol(base_url)}://{path.lstrip('/')}"
        return fs.unstrip_protocol(path)

    def shard_path(self, key: str) -> str:
        if key in self._paths:
            return self._paths[key]
        path = posixpath.join(self.root, key + ".tar")
        if not self.fs.exists(path):
            # The suffix may be in another case (00000.TAR): look in the folder once.
            folder = posixpath.dirname(path)
            for entry in self._ls(folder):
                if entry.lower() == path.lower():
                    path = entry
                    break
        self._paths[key] = path
        return path

    def index_path(self, key: str) -> str:
        if self.index_root is not None:
            return posixpath.join(self.index_root, key + ".idx")
        shard = self.shard_path(key)
        return shard[:-4] + ".idx"

    def output_path(self, kind: str, key: str, suffix: str) -> str:
        """Where a per-shard artifact lives: ``<output>/<kind>/<key><suffix>``."""
        return posixpath.join(self.output_root, kind, key + suffix)

    def _ls(self, folder: str) -> list[str]:
        try:
            return [e if isinstance(e, str) else e["name"] for e in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    # -- listing -----------------------------------------------------------------------------

    def list_shards(self) -> Listing:
        """Every ``*.tar`` under the root (recursively), sorted by key.

        Paths that cannot be partition keys, and hidden folders, are reported in ``rejected``
        rather than failing the whole listing.
        """
        listing = Listing()
        if self.single is not None:
            entries = {self.single: self._info(self.single)}
        else:
            try:
                if not self.local:
                    self.fs.invalidate_cache()  # list what is there now, not a cached listing
                if not self.fs.exists(self.root):
                    raise StorageError(f"{self.url}: no such dataset folder")
                entries = self.fs.find(self.root, detail=True, withdirs=False)
            except FileNotFoundError as exc:
                raise StorageError(f"{self.url}: no such dataset folder") from exc
            except PermissionError as exc:
                raise StorageError(f"{self.url}: permission denied listing the dataset") from exc
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - stores raise their own types (azure.core's HttpResponseError)
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StorageError(f"{self.url}: cannot list the dataset: {first_line}") from exc
        prefix = self.root.rstrip("/") + "/"
        seen: dict[str, str] = {}
        for path, info in entries.items():
            compressed = None if path.lower().endswith(".tar") else compressed_kind(path)
            if compressed is None and not path.lower().endswith(".tar"):
                continue
            rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
            parts = rel.split("/")
            if any(p.startswith(".") for p in parts[:-1]) or parts[0] == OUTPUT_DIRNAME:
                continue
            if compressed is not None:
                listing.rejected.append((self.url_of(path), compressed_reason(compressed)))
                continue
            if info.get("type", "file") != "file":
                if info.get("type") == "link":
                    target = info.get("destination", "?")
                    listing.rejected.append((self.url_of(path), f"a symbolic link to {target}, which does not exist"))
                continue
            try:
                key = key_for_relpath(rel)
            except UnsafeKeyError as exc:
                listing.rejected.append((self.url_of(path), str(exc)))
                continue
            if key in seen:
                listing.rejected.append(
                    (self.url_of(path), f"shard key {key!r} is also used by {self.url_of(seen[key])}")
                )
                continue
            seen[key] = path
            self._paths[key] = path
            listing.shards.append(
                ShardInfo(key, path, self.url_of(path), int(info.get("size") or 0), fingerprint_of(info))
            )
        listing.shards.sort(key=lambda s: s.key)
        return listing

    def _info(self, path: str) -> dict[str, Any]:
        try:
            return _fresh_info(self.fs, path)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url_of(path)}: no such shard") from exc

    def shard(self, key: str) -> ShardInfo:
        path = self.shard_path(key)
        info = self._info(path)
        return ShardInfo(key, path, self.url_of(path), int(info.get("size") or 0), fingerprint_of(info), info)

    # -- reading -----------------------------------------------------------------------------

    def open_shard(self, key: str, *, block_size: int | None = None) -> IO[bytes]:
        """Open a shard for ranged reads (seek + read) or streaming."""
        return self.open(self.shard_path(key), block_size=block_size)

    def open(self, path: str, *, fs=None, block_size: int | None = None) -> IO[bytes]:
        fs = fs or self.fs
        if _is_local(fs):
            return open(path, "rb")  # a real file descriptor: the tar scanner uses os.pread
        kwargs: dict[str, Any] = {}
        if block_size:
            kwargs["block_size"] = block_size
        return fs.open(path, "rb", **kwargs)

    def read_index_bytes(self, key: str) -> bytes | None:
        """The shard's ``.idx`` bytes, or None when there is none."""
        path = self.index_path(key)
        try:
            return self.index_fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def index_info(self, key: str) -> dict[str, Any] | None:
        try:
            return _fresh_info(self.index_fs, self.index_path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_bytes(self, path: str, *, fs=None) -> bytes:
        return (fs or self.fs).cat_file(path)

    def exists(self, path: str, *, fs=None) -> bool:
        return (fs or self.fs).exists(path)

    # -- writing -----------------------------------------------------------------------------

    def write_index(self, key: str, data: bytes) -> str:
        path = self.index_path(key)
        write_atomic(self.index_fs, path, data)
        return self.url_of(path, self.index_fs)

    def write_output(self, kind: str, key: str, suffix: str, data: bytes) -> str:
        path = self.output_path(kind, key, suffix)
        write_atomic(self.output_fs, path, data)
        return self.url_of(path, self.output_fs)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old object or the new one, never half.

    Local: a temp file in the same folder, fsync, then ``os.replace``. Object stores: one
    PUT (``pipe_file``), which the stores make visible only once complete.
    """
    if _is_local(fs):
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            # A unique hidden name beside the target (os.open with O_EXCL; tempfile costs start-up time).
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise StorageError(f"{path}: cannot write here: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return
    try:
        fs.pipe_file(path, data)
    except PermissionError as exc:
        raise StorageError(f"{fs.unstrip_protocol(path)}: permission denied writing") from exc


@contextmanager
def opened(dataset: Dataset, key: str) -> Iterator[IO[bytes]]:
    f = dataset.open_shard(key)
    try:
        yield f
    finally:
        f.close()
