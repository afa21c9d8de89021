"""An index is trusted only when it describes its tar exactly; damaged tars never stop the others.

Shards come from the real writers (the webdataset library, tarfile, GNU tar); expected records
and member bytes from Python's tarfile and the webdataset library, never from our own scanner.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds

from curator_assets import cli
from curator_assets.decode import DecodeOptions, ShardDecoder, StaleIndexError, decode_shard
from curator_assets.formats.manifest import read_manifest
from curator_assets.formats.tar_members import TarError
from curator_assets.steps.index import ensure_index
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets_tests.test_index import wds2idx
from curator_assets_tests.test_realworld_tars import tarfile_tar, wds_samples, webdataset_shards

CPU = DecodeOptions(device="cpu", batch_size=3, pipelines=1)


@pytest.fixture(scope="module")
def decoder() -> ShardDecoder:
    return ShardDecoder(CPU)


def tarfile_payloads(path: Path) -> dict[str, tuple[str, bytes]]:
    """record key -> (member name, bytes) of its image, by tarfile and the key rule."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            base = m.name.rpartition("/")[2]
            if m.isreg() and "." in base and not base.startswith("."):
                key, ext = m.name[: len(m.name) - len(base) + base.index(".")], base.partition(".")[2]
                if ext.lower() in ("jpg", "jpeg"):
                    out[key] = (m.name, tar.extractfile(m).read())
    return out


def webdataset_keys(path: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]


def assert_manifest_is_tarfiles(rows, path: Path) -> None:
    """Every record once, in tar order, each with the sha256 of ITS image as tarfile reads it."""
    payload = tarfile_payloads(path)
    assert [r.record_id for r in rows] == webdataset_keys(path)
    for row in rows:
        name, data = payload[row.record_id]
        assert (row.member, row.sha256, row.decoded) == (name, hashlib.sha256(data).hexdigest(), True), row


# -- the webdataset library's shards: non-ASCII keys, PAX headers everywhere ----------------------


@pytest.mark.parametrize("reader", ["stream", "dali"])
def test_webdataset_shards_index_validate_decode_and_keep_their_index(tmp_path: Path, photos, decoder,
                                                                      reader: str) -> None:
    shards = webdataset_shards(tmp_path / "ds", wds_samples(photos))
    dataset = Dataset(str(tmp_path / "ds"))
    options = DecodeOptions(device="cpu", batch_size=3, pipelines=1, reader=reader)
    decoder_for = decoder if reader == "stream" else ShardDecoder(options)
    for shard in shards:
        key = shard.stem
        assert not ensure_index(dataset, key).reused
        assert ensure_index(dataset, key).reused  # it describes the tar: kept
        report = validate_shard(dataset, key)
        assert report.problems == [] and report.index == "fresh"
        result, rows = decode_shard(dataset, key, decoder=decoder_for, write=False)
        assert result.plan_source == "index" and result.failed == 0
        assert_manifest_is_tarfiles(rows, shard)
        assert ensure_index(dataset, key).reused


# -- edited indexes: never reused, never decoded from ----------------------------------------------


def edits(lines: list[str]) -> dict[str, list[str]]:
    """Index bodies with one line deleted, duplicated, two swapped, an offset or a size moved."""
    first = lines[0].split(" ")
    moved = " ".join([first[0], str(int(first[1]) + 512), *first[2:]])
    resized = " ".join([first[0], first[1], str(int(first[2]) - 1), *first[3:]])
    renamed = " ".join([*first[:3], lines[1].split(" ")[3], *first[4:]])
    return {
        "deleted": lines[:2] + lines[3:], "duplicated": lines[:3] + lines[2:],
        "swapped": [lines[1], lines[0], *lines[2:]],
        "offset": [moved, *lines[1:]], "size": [resized, *lines[1:]], "name": [renamed, *lines[1:]],
        "last_deleted": lines[:-1],
    }


def test_an_edited_index_is_rebuilt_refused_by_decode_and_stale_for_validation(tmp_path: Path, photos,
                                                                               decoder) -> None:
    files = [(f"{p.key}.{e}", d) for p in photos[:6] for e, d in (("jpg", p.jpg), ("txt", p.caption.encode()))]
    shard = tarfile_tar(tmp_path / "ds" / "00000.tar", files, tarfile.PAX_FORMAT, dirs=False)
    dataset = Dataset(str(shard.parent))
    ensure_index(dataset, "00000")
    idx = shard.with_suffix(".idx")
    good = idx.read_bytes()
    head, *lines = good.decode().splitlines()
    for what, body in edits(lines).items():
        edited = f"v1.2 {len(body)}\n" + "\n".join(body) + "\n"
        idx.write_text(edited)
        with pytest.raises(StaleIndexError, match="does not match the tar"):
            decode_shard(dataset, "00000", decoder=decoder, write=False)
        report = validate_shard(dataset, "00000")
        assert [p.code for p in report.problems] == ["idx_stale"], what
        assert not ensure_index(dataset, "00000").reused, what
        assert idx.read_bytes() == good, what


def test_wds2idx_on_gnu_long_names_is_never_trusted(tmp_path: Path, photos, decoder) -> None:
    """wds2idx points GNU long-name members at their ././@LongLink header: decoding from it
    would read a header as an image. That index is rebuilt, and decode refuses it."""
    files = [(f"{'d' * 120}/{p.key}.{e}", d) for p in photos[:4] for e, d in (("jpg", p.jpg), ("txt", b"c"))]
    shard = tarfile_tar(tmp_path / "ds" / "00000.tar", files, tarfile.GNU_FORMAT, dirs=False)
    dataset = Dataset(str(shard.parent))
    theirs = wds2idx(shard)
    idx = shard.with_suffix(".idx")
    idx.write_bytes(theirs)
    with pytest.raises(StaleIndexError):
        decode_shard(dataset, "00000", decoder=decoder, write=False)
    assert [p.code for p in validate_shard(dataset, "00000").problems] == ["idx_stale"]
    assert not ensure_index(dataset, "00000").reused
    assert idx.read_bytes() != theirs
    _, rows = decode_shard(dataset, "00000", decoder=decoder, write=False)
    assert_manifest_is_tarfiles(rows, shard)


# -- damage after indexing, and holes ----------------------------------------------------------------


def test_a_size_field_damaged_after_indexing_is_a_listed_problem_and_other_shards_decode(tmp_path: Path,
                                                                                         photos) -> None:
    folder = tmp_path / "ds"
    shards = []
    for n in range(3):
        files = [(f"{p.key}.jpg", p.jpg) for p in photos[n * 4 : n * 4 + 4]]
        shards.append(tarfile_tar(folder / f"{n:05d}.tar", files, tarfile.GNU_FORMAT, dirs=False))
    dataset = Dataset(str(folder))
    for s in shards:
        ensure_index(dataset, s.stem)
    with tarfile.open(shards[1]) as tar:
        third = tar.getmembers()[2]
    raw = bytearray(shards[1].read_bytes())
    raw[third.offset + 124 : third.offset + 136] = b"\xff" * 12  # base-256 -1, checksum left wrong
    shards[1].write_bytes(raw)
    out = tmp_path / "out"
    done = subprocess.run(
        [*cli_command(), "decode", str(folder), "--output", str(out), "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["key"] for r in rows] == ["00000", "00001", "00002"]
    for n in (0, 2):
        assert rows[n]["ok"] and rows[n]["decoded"] == 4
        table = read_manifest(Dataset(str(folder), output_url=str(out)), f"{n:05d}")
        assert_manifest_is_tarfiles([SimpleNamespace(**row) for row in table.to_pylist()], shards[n])
    damaged = rows[1]
    # Planned from the recovering scan: the damaged member is a listed problem, the rest decode,
    # and the shard is not ok (its manifest lists every record the scan could find).
    assert not damaged["ok"], damaged
    assert damaged["plan"] == "scan" and damaged["decoded"] == 3, damaged
    assert any("tar_bad_header" in str(p) for p in damaged["problems"]), damaged
    assert any("tar_bad_header" in str(e) for e in damaged["shard_errors"]), damaged
    assert done.returncode == 1


def cli_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "curator_assets.cli"]


def test_records_after_a_zero_filled_hole_are_listed_by_every_verb(tmp_path: Path, photos, decoder) -> None:
    files = [(f"{p.key}.jpg", p.jpg) for p in photos[:6]]
    shard = tarfile_tar(tmp_path / "ds" / "00000.tar", files, tarfile.GNU_FORMAT, dirs=False)
    dataset = Dataset(str(shard.parent))
    with tarfile.open(shard) as tar:
        at = tar.getmembers()[3].offset
    raw = shard.read_bytes()
    shard.write_bytes(raw[:at] + bytes(8192) + raw[at:])  # an interrupted copy's zeros, then the rest
    with tarfile.open(shard, ignore_zeros=True) as tar:
        everything = [m.name.rpartition(".")[0] for m in tar.getmembers()]
    report = validate_shard(dataset, "00000")
    assert [p.code for p in report.problems if p.severity == "error"] == ["tar_hole"]
    assert report.record_ids == everything
    with pytest.raises(TarError, match="tar_hole"):
        ensure_index(dataset, "00000")
    result, rows = decode_shard(dataset, "00000", decoder=decoder, write=False)
    assert [r.record_id for r in rows] == everything and result.decoded == 6
    assert any(p.startswith("tar_hole") for p in result.problems)
    assert cli.main(["index", str(shard.parent)]) != 0
