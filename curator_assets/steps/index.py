"""The index step: build (or reuse) the ``.idx`` of one shard of a dataset.

The grammar and "does this index describe this tar" are :mod:`curator_assets.formats.idx`.
"""

from __future__ import annotations

from typing import NamedTuple

from curator_assets.formats.idx import IndexFormatError, describes, index_bytes_of_members, index_counts

# ---------------------------------------------------------------------------------------------
# Building an index for a shard of a dataset


class IndexResult(NamedTuple):
    key: str
    shard_url: str
    index_url: str
    records: int
    members: int
    bytes: int  # size of the shard
    seconds: float
    reused: bool
    tar_fingerprint: str
    index_fingerprint: str | None


def ensure_index(
    dataset,
    key: str,
    *,
    force: bool = False,
    previous: dict[str, str] | None = None,
) -> IndexResult:
    """Build (or reuse) the ``.idx`` of one shard of ``dataset``.

    Reuse rules: ``previous`` fingerprints (what the last run recorded) equal to the current
    tar and index fingerprints; else an existing index that describes the tar exactly
    (:func:`index_differences` against a scan of every header; the data is never read).
    Anything else (a deleted, duplicated or swapped line, a changed offset, ``wds2idx``'s
    offsets for GNU long names, another shard's index) is rebuilt. ``force`` always rebuilds. Raises
    ``TarError``/``IndexFormatError``/``StorageError`` naming the shard.
    """
    import time

    from curator_assets.steps.state import load_shard_state
    from curator_assets.store.keys import fingerprint_of

    start = time.perf_counter()
    state = load_shard_state(dataset, key, index_bytes=not force)
    shard, idx_fp, idx_url = state.info, state.index_fingerprint, state.index_url

    members = built = None
    if not force and state.index_info is not None:
        state.raise_index_error()
        raw = state.index_bytes or b""
        counts: tuple[int, int] | None = None  # (records, components) of a reusable index
        if previous and previous.get("tar_fingerprint"):
            # What the last run recorded decides: an unchanged tar and index are reused, a
            # changed tar is always re-indexed (store timestamps can be whole seconds).
            if previous["tar_fingerprint"] == shard.fingerprint and previous.get("index_fingerprint") == idx_fp:
                counts = index_counts(raw, idx_url)
        else:
            # Every header is read (never the data): reuse only an index that describes the tar exactly.
            members = _members(state)
            counts, built = describes(raw, idx_url, members)
        if counts is not None:
            return IndexResult(key, shard.url, idx_url, counts[0], counts[1], shard.size,
                               time.perf_counter() - start, True, shard.fingerprint, idx_fp)

    if members is None:
        members = _members(state)
    try:
        data, n_records, n_components = built or index_bytes_of_members(members)
    except IndexFormatError as exc:
        raise IndexFormatError(f"{shard.url}: {exc}") from None
    dataset.write_index(key, data)
    new_info = dataset.index_info(key)
    return IndexResult(
        key, shard.url, idx_url, n_records, n_components,
        shard.size, time.perf_counter() - start, False, shard.fingerprint,
        fingerprint_of(new_info) if new_info else None,
    )


def _members(state):
    """Every member of the shard's tar (its headers; the data is never read)."""
    from curator_assets.formats.tar_members import read_members

    with state.open() as f:
        return read_members(f, state.info.url)
