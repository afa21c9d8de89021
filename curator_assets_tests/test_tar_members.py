"""The header scanner agrees with Python's tarfile on every member, in every tar format."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from curator_assets.formats.tar_members import TarError, group_records, read_members, scan_members, scan_tar, split_key
from curator_assets_tests.conftest import add_member, write_members

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def tarfile_view(path: Path) -> list[tuple[str, int, int, bool]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size, m.isreg()) for m in tar.getmembers()]


def ours(path: Path) -> list[tuple[str, int, int, bool]]:
    with open(path, "rb") as f:
        return [(m.name, m.offset, m.size, m.is_file) for m in read_members(f)]


NAMES = [
    "000001.jpg", "000001.txt", "000001.json",
    "a/b.c/000002.seg.jpg", "a/b.c/000002.txt",
    "deep/" + "x" * 120 + "/000003.jpg",  # needs the ustar prefix field, or a long-name header
    "ünïcode/000004.jpg",
    "d/.hidden.jpg",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_members_match_tarfile(tmp_path: Path, fmt: str) -> None:
    path = write_members(tmp_path / f"{fmt}.tar", [(n, bytes([i]) * (100 + 700 * i)) for i, n in enumerate(NAMES)],
                         FORMATS[fmt])
    assert ours(path) == tarfile_view(path)


def test_gnu_and_pax_long_names(tmp_path: Path) -> None:
    long = "l" * 90 + "/" + "m" * 150 + ".seg.jpg"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = write_members(tmp_path / f"long{fmt}.tar", [(long, b"x" * 1000), ("short.txt", b"y")], fmt)
        assert ours(path) == tarfile_view(path)
        assert ours(path)[0][0] == long


def test_gnu_tar_binary_archive(tmp_path: Path) -> None:
    """Archives written by GNU tar itself (directories, long names, a symlink)."""
    src = tmp_path / "src"
    (src / "sub.dir").mkdir(parents=True)
    (src / "sub.dir" / "000001.jpg").write_bytes(b"\xff\xd8" + b"a" * 3000)
    (src / "sub.dir" / ("n" * 130 + ".txt")).write_text("caption")
    (src / "link.jpg").symlink_to("sub.dir/000001.jpg")
    for fmt in ("gnu", "posix", "ustar", "v7"):
        out = tmp_path / f"{fmt}.tar"
        names = ["sub.dir", "link.jpg"] if fmt in ("ustar", "v7") else ["."]
        if fmt in ("ustar", "v7"):
            (src / "sub.dir" / ("n" * 130 + ".txt")).unlink(missing_ok=True)
        subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), *names], check=True)
        assert ours(out) == tarfile_view(out), fmt


def test_base256_size_and_pax_size(tmp_path: Path) -> None:
    # tarfile writes sizes >= 8 GiB as base-256 (GNU) or PAX; emulate the header field only.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "a.jpg", b"z" * 10)
    raw = bytearray(buf.getvalue())
    # Rewrite the size field as base-256 (same value): 0x80 then big-endian.
    raw[124:136] = b"\x80" + (10).to_bytes(11, "big")
    chksum = sum(raw[:148]) + 8 * 32 + sum(raw[156:512])
    raw[148:156] = f"{chksum:06o}\0 ".encode()
    path = tmp_path / "b256.tar"
    path.write_bytes(bytes(raw))
    assert ours(path) == tarfile_view(path)


def test_stream_and_seekable_agree(tmp_path: Path, make_shard) -> None:
    path = make_shard(n=12)

    class Stream(io.RawIOBase):
        def __init__(self, data: bytes):
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, b) -> int:
            chunk = self.inner.read(min(len(b), 777))  # short reads on purpose
            b[: len(chunk)] = chunk
            return len(chunk)

    streamed = [m for m in scan_members(Stream(path.read_bytes()))]
    with open(path, "rb") as f:
        seeked = list(scan_members(f))
    assert streamed == seeked
    assert len(seeked) == 36


def test_truncated_and_garbage(tmp_path: Path, make_shard) -> None:
    path = make_shard(n=5)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    scan = scan_tar(open(cut, "rb"))
    assert [p.code for p in scan.problems] == ["tar_truncated"]
    with tarfile.open(path) as tar:
        whole = [m for m in tar.getmembers() if m.offset_data + m.size <= len(data) // 2]
    assert len(scan.members) >= len(whole)
    with pytest.raises(TarError, match="tar_truncated"):
        read_members(open(cut, "rb"), "cut.tar")

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive\n" * 100)
    with pytest.raises(TarError, match="not a tar archive"):
        read_members(open(garbage, "rb"), str(garbage))

    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(TarError, match="empty"):
        read_members(open(empty, "rb"))


def test_recover_after_corrupt_header(tmp_path: Path, make_shard) -> None:
    path = make_shard(n=6)
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    victim = members[4]  # the second record's .txt header
    raw[victim.offset + 10] ^= 0xFF  # breaks the checksum
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    strict = scan_tar(open(bad, "rb"))
    assert [p.code for p in strict.problems] == ["tar_bad_header"]
    assert len(strict.members) == 4
    recovered = scan_tar(open(bad, "rb"), recover=True)
    assert [p.code for p in recovered.problems] == ["tar_bad_header"]
    assert [m.name for m in recovered.members] == [m.name for m in members if m is not victim]


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("a/b.c/000031.seg.jpg", "a/b.c/000031", "seg.jpg"),
        ("000031.jpg", "000031", "jpg"),
        ("x/y/z.JPG", "x/y/z", "JPG"),
        ("noext", "noext", ""),
    ],
)
def test_split_key(name: str, key: str, ext: str) -> None:
    assert split_key(name) == (key, ext)


def test_records_group_consecutive_members_only(tmp_path: Path) -> None:
    path = write_members(
        tmp_path / "r.tar",
        [("1.jpg", b"a"), ("1.txt", b"b"), ("2.jpg", b"c"), ("1.json", b"d"), (".hidden.jpg", b"e"),
         ("d/.x.jpg", b"f"), ("3.jpg", b"g")],
    )
    with open(path, "rb") as f:
        records = group_records(read_members(f))
    assert [(r.key, r.extensions) for r in records] == [
        ("1", ["jpg", "txt"]), ("2", ["jpg"]), ("1", ["json"]), ("3", ["jpg"])
    ]


def test_compressed_archives_get_a_helpful_message(tmp_path: Path, make_shard) -> None:
    import gzip

    path = make_shard(n=2)
    gz = tmp_path / "shard.tar"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(TarError, match="gzip-compressed"):
        read_members(open(gz, "rb"), str(gz))


# -- hostile headers: every one ends in a reported problem, quickly, never a loop --------------


def bounded(call, seconds: float = 60):
    """Run ``call`` in a thread and fail (instead of hanging the suite) if it does not return."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def fix_checksum(raw: bytearray, at: int) -> None:
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


def records_shard(tmp_path: Path, fmt: int = tarfile.GNU_FORMAT, n: int = 6) -> tuple[Path, list[tarfile.TarInfo]]:
    members = [(f"{i:06d}.{ext}", bytes([i]) * (300 + 200 * i)) for i in range(n) for ext in ("jpg", "txt")]
    path = write_members(tmp_path / f"s{fmt}.tar", members, fmt)
    with tarfile.open(path) as tar:
        return path, tar.getmembers()


@pytest.mark.parametrize("field, start, value", [
    ("size", 124, b"\xff" + b"\xff" * 10 + b"\xfe"),  # base-256 -2
    ("size", 124, b"-0000000012\0"),  # int() alone would read -10
    ("mode", 100, b"garbage\0"), ("uid", 108, b"12x4567\0"), ("gid", 116, b"\x81" * 8),
    ("mtime", 136, b"not a time!\0"),
])
def test_unreadable_or_negative_numeric_fields_stop_where_tarfile_stops(tmp_path: Path, field, start,
                                                                        value) -> None:
    path, infos = records_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    hit = infos[5].offset
    raw[hit + start : hit + start + len(value)] = value
    fix_checksum(raw, hit)
    path.write_bytes(raw)
    expected = [(m.name, m.offset_data, m.size) for m in infos[:5]]
    with tarfile.open(path) as tar:
        if field == "size":  # tarfile takes a negative size (and lists a member of -10 bytes)
            assert tar.getmembers()[5].size < 0
        else:  # tarfile (and so the webdataset library) stops before the header
            assert [(m.name, m.offset_data, m.size) for m in tar.getmembers()] == expected
    scan = bounded(lambda: scan_tar(io.BytesIO(bytes(raw))))
    assert [(m.name, m.offset, m.size) for m in scan.members] == expected
    assert [(p.code, p.offset) for p in scan.problems] == [("tar_bad_header", hit)]
    assert field in scan.problems[0].detail or "negative" in scan.problems[0].detail
    # Recovery skips the one header (its data holds no header) and reads on.
    with open(path, "rb") as f:
        recovered = bounded(lambda: scan_tar(f, recover=True))
    assert [m.name for m in recovered.members] == [i.name for i in infos if i is not infos[5]]
    with pytest.raises(TarError, match="tar_bad_header"), open(path, "rb") as f:
        bounded(lambda: read_members(f))


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode() + body) != n:
        n += 1
    return str(n).encode() + body


@pytest.mark.parametrize("size", ["-1", "-1000000", "1e3", " 12", "+3"])
def test_a_pax_size_that_is_not_a_plain_number_is_a_bad_header(tmp_path: Path, size: str) -> None:
    path = tmp_path / "pax.tar"
    comment = pax_record("comment", "x" * 60)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "000001.jpg", b"a" * 700)
        add_member(tar, "000002.jpg", b"b" * 700, pax_headers={"comment": "x" * 60})
    wanted = pax_record("size", size)
    filler = next(r for n in range(1, 60) if len(r := wanted + pax_record("c", "y" * n)) == len(comment))
    raw = path.read_bytes().replace(comment, filler)  # the same length: the header's size still holds
    assert raw != path.read_bytes()
    scan = bounded(lambda: scan_tar(io.BytesIO(raw), recover=True))
    assert [m.name for m in scan.members] == ["000001.jpg"]
    assert [p.code for p in scan.problems] == ["tar_bad_header"] and "PAX size" in scan.problems[0].detail


def test_a_huge_extended_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    path, infos = records_shard(tmp_path, tarfile.GNU_FORMAT, 2)
    raw = bytearray(path.read_bytes())
    long_name = bytearray(512)
    long_name[0:13] = b"././@LongLink"
    long_name[124:136] = b"77777777777\0"  # 8 GiB of "name"
    long_name[156] = ord("L")
    long_name[257:265] = b"ustar  \0"
    fix_checksum(long_name, 0)
    raw[infos[2].offset : infos[2].offset] = long_name
    scan = bounded(lambda: scan_tar(io.BytesIO(bytes(raw))))
    assert [m.name for m in scan.members] == [i.name for i in infos[:2]]
    assert [p.code for p in scan.problems] in (["tar_bad_header"], ["tar_truncated"])


def gnu_tar_ignoring_zeros(path: Path) -> list[str]:
    out = subprocess.run(["tar", "--ignore-zeros", "--list", "-f", str(path)], capture_output=True, check=True)
    return out.stdout.decode().split("\n")[:-1]


@pytest.mark.parametrize("hole", [512, 1024, 4096, 10240 + 512])
def test_a_zero_filled_hole_at_a_member_boundary_is_reported_and_read_past(tmp_path: Path, hole: int) -> None:
    """An interrupted copy leaves zeros where members were: readers stop there without a word;
    the scan reports a tar_hole and, recovering, finds every member GNU tar -i finds."""
    path, infos = records_shard(tmp_path)
    raw = bytearray(path.read_bytes())
    at = infos[4].offset
    raw[at:at] = bytes(hole)
    path.write_bytes(raw)
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == 4  # tarfile ends the archive at the zeros
    with tarfile.open(path, ignore_zeros=True) as tar:
        everything = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    assert [n for n, _, _ in everything] == gnu_tar_ignoring_zeros(path) == [i.name for i in infos]
    with open(path, "rb") as f:
        scan = bounded(lambda: scan_tar(f, recover=True))
    assert [(m.name, m.offset, m.size) for m in scan.members] == everything
    assert [(p.code, p.offset) for p in scan.problems] == [("tar_hole", at)]
    assert f"from byte {at + hole}" in scan.problems[0].detail
    with open(path, "rb") as f:
        strict = scan_tar(f)
    assert len(strict.members) == 4 and [p.code for p in strict.problems] == ["tar_hole"]
    with pytest.raises(TarError, match="tar_hole"), open(path, "rb") as f:
        read_members(f)


def test_archives_appended_to_each_other_are_a_hole_and_padding_is_not(tmp_path: Path) -> None:
    first, a = records_shard(tmp_path / "a", n=2)
    second, b = records_shard(tmp_path / "b", n=3)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with open(joined, "rb") as f:
        scan = scan_tar(f, recover=True)
    assert [m.name for m in scan.members] == [i.name for i in a + b] == gnu_tar_ignoring_zeros(joined)
    assert [p.code for p in scan.problems] == ["tar_hole"]
    # The end blocks and any zero padding after them (tar's 10 KiB records): nothing to report.
    padded = tmp_path / "padded.tar"
    padded.write_bytes(first.read_bytes() + bytes(20 * 512))
    with open(padded, "rb") as f:
        assert scan_tar(f, recover=True).problems == []


def test_a_header_with_foreign_magic_is_read_as_every_reader_reads_it(tmp_path: Path) -> None:
    """A junk format magic with a valid checksum: tarfile, GNU tar and bsdtar read the header as
    a pre-POSIX one; a scanner that refused it would drop records the readers all see."""
    path, infos = records_shard(tmp_path, tarfile.GNU_FORMAT, 3)
    raw = bytearray(path.read_bytes())
    raw[infos[2].offset + 257 : infos[2].offset + 265] = b"NOTAR\0\0\0"
    fix_checksum(raw, infos[2].offset)
    path.write_bytes(raw)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    assert [n for n, _, _ in expected] == [i.name for i in infos]
    for tool, package in (("tar", "tar"), ("bsdtar", "libarchive-tools")):
        command = shutil.which(tool)
        if command is None:
            pytest.fail(f"{tool} is missing: apt-get install -y {package} (.ci/run installs it)", pytrace=False)
        listed = subprocess.run([command, "-tf", str(path)], capture_output=True, text=True, check=True).stdout
        assert listed.split("\n")[:-1] == [i.name for i in infos], tool
    scan = scan_tar(io.BytesIO(bytes(raw)))
    assert scan.problems == [] and [(m.name, m.offset, m.size) for m in scan.members] == expected
