"""The header scanner agrees with Python's tarfile on every member, in every tar format."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from curator_assets.tar_members import (
    TarError,
    group_records,
    read_members,
    scan_members,
    scan_tar,
    split_key,
)
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
