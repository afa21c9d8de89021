"""Shard validation: tar structure, record IDs, the ``.idx``, image headers and side files.

Two passes, one report. The precise pass goes member by member: the recovering tar scanner
(so records after a damaged spot are still found and counted), then per record a few small
ranged reads: the head of each image (its header; for JPEG a marker walk up to the frame
header), a JPEG's last bytes (its end-of-image marker) and the side files. Image payloads are
never read whole, except a JPEG that does not end with its marker: its markers are walked to
tell a trailer after a complete image (``jpeg_trailing_data``) from a cut (``jpeg_truncated``).
Nothing is decoded. On a local file a vectorised pass runs first and proves most shards clean
at several times the speed; it hands anything it cannot prove to the precise pass (see below).

Every problem has a stable code and a severity. Shard-level problems (the tar, the index,
record IDs) are errors: a reader would return wrong or shifted data, so the shard must not
be decoded. Record-level problems (image bytes, side files) are warnings. Informational ones
(``jpeg_trailing_data``) change nothing. Severities can be overridden per code.

The report records the fingerprints of the tar and the index it describes. Decode reads it
(:func:`read_report`, :meth:`ShardReport.describes`): while the tar is unchanged, every record
with a record-level problem (:meth:`ShardReport.problem_records`) is marked failed with the
report's code and detail instead of being decoded; a stale report is not trusted.

What a component is and means comes from :mod:`curator_assets.formats.schema`; what image bytes are,
and their header rules, from :mod:`curator_assets.formats.sniff`.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from curator_assets.formats import schema
from curator_assets.formats.idx import (
    IndexFormatError,
    build_index_bytes,
    index_differences,
    parse_index,
)
from curator_assets.formats.report import (
    CODES,
    DEFAULT_MAX_PIXELS,
    DatasetSummary,
    ImageInfo,
    Problem,
    ShardReport,
    read_report,
    resolve_severities,
    summarize,
)
from curator_assets.formats.sniff import not_a_tar
from curator_assets.formats.tar_members import (
    BLOCK,
    NO_DATA_TYPES,
    Member,
    Record,
    TarProblem,
    group_records,
    is_component,
    scan_members,
    split_key,
)
from curator_assets.steps.validate_checks import (
    BAD_NAME_CHARS,
    IMAGE_EXTS,
    Collector,
    Window,
    check_image_member,
    check_side,
    ranged_reader,
)
from curator_assets.steps.validate_fast import fast_validate


def _record_id_problem(key: str) -> str | None:
    if not key:
        return "empty record ID"
    if key[0] == "/":
        return "absolute path"
    if ".." in key and ".." in key.split("/"):
        return "'..' path segment"
    bad = BAD_NAME_CHARS.search(key)
    if bad:
        ch = bad.group()
        if "\udc80" <= ch <= "\udcff":
            return "not valid UTF-8"
        return f"contains {ch!r}, which the .idx format and many tools cannot hold"
    return None


def _opened(fileobj: BinaryIO, total_size: int | None):
    """(seekable file, ranged reader, fd or None, size): a stream is read into memory first."""
    try:
        seekable = bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    if not seekable:
        data = fileobj.read()
        fileobj, total_size = io.BytesIO(data), len(data)
    fileobj.seek(0)
    read_at = ranged_reader(fileobj)
    fd = getattr(read_at, "fd", None)
    if total_size is None:
        if fd is not None:
            total_size = os.fstat(fd).st_size
        else:
            size_attr = getattr(fileobj, "size", None)
            total_size = size_attr if isinstance(size_attr, int) else fileobj.seek(0, os.SEEK_END)
            fileobj.seek(0)
    return fileobj, read_at, fd, total_size


def _scanned_members(fileobj: BinaryIO, read_at, total_size: int, out: Collector) -> Iterator[Member]:
    """Every member the recovering scanner finds, as it finds them (also appended to ``out.members``);
    each damaged spot becomes a problem. A last member whose data is cut off is taken back out of
    ``out.members`` (it is not readable, not counted)."""
    members: list[Member] = out.members
    # A stride of 1 MB keeps the contents check a few records behind the scan on a stream read
    # ahead in blocks (a remote shard); a mapped local file is not affected.
    for item in scan_members(fileobj, recover=True, total_size=total_size, stride=1 << 20):
        if isinstance(item, Member):
            members.append(item)
            yield item
            continue
        problem: TarProblem = item
        member = None
        if problem.code == "tar_truncated" and members and members[-1].type not in NO_DATA_TYPES and (
            members[-1].offset + members[-1].size > total_size
        ):
            member = members.pop().name  # its data is cut off: not readable, not counted
        code = problem.code if problem.code in CODES else "tar_bad_header"
        detail = f"{problem.detail} (at byte {problem.offset})"
        if problem.offset == 0 and not members and not out.problems:
            why = not_a_tar(read_at(0, BLOCK))
            if why is not None:
                code, detail = "not_a_tar", why
        out.add(code, detail, split_key(member)[0] if member else None, member)


def _keeping_position(fileobj: BinaryIO, read_at):
    """``read_at`` that leaves the file where it was: the scanner reading the same file keeps
    its own idea of the position. (``os.pread`` never moves it.)"""
    if getattr(read_at, "fd", None) is not None:
        return read_at

    def read_back(offset: int, n: int) -> bytes:
        here = fileobj.tell()
        try:
            return read_at(offset, n)
        finally:
            fileobj.seek(here)

    return read_back


def _scan_and_check(fileobj: BinaryIO, read_at, total_size: int, out: Collector,
                    max_pixels: int) -> tuple[list[Member], list[ImageInfo], list[Problem]]:
    """One pass over the tar: the members, and each record's contents checked as soon as the scan
    has passed it, while its bytes are still in the reader's read-ahead block, so a remote shard
    is read once rather than once for the headers and again for the contents. Records group as
    :func:`group_records` groups them (consecutive components of one key); the content problems
    are returned apart, to follow the structural ones in the report."""
    contents = Collector(out.severities)
    window = Window(_keeping_position(fileobj, read_at))
    images: list[ImageInfo] = []
    pending: list[Member] = []  # the record being scanned (and non-components among its members)
    pending_key: str | None = None
    for m in _scanned_members(fileobj, read_at, total_size, out):
        key = split_key(m.name)[0] if is_component(m) else None
        if key is not None and key != pending_key:
            images += _check_contents(window, group_records(pending), max_pixels, contents)
            pending, pending_key = [], key
        pending.append(m)
    if pending and pending[-1] is not (out.members[-1] if out.members else None):
        pending.pop()  # the cut-off last member, taken back out by the scan
    images += _check_contents(window, group_records(pending), max_pixels, contents)
    return out.members, images, contents.problems


def _check_non_components(members: list[Member], out: Collector) -> None:
    """Members that are no record component: stray files, volume labels, links, devices."""
    for m in members:
        if m.is_file:
            if is_component(m):
                continue
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith(".") and base[1:].lower() in IMAGE_EXTS:
                out.add("bad_record_id", "empty record ID: the name starts with a dot, so readers disagree "
                        "on whether it is a record", "", m.name)
            elif base:
                why = "hidden file" if base.startswith(".") else "no extension"
                out.add("stray_member", f"{why}: not part of any record", None, m.name)
        elif m.type == "V":  # a GNU volume label: every reader skips it, so no reason to block a shard
            out.add("stray_member", f"volume label {m.name!r}: readers skip it", None, m.name)
        elif m.type not in ("5", "D"):  # directories (GNU incremental dumps write them as 'D') are normal
            out.add("unsupported_member", f"{m.type_name} member: readers cannot use it", None, m.name)


def validate_file(
    fileobj: BinaryIO,
    *,
    shard: str = "<shard>",
    key: str | None = None,
    index_bytes: bytes | None = None,
    expect_index: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    severities: Mapping[str, str] | None = None,
    total_size: int | None = None,
    fast: bool = True,
) -> ShardReport:
    """Validate one tar read from ``fileobj`` (seekable; a stream is read into memory first).

    ``index_bytes`` is the shard's ``.idx``, if any; with ``expect_index`` a missing one is
    reported as ``idx_missing``. On a local file a vectorised pass first tries to prove the
    shard clean; whatever it cannot prove (any tar, record-ID or index problem) is left to the
    precise member-by-member pass, so ``fast`` changes the speed, never the report.
    """
    start = time.perf_counter()
    levels = resolve_severities(severities)
    fileobj, read_at, fd, total_size = _opened(fileobj, total_size)

    if fast and fd is not None:
        report = fast_validate(
            fd, read_at, total_size, shard=shard, key=key, index_bytes=index_bytes, expect_index=expect_index,
            max_pixels=max_pixels, levels=levels,
        )
        if report is not None:
            report.seconds = time.perf_counter() - start
            return report

    out = Collector(levels)
    report = ShardReport(shard=shard, key=key, bytes=total_size, max_pixels=max_pixels)

    # 1. Tar structure: every member the recovering scanner finds; damaged ones are reported.
    #    The contents of each record are checked in the same pass (their problems come last).
    members, images, content_problems = _scan_and_check(fileobj, read_at, total_size, out, max_pixels)
    tar_damaged = bool(out.problems)
    report.members = len(members)

    # 2. Members that are no record component.
    _check_non_components(members, out)

    # 3. Records and their IDs.
    records = group_records(members)
    report.records = len(records)
    report.record_ids = [r.key for r in records]
    if not records and not tar_damaged:
        out.add("no_records", "the tar holds no record (no regular file with a key and an extension)")
    _check_record_ids(records, out)

    # 4. The index.
    report.index = _index_state(index_bytes, expect_index, records, out)

    # 5. Image headers and side files (read during the scan).
    report.images = images
    report.problems = out.problems + content_problems
    report.seconds = time.perf_counter() - start
    return report


def _index_state(index_bytes: bytes | None, expect_index: bool, records: list[Record], out: Collector) -> str:
    """The report's ``index`` field; a missing index (when one is expected) or one that does not
    describe the records is a problem."""
    if index_bytes is None:
        if expect_index:
            out.add("idx_missing", "no .idx beside the shard: readers must scan the whole tar first")
        return "missing"
    return _check_index(index_bytes, records, out)


def _check_contents(window: Window, records: list[Record], max_pixels: int, out: Collector) -> list[ImageInfo]:
    """Each component's bytes by the schema's content rules; the facts of every readable image."""
    images: list[ImageInfo] = []
    for record in records:
        has_image = False
        for ext, m in record.components:
            kind = schema.content_kind(ext)
            if kind is None:
                continue
            if kind == "image":
                has_image = has_image or schema.role(ext) == schema.IMAGE
                info = check_image_member(window, record.key, m, max_pixels, out, jpeg=schema.is_jpeg_extension(ext))
                if info is not None:
                    images.append(info)
            else:
                check_side(kind, window.get(m.offset, m.size), record.key, m.name, out)
        if not has_image:
            out.add("missing_image", f"no image member (has: {', '.join(record.extensions)})", record.key,
                    record.components[0][1].name)
    return images


def _check_record_ids(records: list[Record], out: Collector) -> None:
    where: dict[str, list[int]] = {}
    for n, record in enumerate(records):
        where.setdefault(record.key, []).append(n)
        why = _record_id_problem(record.key)
        if why is None:
            for ext in record.extensions:
                if BAD_NAME_CHARS.search(ext):
                    why = f"extension {ext!r} contains whitespace or control characters"
                    break
                if not ext:
                    why = "a member name ends in a dot: an empty extension, which the .idx format cannot hold"
                    break
        if why is not None:
            out.add("bad_record_id", why, record.key, record.components[0][1].name)
        exts = record.extensions
        for group in schema.ambiguous_extensions(exts):
            shown = " and ".join(f".{e}" for e in group)
            out.add("ambiguous_extension", f"{shown} differ only in case: lower-casing readers (webdataset) refuse "
                    "the record, case-sensitive ones see both", record.key, f"{record.key}.{group[0]}")
        # The same member name twice inside one record: a file appended to the tar again.
        if len(set(exts)) != len(exts):
            dup = sorted({e for e in exts if exts.count(e) > 1})
            out.add("duplicate_record_id", f"member(s) {', '.join(dup)} appear twice in a row", record.key,
                    f"{record.key}.{dup[0]}")
    for key, positions in where.items():
        if len(positions) < 2:
            continue
        seen: set[str] = set()
        overlap = False
        for p in positions:
            exts = set(records[p].extensions)
            overlap = overlap or bool(seen & exts)
            seen |= exts
        first = records[positions[0]].components[0][1].name
        places = ", ".join(str(p) for p in positions[:10])
        if overlap:
            out.add("duplicate_record_id", f"record ID appears {len(positions)} times (records {places})", key, first)
        else:
            out.add("split_record", f"the record's members are not adjacent: readers see {len(positions)} "
                    f"records (at {places})", key, first)


def _check_index(index_bytes: bytes, records: list[Record], out: Collector) -> str:
    # Fast path: the index is exactly what this tar produces.
    try:
        if records and build_index_bytes(records) == index_bytes:
            return "fresh"
    except IndexFormatError:
        pass
    try:
        index = parse_index(index_bytes, ".idx")
    except IndexFormatError as exc:
        out.add("idx_unreadable", str(exc))
        return "unreadable"
    diffs = index_differences(index, records)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")
        out.add("idx_stale", f"the .idx does not describe this tar: {shown}")
        return "stale"
    return "fresh"


# ---------------------------------------------------------------------------------------------
# Shards of a dataset


def validate_shard(
    dataset,
    key: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    severities: Mapping[str, str] | None = None,
) -> ShardReport:
    """Validate shard ``key`` of a :class:`~curator_assets.store.dataset.Dataset` (tar and its .idx).

    Raises :class:`~curator_assets.store.errors.StorageError` only when the shard cannot be opened;
    everything wrong inside it is a problem in the report.
    """
    from curator_assets.steps.state import load_shard_state

    start = time.perf_counter()
    state = load_shard_state(dataset, key)
    state.raise_index_error()
    info, index_bytes = state.info, state.index_bytes
    # Remote stores: read ahead in large blocks (RemoteFile.DEFAULT_BLOCK), so the one pass
    # over headers and contents costs few requests.
    with state.open() as f:
        report = validate_file(
            f, shard=info.url, key=key, index_bytes=index_bytes, expect_index=True, max_pixels=max_pixels,
            severities=severities, total_size=info.size,
        )
    report.fingerprint = info.fingerprint
    if index_bytes is not None:
        report.index_fingerprint = state.index_fingerprint
    report.seconds = time.perf_counter() - start
    return report


def unreadable_report(shard: str | None, detail: str, severities: Mapping[str, str] | None = None) -> ShardReport:
    """The report of a shard that could not be read at all (one ``shard_unreadable`` problem)."""
    level = resolve_severities(severities)["shard_unreadable"]
    return ShardReport(shard=shard, problems=[Problem("shard_unreadable", level, None, None, detail)])


def summarize_dataset(dataset) -> DatasetSummary:
    """Summarise the stored reports of every shard in ``dataset``."""
    listing = dataset.list_shards()
    return summarize((s.key, read_report(dataset, s.key)) for s in listing.shards)


SUMMARY_KIND = "dataset"
SUMMARY_NAME = "validation_summary"


def write_summary(dataset, summary: DatasetSummary) -> str:
    data = json.dumps(summary.to_json(), separators=(",", ":"), sort_keys=True).encode()
    return dataset.write_output(SUMMARY_KIND, SUMMARY_NAME, ".json", data)
