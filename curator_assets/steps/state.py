"""The state of one shard, read once per step: its listing info, its ``.idx`` (info, bytes, URL,
fingerprint, parsed once) and its stored validation report.

Index, validate and decode each load one :class:`ShardState` and read everything about the shard
from it, so no step asks the store twice for the same thing or parses the index twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

from curator_assets.formats.idx import IndexFormatError, ShardIndex, parse_index
from curator_assets.formats.report import ShardReport, read_report
from curator_assets.store.errors import StorageError
from curator_assets.store.keys import ShardInfo, fingerprint_of


@dataclass
class ShardState:
    """What the store holds for shard ``key``. A part not asked for when loading stays None."""

    dataset: Any = field(repr=False)
    key: str
    info: ShardInfo
    index_url: str
    index_info: dict[str, Any] | None = None  # the store's details of the .idx (None: none, or not asked)
    index_bytes: bytes | None = None  # the .idx (None: none, or not read)
    index_error: OSError | None = None  # why the .idx could not be read (a StorageError is raised instead)
    report: ShardReport | None = None  # the stored validation report (None: none, or not read)
    report_error: Exception | None = None  # why the stored report could not be read
    _parsed: ShardIndex | IndexFormatError | None = field(default=None, repr=False)

    @property
    def index_fingerprint(self) -> str | None:
        return fingerprint_of(self.index_info) if self.index_info else None

    def parsed_index(self) -> ShardIndex:
        """The ``.idx`` parsed (once; named by its URL in errors); raises :class:`IndexFormatError`."""
        if self._parsed is None:
            try:
                self._parsed = parse_index(self.index_bytes or b"", self.index_url)
            except IndexFormatError as exc:
                self._parsed = exc
        if isinstance(self._parsed, IndexFormatError):
            raise self._parsed
        return self._parsed

    def raise_index_error(self) -> None:
        if self.index_error is not None:
            raise self.index_error

    def open(self) -> IO[bytes]:
        """The tar, for ranged reads (its size is known from the listing info)."""
        return self.dataset.open_shard(self.key)


def load_shard_state(
    dataset, key: str, *, index_info: bool = True, index_bytes: bool = True, report: bool = False
) -> ShardState:
    """Read what a step needs of shard ``key``, each thing once: the tar's info (raises
    ``StorageError`` when there is no such shard), the ``.idx``'s info and bytes (its bytes only
    when it exists, or when its info is not asked for), and the stored report.

    An ``.idx`` that cannot be read is kept as ``index_error`` (a ``StorageError`` is raised); a
    stored report that cannot be read as ``report_error``: each step decides what they mean."""
    info = dataset.shard(key)
    state = ShardState(dataset, key, info, dataset.url_of(dataset.index_path(key), dataset.index_fs))
    if index_info:
        state.index_info = dataset.index_info(key)
    if index_bytes and (state.index_info is not None or not index_info):
        try:
            state.index_bytes = dataset.read_index_bytes(key)
        except StorageError:
            raise
        except OSError as exc:
            state.index_error = exc
    if report:
        try:
            state.report = read_report(dataset, key)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            state.report_error = exc
    return state
