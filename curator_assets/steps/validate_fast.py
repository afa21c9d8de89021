"""Validation's vectorised pass.

Python costs about a microsecond per member however lean the loop, which on a shard of small
images is several times what the kernel needs to copy the whole file. So this pass does the
one inherently sequential step (following the header chain: each header's size says where
the next one is) in a minimal loop, and everything else with numpy over all headers at once.
It only ever proves a shard clean: anything unusual makes it return None and the precise pass
(the recovering scanner, member by member, in :mod:`curator_assets.steps.validate`) runs
instead, so both always give one report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from itertools import repeat
from typing import Any, NamedTuple

from curator_assets.formats import schema
from curator_assets.formats.idx import (
    index_tokens,
    is_index_of_fields,
)
from curator_assets.formats.report import ImageColumns, ImageInfo, ShardReport
from curator_assets.formats.sniff import JPEG_MODES, PROGRESSIVE_SOF, SOF_PROCESS
from curator_assets.formats.tar_members import (
    BLOCK,
    Member,
)
from curator_assets.steps.validate_checks import (
    IMAGE_EXTS,
    JSON_EXTS,
    TEXT_EXTS,
    Collector,
    Window,
    check_image_member,
    check_side,
)

# ---------------------------------------------------------------------------------------------
# The vectorised pass
#
# Python costs about a microsecond per member however lean the loop, which on a shard of small
# images is several times what the kernel needs to copy the whole file. So this pass does the
# one inherently sequential step (following the header chain: each header's size says where
# the next one is) in a minimal loop, and everything else with numpy over all headers at once.
# It only ever proves a shard clean: anything unusual makes it return None and the precise pass
# (the recovering scanner, member by member) runs instead, so both always give one report.

_FAST_HEAD = 512  # bytes of each member read with its header: a side file, or a JPEG's markers
_FAST_ROW = BLOCK + _FAST_HEAD
_FAST_CHUNK = 4096
_FAST_MAX_MEMBERS = 65_536  # the rows take 1.5 KB a member; bigger shards go member by member
_ZERO_BLOCK = bytes(BLOCK)

# Markers that carry a length and may come before the frame header (everything else, or any
# surprise, is left to the precise parser).
_SEGMENT_MARKERS = frozenset(range(0xC0, 0xFF)) - frozenset(SOF_PROCESS) - frozenset(range(0xD0, 0xDB))


def _pack(word: str) -> int:
    return int.from_bytes(word.encode().ljust(8, b"\0"), "little")


_IMAGE_WORDS = [_pack(w) for w in IMAGE_EXTS]
_JPEG_WORDS = [_pack(w) for w in schema.JPEG_EXTENSIONS]
_JSON_WORDS = [_pack(w) for w in JSON_EXTS]
_TEXT_WORDS = [_pack(w) for w in TEXT_EXTS]


class _Names(NamedTuple):
    """The regular files of a shard, by their names (arrays over files unless said otherwise)."""
    files: Any  # header numbers of the regular files
    fnames: Any  # their names, one row of bytes each (``width`` columns)
    f_in: Any  # which columns of a row are in the name
    f_len: Any
    width: int
    col: Any
    first_dot: Any
    last_dot: Any
    starts: Any  # True where a record starts
    record_of: Any  # record number of each file
    key_list: list[bytes]  # the record IDs
    name_list: list[bytes]  # the member names


class _Kinds(NamedTuple):
    is_image: Any
    is_jpeg: Any
    is_json: Any
    is_text: Any


class _Jpegs(NamedTuple):
    img: Any  # file numbers of the images
    width: Any
    height: Any
    comps: Any
    sof: Any
    suspects: list[int]  # file numbers the vectorised walk could not clear


def fast_validate(
    fd: int,
    read_at: Callable[[int, int], bytes],
    total_size: int,
    *,
    shard: str,
    key: str | None,
    index_bytes: bytes | None,
    expect_index: bool,
    max_pixels: int,
    levels: Mapping[str, str],
) -> ShardReport | None:
    """The report of a shard this pass proves clean, or None: each piece below answers None for
    "not proven clean", and the precise pass then gives the one report."""
    # 1. The header chain, as rows of [the block before a header | the header | the first
    # bytes of the member's data]; the last row is the end-of-archive block's.
    rows = _rows_from_index(fd, index_bytes, total_size) if index_bytes else None
    if rows is None:
        rows = _rows_by_walking(fd, total_size)
        if rows is None:
            return None
    buf, table, starts_in_buf, header_at, size_arr, index_tokens = rows
    n = header_at.size - 1
    if n == 0:
        return None
    hdr = table[:n, BLOCK : 2 * BLOCK]
    offsets = header_at[:n] + BLOCK
    is_dir = _clean_headers(hdr, size_arr) if _zero_tail(fd, int(header_at[-1]) + 2 * BLOCK, total_size) else None
    if is_dir is None:
        return None  # members after the end blocks (a hole), or bytes there: the precise pass says which
    names = _record_names(hdr, is_dir)
    kinds = names and _kinds(names)
    if kinds is None:
        return None

    out = Collector(levels)
    report = ShardReport(shard=shard, key=key, bytes=total_size, max_pixels=max_pixels, members=n,
                         records=len(names.key_list), record_ids=list(map(bytes.decode, names.key_list)))
    # 4. The index: byte for byte what this tar produces, or the precise pass explains why not.
    if index_bytes is None:
        report.index = "missing"
        if expect_index:
            out.add("idx_missing", "no .idx beside the shard: readers must scan the whole tar first")
    elif _index_matches(index_bytes, index_tokens, names, offsets, size_arr):
        report.index = "fresh"
    else:
        return None

    head_of = table[:n, 2 * BLOCK :]
    block_before_next = table[1:, :BLOCK]
    jpegs = _jpeg_headers(names, kinds, head_of, block_before_next, size_arr, max_pixels)
    suspects = [(i, "image") for i in jpegs.suspects]
    suspects += _side_file_suspects(names, kinds, size_arr, starts_in_buf, buf)
    images = _precise_checks(suspects, names, kinds, offsets, size_arr, report.record_ids, read_at, max_pixels, out)
    report.images = _image_facts(jpegs, names, report.record_ids, images)
    report.problems = out.problems
    return report


def _clean_headers(hdr, size_arr):
    """2. Headers: ustar/GNU magic, plain files or directories, octal fields, checksums. A
    vectorised form of tar_members' rules for the common case only: whatever it cannot prove
    clean is judged by the scanner (tar_members.check_header) in the precise pass. Returns which
    headers are directories, or None."""
    import numpy as np

    if not (hdr[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all():
        return None
    version = hdr[:, 262]
    if not ((version == 0) | (version == 32)).all():
        return None
    typeflag = hdr[:, 156]
    is_dir = typeflag == ord("5")
    if not ((typeflag == ord("0")) | (typeflag == 0) | is_dir).all():
        return None
    if (size_arr[is_dir] != 0).any():  # readers skip no data for a directory, whatever its size says
        return None
    # mode, uid, gid and mtime: plain octal (anything else is the precise pass's to judge).
    numeric = np.concatenate([hdr[:, 100:124], hdr[:, 136:148]], 1)
    if not (((numeric >= 48) & (numeric <= 55)) | (numeric == 0) | (numeric == 32)).all():
        return None
    digits = hdr[:, 124:135]
    if not ((digits >= 48) & (digits <= 55)).all():
        return None
    chk = hdr[:, 148:154]
    if not (((chk >= 48) & (chk <= 55)).all() and ((hdr[:, 154] == 0) | (hdr[:, 154] == 32)).all()):
        return None
    stored = ((chk.astype(np.int64) - 48) * (8 ** np.arange(5, -1, -1))).sum(1)
    computed = hdr.sum(1, dtype=np.uint32).astype(np.int64) - hdr[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    if not (stored == computed).all():
        return None
    if ((version == 0) & (hdr[:, 345] != 0)).any():  # a POSIX name prefix
        return None
    return is_dir


def _record_names(hdr, is_dir) -> _Names | None:
    """3. Names: printable ASCII without spaces; every file a component with a plain key; records
    neither duplicated nor split; no extensions that differ only in case."""
    import numpy as np

    if (hdr[:, 99] != 0).any():
        return None  # a name filling all 100 bytes: rare, left to the precise pass
    length = (hdr[:, :100] == 0).argmax(1)
    width = int(length.max()) + 1  # work on the used columns only: names are usually short
    names = hdr[:, :width]
    col = np.arange(width)
    in_name = col < length[:, None]
    if (length == 0).any() or (((names <= 32) | (names >= 127)) & in_name).any():
        return None
    files = np.flatnonzero(~is_dir)
    if files.size == 0:
        return None
    fnames = names[files]
    f_in = in_name[files]
    f_len = length[files]
    slashes = (fnames == ord("/")) & f_in
    if slashes.any():
        last_slash = width - 1 - slashes[:, ::-1].argmax(1)
        last_slash[~slashes.any(1)] = -1
        dots = (fnames == ord(".")) & f_in & (col > last_slash[:, None])
    else:
        last_slash = np.full(files.size, -1)
        dots = (fnames == ord(".")) & f_in
    if not dots.any(1).all():
        return None  # a file without an extension
    first_dot = dots.argmax(1)
    last_dot = width - 1 - dots[:, ::-1].argmax(1)
    if (first_dot == last_slash + 1).any() or (fnames[:, 0] == ord("/")).any():
        return None  # hidden file or absolute path
    in_key = col < first_dot[:, None]
    if ((fnames[:, :-1] == ord(".")) & (fnames[:, 1:] == ord(".")) & in_key[:, 1:]).any():
        return None  # '..' in a record ID
    ext_len = f_len - first_dot - 1
    if ((ext_len > 16) | (ext_len == 0)).any():  # long, or empty (a name ending in a dot)
        return None
    keys = (fnames * in_key).view(f"S{width}").ravel()
    name_list = (fnames * f_in).view(f"S{width}").ravel().tolist()
    starts = np.ones(files.size, bool)
    starts[1:] = keys[1:] != keys[:-1]
    record_of = np.cumsum(starts) - 1
    key_list = keys[starts].tolist()
    if len(set(key_list)) != len(key_list) or len(set(name_list)) != len(name_list):
        return None  # duplicate or split records
    in_ext = f_in & (col > first_dot[:, None])
    upper = (fnames >= 65) & (fnames <= 90) & in_ext
    if upper.any():  # extensions differing only in case (ambiguous_extension) are the precise pass's
        lowered = (fnames * f_in + upper * np.uint8(32)).view(f"S{width}").ravel().tolist()
        if len(set(lowered)) != len(lowered):
            return None
    return _Names(files, fnames, f_in, f_len, width, col, first_dot, last_dot, starts, record_of, key_list,
                  name_list)


def _kinds(nm: _Names) -> _Kinds | None:
    """Kinds, by the last suffix, lower-cased; a record needs an image extension as its full extension."""
    import numpy as np

    take = np.minimum(nm.last_dot[:, None] + 1 + np.arange(8), nm.width - 1)
    suffix = np.take_along_axis(nm.fnames, take, 1)
    suffix = np.where(take < nm.f_len[:, None], suffix, 0)
    suffix = suffix | (((suffix >= 65) & (suffix <= 90)) * np.uint8(32))
    words = np.ascontiguousarray(suffix).view(np.uint64).ravel()
    short = (nm.f_len - nm.last_dot - 1) <= 8
    is_image = np.isin(words, _IMAGE_WORDS) & short
    has_image = np.zeros(len(nm.key_list), bool)
    has_image[nm.record_of[is_image & (nm.first_dot == nm.last_dot)]] = True
    if not has_image.all():
        return None  # missing_image is reported by the precise pass
    return _Kinds(is_image, np.isin(words, _JPEG_WORDS) & short, np.isin(words, _JSON_WORDS) & short,
                  np.isin(words, _TEXT_WORDS) & short)


def _index_matches(index_bytes: bytes, index_tokens, nm: _Names, offsets, size_arr) -> bool:
    """Whether the .idx is byte for byte what this tar produces."""
    import numpy as np

    take = np.minimum(nm.first_dot[:, None] + 1 + np.arange(16), nm.width - 1)
    ext = np.where(take < nm.f_len[:, None], np.take_along_axis(nm.fnames, take, 1), 0)
    ext_list = np.ascontiguousarray(ext).view("S16").ravel().tolist()
    per_record = np.diff(np.append(np.flatnonzero(nm.starts), nm.files.size))
    return is_index_of_fields(index_bytes, index_tokens, ext_list, offsets[nm.files], size_arr[nm.files],
                              nm.name_list, (nm.f_len - nm.first_dot - 1) + nm.f_len, per_record)


def _jpeg_headers(nm: _Names, kinds: _Kinds, head_of, block_before_next, size_arr, max_pixels: int) -> _Jpegs:
    """5. JPEG headers: walk the markers of every image at once, up to its frame header; then the
    end-of-image marker. The hot loop runs at most 32 times per shard, over all images at once."""
    import numpy as np

    files = nm.files
    img = np.flatnonzero(kinds.is_image)
    head = head_of[files[img]]
    img_size = size_arr[files[img]]
    room = np.minimum(img_size, _FAST_HEAD)
    n_img = img.size
    suspect = ~((head[:, 0] == 0xFF) & (head[:, 1] == 0xD8) & (head[:, 2] == 0xFF) & (img_size >= 4))
    active = ~suspect
    at = np.full(n_img, 2, np.int64)
    width = np.zeros(n_img, np.int64)
    height = np.zeros(n_img, np.int64)
    comps = np.zeros(n_img, np.int64)
    sof = np.zeros(n_img, np.int64)
    is_sof_marker = np.zeros(256, bool)
    is_sof_marker[list(SOF_PROCESS)] = True
    is_segment = np.zeros(256, bool)
    is_segment[list(_SEGMENT_MARKERS)] = True
    for _ in range(32):
        live = np.flatnonzero(active)
        if live.size == 0:
            break
        p = at[live]
        fits = p + 10 <= room[live]
        suspect[live[~fits]] = True
        live, p = live[fits], p[fits]
        ff = head[live, p] == 0xFF
        marker = head[live, p + 1]
        seg_len = head[live, p + 2].astype(np.int64) * 256 + head[live, p + 3]
        found = ff & is_sof_marker[marker]
        step = ff & is_segment[marker] & (seg_len >= 2)
        f_live, f_p = live[found], p[found]
        height[f_live] = head[f_live, f_p + 5].astype(np.int64) * 256 + head[f_live, f_p + 6]
        width[f_live] = head[f_live, f_p + 7].astype(np.int64) * 256 + head[f_live, f_p + 8]
        comps[f_live] = head[f_live, f_p + 9]
        sof[f_live] = marker[found]
        at[live[step]] = p[step] + 2 + seg_len[step]
        suspect[live[~(found | step)]] = True
        active[:] = False
        active[live[step]] = True
    suspect |= active | (width == 0) | (height == 0) | (width * height > max_pixels)
    # The end-of-image marker: the last two bytes, found in the block before the next header.
    end_in_block = BLOCK - (-img_size % BLOCK)  # where the data ends within its last block
    last = block_before_next[files[img]]
    rows = np.arange(n_img)
    tail_ok = (end_in_block >= 2) & (img_size >= 2)
    safe = np.where(tail_ok, end_in_block, 2)
    tail_ok &= (last[rows, safe - 2] == 0xFF) & (last[rows, safe - 1] == 0xD9)
    suspect |= ~tail_ok
    return _Jpegs(img, width, height, comps, sof, [int(img[i]) for i in np.flatnonzero(suspect)])


def _side_file_suspects(nm: _Names, kinds: _Kinds, size_arr, starts_in_buf, buf) -> list[tuple[int, str]]:
    """6. Side files: all JSON documents through one decoder call each, all texts in one decode."""
    import numpy as np

    suspects: list[tuple[int, str]] = []
    for kind, which in (("json", np.flatnonzero(kinds.is_json)), ("text", np.flatnonzero(kinds.is_text))):
        if which.size == 0:
            continue
        w_size = size_arr[nm.files[which]]
        inline = w_size <= _FAST_HEAD
        suspects += [(int(i), kind) for i in which[~inline]]
        which, w_size = which[inline], w_size[inline]
        starts_at = (starts_in_buf[nm.files[which]] + 2 * BLOCK).tolist()
        docs = [buf[a : a + s] for a, s in zip(starts_at, w_size.tolist(), strict=True)]
        bad = _side_suspects(kind, docs)
        suspects += [(int(which[i]), kind) for i in bad]
    return suspects


def _precise_checks(suspects, nm: _Names, kinds: _Kinds, offsets, size_arr, record_ids: list[str], read_at,
                    max_pixels: int, out: Collector) -> dict[int, ImageInfo | None]:
    """7. The precise checks for whatever the vectorised ones could not clear, in tar order."""
    images: dict[int, ImageInfo | None] = {}
    window = Window(read_at)
    for i, kind in sorted(suspects):
        at = int(offsets[nm.files[i]])
        member = Member(nm.name_list[i].decode("ascii"), at - BLOCK, at, int(size_arr[nm.files[i]]), "0")
        rid = record_ids[nm.record_of[i]]
        if kind == "image":
            images[i] = check_image_member(window, rid, member, max_pixels, out, jpeg=bool(kinds.is_jpeg[i]))
        else:
            check_side(kind, window.get(member.offset, member.size), rid, member.name, out)
    return images


def _image_facts(jp: _Jpegs, nm: _Names, record_ids: list[str], images: dict[int, ImageInfo | None]):
    """Image facts, built column-wise: one C-level constructor call per image; the precisely
    checked ones replaced by their facts (or dropped when the header is unreadable)."""
    import numpy as np

    img, n_img = jp.img, jp.img.size
    modes = {c: JPEG_MODES.get(c, f"{c} components") for c in set(jp.comps.tolist())}
    names_of = np.array(nm.name_list, dtype=object)[img] if n_img else []
    ids_of = np.array(record_ids, dtype=object)[nm.record_of[img]] if n_img else []
    sof_list = jp.sof.tolist()
    facts = ImageColumns(
        ids_of.tolist() if n_img else [], list(map(bytes.decode, names_of)), jp.width.tolist(), jp.height.tolist(),
        [modes[c] for c in jp.comps.tolist()], [m in PROGRESSIVE_SOF for m in sof_list],
        [SOF_PROCESS.get(m, "") for m in sof_list],
    )
    if not images:
        return facts
    where = {i: n for n, i in enumerate(img.tolist())}
    merged: list[ImageInfo | None] = list(facts)
    for i, info in images.items():
        merged[where[i]] = info
    return [info for info in merged if info is not None]


def _zero_tail(fd: int, start: int, total_size: int) -> bool:
    """Whether everything from ``start`` to the end of the file is zeros (the end blocks' padding)."""
    pos = start
    while pos < total_size:
        chunk = os.pread(fd, min(total_size - pos, 1 << 20), pos)
        if not chunk or chunk.count(0) != len(chunk):
            return bool(not chunk and pos >= total_size)
        pos += len(chunk)
    return True


# Rows: (joined bytes, rows as an (n + 1, 1536) array, where each row starts in the bytes,
# header positions, member sizes).
_RowsResult = tuple[bytes, Any, Any, Any, Any]


def _rows_by_walking(fd: int, total_size: int) -> _RowsResult | None:
    """Follow the header chain from the start: the one sequential step, in a minimal loop.
    One read serves several headers when members are small. None when anything is unusual."""
    import numpy as np

    pread = os.pread
    zero, row_len, chunk_len = _ZERO_BLOCK, _FAST_ROW, _FAST_CHUNK  # locals: this loop runs per member
    chunks: list[bytes] = [zero]  # the block "before" the first header
    chunk_starts: list[int] = []  # file offset of each chunk read
    chunk_done: list[int] = []  # where each chunk begins in the joined chunks
    positions: list[int] = []
    sizes: list[int] = []
    add_pos, add_size = positions.append, sizes.append
    limit = total_size - 2 * BLOCK  # the two end-of-archive blocks must fit after the last member
    pos = 0
    done = 0  # bytes of the chunks before the current one
    chunk, chunk_start, chunk_end = zero, 0, 0
    while True:
        if pos + row_len > chunk_end:
            if pos > limit or len(positions) > _FAST_MAX_MEMBERS:
                return None
            done += len(chunk)
            chunk_start = pos - 512 if pos >= 512 else 0
            chunk = pread(fd, chunk_len, chunk_start)
            chunks.append(chunk)
            chunk_starts.append(chunk_start)
            chunk_done.append(done)
            chunk_end = chunk_start + len(chunk)
        i = pos - chunk_start
        if chunk[i] == 0 and chunk[i : i + 512] == zero:
            if pos > limit or chunk[i + 512 : i + 1024] != zero:
                return None
            break
        try:
            size = int(chunk[i + 124 : i + 135], 8)
        except ValueError:
            return None
        if size < 0:  # int() takes a sign: a negative size would walk back, or stay put, forever
            return None
        add_pos(pos)
        add_size(size)
        pos += 512 + ((size + 511) & -512)
    add_pos(pos)  # the end row

    header_at = np.array(positions, np.int64)
    starts = np.array(chunk_starts, np.int64)
    # Each header lies in the last chunk read before it: the one with the largest start <= it.
    which = np.searchsorted(starts, header_at, side="right") - 1
    starts_in_buf = np.array(chunk_done, np.int64)[which] + header_at - starts[which] - BLOCK
    buf, rows = _table(chunks, starts_in_buf)
    return buf, rows, starts_in_buf, header_at, np.array(sizes, np.int64), None


def _rows_from_index(fd: int, index_bytes: bytes, total_size: int) -> _RowsResult | None:
    """The same rows with the header positions taken from the shard's .idx, so without the
    sequential step. The .idx is only a hint: the chain is verified from the headers read
    (each header's size says where the next one is) and the .idx is compared byte for byte
    later. None when the hint does not hold (a stale index, or members it does not list)."""
    import numpy as np

    seen = index_tokens(index_bytes)
    if seen is None:
        return None
    version, tokens = seen
    width = 4 if version == "v1.2" else 3
    if not tokens or len(tokens) % width:
        return None
    try:
        data_at = np.array(tokens[1::width]).astype(np.int64)
        last_size = int(tokens[-width + 2])
    except ValueError:
        return None
    header_at = np.append(data_at - BLOCK, data_at[-1] + ((last_size + 511) & -512))
    if header_at.size > _FAST_MAX_MEMBERS or header_at[0] != 0 or (np.diff(header_at) < BLOCK).any() or (
        header_at[-1] > total_size - 2 * BLOCK
    ):
        return None
    # Rows close together share one read: a record's side files and the next image's header.
    row_start = header_at - BLOCK
    new_read = np.ones(header_at.size, bool)
    new_read[1:] = np.diff(row_start) > _FAST_CHUNK - BLOCK - _FAST_ROW
    first = np.flatnonzero(new_read)
    last = np.append(first[1:] - 1, header_at.size - 1)
    read_start = row_start[first]  # the first is -512: the zero block stands in front of the file
    read_len = row_start[last] + BLOCK + _FAST_ROW - read_start
    buf_at = np.cumsum(read_len) - read_len
    pread = os.pread
    chunks = [_ZERO_BLOCK + pread(fd, int(read_len[0]) - BLOCK, 0),
              *map(pread, repeat(fd), read_len[1:].tolist(), read_start[1:].tolist())]
    if sum(map(len, chunks)) != int(read_len.sum()):
        return None
    group = np.cumsum(new_read) - 1
    starts_in_buf = buf_at[group] + row_start - read_start[group]
    buf, rows = _table(chunks, starts_in_buf)
    fields = rows[:-1, BLOCK + 124 : BLOCK + 135]
    if not ((fields >= 48) & (fields <= 55)).all():
        return None
    sizes = ((fields.astype(np.int64) - 48) * (8 ** np.arange(10, -1, -1))).sum(1)
    chained = header_at[:-1] + BLOCK + ((sizes + 511) & -512) == header_at[1:]
    if not chained.all() or (rows[-1, BLOCK:] != 0).any():
        return None
    return buf, rows, starts_in_buf, header_at, sizes, tokens if width == 4 else None


def _table(chunks: list[bytes], starts_in_buf) -> tuple[bytes, Any]:
    import numpy as np

    chunks.append(bytes(_FAST_ROW))  # every row whole, even the last
    buf = b"".join(chunks)
    view = np.lib.stride_tricks.sliding_window_view(np.frombuffer(buf, np.uint8), BLOCK + _FAST_ROW)
    return buf, view[starts_in_buf]


_scan_json = json.JSONDecoder().scan_once


def _side_suspects(kind: str, docs: list[bytes]) -> list[int]:
    """Positions of the documents that one batched check cannot clear (they get the precise one)."""
    joined = b"\n".join(docs)
    try:
        text = joined.decode("utf-8")
    except UnicodeDecodeError:
        return list(range(len(docs)))
    if kind != "json":
        return []  # a newline cannot complete a broken UTF-8 sequence: all of them decode
    if len(text) != len(joined):  # non-ASCII: string and byte positions differ
        return list(range(len(docs)))
    import numpy as np

    lengths = np.fromiter(map(len, docs), np.int64, len(docs))
    ends = np.cumsum(lengths + 1) - 1
    starts = (ends - lengths).tolist()
    # map() runs the C scanner without a Python frame per document. A StopIteration from a
    # broken one would silently end map() early, hence the length check.
    try:
        found = [end for _, end in map(_scan_json, repeat(text), starts)]
    except ValueError:
        found = []
    if len(found) != len(docs):  # one of them is broken: find which, one by one
        found = []
        for start in starts:
            try:
                found.append(_scan_json(text, start)[1])
            except (StopIteration, ValueError):
                found.append(-1)
    bad = np.flatnonzero(np.array(found, np.int64) != ends).tolist()
    return bad


