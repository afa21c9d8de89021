"""Shard names and partition keys, fingerprints and modification times: what a listing says about a shard."""

from __future__ import annotations

from typing import Any, NamedTuple

from curator_assets.store.errors import UnsafeKeyError

# Characters and substrings that break Dagster partition selection or the UI.
_UNSAFE_KEY_SUBSTRINGS = ("...", ",", "|", "[", "]")
OUTPUT_DIRNAME = "_curator"
LOCAL_PROTOCOLS = ("file", "local")


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


