"""A corpus of damaged and unusual shards, and the problems each one must produce.

Every builder writes ``<root>/<case name>/00000.tar`` (and a ``00000.idx`` where the case is
about the index) and returns a :class:`Case`: the exact problem codes expected and how many
records must still be counted. Expected record counts are derived independently of the code
under test: from Python's ``tarfile`` reading the intact archive before the damage, and from
:func:`count_records`, a separate implementation of the WebDataset grouping rule.

Three ways of making shards: ``tarfile`` (ustar, GNU, PAX), GNU ``tar`` through a subprocess
(symlinks, sparse files, volume labels, its own long-name and PAX encodings), and byte surgery
on an intact archive (truncation, broken checksums, foreign magic, stray zero blocks).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from curator_assets.cli.demo import PhotoRecord

SHARD = "00000"
MTIME = 1_700_000_000


@dataclass
class Case:
    name: str
    path: Path  # the tar
    codes: Counter[str]  # problems expected from the tar and its .idx (idx_missing excluded)
    records: int  # records that must still be counted
    index: bool = False  # an .idx was written beside the tar
    max_pixels: int | None = None  # validate with this limit instead of the default
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def expected_for_file(self) -> Counter[str]:
        """The codes when the tar alone is validated (no index given)."""
        return Counter({code: n for code, n in self.codes.items() if not code.startswith("idx_")})

    def expected_for_shard(self) -> Counter[str]:
        """The codes when validated as a dataset shard, where a missing .idx is reported too."""
        codes = Counter(self.codes)
        if not self.index:
            codes["idx_missing"] += 1
        return codes


# ---------------------------------------------------------------------------------------------
# Independent helpers


def count_records(names: Iterable[str]) -> int:
    """Records as WebDataset readers form them from these regular-file names: consecutive
    files whose basename shares the part before its first dot; hidden files and files without
    an extension belong to none."""
    count, last = 0, None
    for name in names:
        folder, _, base = name.rpartition("/")
        if not base or base[0] == "." or "." not in base:
            continue
        key = (folder + "/" if folder else "") + base.split(".", 1)[0]
        if key != last:
            count += 1
            last = key
    return count


def layout(path: Path) -> list[tarfile.TarInfo]:
    """The members of an intact tar as Python's tarfile sees them (header and data offsets)."""
    with tarfile.open(path) as tar:
        return tar.getmembers()


def record_members(photo: PhotoRecord, key: str | None = None) -> list[tuple[str, bytes]]:
    key = key or photo.key
    return [
        (f"{key}.jpg", photo.jpg),
        (f"{key}.txt", photo.caption.encode()),
        (f"{key}.json", json.dumps(photo.metadata, sort_keys=True).encode()),
    ]


def shard_members(photos: list[PhotoRecord], n: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for photo in photos[:n]:
        out += record_members(photo)
    return out


def write_tar(path: Path, members: Iterable[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT,
              encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt, encoding=encoding) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = MTIME
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def gnu_tar(path: Path, folder: Path, names: list[str], *options: str) -> Path:
    """Archive ``names`` (relative to ``folder``, in this order) with GNU tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", *options, f"--mtime=@{MTIME}", "--owner=0", "--group=0", "--numeric-owner",
         "-cf", str(path), "-C", str(folder), *names],
        check=True, capture_output=True,
    )
    return path


def stage_files(folder: Path, members: Iterable[tuple[str, bytes]]) -> list[str]:
    """Write members as files under ``folder`` (for GNU tar); returns their names in order."""
    names = []
    for name, data in members:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        names.append(name)
    return names


def set_header_field(data: bytearray, header: int, start: int, value: bytes, *, fix_checksum: bool) -> None:
    data[header + start : header + start + len(value)] = value
    if fix_checksum:
        block = data[header : header + 512]
        block[148:156] = b" " * 8
        data[header + 148 : header + 156] = b"%06o\0 " % sum(block)


def index_text(entries: list[list[tuple[str, int, int, str]]], version: str = "v1.2") -> bytes:
    """An .idx written from (ext, offset, size, name) lists, one list per record."""
    lines = [f"{version} {len(entries)}"]
    for rec in entries:
        if version == "v1.2":
            lines.append(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in rec))
        else:
            lines.append(" ".join(f"{e} {o} {s}" for e, o, s, _ in rec))
    return ("\n".join(lines) + "\n").encode()


def index_from_tarfile(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Index entries of an intact tar computed with tarfile (not with the code under test)."""
    entries: list[list[tuple[str, int, int, str]]] = []
    last = None
    for m in layout(path):
        if not m.isfile():
            continue
        folder, _, base = m.name.rpartition("/")
        if not base or base[0] == "." or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        key = (folder + "/" if folder else "") + stem
        if key != last:
            entries.append([])
            last = key
        entries[-1].append((ext, m.offset_data, m.size, m.name))
    return entries


def png_bytes(size=(32, 24)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def with_sof_size(jpg: bytes, width: int, height: int) -> bytes:
    """A copy of a JPEG whose frame header claims another size (a decompression bomb's trick)."""
    data = bytearray(jpg)
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5 : pos + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(data)
        pos += 2 + length
    raise ValueError("no frame header")


# ---------------------------------------------------------------------------------------------
# The cases

N = 6  # records in the base shard of most cases

Builder = Callable[[Path, list[PhotoRecord]], Case]
BUILDERS: dict[str, Builder] = {}
CLEAN_BUILDERS: dict[str, Builder] = {}


def case(registry: dict[str, Builder] = BUILDERS):
    def register(fn: Builder) -> Builder:
        registry[fn.__name__] = fn
        return fn

    return register


def _target(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{SHARD}.tar"


def _truncated(root: Path, photos: list[PhotoRecord], name: str,
               cut_at: Callable[[list[tarfile.TarInfo]], int]) -> Case:
    path = _target(root, name)
    write_tar(path, shard_members(photos, N))
    members = layout(path)
    cut = cut_at(members)
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    survivors = [m.name for m in members if m.offset_data + m.size <= cut]
    return Case(name, path, Counter(tar_truncated=1), count_records(survivors))


# -- tar structure -----------------------------------------------------------------------------


@case()
def truncated_mid_image(root, photos):
    return _truncated(root, photos, "truncated_mid_image", lambda ms: ms[9].offset_data + ms[9].size // 2)


@case()
def truncated_mid_text(root, photos):
    return _truncated(root, photos, "truncated_mid_text", lambda ms: ms[10].offset_data + 10)


@case()
def truncated_mid_header(root, photos):
    return _truncated(root, photos, "truncated_mid_header", lambda ms: ms[12].offset + 100)


@case()
def truncated_without_end_blocks(root, photos):
    return _truncated(root, photos, "truncated_without_end_blocks",
                      lambda ms: ms[-1].offset_data + (ms[-1].size + 511) // 512 * 512)


@case()
def truncated_inside_end_blocks(root, photos):
    return _truncated(root, photos, "truncated_inside_end_blocks",
                      lambda ms: ms[-1].offset_data + (ms[-1].size + 511) // 512 * 512 + 100)


@case()
def empty_file(root, photos):
    path = _target(root, "empty_file")
    path.write_bytes(b"")
    return Case("empty_file", path, Counter(tar_truncated=1), 0)


def _damaged_header(root, photos, name: str, member: int, start: int, value: bytes, fix: bool,
                    extra_codes: dict | None = None) -> Case:
    path = _target(root, name)
    write_tar(path, shard_members(photos, N))
    members = layout(path)
    data = bytearray(path.read_bytes())
    set_header_field(data, members[member].offset, start, value, fix_checksum=fix)
    path.write_bytes(bytes(data))
    survivors = [m.name for i, m in enumerate(members) if i != member]
    return Case(name, path, Counter(tar_bad_header=1, **(extra_codes or {})), count_records(survivors))


@case()
def bad_checksum_side_file(root, photos):
    # Record 2's caption header is damaged: the caption is lost, the record (image + JSON) stays.
    return _damaged_header(root, photos, "bad_checksum_side_file", 7, 0, b"X", fix=False)


@case()
def bad_checksum_image(root, photos):
    # Record 2's image header is damaged: its caption and JSON remain, as a record without an image.
    return _damaged_header(root, photos, "bad_checksum_image", 6, 0, b"X", fix=False,
                           extra_codes={"missing_image": 1})


@case()
def foreign_magic(root, photos):
    # The ustar magic overwritten with junk (checksum recomputed): tarfile, GNU tar and bsdtar all
    # read such a header as a pre-POSIX one, and so do we. Nothing to report.
    path = _target(root, "foreign_magic")
    write_tar(path, shard_members(photos, N))
    data = bytearray(path.read_bytes())
    set_header_field(data, layout(path)[5].offset, 257, b"NOTAR\0", fix_checksum=True)
    path.write_bytes(bytes(data))
    return Case("foreign_magic", path, Counter(), N)


@case()
def garbage(root, photos):
    path = _target(root, "garbage")
    path.write_bytes(random.Random(3).randbytes(20_000))
    return Case("garbage", path, Counter(not_a_tar=1), 0)


@case()
def zip_named_tar(root, photos):
    path = _target(root, "zip_named_tar")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in shard_members(photos, 2):
            zf.writestr(name, data)
    return Case("zip_named_tar", path, Counter(not_a_tar=1), 0)


@case()
def zero_block_inside(root, photos):
    path = _target(root, "zero_block_inside")
    write_tar(path, shard_members(photos, N))
    members = layout(path)
    data = path.read_bytes()
    at = members[9].offset
    path.write_bytes(data[:at] + bytes(512) + data[at:])
    return Case("zero_block_inside", path, Counter(tar_hole=1), N)


@case()
def garbage_mode_field(root, photos):
    # Text in the mode field (checksum recomputed): tarfile and the webdataset library stop there.
    return _damaged_header(root, photos, "garbage_mode_field", 4, 100, b"rw-r--r\0", fix=True)


@case()
def garbage_mtime_field(root, photos):
    return _damaged_header(root, photos, "garbage_mtime_field", 8, 136, b"yesterday\0\0\0", fix=True)


@case()
def negative_size(root, photos):
    # A base-256 size of -2 (checksum recomputed): a reader that believes it steps backwards forever.
    return _damaged_header(root, photos, "negative_size", 5, 124, b"\xff" * 11 + b"\xfe", fix=True)


@case()
def negative_size_text(root, photos):
    # An octal size of -1000 (checksum recomputed): one step of -512 blocks plus the header's
    # own block leaves a reader that believes it on the same header forever.
    return _damaged_header(root, photos, "negative_size_text", 5, 124, b"-0000001750\0", fix=True)


@case()
def zero_filled_hole(root, photos):
    # An interrupted copy: 8 KiB of zeros where record 3 starts, then the rest of the shard.
    path = _target(root, "zero_filled_hole")
    write_tar(path, shard_members(photos, N))
    members = layout(path)
    data = path.read_bytes()
    at = members[9].offset
    path.write_bytes(data[:at] + bytes(8192) + data[at:])
    return Case("zero_filled_hole", path, Counter(tar_hole=1), N)


@case()
def symlink_gnu_tar(root, photos):
    path = _target(root, "symlink_gnu_tar")
    stage = root / "_stage_symlink"
    names = stage_files(stage, shard_members(photos, 3))
    os.symlink(names[0], stage / "link.jpg")
    gnu_tar(path, stage, names + ["link.jpg"], "--format=gnu")
    shutil.rmtree(stage)
    return Case("symlink_gnu_tar", path, Counter(unsupported_member=1), count_records(names))


@case()
def hard_link(root, photos):
    path = _target(root, "hard_link")
    members = shard_members(photos, 3)
    write_tar(path, members)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("copy.jpg")
        info.type = tarfile.LNKTYPE
        info.linkname = members[0][0]
        tar.addfile(info)
    return Case("hard_link", path, Counter(unsupported_member=1), 3)


@case()
def device_and_fifo(root, photos):
    path = _target(root, "device_and_fifo")
    members = shard_members(photos, 3)
    write_tar(path, members)
    with tarfile.open(path, "a") as tar:
        for name, kind in (("dev.jpg", tarfile.CHRTYPE), ("pipe.txt", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
    return Case("device_and_fifo", path, Counter(unsupported_member=2), 3)


def _sparse_file(stage: Path) -> str:
    with open(stage / "holes.bin", "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"data in the middle")
    return "holes.bin"


def _sparse_case(root, photos, name: str, fmt: str) -> Case:
    """Three records and a sparse file, written by GNU tar itself in format ``fmt``."""
    path = _target(root, name)
    stage = root / f"_stage_{name}"
    names = stage_files(stage, shard_members(photos, 3))
    gnu_tar(path, stage, names + [_sparse_file(stage)], f"--format={fmt}", "--sparse")
    shutil.rmtree(stage)
    return Case(name, path, Counter(unsupported_member=1), 3)


@case()
def sparse_gnu_tar(root, photos):
    case = _sparse_case(root, photos, "sparse_gnu_tar", "gnu")
    sparse = [m.name for m in layout(case.path) if m.issparse()]
    assert sparse == ["holes.bin"], f"GNU tar did not write a sparse member: {sparse}"
    return case


@case()
def sparse_pax_tar(root, photos):
    return _sparse_case(root, photos, "sparse_pax_tar", "pax")


@case()
def volume_label(root, photos):
    path = _target(root, "volume_label")
    stage = root / "_stage_label"
    names = stage_files(stage, shard_members(photos, 3))
    gnu_tar(path, stage, names, "--format=gnu", "--label=shard-00000")
    shutil.rmtree(stage)
    return Case("volume_label", path, Counter(stray_member=1), 3)


# -- records -----------------------------------------------------------------------------------


def _members_case(root, name: str, members: list[tuple[str, bytes]], codes: dict, *, fmt=tarfile.GNU_FORMAT,
                  encoding="utf-8", max_pixels=None) -> Case:
    path = write_tar(_target(root, name), members, fmt=fmt, encoding=encoding)
    return Case(name, path, Counter(codes), count_records(n for n, _ in members), max_pixels=max_pixels)


@case()
def missing_image(root, photos):
    members = shard_members(photos, N)
    del members[6]  # record 2 keeps its caption and JSON only
    return _members_case(root, "missing_image", members, {"missing_image": 1})


@case()
def duplicate_record_id(root, photos):
    members = shard_members(photos, 5) + record_members(photos[1])
    return _members_case(root, "duplicate_record_id", members, {"duplicate_record_id": 1})


@case()
def duplicate_member_adjacent(root, photos):
    members = shard_members(photos, N)
    members.insert(7, members[6])  # record 2's image twice in a row
    return _members_case(root, "duplicate_member_adjacent", members, {"duplicate_record_id": 1})


@case()
def split_record(root, photos):
    r0, r1 = record_members(photos[0]), record_members(photos[1])
    members = r0[:2] + r1 + r0[2:] + shard_members(photos[2:], 2)
    # The second fragment of record 0 (its JSON alone) is also a record without an image.
    return _members_case(root, "split_record", members, {"split_record": 1, "missing_image": 1})


@case()
def dotdot_record_id(root, photos):
    members = shard_members(photos, 3) + record_members(photos[3], f"../outside/{photos[3].key}")
    return _members_case(root, "dotdot_record_id", members, {"bad_record_id": 1})


@case()
def absolute_record_id(root, photos):
    members = shard_members(photos, 3) + record_members(photos[3], f"/data/{photos[3].key}")
    return _members_case(root, "absolute_record_id", members, {"bad_record_id": 1})


@case()
def empty_record_id(root, photos):
    members = shard_members(photos, 3) + [(".jpg", photos[3].jpg)]
    return _members_case(root, "empty_record_id", members, {"bad_record_id": 1})


@case()
def space_in_record_id(root, photos):
    members = shard_members(photos, 3) + record_members(photos[3], "holiday photo 3")
    return _members_case(root, "space_in_record_id", members, {"bad_record_id": 1})


@case()
def non_utf8_record_id(root, photos):
    # Latin-1 encoding writes the byte 0xE9: not UTF-8, which every reader assumes.
    members = shard_members(photos, 3) + record_members(photos[3], "caf\u00e9")
    return _members_case(root, "non_utf8_record_id", members, {"bad_record_id": 1}, encoding="latin-1")


@case()
def stray_member(root, photos):
    members = shard_members(photos, 3) + [("README", b"not a record")] + shard_members(photos[3:], 2)
    return _members_case(root, "stray_member", members, {"stray_member": 1})


@case()
def hidden_member(root, photos):
    members = [(".DS_Store", b"\0\0\0\1Bud1")] + shard_members(photos, 3)
    return _members_case(root, "hidden_member", members, {"stray_member": 1})


@case()
def no_records(root, photos):
    path = _target(root, "no_records")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT):
        pass  # end-of-archive blocks only
    return Case("no_records", path, Counter(no_records=1), 0)


# -- image bytes ------------------------------------------------------------------------------


def _replace(photos, n: int, index: int, data: bytes) -> list[tuple[str, bytes]]:
    members = shard_members(photos, n)
    members[index] = (members[index][0], data)
    return members


@case()
def png_named_jpg(root, photos):
    return _members_case(root, "png_named_jpg", _replace(photos, N, 3, png_bytes()), {"not_jpeg": 1})


@case()
def zero_byte_jpg(root, photos):
    return _members_case(root, "zero_byte_jpg", _replace(photos, N, 3, b""), {"not_jpeg": 1})


@case()
def jpeg_truncated(root, photos):
    jpg = photos[1].jpg
    return _members_case(root, "jpeg_truncated", _replace(photos, N, 3, jpg[: len(jpg) * 6 // 10]),
                         {"jpeg_truncated": 1})


@case()
def jpeg_bad_header(root, photos):
    broken = b"\xff\xd8\xff\xe0\x00\x01" + photos[1].jpg[6:]  # APP0 segment of length 1
    return _members_case(root, "jpeg_bad_header", _replace(photos, N, 3, broken), {"jpeg_bad_header": 1})


@case()
def jpeg_trailing_data(root, photos):
    return _members_case(root, "jpeg_trailing_data", _replace(photos, N, 3, photos[1].jpg + b"appended bytes"),
                         {"jpeg_trailing_data": 1})


@case()
def decompression_bomb(root, photos):
    bomb = with_sof_size(photos[1].jpg, 20_000, 20_000)
    return _members_case(root, "decompression_bomb", _replace(photos, N, 3, bomb), {"image_too_large": 1})


@case()
def over_configured_pixel_limit(root, photos):
    w, h = 160, 120  # the photos fixture's size; the limit is one pixel less
    return _members_case(root, "over_configured_pixel_limit", shard_members(photos, N), {"image_too_large": N},
                         max_pixels=w * h - 1)


# -- side files ------------------------------------------------------------------------------


@case()
def bad_json(root, photos):
    return _members_case(root, "bad_json", _replace(photos, N, 5, b'{"key": "000000001", '), {"bad_json": 1})


@case()
def empty_json(root, photos):
    return _members_case(root, "empty_json", _replace(photos, N, 8, b""), {"bad_json": 1})


@case()
def bad_text(root, photos):
    return _members_case(root, "bad_text", _replace(photos, N, 4, "caf\u00e9".encode("latin-1")), {"bad_text": 1})


# -- the index --------------------------------------------------------------------------------


def _indexed(root, photos, name: str, codes: dict, make_index: Callable[[Path], bytes]) -> Case:
    path = write_tar(_target(root, name), shard_members(photos, N))
    path.with_suffix(".idx").write_bytes(make_index(path))
    return Case(name, path, Counter(codes), N, index=True)


@case()
def idx_unreadable(root, photos):
    return _indexed(root, photos, "idx_unreadable", {"idx_unreadable": 1}, lambda p: b"this is not an index\n")


@case()
def idx_stale_count(root, photos):
    return _indexed(root, photos, "idx_stale_count", {"idx_stale": 1},
                    lambda p: index_text(index_from_tarfile(p)[:-1]))


@case()
def idx_stale_offset(root, photos):
    def shifted(p: Path) -> bytes:
        entries = index_from_tarfile(p)
        ext, off, size, name = entries[3][0]
        entries[3][0] = (ext, off + 512, size, name)
        return index_text(entries)

    return _indexed(root, photos, "idx_stale_offset", {"idx_stale": 1}, shifted)


@case()
def idx_of_another_shard(root, photos):
    def other(p: Path) -> bytes:
        other_tar = write_tar(p.parent / "_other" / "00001.tar", shard_members(photos[N:], N))
        data = index_text(index_from_tarfile(other_tar))
        shutil.rmtree(other_tar.parent)
        return data

    return _indexed(root, photos, "idx_of_another_shard", {"idx_stale": 1}, other)


@case()
def idx_v11_stale(root, photos):
    def wrong_size(p: Path) -> bytes:
        entries = index_from_tarfile(p)
        ext, off, size, name = entries[1][1]
        entries[1][1] = (ext, off, size + 1, name)
        return index_text(entries, "v1.1")

    return _indexed(root, photos, "idx_v11_stale", {"idx_stale": 1}, wrong_size)


# -- several problems at once -----------------------------------------------------------------


@case()
def truncated_with_bad_json(root, photos):
    path = write_tar(_target(root, "truncated_with_bad_json"), _replace(photos, N, 5, b"{broken"))
    members = layout(path)
    cut = members[13].offset_data + 5
    path.write_bytes(path.read_bytes()[:cut])
    survivors = [m.name for m in members if m.offset_data + m.size <= cut]
    return Case("truncated_with_bad_json", path, Counter(tar_truncated=1, bad_json=1), count_records(survivors))


# ---------------------------------------------------------------------------------------------
# Clean shards in every format: zero problems


def _clean(root, name: str, members, fmt=tarfile.GNU_FORMAT, index=True) -> Case:
    path = write_tar(_target(root, name), members, fmt=fmt)
    if index:
        path.with_suffix(".idx").write_bytes(index_text(index_from_tarfile(path)))
    return Case(name, path, Counter(), count_records(n for n, _ in members), index=index)


@case(CLEAN_BUILDERS)
def clean_ustar(root, photos):
    return _clean(root, "clean_ustar", shard_members(photos, N), tarfile.USTAR_FORMAT)


@case(CLEAN_BUILDERS)
def clean_gnu(root, photos):
    return _clean(root, "clean_gnu", shard_members(photos, N), tarfile.GNU_FORMAT)


@case(CLEAN_BUILDERS)
def clean_pax(root, photos):
    # Non-ASCII and long names make tarfile write PAX extended headers.
    members = shard_members(photos, 2)
    for n, photo in enumerate(photos[2:N]):
        members += record_members(photo, f"r\u00e9sum\u00e9/{'x' * 110}/{n:04d}")
    return _clean(root, "clean_pax", members, tarfile.PAX_FORMAT)


@case(CLEAN_BUILDERS)
def clean_gnu_long_names(root, photos):
    members = []
    for n, photo in enumerate(photos[:N]):
        members += record_members(photo, f"{'deep/' * 25}{n:06d}")
    return _clean(root, "clean_gnu_long_names", members, tarfile.GNU_FORMAT)


def _clean_gnu_tar(root, photos, name: str, *options: str, with_dirs: bool = False) -> Case:
    path = _target(root, name)
    stage = root / f"_stage_{name}"
    members = []
    for n, photo in enumerate(photos[:N]):
        members += record_members(photo, f"part{n % 2}/{photo.key}" if with_dirs else None)
    names = stage_files(stage, members)
    args = sorted({n.split("/")[0] for n in names}) if with_dirs else names
    gnu_tar(path, stage, args, *options, "--sort=name")
    shutil.rmtree(stage)
    path.with_suffix(".idx").write_bytes(index_text(index_from_tarfile(path)))
    regular = [m.name for m in layout(path) if m.isfile()]
    return Case(name, path, Counter(), count_records(regular), index=True)


@case(CLEAN_BUILDERS)
def clean_gnu_tar_gnu(root, photos):
    return _clean_gnu_tar(root, photos, "clean_gnu_tar_gnu", "--format=gnu")


@case(CLEAN_BUILDERS)
def clean_gnu_tar_pax(root, photos):
    return _clean_gnu_tar(root, photos, "clean_gnu_tar_pax", "--format=pax")


@case(CLEAN_BUILDERS)
def clean_gnu_tar_with_directories(root, photos):
    return _clean_gnu_tar(root, photos, "clean_gnu_tar_with_directories", "--format=gnu", with_dirs=True)


@case(CLEAN_BUILDERS)
def clean_upper_case_and_padding(root, photos):
    members = shard_members(photos, N)
    members[0] = (members[0][0].replace(".jpg", ".JPG"), members[0][1])
    members[3] = (members[3][0].replace(".jpg", ".jpeg"), members[3][1] + bytes(300))  # zero padding after EOI
    return _clean(root, "clean_upper_case_and_padding", members)


@case(CLEAN_BUILDERS)
def clean_progressive(root, photos):
    from PIL import Image

    members = shard_members(photos, N)
    for i in range(0, len(members), 3):
        buf = io.BytesIO()
        Image.open(io.BytesIO(members[i][1])).save(buf, "JPEG", progressive=True, quality=85)
        members[i] = (members[i][0], buf.getvalue())
    return _clean(root, "clean_progressive", members)


@case(CLEAN_BUILDERS)
def clean_v11_index(root, photos):
    path = write_tar(_target(root, "clean_v11_index"), shard_members(photos, N))
    path.with_suffix(".idx").write_bytes(index_text(index_from_tarfile(path), "v1.1"))
    return Case("clean_v11_index", path, Counter(), N, index=True)


def build(root: Path, photos: list[PhotoRecord], names: Iterable[str] | None = None, *,
          clean: bool = False) -> list[Case]:
    registry = CLEAN_BUILDERS if clean else BUILDERS
    return [registry[name](root, photos) for name in (names or registry)]
