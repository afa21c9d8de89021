"""The .idx we write: byte-identical to DALI's wds2idx where wds2idx is right, correct where it is not,
and read by DALI's own webdataset reader to give exactly the bytes tarfile gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curator_assets.formats.idx import (
    IndexFormatError,
    build_index_bytes,
    format_index,
    index_bytes_of_members,
    parse_index,
)
from curator_assets.formats.tar_members import group_records, read_members
from curator_assets_tests.conftest import write_members

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def wds2idx_command() -> str:
    """DALI's wds2idx from this interpreter's environment (the venv need not be activated)."""
    beside = Path(sys.executable).parent / "wds2idx"
    found = str(beside) if beside.exists() else shutil.which("wds2idx")
    assert found, "wds2idx (from the nvidia-dali wheel) is not installed"
    return found


def wds2idx(tar: Path) -> bytes:
    out = tar.with_suffix(".wds2idx")
    subprocess.run([wds2idx_command(), str(tar), str(out)], check=True, capture_output=True)
    return out.read_bytes()


def our_index(tar: Path) -> bytes:
    """The index both ways (records then text, and the fused hot path); they must agree."""
    with open(tar, "rb") as f:
        members = read_members(f)
    try:
        via_records = build_index_bytes(group_records(members))
    except IndexFormatError as exc:
        with pytest.raises(IndexFormatError):
            index_bytes_of_members(members)
        raise exc
    fused, n_records, n_components = index_bytes_of_members(members)
    assert fused == via_records
    assert n_records == len(group_records(members))
    assert n_components == sum(len(r.components) for r in group_records(members))
    return fused


def layout(photos, variant: str) -> list[tuple[str, bytes]]:
    """Members for one shard layout built from real photos."""
    members: list[tuple[str, bytes]] = []
    for i, p in enumerate(photos[:12]):
        cap, meta = p.caption.encode(), json.dumps(p.metadata).encode()
        if variant == "full":
            members += [(f"{p.key}.jpg", p.jpg), (f"{p.key}.txt", cap), (f"{p.key}.json", meta)]
        elif variant == "images-only":
            members += [(f"{p.key}.jpg", p.jpg)]
        elif variant == "mixed-sidecars":
            members += [(f"{p.key}.jpg", p.jpg)]
            if i % 2:
                members += [(f"{p.key}.txt", cap)]
            if i % 3:
                members += [(f"{p.key}.json", meta)]
        elif variant == "nested-multidot":
            folder = f"part.{i % 3}/sub-{i % 2}"
            members += [(f"{folder}/{p.key}.seg.jpg", p.jpg), (f"{folder}/{p.key}.cap.txt", cap),
                        (f"{folder}/{p.key}.json", meta)]
        elif variant == "upper-and-jpeg":
            members += [(f"{p.key}.{'JPG' if i % 2 else 'jpeg'}", p.jpg), (f"{p.key}.TXT", cap)]
    return members


VARIANTS = ["full", "images-only", "mixed-sidecars", "nested-multidot", "upper-and-jpeg"]


@pytest.mark.parametrize("fmt", ["ustar", "pax"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_byte_identical_to_wds2idx(tmp_path: Path, photos, fmt: str, variant: str) -> None:
    tar = write_members(tmp_path / "s.tar", layout(photos, variant), FORMATS[fmt])
    ours = our_index(tar)
    assert ours == wds2idx(tar)
    assert parse_index(ours).records  # and it reads back


@pytest.mark.parametrize("variant", VARIANTS)
def test_byte_identical_gnu_format_short_names(tmp_path: Path, photos, variant: str) -> None:
    tar = write_members(tmp_path / "g.tar", layout(photos, variant), tarfile.GNU_FORMAT)
    assert our_index(tar) == wds2idx(tar)


def test_byte_identical_on_gnu_tar_made_archives(tmp_path: Path, photos) -> None:
    src = tmp_path / "src"
    for i, p in enumerate(photos[:8]):
        d = src / f"dir.{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{p.key}.jpg").write_bytes(p.jpg)
        (d / f"{p.key}.txt").write_text(p.caption)
    for fmt in ("gnu", "posix", "ustar"):
        tar = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(tar), "-C", str(src), "."], check=True)
        assert our_index(tar) == wds2idx(tar), fmt


def test_gnu_long_names_are_correct_where_wds2idx_is_not(tmp_path: Path, photos) -> None:
    long_dir = "d" * 120
    members = [(f"{long_dir}/{p.key}.jpg", p.jpg) for p in photos[:4]]
    tar = write_members(tmp_path / "long.tar", members, tarfile.GNU_FORMAT)
    idx = parse_index(our_index(tar))
    with tarfile.open(tar) as t:
        truth = [(m.name, m.offset_data, m.size) for m in t.getmembers()]
    assert [(c.name, c.offset, c.size) for r in idx.records for c in r.components] == truth
    # wds2idx adds 512 to the long-name header's block instead of the member's.
    theirs = parse_index(wds2idx(tar))
    assert [c.offset for r in theirs.records for c in r.components] != [t[1] for t in truth]


def test_whitespace_in_a_name_is_a_clear_error(tmp_path: Path) -> None:
    tar = write_members(tmp_path / "ws.tar", [("ok.jpg", b"1"), ("has space.jpg", b"2")])
    with pytest.raises(IndexFormatError, match="has space.jpg.*whitespace"):
        our_index(tar)


def test_empty_shard_has_nothing_to_index(tmp_path: Path) -> None:
    tar = write_members(tmp_path / "e.tar", [])
    with pytest.raises(IndexFormatError, match="no records"):
        our_index(tar)


def test_read_v11_and_reject_broken(tmp_path: Path) -> None:
    v11 = parse_index("v1.1 2\njpg 512 10 txt 1536 3\njpg 2560 7\n")
    assert v11.version == "v1.1" and not v11.has_names
    assert [len(r.components) for r in v11.records] == [2, 1]
    assert v11.records[0].components[1].offset == 1536
    for broken in ["", "v9 1\njpg 1 2 a.jpg\n", "v1.2 2\njpg 512 1 a.jpg\n", "v1.2 1\njpg x 1 a.jpg\n",
                   "v1.2 1\njpg 512 1\n"]:
        with pytest.raises(IndexFormatError):
            parse_index(broken)


def test_format_round_trip(tmp_path: Path, photos) -> None:
    tar = write_members(tmp_path / "rt.tar", layout(photos, "nested-multidot"))
    with open(tar, "rb") as f:
        records = group_records(read_members(f))
    idx = parse_index(format_index(records))
    assert [r.key for r in idx.records] == [r.key for r in records]


def dali_read_all(tar: Path, idx: Path, exts: list[str]) -> list[tuple[str, list[bytes]]]:
    """Every sample DALI's fn.readers.webdataset returns (CPU pipeline, no GPU needed)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        outs = fn.readers.webdataset(
            paths=[str(tar)], index_paths=[str(idx)], ext=exts, missing_component_behavior="empty",
            name="reader", dont_use_mmap=True,
        )
        info = fn.get_property(outs[0], key="source_info")
        return (*outs, info)

    p = pipe()
    p.build()
    total = p.reader_meta("reader")["epoch_size"]
    samples: list[tuple[str, list[bytes]]] = []
    while len(samples) < total:
        outs = p.run()
        for i in range(len(outs[0])):
            if len(samples) == total:
                break
            source = bytes(np.array(outs[-1][i])).decode()
            samples.append((source, [np.array(o[i]).tobytes() for o in outs[:-1]]))
    return samples


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_dali_reads_our_index_byte_for_byte(tmp_path: Path, photos, fmt: str) -> None:
    members = layout(photos, "mixed-sidecars")
    if fmt == "gnu":  # long names too: where wds2idx's index would give DALI the wrong bytes
        members = [("g" * 110 + "/" + n, d) for n, d in members]
    tar = write_members(tmp_path / "d.tar", members, FORMATS[fmt])
    idx = tmp_path / "d.idx"
    idx.write_bytes(our_index(tar))
    exts = ["jpg", "txt", "json"]
    samples = dali_read_all(tar, idx, exts)
    with tarfile.open(tar) as t:
        by_key: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        for m in t.getmembers():
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            key = m.name.rsplit("/", 1)[0] + "/" + key if "/" in m.name else key
            if key not in by_key:
                order.append(key)
                by_key[key] = {}
            by_key[key][ext] = t.extractfile(m).read()
    assert len(samples) == len(order)
    for (source, payloads), key in zip(samples, order, strict=False):
        assert source.startswith(str(tar))
        for ext, payload in zip(exts, payloads, strict=False):
            assert payload == by_key[key].get(ext, b""), (key, ext)
