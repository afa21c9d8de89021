"""Shard storage over fsspec: local disk, ``file://``, ``s3://``, ``gs://``, ``az://``/``abfs://``.

A dataset is a folder of ``*.tar`` shards (any case, any depth). Each shard gets a stable
partition key: its path relative to the dataset root without the ``.tar`` suffix
(``00000``, ``part-a/00000``). Indexes go beside the tar (``00000.idx``) or under a separate
index location for read-only datasets; reports and manifests go under an output location.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

# Characters and substrings that break Dagster partition selection or the UI.
_UNSAFE_KEY_SUBSTRINGS = ("...", ",", "|", "[", "]")
OUTPUT_DIRNAME = "_curator"
LOCAL_PROTOCOLS = ("file", "local")


# Store-fault policy (see the README's "Object stores" section): each request gets these connect
# and read timeouts, transient faults are retried this many times with exponential backoff.
STORE_TIMEOUT_ENV = "CURATOR_STORE_TIMEOUT"
STORE_RETRIES_ENV = "CURATOR_STORE_RETRIES"
DEFAULT_STORE_TIMEOUT_S = 30.0
DEFAULT_STORE_RETRIES = 4
# Storage options that are this project's own (taken out before the rest go to fsspec).
STORE_TIMEOUT_OPTION = "store_timeout"
STORE_RETRIES_OPTION = "store_retries"

# Stable codes of StorageError (the README's table lists them).
STORE_ERROR = "store_error"  # anything else the store refused (the message says what)
STORE_NOT_FOUND = "store_not_found"  # no such bucket, folder or object
STORE_DENIED = "store_denied"  # 401/403, wrong or missing credentials
STORE_UNAVAILABLE = "store_unavailable"  # 5xx, resets, truncated bodies: still failing after the retries
STORE_TIMEOUT = "store_timeout"  # no answer within the timeout, after the retries
STORE_WRITE_FAILED = "store_write_failed"  # a local location that cannot be written


class StorageError(OSError):
    """A dataset location that cannot be listed, read or written; the message names it (never a
    credential) and ``code`` is one of the stable ``STORE_*`` codes."""

    def __init__(self, message: str, code: str = STORE_ERROR):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.code))


class UnsafeKeyError(ValueError):
    """A shard path that cannot be a Dagster partition key."""


# The names a shard file may have: a plain ``.tar``, or the name of a compressed tar. What a file
# IS comes from its bytes, never from these names: a plain tar named ``.tar.gz`` is read as the tar
# it is, and a compressed stream under any name is reported as such by every verb (``not_a_tar``).
SHARD_SUFFIXES = (
    ".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tzst", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz",
    ".tar.lz4",
)


def shard_suffix(path: str) -> str | None:
    """The shard suffix ``path`` ends with, in its own case (``.TAR``, ``.tar.gz``), or None."""
    lower = path.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            return path[len(path) - len(suffix):]
    return None


def shard_stem(path: str) -> str:
    """``path`` without its shard suffix (``a/00000.tar.gz`` -> ``a/00000``); unchanged without one."""
    suffix = shard_suffix(path)
    return path[: len(path) - len(suffix)] if suffix else path


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
    key = shard_stem(relpath)
    problem = partition_key_problem(key)
    if problem:
        raise UnsafeKeyError(f"shard {relpath!r} cannot be a partition key: {problem}; rename it")
    return key


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
    if _is_local(fs):
        return fs, path
    tune_client(fs)
    return GuardedFS(fs, policy, secret_values(options), protocol), path


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


_SECRET_OPTION_NAMES = ("key", "secret", "token", "password", "connection_string", "account_key", "sas_token",
                        "credential", "client_secret", "session_token", "aws_secret_access_key")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING",
               "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "GCS_TOKEN")
_SECRET_PATTERNS = re.compile(
    r"(AccountKey=)[^;\s]+|(\b(?:sig|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature)=)[^&\s'\",;]+",
    re.IGNORECASE,
)


def secret_values(options: dict[str, Any]) -> tuple[str, ...]:
    """Credential values that must never appear in a message: from the options and the environment."""
    found = []
    for name, value in options.items():
        if isinstance(value, str) and any(s in name.lower() for s in _SECRET_OPTION_NAMES):
            found.append(value)
    found += [os.environ[n] for n in _SECRET_ENV if os.environ.get(n)]
    parts = []
    for v in found:  # a connection string's key, on its own too
        parts += [m.group(1) for m in re.finditer(r"AccountKey=([^;]+)", v)]
    return tuple(sorted({v for v in found + parts if len(v) >= 6}, key=len, reverse=True))


def redact(text: str, secrets: Any = ()) -> str:
    """``text`` with credential values and URL signatures replaced by ``***``."""
    if isinstance(secrets, dict):
        secrets = secret_values(secrets)
    for value in secrets:
        text = text.replace(value, "***")
    return _SECRET_PATTERNS.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


_DENIED_NAMES = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                 "DefaultCredentialsError", "ClientAuthenticationError", "RefreshError", "TransportError")
_TRANSIENT_NAMES = ("Connect", "ClientOSError", "Payload", "Incomplete", "Disconnect", "Streaming", "ServiceRequest",
                    "ServiceResponse", "ResponseParser", "ProxyError", "ChunkedEncoding", "HTTPClientError")


_TRANSIENT_ERRNOS = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT)


# A body cut short or a connection dropped mid-answer (aiohttp, botocore, azure-core, urllib3).
_CUT_SHORT_NAMES = ("Payload", "ContentLength", "Incomplete", "Disconnect", "Streaming", "ChunkedEncoding")


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status_code", "status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def classify(exc: BaseException) -> tuple[str, bool]:
    """(code, transient) for an exception a store client raised (its cause chain included)."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    for e in chain:
        name = type(e).__name__
        if isinstance(e, FileNotFoundError) or name in ("NoSuchBucket", "NoSuchKey", "ResourceNotFoundError"):
            return STORE_NOT_FOUND, False
        if isinstance(e, PermissionError) or name in _DENIED_NAMES or str(e).startswith("Forbidden"):
            return STORE_DENIED, False
        if any(part in name for part in _CUT_SHORT_NAMES):  # aiohttp's carry a made-up status 400
            return STORE_UNAVAILABLE, True
        status = _status_of(e)
        if status is not None:
            if status in (401, 403):
                return STORE_DENIED, False
            if status == 404:
                return STORE_NOT_FOUND, False
            if status in (408, 429) or status >= 500:
                return STORE_UNAVAILABLE, True
            if status >= 400:
                return STORE_ERROR, False
    for e in chain:
        name = type(e).__name__
        if isinstance(e, TimeoutError) or "Timeout" in name:
            return STORE_TIMEOUT, True
        if isinstance(e, ConnectionError) or getattr(e, "errno", None) in _TRANSIENT_ERRNOS or any(
            part in name for part in _TRANSIENT_NAMES
        ):
            return STORE_UNAVAILABLE, True
    return STORE_ERROR, False


_CODE_WORDS = {
    STORE_NOT_FOUND: "no such object or bucket", STORE_DENIED: "access denied (check the credentials)",
    STORE_UNAVAILABLE: "the store keeps failing", STORE_TIMEOUT: "the store did not answer in time",
    STORE_ERROR: "the store refused the request",
}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


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
        return StorageError(f"{self.url(path)}: {_CODE_WORDS[code]}{tries}: {detail} [{code}]", code)

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
        if (not self._isdir(path)) if shard_suffix(path) else self._isfile(path):
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
        self._sizes: dict[str, int] = {}

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

    def _isfile(self, path: str) -> bool:
        """A file named by the user is taken as a shard whatever its name (its bytes decide)."""
        try:
            return self.fs.isfile(path)
        except Exception:  # noqa: BLE001 - any store error: leave it to the listing to report
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
            return _fresh_info(self.fs, path)
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
        if _is_local(fs):
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


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old object or the new one, never half.

    Local: a temp file in the same folder, fsync, then ``os.replace`` (temp files that a killed
    writer left there are removed by the next write to the folder). Object stores: one PUT
    (``pipe_file``), which the stores make visible only once complete.
    """
    if _is_local(fs):
        _write_local(path, data)
        return
    try:
        fs.pipe_file(path, data)
    except PermissionError as exc:
        raise StorageError(f"{fs.unstrip_protocol(path)}: permission denied writing", STORE_DENIED) from exc


@contextmanager
def opened(dataset: Dataset, key: str) -> Iterator[IO[bytes]]:
    f = dataset.open_shard(key)
    try:
        yield f
    finally:
        f.close()


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

    local = _is_local(fs)
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
