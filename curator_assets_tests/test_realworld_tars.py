"""Unusual but valid tars, as users bring them, checked against the real tools that read them.

A corpus built by GNU tar (every ``--format``, owners, PAX options, a global PAX header, sparse
files, links, xattrs, labels, incremental dumps) and by Python's tarfile (every format, PAX
headers with non-ASCII names, large ids, fractional mtimes), with directories interleaved,
leading ``./``, long paths, 0- and 512-byte members, trailing bytes after the end blocks and a
single end block. For each shard: our members equal tarfile's, our records equal what the
webdataset library yields, DALI's reader given our ``.idx`` returns exactly tarfile's bytes,
the index is what the format says (and byte-identical to ``wds2idx`` where that tool is right),
and validation passes, with the fast pass agreeing with the precise one.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from curator_assets.cli.demo import PhotoRecord
from curator_assets.formats.idx import IndexFormatError, format_index, index_bytes_of_members, parse_index
from curator_assets.formats.tar_members import _batches, group_records, scan_tar
from curator_assets.steps.index import ensure_index
from curator_assets.steps.validate import validate_file, validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets_tests.test_index import dali_read_all, wds2idx

MTIME = 1_700_000_000
BLOCK = 512


@dataclass
class Case:
    name: str
    path: Path
    wds2idx_ok: bool = True  # wds2idx (GNU tar's listing) gets this tar right


def tree(photos: list[PhotoRecord], *, longest: int = 1000, unicode: bool = True) -> list[tuple[str, bytes]]:
    """Files of a shard with awkward names, in the order ``tar --sort=name`` stores them."""
    p = photos
    files = [
        ("000001.jpg", p[0].jpg), ("000001.json", b'{"a": 1}'), ("000001.txt", b"caption one"),
        # Each kept adjacent with its record: empty, exactly one block, a block and a byte.
        ("000006.bin", b"\x00" * 1024), ("000006.block.txt", b"b" * 512), ("000006.empty.txt", b""),
        ("000006.jpg", p[1].jpg), ("000006.odd.txt", b"c" * 513),
        ("000008.JPG", p[2].jpg), ("000008.TXT", b"upper-case extensions"),
        ("a/b.c/000002.cap.txt", b"a dotted folder and a two-part extension"), ("a/b.c/000002.jpg", p[3].jpg),
        ("l" * 60 + "/" + "m" * 60 + "/000004.jpg", p[4].jpg),  # > 100 bytes: ustar prefix or long name
        ("l" * 60 + "/" + "m" * 60 + "/000004.txt", b"long path"),
        ("x/" + "n" * 96 + ".jpg", p[5].jpg),  # a 100-byte basename: the name field has no terminator
    ]
    if unicode:
        files += [("ünïcode/日本.jpg", p[6].jpg), ("ünïcode/日本.txt", b"non-ASCII names")]
    if longest > 256:
        deep = "/".join(c * 90 for c in "pqr")
        files += [(f"{deep}/000005.jpg", p[7].jpg), (f"{deep}/000005.txt", b"over 256 bytes of path")]
    return sorted((f for f in files if len(f[0].encode()) <= longest), key=lambda f: f[0].split("/"))


def stage(folder: Path, files: list[tuple[str, bytes]]) -> Path:
    for name, data in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.utime(target, (MTIME, MTIME))
    return folder


def gnu_tar(out: Path, src: Path, *options: str, names: tuple[str, ...] = (".",)) -> Path:
    done = subprocess.run(["tar", "--sort=name", *options, "-cf", str(out), "-C", str(src), *names],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def tarfile_tar(out: Path, files: list[tuple[str, bytes]], fmt: int, *, dirs: bool = True,
                edit: Callable[[tarfile.TarInfo], None] | None = None, **open_kw) -> Path:
    """A tar written by Python's tarfile, with each folder's member before its first file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=fmt, **open_kw) as tar:
        seen: set[str] = set()
        for name, data in files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folder = "/".join(parts[:i])
                if dirs and folder not in seen:
                    seen.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            if edit:
                edit(info)
            tar.addfile(info, io.BytesIO(data))
    return out


def build_corpus(root: Path, photos: list[PhotoRecord]) -> dict[str, Case]:
    cases: dict[str, Case] = {}

    def add(name: str, path: Path, **kw) -> None:
        cases[name] = Case(name, path, **kw)

    full = stage(root / "src-full", tree(photos))
    short = stage(root / "src-ustar", tree(photos, longest=255))
    plain = stage(root / "src-plain", tree(photos, longest=99))  # no GNU long names: wds2idx is right
    v7 = stage(root / "src-v7", tree(photos, longest=99, unicode=False))

    # GNU tar, every format. GNU long names: wds2idx points at the ././@LongLink header.
    add("gnu_tar_gnu", gnu_tar(root / "gnu_tar_gnu.tar", full, "--format=gnu"), wds2idx_ok=False)
    add("gnu_tar_oldgnu", gnu_tar(root / "gnu_tar_oldgnu.tar", full, "--format=oldgnu"), wds2idx_ok=False)
    add("gnu_tar_posix", gnu_tar(root / "gnu_tar_posix.tar", full, "--format=posix"))
    add("gnu_tar_ustar", gnu_tar(root / "gnu_tar_ustar.tar", short, "--format=ustar"))
    add("gnu_tar_v7", gnu_tar(root / "gnu_tar_v7.tar", v7, "--format=v7"))
    add("gnu_tar_owners", gnu_tar(root / "gnu_tar_owners.tar", plain, "--format=gnu", "--owner=nobody:4294967",
                                  "--group=users:3000000", "--numeric-owner", "--mtime=1970-01-02"))
    add("gnu_tar_global_pax", gnu_tar(root / "gnu_tar_global_pax.tar", full, "--format=posix",
                                      "--pax-option=globexthdr.name=x,comment=hello"))
    add("gnu_tar_pax_keywords", gnu_tar(root / "gnu_tar_pax_keywords.tar", full, "--format=posix",
                                        "--pax-option=comment:=per-member,delete=atime,delete=ctime"))
    add("gnu_tar_blocking_1", gnu_tar(root / "gnu_tar_blocking_1.tar", plain, "--format=gnu", "-b", "1"))
    add("gnu_tar_label", gnu_tar(root / "gnu_tar_label.tar", plain, "--format=gnu", "--label=shard 7"))
    # Directories as 'D' members with a listing, and times in the field tarfile reads as a prefix.
    add("gnu_tar_incremental", gnu_tar(root / "gnu_tar_incremental.tar", plain, "--format=gnu",
                                       f"--listed-incremental={root / 'snapshot'}"))

    # Links, sparse files, extended attributes.
    linked = stage(root / "src-links", tree(photos, longest=99))
    os.link(linked / "000001.txt", linked / "000009.txt")
    (linked / "000009.jpg").symlink_to("000006.jpg")
    with open(linked / "000009.raw", "wb") as f:  # mostly a hole: a sparse member with --sparse
        f.truncate(1 << 20)
        f.seek(512 << 10)
        f.write(b"data in the middle")
    # A sparse member is listed by GNU tar as a plain file with its expanded size: wds2idx indexes it.
    for fmt in ("gnu", "posix"):
        add(f"gnu_tar_{fmt}_links_sparse", gnu_tar(root / f"gnu_tar_{fmt}_links_sparse.tar", linked, f"--format={fmt}",
                                                   "--sparse"), wds2idx_ok=False)
    add("gnu_tar_dereferenced", gnu_tar(root / "gnu_tar_dereferenced.tar", linked, "--format=gnu",
                                        "--hard-dereference", "-h"))
    attrs = stage(root / "src-xattrs", tree(photos))
    try:
        os.setxattr(attrs / "000001.jpg", "user.origin", b"camera 7")
    except OSError:  # a file system without user xattrs: the PAX records come from tarfile below
        pass
    add("gnu_tar_xattrs", gnu_tar(root / "gnu_tar_xattrs.tar", attrs, "--format=posix", "--xattrs",
                                  "--xattrs-include=*"))

    for version in ("0.0", "0.1"):  # the older PAX sparse encodings (1.0 is the default above)
        add(f"gnu_tar_sparse_{version}", gnu_tar(root / f"gnu_tar_sparse_{version}.tar", linked, "--format=posix",
                                                  "--sparse", f"--sparse-version={version}"), wds2idx_ok=False)

    # Directories interleaved inside a record, in an order no --sort gives.
    order = ["a", "000001.jpg", "a/b.c", "000001.json", "ünïcode", "000001.txt", "a/b.c/000002.cap.txt", "a",
             "a/b.c/000002.jpg"]
    add("gnu_tar_dirs_interleaved", gnu_tar(root / "gnu_tar_dirs_interleaved.tar", plain, "--format=gnu",
                                            "--no-recursion", names=tuple(order)))

    # The end of the archive: bytes after it, a single end block, a second archive after it.
    base = gnu_tar(root / "base.tar", plain, "--format=gnu", "-b", "1").read_bytes()
    garbage = (root / "trailing_garbage.tar")
    garbage.write_bytes(base + b"not part of the archive " * 100)
    add("trailing_garbage", garbage)
    single = root / "single_end_block.tar"
    single.write_bytes(base[:-512])
    add("single_end_block", single)

    # bsdtar (libarchive), every tar format it writes, with "./" names and folders as members.
    for fmt, src, files in (("ustar", short, tree(photos, longest=255)), ("pax", full, tree(photos)),
                            ("gnutar", full, tree(photos)), ("v7", v7, tree(photos, longest=99, unicode=False)),
                            ("default", full, tree(photos))):
        add(f"bsdtar_{fmt}", bsdtar(root / f"bsdtar_{fmt}.tar", src, files, fmt), wds2idx_ok=fmt != "gnutar")

    # Python's tarfile, every format; PAX headers carrying what ustar fields cannot hold.
    members = tree(photos)
    add("tarfile_gnu", tarfile_tar(root / "tarfile_gnu.tar", members, tarfile.GNU_FORMAT), wds2idx_ok=False)
    add("tarfile_pax", tarfile_tar(root / "tarfile_pax.tar", members, tarfile.PAX_FORMAT))
    add("tarfile_ustar", tarfile_tar(root / "tarfile_ustar.tar", tree(photos, longest=255), tarfile.USTAR_FORMAT))
    add("tarfile_no_dirs", tarfile_tar(root / "tarfile_no_dirs.tar", members, tarfile.PAX_FORMAT, dirs=False))
    # Files that belong to no record, between and inside records: no key, hidden, a dotted folder.
    strays = [("README", b"about this shard"), *members[:5], ("a/.hidden.txt", b"editor state"), *members[5:9],
              ("x.y/noext", b"no extension"), *members[9:]]
    add("tarfile_strays", tarfile_tar(root / "tarfile_strays.tar", strays, tarfile.PAX_FORMAT),
        wds2idx_ok=False)  # wds2idx indexes a name without a dot under a key one character short

    def big_ids(info: tarfile.TarInfo) -> None:
        info.uid = info.gid = 3_000_000_000  # over 7 octal digits: base-256 in GNU headers, PAX records in PAX ones
        info.uname, info.gname = "ü" * 40, "group"
        info.mtime = MTIME + 0.25  # fractional: a PAX mtime record

    add("tarfile_pax_ids", tarfile_tar(root / "tarfile_pax_ids.tar", members, tarfile.PAX_FORMAT, edit=big_ids,
                                       pax_headers={"comment": "global header ✓", "mtime": "1700000000.5"}))
    add("tarfile_gnu_ids", tarfile_tar(root / "tarfile_gnu_ids.tar", members, tarfile.GNU_FORMAT, edit=big_ids),
        wds2idx_ok=False)

    def pax_records(info: tarfile.TarInfo) -> None:
        info.pax_headers = {"SCHILY.xattr.user.origin": "camera 7", "comment": "ünïcode ✓", "mtime": "1700000000.75",
                            "uid": "4000000000"}

    add("tarfile_pax_records", tarfile_tar(root / "tarfile_pax_records.tar", members, tarfile.PAX_FORMAT,
                                           edit=pax_records))

    # The webdataset library's writers with their defaults: PAX headers on every member, the
    # ustar name field '?'-replaced for non-ASCII keys, long keys, extensions in any case.
    add("webdataset_tarwriter", webdataset_tar(root / "webdataset_tarwriter.tar", wds_samples(photos)))
    add("webdataset_shardwriter", webdataset_shards(root / "wds-shards", wds_samples(photos))[0])

    # Headers as other writers make them, by byte surgery on tarfile's output.
    add("pre_posix", pre_posix(root / "pre_posix.tar", tree(photos, longest=99)))
    odd = [*tree(photos, longest=99), ("back\\slash.jpg", photos[8].jpg), ("back\\slash.txt", b"a backslash")]
    add("odd_numeric_fields", odd_numeric_fields(root / "odd_numeric_fields.tar", odd), wds2idx_ok=False)
    return cases


def bsdtar(out: Path, src: Path, files: list[tuple[str, bytes]], fmt: str) -> Path:
    """bsdtar given every folder and file as "./name", in the order of ``files`` (it does not sort)."""
    names: list[str] = []
    for name, _ in files:
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "./" + "/".join(parts[:i])
            if folder not in names:
                names.append(folder)
        names.append("./" + name)
    options = [] if fmt == "default" else [f"--format={fmt}"]
    done = subprocess.run([bsdtar_command(), *options, "-n", "-cf", str(out), "-C", str(src), *names],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def bsdtar_command() -> str:
    found = shutil.which("bsdtar")
    if found is None:  # part of the test set-up, like the emulators: never skipped
        pytest.fail("bsdtar is missing: apt-get install -y libarchive-tools (scripts/test.sh installs it)")
    return found


def wds_samples(photos: list[PhotoRecord]) -> list[dict]:
    """Samples as users hand them to the webdataset library: non-ASCII and long keys (over the
    100 bytes of a ustar name), mixed-case extensions, values it encodes itself."""
    p = photos
    return [
        {"__key__": "ünïcode/日本-000001", "jpg": p[0].jpg, "txt": "a caption ✓", "json": {"ü": 1}},
        {"__key__": "000002", "JPG": p[1].jpg, "Txt": "upper-case extensions", "cls": 3},
        {"__key__": "l" * 70 + "/" + "m" * 70 + "/000003", "jpeg": p[2].jpg, "seg.txt": "two-part extension"},
        {"__key__": "café/000004", "jpg": p[3].jpg},
        {"__key__": "000005", "jpg": p[4].jpg, "json": {"a": [1, 2]}},
        {"__key__": "naïve" * 30, "jpg": p[5].jpg, "txt": "a 150-character non-ASCII key"},
    ]


def webdataset_tar(out: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    out.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out)) as writer:
        for sample in samples:
            writer.write(sample)
    return out


def webdataset_shards(folder: Path, samples: list[dict]) -> list[Path]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=4, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(folder.glob("*.tar"))


def header_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def set_checksum(raw: bytearray, at: int, style: str = "standard") -> None:
    """Recompute a header's checksum, written the way various tools write it."""
    raw[at + 148 : at + 156] = b" " * 8
    header = raw[at : at + BLOCK]
    if style == "signed":  # old tars summed signed chars
        total = sum(b - 256 if b > 127 else b for b in header)
    else:
        total = sum(header)
    field = {"standard": b"%06o\0 ", "signed": b"%06o\0 ", "seven_digits": b"%07o\0",
             "leading_space": b" %05o\0 "}[style]
    raw[at + 148 : at + 156] = field % total


def pre_posix(out: Path, files: list[tuple[str, bytes]]) -> Path:
    """A tar as pre-POSIX tools wrote it: no magic, no owner names, every member an old-style
    regular file ('\\0'), directories marked by a trailing slash."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        seen: set[str] = set()
        for name, data in files:
            folder = name.rpartition("/")[0]
            if folder and folder not in seen:
                seen.add(folder)
                info = tarfile.TarInfo(folder + "/")
                info.type, info.mtime = tarfile.AREGTYPE, MTIME
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.type = len(data), MTIME, tarfile.AREGTYPE
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(out.read_bytes())
    for at in header_offsets(out):
        raw[at + 257 : at + BLOCK] = bytes(BLOCK - 257)
        set_checksum(raw, at)
    out.write_bytes(raw)
    return out


def odd_numeric_fields(out: Path, files: list[tuple[str, bytes]]) -> Path:
    """A base-256 size, space-padded sizes, checksums with 7 digits, a leading space or a signed
    sum, and a contiguous-file member: all valid, all read by tarfile and GNU tar alike."""
    tarfile_tar(out, files, tarfile.GNU_FORMAT, dirs=False,
                edit=lambda info: setattr(info, "type", tarfile.CONTTYPE) if info.name == "000006.bin" else None)
    raw = bytearray(out.read_bytes())
    at = header_offsets(out)
    size = int(raw[at[0] + 124 : at[0] + 135], 8)
    raw[at[0] + 124 : at[0] + 136] = b"\x80" + size.to_bytes(11, "big")
    set_checksum(raw, at[0])
    size = int(raw[at[1] + 124 : at[1] + 135], 8)
    raw[at[1] + 124 : at[1] + 136] = b"%11o " % size
    set_checksum(raw, at[1], "seven_digits")
    set_checksum(raw, at[2], "leading_space")
    raw[at[3] + 265 : at[3] + 297] = "ü".encode() * 16  # owner name bytes > 127: signed and unsigned sums differ
    set_checksum(raw, at[3], "signed")
    out.write_bytes(raw)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> dict[str, Case]:
    return build_corpus(tmp_path_factory.mktemp("realworld"), photos)


CASES = [
    "gnu_tar_gnu", "gnu_tar_oldgnu", "gnu_tar_posix", "gnu_tar_ustar", "gnu_tar_v7", "gnu_tar_owners",
    "gnu_tar_global_pax", "gnu_tar_pax_keywords", "gnu_tar_blocking_1", "gnu_tar_label", "gnu_tar_incremental",
    "gnu_tar_gnu_links_sparse", "gnu_tar_posix_links_sparse", "gnu_tar_dereferenced", "gnu_tar_xattrs",
    "gnu_tar_sparse_0.0", "gnu_tar_sparse_0.1", "gnu_tar_dirs_interleaved", "trailing_garbage", "single_end_block",
    "tarfile_gnu", "tarfile_pax", "tarfile_ustar", "tarfile_no_dirs", "tarfile_strays",
    "tarfile_pax_ids", "tarfile_gnu_ids", "tarfile_pax_records", "pre_posix", "odd_numeric_fields",
    "bsdtar_ustar", "bsdtar_pax", "bsdtar_gnutar", "bsdtar_v7", "bsdtar_default",
    "webdataset_tarwriter", "webdataset_shardwriter",
]


def test_the_corpus_is_what_the_cases_say(corpus) -> None:
    assert sorted(corpus) == sorted(CASES)
    with tarfile.open(corpus["gnu_tar_global_pax"].path) as tar:
        tar.getmembers()
        assert tar.pax_headers.get("comment") == "hello"  # a global header really is there
    kinds = Counter()
    for name in ("gnu_tar_gnu_links_sparse", "gnu_tar_posix_links_sparse", "gnu_tar_sparse_0.0", "gnu_tar_sparse_0.1"):
        with tarfile.open(corpus[name].path) as tar:
            kinds.update("sparse" if m.issparse() else m.type.decode() for m in tar.getmembers())
    assert kinds["sparse"] == 4 and kinds["1"] == 4 and kinds["2"] == 4
    with tarfile.open(corpus["tarfile_pax_records"].path) as tar:
        assert all("SCHILY.xattr.user.origin" in m.pax_headers for m in tar.getmembers() if m.isreg())
    for fmt in ("ustar", "pax", "gnutar", "v7", "default"):
        with tarfile.open(corpus[f"bsdtar_{fmt}"].path) as tar:
            assert all(n.startswith("./") for n in tar.getnames()), fmt
    assert b"././@LongLink" in corpus["bsdtar_gnutar"].path.read_bytes()
    for name in ("webdataset_tarwriter", "webdataset_shardwriter"):
        path = corpus[name].path
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert all(m.pax_headers for m in members)  # every member behind a PAX header
        # The ustar name field of a non-ASCII member holds '?' where its real name has letters.
        odd = next(m for m in members if not m.name.isascii())
        assert raw[odd.offset_data - 512 : odd.offset_data - 412].count(b"?") > 0


# ---------------------------------------------------------------------------------------------
# The references: GNU tar's listing for names, tarfile for everything else.


def gnu_tar_names(path: Path) -> list[str]:
    """Member names as GNU tar lists them."""
    listed = subprocess.run(["tar", "--list", "--quoting-style=literal", "-f", str(path)], capture_output=True,
                            check=True).stdout
    return os.fsdecode(listed).split("\n")[:-1]


def reference_members(path: Path) -> list[tuple[tarfile.TarInfo, str]]:
    """tarfile's members, each with its name as GNU tar reads it. The two disagree on one thing:
    tarfile reads the access/change times GNU incremental dumps store as a name prefix."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    names = gnu_tar_names(path)
    assert len(names) == len(members)
    # Directories without their trailing slash, as tarfile reports them.
    names = [n.rstrip("/") if m.isdir() and len(n) > 1 else n for m, n in zip(members, names, strict=True)]
    return list(zip(members, names, strict=True))


def key_rule(name: str) -> tuple[str, str] | tuple[None, None]:
    """The WebDataset key rule: the key runs to the first dot of the basename, the rest is the
    extension; a basename without a dot or starting with one belongs to no record."""
    base = name.rpartition("/")[2]
    if not base or base[0] == "." or "." not in base:
        return None, None
    stem, _, ext = base.partition(".")
    return name[: len(name) - len(base)] + stem, ext


def ours(path: Path):
    with open(path, "rb") as f:
        scan = scan_tar(f)
    assert scan.problems == []
    return scan.members


@pytest.mark.parametrize("name", CASES)
def test_members_agree_with_tarfile_and_gnu_tar(corpus, name: str) -> None:
    path = corpus[name].path
    members = ours(path)
    reference = reference_members(path)
    assert len(members) == len(reference)
    for m, (info, gnu_name) in zip(members, reference, strict=True):
        assert m.name == gnu_name
        if info.name != gnu_name:  # tarfile's misreading of incremental dumps, and only that
            assert name == "gnu_tar_incremental" and info.name.endswith(gnu_name)
        assert (m.header_offset, m.type, m.sparse) == (info.offset, info.type.decode(), info.issparse()), m
        if not info.issparse():  # tarfile gives a sparse file's expanded size; we give what is stored
            assert (m.offset, m.size) == (info.offset_data, info.size), m
    # The same through a seekable file object without a descriptor (remote stores) and a stream.
    data = path.read_bytes()
    for fileobj in (io.BytesIO(data), Stream(data)):
        assert scan_tar(fileobj).members == members


class Stream(io.RawIOBase):
    """A file object that can only be read forward, in small pieces, like a socket."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), 4000, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def webdataset_samples(path: Path, sparse: set[str], names: dict[str, str]) -> list[dict]:
    """What the webdataset library yields: its own tar iteration and grouping. Fed GNU tar's
    names, without sparse files (their expanded bytes are nowhere in the tar to index) and
    without hidden files in folders: webdataset's pattern reads "a/.notes.txt" as key "a/" with
    extension "notes.txt", where the key rule (and DALI's wds2idx) makes it no record's."""

    def wanted(name: str) -> bool:
        return name not in sparse and not name.rpartition("/")[2].startswith(".")

    with open(path, "rb") as stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}], select_files=wanted,
                                  rename_files=lambda n: names.get(n, n))
        return list(group_by_keys(files))


@pytest.mark.parametrize("name", CASES)
def test_records_agree_with_webdataset(corpus, name: str) -> None:
    path = corpus[name].path
    reference = reference_members(path)
    samples = webdataset_samples(path, {i.name for i, _ in reference if i.issparse()},
                                 {i.name: g for i, g in reference})
    records = group_records(ours(path))
    assert [r.key for r in records] == [s["__key__"] for s in samples]
    data = path.read_bytes()
    for record, sample in zip(records, samples, strict=True):
        # webdataset lower-cases extensions; DALI and we keep them as they are.
        got = {ext.lower(): data[m.offset : m.offset + m.size] for ext, m in record.components}
        assert got == {k: v for k, v in sample.items() if not k.startswith("__")}, record.key


def expected_index(path: Path) -> bytes:
    """The v1.2 index as the format defines it, from tarfile's offsets and the key rule."""
    lines: list[list[str]] = []
    last = None
    for info, name in reference_members(path):
        if not info.isreg() or info.issparse():
            continue
        key, ext = key_rule(name)
        if key is None:
            continue
        if key != last:
            lines.append([])
            last = key
        lines[-1].append(f"{ext} {info.offset_data} {info.size} {name}")
    return (f"v1.2 {len(lines)}\n" + "".join(" ".join(line) + "\n" for line in lines)).encode()


@pytest.mark.parametrize("name", CASES)
def test_index_is_exact_and_byte_identical_to_wds2idx_where_it_is_right(corpus, name: str) -> None:
    case = corpus[name]
    members = ours(case.path)
    index, n_records, _ = index_bytes_of_members(members)
    assert index == expected_index(case.path)
    assert n_records == len(parse_index(index).records) == len(group_records(members))
    if case.wds2idx_ok:
        assert index == wds2idx(case.path)


@pytest.mark.parametrize("name", CASES)
def test_dali_reads_exactly_tarfiles_bytes_through_our_index(corpus, name: str, tmp_path: Path) -> None:
    path = corpus[name].path
    records = group_records(ours(path))
    idx = tmp_path / "shard.idx"
    idx.write_bytes(index_bytes_of_members(ours(path))[0])
    exts = sorted({ext for r in records for ext in r.extensions})
    with tarfile.open(path) as tar:
        payload = {m.offset_data: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    samples = dali_read_all(path, idx, exts)
    assert len(samples) == len(records)
    for (_, got), record in zip(samples, records, strict=True):
        members = dict(record.components)
        expected = [payload[members[e].offset] if e in members else b"" for e in exts]
        assert got == expected, record.key


def expected_problems(path: Path) -> Counter:
    """Every corpus shard is clean but for its members that are no regular file or folder (as
    GNU tar lists them: incremental dumps store folders as 'D' members): links and sparse files;
    and, as warnings, a volume label and regular files that the key rule leaves out of every record."""
    reference = reference_members(path)
    return Counter(
        unsupported_member=sum(1 for info, _ in reference if info.issparse()
                               or not (info.isreg() or info.isdir() or info.type in (b"D", b"V"))),
        stray_member=sum(1 for info, name in reference
                         if (info.isreg() and not info.issparse() and key_rule(name)[0] is None)
                         or info.type == b"V"),
    ) + Counter()  # drops the zero counts


def comparable(report) -> dict:
    data = report.to_json()
    data.pop("seconds")
    return data


@pytest.mark.parametrize("name", CASES)
def test_validation_reports_nothing_but_unsupported_members_and_both_passes_agree(corpus, name: str,
                                                                                  tmp_path: Path) -> None:
    shard = tmp_path / f"{name}.tar"
    shutil.copyfile(corpus[name].path, shard)
    dataset = Dataset(str(shard))
    assert not ensure_index(dataset, name).reused
    report = validate_shard(dataset, name)
    assert Counter(p.code for p in report.problems) == expected_problems(shard)
    assert report.index == "fresh"
    assert report.record_ids == [r.key for r in group_records(ours(shard))]
    for index_bytes in (shard.with_suffix(".idx").read_bytes(), None):
        with open(shard, "rb") as f:
            fast = validate_file(f, index_bytes=index_bytes, expect_index=True)
        with open(shard, "rb") as f:
            precise = validate_file(f, index_bytes=index_bytes, expect_index=True, fast=False)
        assert comparable(fast) == comparable(precise)


# ---------------------------------------------------------------------------------------------
# Names the index format cannot hold: a clear error, never a broken index.


def test_a_name_ending_in_a_dot_is_a_clear_error_not_a_broken_index(tmp_path: Path, photos) -> None:
    files = [("000001.jpg", photos[0].jpg), ("000001.", b"an empty extension"), ("000002.jpg", photos[1].jpg)]
    shard = tarfile_tar(tmp_path / "dot.tar", files, tarfile.GNU_FORMAT)
    # wds2idx writes the line a field short, and DALI refuses that index.
    broken = tmp_path / "wds2idx.idx"
    broken.write_bytes(wds2idx(shard))
    with pytest.raises(RuntimeError, match="[Mm]alformed index"):
        dali_read_all(shard, broken, ["jpg", "txt"])
    members = ours(shard)
    for build in (lambda: index_bytes_of_members(members), lambda: format_index(group_records(members))):
        with pytest.raises(IndexFormatError, match=r"'000001\.'.*extension is empty"):
            build()
    # Validation names it as a record ID problem, the same in both passes.
    with open(shard, "rb") as f:
        fast = validate_file(f)
    with open(shard, "rb") as f:
        precise = validate_file(f, fast=False)
    assert comparable(fast) == comparable(precise)
    assert [(p.code, p.member) for p in precise.problems] == [("bad_record_id", "000001.jpg")]


def test_a_name_that_is_not_utf8_is_named_as_such(tmp_path: Path, photos) -> None:
    shard = tarfile_tar(tmp_path / "latin1.tar", [("caf\udce9.jpg", photos[0].jpg)], tarfile.GNU_FORMAT,
                        errors="surrogateescape")
    with tarfile.open(shard, errors="surrogateescape") as tar:
        assert [m.name for m in ours(shard)] == tar.getnames()
    with pytest.raises(IndexFormatError, match="not valid UTF-8"):
        index_bytes_of_members(ours(shard))


def test_a_global_header_without_member_fields_keeps_the_fast_path(tmp_path: Path, photos) -> None:
    """``git archive`` starts every tar with a global header holding the commit id: the plain
    headers after it still go through the one-loop scan, in one batch."""
    files = tree(photos, longest=99, unicode=False)  # no member needs a PAX header of its own
    shard = tarfile_tar(tmp_path / "git.tar", files, tarfile.PAX_FORMAT, dirs=False,
                        pax_headers={"comment": "6b8e3f0c2a"})
    with tarfile.open(shard) as tar:
        expected = [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]
        assert tar.pax_headers == {"comment": "6b8e3f0c2a"}
    with open(shard, "rb") as f:
        batches = list(_batches(f, False, None))
    assert [(m.name, m.header_offset, m.offset, m.size) for m in batches[0]] == expected
    # A global path would rename every member: those headers take the careful path.
    renamed = tarfile_tar(tmp_path / "renamed.tar", files[:2], tarfile.PAX_FORMAT, dirs=False,
                          pax_headers={"path": "everything.jpg"})
    with tarfile.open(renamed) as tar:
        assert [m.name for m in ours(renamed)] == tar.getnames() == ["everything.jpg"] * 2


# ---------------------------------------------------------------------------------------------
# Index reuse, and shard paths as users lay them out


def record_files(photos: list[PhotoRecord]) -> list[tuple[str, bytes]]:
    return [(f"{p.key}.{ext}", data) for p in photos for ext, data in (("jpg", p.jpg), ("txt", p.caption.encode()))]


def rewrite_keeping_size(shard: Path, member: int) -> None:
    """Rewrite a shard with one member a byte shorter (same blocks, same tar size), as a fixed
    image would be, then restore an older mtime (``rsync -a``, ``cp -p`` and tar extraction do)."""
    with tarfile.open(shard) as tar:
        infos = tar.getmembers()
        files = [(m.name, tar.extractfile(m).read()) for m in infos]
    name, data = files[member]
    assert len(data) % BLOCK != 1  # one byte less keeps the padded size
    files[member] = (name, data[:-1])
    size = shard.stat().st_size
    tarfile_tar(shard, files, tarfile.GNU_FORMAT, dirs=False)
    assert shard.stat().st_size == size
    os.utime(shard, (MTIME, MTIME))


def test_index_reuse_never_keeps_a_stale_index(tmp_path: Path, photos) -> None:
    files = record_files(photos[:4])
    shard = tarfile_tar(tmp_path / "ds" / "00000.tar", files, tarfile.GNU_FORMAT, dirs=False)
    idx = shard.with_suffix(".idx")
    dataset = Dataset(str(shard.parent))
    last = ensure_index(dataset, "00000")
    assert not last.reused
    assert ensure_index(dataset, "00000").reused  # nothing changed: reused
    # A shard that came with its index (one download, old mtimes kept): checked whole, reused as is.
    os.utime(shard, (MTIME, MTIME))
    os.utime(idx, (MTIME + 50, MTIME + 50))
    before = idx.stat()
    assert ensure_index(dataset, "00000").reused
    assert (idx.stat().st_ino, idx.stat().st_mtime) == (before.st_ino, before.st_mtime)
    for member in range(len(files)):
        rewrite_keeping_size(shard, member)
        # Without what the last run recorded (the CLI), and with it (the Dagster asset).
        previous = {"tar_fingerprint": last.tar_fingerprint, "index_fingerprint": last.index_fingerprint}
        for kwargs in ({}, {"previous": previous}):
            os.utime(idx, (MTIME + 50, MTIME + 50))  # newer than the shard's restored mtime
            last = ensure_index(dataset, "00000", **kwargs)
            assert not last.reused, (member, kwargs)
            assert idx.read_bytes() == expected_index(shard)


def test_an_index_from_another_shard_or_a_broken_one_is_rebuilt(tmp_path: Path, photos) -> None:
    folder = tmp_path / "ds"
    for n, key in enumerate(("00000", "00001")):
        files = [(f"{p.key}.jpg", p.jpg) for p in photos[n * 5 : n * 5 + 5]]
        tarfile_tar(folder / f"{key}.tar", files, tarfile.GNU_FORMAT, dirs=False)
    dataset = Dataset(str(folder))
    for key in ("00000", "00001"):
        ensure_index(dataset, key)
    shutil.copyfile(folder / "00001.idx", folder / "00000.idx")  # a fresh copy: newer than the shard
    assert not ensure_index(dataset, "00000").reused
    assert (folder / "00000.idx").read_bytes() == expected_index(folder / "00000.tar")
    for broken in ("v1.2 1\njpg 0 10 x.jpg\n", "v1.2 1\njpg 512 99999999 x.jpg\n", "v1.1 1\njpg 1 2\n", "\xff"):
        (folder / "00000.idx").write_text(broken, errors="surrogateescape")
        assert not ensure_index(dataset, "00000").reused, broken
        assert (folder / "00000.idx").read_bytes() == expected_index(folder / "00000.tar")


def test_symlinked_shards_and_folders_and_awkward_paths(tmp_path: Path, photos) -> None:
    outside, folder = tmp_path / "elsewhere", tmp_path / "my datasets" / "ds"
    files = record_files(photos[:3])
    shards = {"00000": folder / "00000.tar", "part a/00001": folder / "part a" / "00001.tar",
              "ünï/日本 02": folder / "ünï" / "日本 02.tar", "linked": outside / "x.tar",
              "more/00003": outside / "folder" / "00003.tar"}
    for path in shards.values():
        tarfile_tar(path, files, tarfile.PAX_FORMAT, dirs=False)
    (folder / "linked.tar").symlink_to(outside / "x.tar")
    (folder / "more").symlink_to(outside / "folder")  # a folder on another disk: listed
    (outside / "folder" / "up").symlink_to(outside / "folder")  # a loop: listed once
    (folder / "again").symlink_to(folder / "part a")  # inside the dataset: not listed twice
    (folder / "gone.tar").symlink_to(outside / "missing.tar")  # dangling: reported
    (tmp_path / "link to ds").symlink_to(folder)
    for url in (str(folder), str(tmp_path / "link to ds"), f"file://{tmp_path / 'link to ds'}"):
        dataset = Dataset(url)
        listing = dataset.list_shards()
        assert [s.key for s in listing.shards] == sorted(shards), url
        assert [(Path(p).name, "does not exist" in why) for p, why in listing.rejected] == [("gone.tar", True)]
    with tarfile.open(shards["00000"]) as tar:
        payload = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in ("part a/00001", "ünï/日本 02", "linked"):
        result = ensure_index(dataset, key)
        assert Path(result.index_url) == Path(dataset.shard_path(key)).with_suffix(".idx")
        assert validate_shard(dataset, key).problems == []
        samples = dali_read_all(Path(dataset.shard_path(key)), Path(result.index_url), ["jpg", "txt"])
        records = group_records(ours(Path(dataset.shard_path(key))))
        assert [[payload[r.get(e).name] for e in ("jpg", "txt")] for r in records] == [got for _, got in samples]


def test_a_stream_is_scanned_like_a_file_even_where_the_scan_steps_back(tmp_path: Path, photos) -> None:
    """A long name after plain headers, and a damaged header that recovery skips: the scan
    re-reads a header it has already read, which a stream can only give from its last read."""
    files = [*record_files(photos[:3]), ("d" * 120 + "/000009.jpg", photos[3].jpg), *record_files(photos[4:6])]
    shard = tarfile_tar(tmp_path / "s.tar", files, tarfile.GNU_FORMAT, dirs=False)
    with tarfile.open(shard) as tar:
        infos = tar.getmembers()
    damaged = bytearray(shard.read_bytes())
    damaged[infos[2].offset] ^= 0xFF  # the third member's header no longer matches its checksum
    expected = [(i.name, i.offset_data, i.size) for i in infos if i is not infos[2]]
    for data in (shard.read_bytes(), bytes(damaged)):
        scans = [scan_tar(f, recover=True) for f in (io.BytesIO(data), Stream(data))]
        assert scans[0].members == scans[1].members and scans[0].problems == scans[1].problems
        got = [(m.name, m.offset, m.size) for m in scans[1].members]
        assert got == (expected if data == damaged else [(i.name, i.offset_data, i.size) for i in infos])
