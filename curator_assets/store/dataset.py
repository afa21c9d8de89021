"""Shard storage over fsspec: local disk, ``file://``, ``s3://``, ``gs://``, ``az://``/``abfs://``.

A dataset is a folder of ``*.tar`` shards (any case, any depth). Each shard gets a stable
partition key: its path relative to the dataset root without the ``.tar`` suffix
(``00000``, ``part-a/00000``). Indexes go beside the tar (``00000.idx``) or under a separate
index location for read-only datasets; reports and manifests go under an output location.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from curator_assets.store.atomic import write_atomic
from curator_assets.store.errors import STORE_DENIED, STORE_NOT_FOUND, StorageError, UnsafeKeyError
from curator_assets.store.fs import GuardedFS, RemoteFile, fresh_info, is_local, split_url, url_protocol
from curator_assets.store.keys import (
    OUTPUT_DIRNAME,
    Listing,
    ShardInfo,
    fingerprint_of,
    key_for_relpath,
    shard_stem,
    shard_suffix,
)


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
        self.fs, path = split_url(url, self.storage_options)
        self.local = is_local(self.fs)
        path = path.rstrip("/") or "/"
        self.single: str | None = None
        if (not self._isdir(path)) if shard_suffix(path) else self._isfile(path):
            self.single = path
            path = posixpath.dirname(path) or "/"
        self.root = path
        if index_url:
            self.index_fs, self.index_root = split_url(index_url, self._options_for(index_url))
            self.index_root = self.index_root.rstrip("/")
        else:
            self.index_fs, self.index_root = self.fs, None
        if output_url:
            self.output_fs, self.output_root = split_url(output_url, self._options_for(output_url))
            self.output_root = self.output_root.rstrip("/")
        else:
            self.output_fs = self.index_fs
            base = self.index_root if self.index_root is not None else self.root
            self.output_root = posixpath.join(base, OUTPUT_DIRNAME)
        self._paths: dict[str, str] = {}
        self._sizes: dict[str, int] = {}

    @property
    def all_local(self) -> bool:
        """Shards, indexes and outputs all on local disk."""
        return self.local and is_local(self.index_fs) and is_local(self.output_fs)

    def _options_for(self, url: str) -> dict[str, Any]:
        # Credentials belong to the dataset's store; another store gets its own defaults.
        return self.storage_options if url_protocol(url) == url_protocol(self.url) else {}

    # -- naming ------------------------------------------------------------------------------

    def _isdir(self, path: str) -> bool:
        try:
            return self.fs.isdir(path)
        except Exception:  # noqa: BLE001 - any store error means "not a folder we can list"
            return False

    def _isfile(self, path: str) -> bool:
        """A file named by the user is taken as a shard whatever its name (its bytes decide)."""
        try:
            return self.fs.isfile(path)
        except Exception:  # noqa: BLE001 - any store error: leave it to the listing to report
            return False

    def url_of(self, path: str, fs=None) -> str:
        """A protocol-qualified URL in the scheme the user wrote (adlfs would say abfs:// for az://)."""
        fs = fs or self.fs
        if is_local(fs):
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
        if self.single is not None and shard_stem(posixpath.basename(self.single)) == key:
            path = self.single
        elif not self.fs.exists(path):
            # The suffix may be in another case (00000.TAR) or another shard name (00000.tar.gz):
            # look in the folder once. A plain .tar wins over the other names.
            stem = posixpath.join(self.root, key)
            named = {e: shard_suffix(e) for e in self._ls(posixpath.dirname(path))}
            found = [e for e, suffix in named.items() if suffix and e[: len(e) - len(suffix)] == stem]
            found.sort(key=lambda e: (named[e].lower() != ".tar", e))
            path = found[0] if found else path
        self._paths[key] = path
        return path

    def index_path(self, key: str) -> str:
        if self.index_root is not None:
            return posixpath.join(self.index_root, key + ".idx")
        return shard_stem(self.shard_path(key)) + ".idx"

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
                    raise StorageError(f"{self.url}: no such dataset folder", STORE_NOT_FOUND)
                entries = self.fs.find(self.root, detail=True, withdirs=False)
            except FileNotFoundError as exc:
                raise StorageError(f"{self.url}: no such dataset folder", STORE_NOT_FOUND) from exc
            except PermissionError as exc:
                raise StorageError(f"{self.url}: permission denied listing the dataset", STORE_DENIED) from exc
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - stores raise their own types (azure.core's HttpResponseError)
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StorageError(f"{self.url}: cannot list the dataset: {first_line}") from exc
        prefix = self.root.rstrip("/") + "/"
        seen: dict[str, str] = {}
        for path, info in entries.items():
            if shard_suffix(path) is None and path != self.single:
                continue
            rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
            parts = rel.split("/")
            if any(p.startswith(".") for p in parts[:-1]) or parts[0] == OUTPUT_DIRNAME:
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
            return fresh_info(self.fs, path)
        except FileNotFoundError as exc:
            raise StorageError(f"{self.url_of(path)}: no such shard", STORE_NOT_FOUND) from exc

    def shard(self, key: str) -> ShardInfo:
        path = self.shard_path(key)
        info = self._info(path)
        size = int(info.get("size") or 0)
        self._sizes[path] = size  # for the open that follows (saves a request on an object store)
        return ShardInfo(key, path, self.url_of(path), size, fingerprint_of(info), info)

    # -- reading -----------------------------------------------------------------------------

    def open_shard(self, key: str, *, block_size: int | None = None) -> IO[bytes]:
        """Open a shard for ranged reads (seek + read) or streaming."""
        path = self.shard_path(key)
        return self.open(path, block_size=block_size, size=self._sizes.pop(path, None))

    def open(self, path: str, *, fs=None, block_size: int | None = None, size: int | None = None) -> IO[bytes]:
        """A file to read: a real one on local disk (the tar scanner uses os.pread), else a
        :class:`RemoteFile` (read ahead ``block_size`` bytes at a time, retried, bounded in time)."""
        fs = fs or self.fs
        if is_local(fs):
            return open(path, "rb")
        if isinstance(fs, GuardedFS):
            return RemoteFile(fs, path, block_size=block_size, size=size)  # type: ignore[return-value]
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
            return fresh_info(self.index_fs, self.index_path(key))
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


@contextmanager
def opened(dataset: Dataset, key: str) -> Iterator[IO[bytes]]:
    f = dataset.open_shard(key)
    try:
        yield f
    finally:
        f.close()
