"""fsspec access: the local shortcut, the store client's timeouts and retries, guarded reads and files."""

from __future__ import annotations

import os
import posixpath
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from curator_assets.store.errors import (
    CODE_WORDS,
    DEFAULT_STORE_RETRIES,
    DEFAULT_STORE_TIMEOUT_S,
    STORE_NOT_FOUND,
    STORE_RETRIES_ENV,
    STORE_RETRIES_OPTION,
    STORE_TIMEOUT,
    STORE_TIMEOUT_ENV,
    STORE_TIMEOUT_OPTION,
    StorageError,
    classify,
    first_line,
    redact,
    secret_values,
)
from curator_assets.store.keys import LOCAL_PROTOCOLS


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


def split_url(url: str, storage_options: dict[str, Any]):
    local = _local_path(url)
    if local is not None and not storage_options:
        return LocalFS(), local
    import fsspec.core  # imported lazily: keeps `curator-assets index` start-up lean

    policy, options = StorePolicy.split(storage_options)
    protocol = url_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **client_options(protocol, options, policy))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: cannot open this location: {redact(first_line(exc), options)}") from exc
    except Exception as exc:  # noqa: BLE001 - a client may fail at set-up (credential files, auth libraries)
        code, _ = classify(exc)
        raise StorageError(f"{url}: cannot open this location: {redact(first_line(exc), options)} [{code}]",
                           code) from exc
    if is_local(fs):
        return fs, path
    tune_client(fs)
    return GuardedFS(fs, policy, secret_values(options), protocol), path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in LOCAL_PROTOCOLS


def fresh_info(fs, path: str) -> dict[str, Any]:
    # fsspec shares filesystem instances and answers info() from cached folder listings: without
    # this, a long-lived process (the sensor's daemon) would keep seeing a rewritten object's old etag.
    if not is_local(fs):
        fs.invalidate_cache(path)
        fs.invalidate_cache(posixpath.dirname(path))  # adlfs drops only the exact path, not its folder
    return fs.info(path)


# -- store faults: timeouts, retries, errors that name the object -------------------------------


class StorePolicy(NamedTuple):
    """How long one request may stay silent, and how often a transient fault is retried."""

    timeout: float = DEFAULT_STORE_TIMEOUT_S
    retries: int = DEFAULT_STORE_RETRIES
    backoff: float = 0.25  # seconds before the first retry, doubling each time (with jitter)
    max_backoff: float = 8.0

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[StorePolicy, dict[str, Any]]:
        """The policy (options ``store_timeout``/``store_retries``, else ``CURATOR_STORE_TIMEOUT``/
        ``CURATOR_STORE_RETRIES``, else the defaults) and the options left for fsspec."""
        rest = dict(options)
        timeout = rest.pop(STORE_TIMEOUT_OPTION, None) or os.environ.get(STORE_TIMEOUT_ENV) or DEFAULT_STORE_TIMEOUT_S
        retries = rest.pop(STORE_RETRIES_OPTION, None)
        if retries is None:
            retries = os.environ.get(STORE_RETRIES_ENV) or DEFAULT_STORE_RETRIES
        try:
            policy = cls(timeout=float(timeout), retries=max(0, int(retries)))
        except ValueError as exc:
            raise StorageError(f"bad store timeout or retries ({timeout!r}, {retries!r}): {exc}") from None
        if policy.timeout <= 0:
            raise StorageError(f"the store timeout must be positive, got {timeout!r}")
        return policy, rest

    @property
    def call_limit(self) -> float:
        """The wall-clock bound of one attempt of one call, whatever the client does inside it
        (some clients apply their read timeout to downloads only)."""
        return 3 * self.timeout

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)


def client_options(protocol: str, options: dict[str, Any], policy: StorePolicy) -> dict[str, Any]:
    """``options`` with each client's connect/read timeouts set from ``policy`` (where the user set
    none) and its own retries off: the retries are ours (:class:`GuardedFS`), the same on every store."""
    out = dict(options)
    t = policy.timeout
    if protocol in ("s3", "s3a"):
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", t)
        config.setdefault("read_timeout", t)
        config.setdefault("retries", {"total_max_attempts": 1})
        out["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        if "requests_timeout" not in out:
            import aiohttp

            out["requests_timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
    elif protocol in ("az", "abfs", "abfss", "adl"):
        out.setdefault("connection_timeout", int(max(1, round(t))))
        out.setdefault("read_timeout", int(max(1, round(t))))
    return out


def tune_client(fs) -> None:
    """Turn the client's own retry loops off where options cannot (best effort): their backoffs
    (gcsfs: up to 32 s, Azure: 15 s and more) would outlast our timeouts and double the retries."""
    cls = type(fs).__name__
    try:
        if cls == "S3FileSystem":
            fs.retries = 1
        elif cls == "GCSFileSystem":
            unwrapped = getattr(type(fs)._request, "__wrapped__", None)  # gcsfs's retry_request decorator
            if unwrapped is not None and "_request" not in vars(fs):
                fs._request = unwrapped.__get__(fs)
        elif cls == "AzureBlobFileSystem":
            fs.service_client._config.retry_policy.total_retries = 0
    except AttributeError:
        pass


_read_counts = threading.local()


@contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Count the bytes this thread reads from object stores inside the block: yields a one-item
    list holding the running total (what a step reports as ``bytes_read``)."""
    outer = getattr(_read_counts, "box", None)
    box = [0]
    _read_counts.box = box
    try:
        yield box
    finally:
        _read_counts.box = outer
        if outer is not None:
            outer[0] += box[0]


def _counted(n: int) -> None:
    box = getattr(_read_counts, "box", None)
    if box is not None:
        box[0] += n


class GuardedFS:
    """An fsspec filesystem whose calls are bounded in time, retried on transient faults, and
    fail as one :class:`StorageError` naming the object (never a credential).

    ``FileNotFoundError`` passes through unchanged (callers treat a missing ``.idx`` as none);
    everything else a client raises (``aiohttp.ClientPayloadError`` is not an ``OSError``)
    becomes a ``StorageError`` with a stable code. Attributes and calls not listed pass through.
    """

    GUARDED = frozenset({"cat_file", "info", "exists", "isdir", "isfile", "ls", "find", "pipe_file", "size",
                         "rm_file", "rm", "mkdir", "makedirs", "put_file", "get_file", "cat"})

    def __init__(self, fs, policy: StorePolicy, secrets: tuple[str, ...] = (), scheme: str | None = None):
        self.fs = fs
        self.policy = policy
        self.secrets = secrets
        self.scheme = scheme
        self.bytes_read = 0  # payload bytes returned by cat_file, over the filesystem's life

    def __reduce__(self):
        return (type(self), (self.fs, self.policy, self.secrets, self.scheme))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "fs":
            raise AttributeError(name)
        attr = getattr(self.fs, name)
        if name in self.GUARDED:
            return lambda path, *args, **kwargs: self.call(name, path, *args, **kwargs)
        return attr

    def url(self, path: Any) -> str:
        path = path if isinstance(path, str) else str(path)
        if self.scheme:
            return f"{self.scheme}://{path.lstrip('/')}"
        return self.fs.unstrip_protocol(path)

    def call(self, name: str, path: Any, *args: Any, **kwargs: Any) -> Any:
        """``fs.<name>(path, ...)`` under the policy."""
        method = getattr(self.fs, name)
        if getattr(self.fs, "async_impl", False) and hasattr(self.fs, "_" + name):
            kwargs.setdefault("timeout", self.policy.call_limit)  # fsspec's sync(): cancels the coroutine
        result = self.retrying(lambda: method(path, *args, **kwargs), path)
        if name == "cat_file" and isinstance(result, (bytes, bytearray)):
            self.bytes_read += len(result)
            _counted(len(result))
        return result

    def retrying(self, fn: Callable[[], Any], path: Any) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except (FileNotFoundError, NotADirectoryError, StorageError):
                raise
            except Exception as exc:  # noqa: BLE001 - every client has its own error types
                code, transient = classify(exc)
                if code == STORE_NOT_FOUND and not isinstance(exc, OSError):
                    raise FileNotFoundError(self.url(path)) from None
                # A silent store is retried once at most: each wait is a whole timeout.
                limit = min(self.policy.retries, 1) if code == STORE_TIMEOUT else self.policy.retries
                if not transient or attempt >= limit:
                    raise self.error(path, exc, code, attempt + 1) from None
                time.sleep(self.policy.delay(attempt))
                attempt += 1

    def error(self, path: Any, exc: BaseException, code: str, attempts: int) -> StorageError:
        detail = redact(first_line(exc), self.secrets)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if code == STORE_TIMEOUT:
            detail = f"no answer within {self.policy.timeout:g}s ({type(exc).__name__})"
        return StorageError(f"{self.url(path)}: {CODE_WORDS[code]}{tries}: {detail} [{code}]", code)

    def open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> Any:
        if mode != "rb" or kwargs:
            if block_size:
                kwargs["block_size"] = block_size
            return self.fs.open(path, mode, **kwargs)
        return RemoteFile(self, path, block_size=block_size)


class RemoteFile:
    """A read-only, seekable view of one object through :meth:`GuardedFS.cat_file`: reads ahead
    ``block_size`` bytes at a time (a sequential pass costs about one byte read per byte of
    object), and every range it fetches is retried and checked for its full length."""

    DEFAULT_BLOCK = 8 << 20

    def __init__(self, fs: GuardedFS, path: str, *, block_size: int | None = None, size: int | None = None):
        self.fs, self.path = fs, path
        self.block_size = block_size or self.DEFAULT_BLOCK
        self.size = size if size is not None else int(fs.call("info", path).get("size") or 0)
        self.pos = 0
        self.bytes_read = 0
        self.closed = False
        self._buf_start, self._buf = 0, b""
        # The block before the current one, kept: a pass that reads a little behind the scan (a
        # record's contents checked once the scan has passed its end) would otherwise fetch that
        # block again, and a read across a block boundary needs both.
        self._prev_start, self._prev = 0, b""

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.size)[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def _fetch(self, start: int, end: int) -> bytes:
        def get() -> bytes:
            data = self.fs.fs.cat_file(self.path, start=start, end=end, **self._timeout())
            if len(data) != end - start:  # a body cut short (or a store that ignored the range)
                raise ConnectionError(f"expected {end - start} bytes from offset {start}, got {len(data)}")
            return data

        data = self.fs.retrying(get, self.path)
        self.bytes_read += len(data)
        self.fs.bytes_read += len(data)
        _counted(len(data))
        return data

    def _timeout(self) -> dict[str, float]:
        fs = self.fs.fs
        return {"timeout": self.fs.policy.call_limit} if getattr(fs, "async_impl", False) else {}

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        out = self._cached(self.pos, end)
        if out is None:
            buf_end = self._buf_start + len(self._buf)
            # A read that runs past the current block, or starts a little after it (a header
            # just past a member that crossed the block's end), continues the block: the bytes
            # in between are read once now rather than again by the next pass over them.
            near = self._buf and self._buf_start <= self.pos < buf_end + self.block_size // 4
            start = buf_end if near else self.pos
            data = self._fetch(start, min(self.size, max(end, start + self.block_size)))
            self._prev_start, self._prev = self._buf_start, self._buf
            self._buf_start, self._buf = start, data
            out = self._cached(self.pos, end)
        self.pos = end
        return out

    def _cached(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) from the two blocks held, or None."""
        cur, cur_end = self._buf_start, self._buf_start + len(self._buf)
        prev, prev_end = self._prev_start, self._prev_start + len(self._prev)
        if cur <= start and end <= cur_end:
            return self._buf[start - cur : end - cur]
        if prev <= start and end <= prev_end:
            return self._prev[start - prev : end - prev]
        if prev_end == cur and prev <= start < cur < end <= cur_end:
            return self._prev[start - prev :] + self._buf[: end - cur]
        return None

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.closed = True
        self._buf = self._prev = b""

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


