"""One record schema and one set of image rules for every verb, on shards the world writes.

Shards are written by the webdataset library's ``TarWriter`` and Python's ``tarfile``; images by
Pillow. Verdicts are cross-checked with independent readers: the webdataset library (its keys,
its JSON decoding, its refusal of ``.JPG`` beside ``.jpg``) and Pillow (formats and sizes).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, features

from curator_assets import cli, sniff
from curator_assets.decode import DecodeOptions, decode_shard, sniff_image
from curator_assets.index import ensure_index
from curator_assets.schema import ambiguous_extensions, content_kind, parse_metadata, role
from curator_assets.storage import Dataset
from curator_assets.validation import CODES, INFO, read_report, validate_file, validate_shard, write_report
from curator_assets_tests.conftest import write_members
from curator_assets_tests.malformed import with_sof_size

CPU = DecodeOptions(device="cpu", batch_size=4)
READERS = ("stream", "dali")


def encoded(jpg: bytes, fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert(mode).save(buf, fmt, **kwargs)
    return buf.getvalue()


def motion_photo(jpg: bytes, seed: int = 0) -> bytes:
    """A JPEG with an MP4-like video appended after its end marker, as Motion Photos are: far
    more than a few KiB of trailer, with FF D9 pairs inside it."""
    video = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + random.Random(seed).randbytes(200_000)
    return jpg + video + b"\xff\xd9\x00\x01trailer end"


def pillow_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def codes(report) -> list[str]:
    return sorted(p.code for p in report.problems if p.code != "idx_missing")


def both_passes(path: Path, index_bytes: bytes | None = None):
    """The vectorised and the precise pass on one file: they must give one report."""
    with open(path, "rb") as f:
        fast = validate_file(f, shard=str(path), index_bytes=index_bytes)
    with open(path, "rb") as f:
        precise = validate_file(f, shard=str(path), index_bytes=index_bytes, fast=False)
    assert [p.to_json() for p in fast.problems] == [p.to_json() for p in precise.problems]
    assert list(fast.images) == list(precise.images)
    return fast


def decode_rows(folder: Path, reader: str, **kwargs):
    result, rows = decode_shard(Dataset(str(folder)), "00000", dataclasses.replace(CPU, reader=reader),
                                write=False, **kwargs)
    return result, {r.record_id: r for r in rows}


# -- the schema ---------------------------------------------------------------------------------


def test_roles_and_kinds_follow_the_whole_extension_in_any_case():
    assert [role(e) for e in ("jpg", "JPG", "png", "WebP", "txt", "json", "seg.jpg", "cls")] == [
        "image", "image", "image", "image", "caption", "metadata", "other", "other"]
    assert [content_kind(e) for e in ("seg.jpg", "PNG", "Json", "cls", "npy")] == [
        "image", "image", "json", "text", None]
    assert ambiguous_extensions(["JPG", "jpg", "txt"]) == [["JPG", "jpg"]]
    assert ambiguous_extensions(["jpg", "jpg"]) == []  # the same name twice is a duplicate member
    assert ambiguous_extensions(["jpg", "jpeg", "TXT"]) == []


def test_json_rule_is_the_webdataset_rule():
    for data in (b'{"a": 1}', b'\xef\xbb\xbf{"a": 1}', '{"é": 1}'.encode("utf-16")):
        text, why = parse_metadata(data)
        assert why is None and json.loads(text) == wds.autodecode.decoders["json"](data)
    for data in (b"{bad", b"\xff\xfe\x00", b""):
        text, why = parse_metadata(data)
        assert text is None and why
        with pytest.raises(ValueError):
            json.loads(data)


# -- image rules -------------------------------------------------------------------------------


def _formats(jpg: bytes) -> dict[str, bytes]:
    out = {
        "png rgb": encoded(jpg, "PNG"), "png gray": encoded(jpg, "PNG", "L"), "png rgba": encoded(jpg, "PNG", "RGBA"),
        "png palette": encoded(jpg, "PNG", "P"), "webp lossy": encoded(jpg, "WEBP"),
        "webp lossless": encoded(jpg, "WEBP", lossless=True), "webp alpha": encoded(jpg, "WEBP", "RGBA"),
        "bmp": encoded(jpg, "BMP"), "tiff": encoded(jpg, "TIFF"), "ppm": encoded(jpg, "PPM"),
        "pgm": encoded(jpg, "PPM", "L"), "jpeg": jpg, "jpeg progressive": encoded(jpg, "JPEG", progressive=True),
    }
    if features.check("jpg_2000"):
        out["jpeg2000"] = encoded(jpg, "JPEG2000")
    return out


def test_every_accepted_format_gives_pillows_size(photos):
    for name, data in _formats(photos[0].jpg).items():
        get = lambda pos, n, d=data: d[pos : pos + n]  # noqa: E731
        found = sniff.check_image(get, len(data))
        assert found.problems == (), name
        assert found.header.format == name.split()[0].replace("ppm", "pnm").replace("pgm", "pnm"), name
        assert (found.header.width, found.header.height) == pillow_size(data), name


def test_headers_over_the_pixel_limit_are_refused_in_every_format(photos):
    png = bytearray(encoded(photos[0].jpg, "PNG"))
    png[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    for data in (with_sof_size(photos[0].jpg, 30000, 30000), bytes(png)):
        found = sniff.check_image(lambda pos, n, d=data: d[pos : pos + n], len(data), max_pixels=100_000_000)
        assert [c for c, _ in found.problems] == ["image_too_large"]
        assert sniff_image(data, 100_000_000).code == "image_too_large"


def test_a_jpeg_with_a_trailer_is_complete(photos):
    data = motion_photo(photos[0].jpg)
    found = sniff.check_image(lambda pos, n: data[pos : pos + n], len(data))
    assert [c for c, _ in found.problems] == ["jpeg_trailing_data"]
    assert found.end == len(photos[0].jpg)  # the image ends at its own end marker
    s = sniff_image(data)
    assert s.error is None and not s.suspect and s.end == len(photos[0].jpg)
    with Image.open(io.BytesIO(data)) as im:  # Pillow reads it as the complete image it is
        im.load()
        assert im.size == pillow_size(photos[0].jpg)
    cut = photos[0].jpg[:-200]
    found = sniff.check_image(lambda pos, n: cut[pos : pos + n], len(cut))
    assert [c for c, _ in found.problems] == ["jpeg_truncated"]
    assert CODES["jpeg_trailing_data"][0] == INFO


@pytest.mark.parametrize("head, what", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 1234\n", "Git LFS"),
    (b"Just a readme, written by hand.\n" * 20, "text"),
    (gzip.compress(b"x" * 1000, mtime=0)[:512], "gzip"),
    (b"\x28\xb5\x2f\xfd" + bytes(508), "zstd"),
    (random.Random(1).randbytes(512), "unknown data"),
])
def test_files_that_are_no_tar(head, what):
    assert what in sniff.not_a_tar(head)


def test_tars_and_cut_tars_are_not_called_non_tars(tmp_path, photos):
    path = write_members(tmp_path / "a.tar", [("000.jpg", photos[0].jpg)], fmt=tarfile.USTAR_FORMAT)
    data = path.read_bytes()
    for cut in (0, 5, 99, 150, 300, 512):
        assert sniff.not_a_tar(data[:cut]) is None, cut


# -- records the world writes, through every verb -------------------------------------------------


@pytest.fixture
def world(tmp_path, photos) -> Path:
    """One shard by webdataset's TarWriter: PNG-, WebP- and JPEG-only records, a Motion Photo,
    a BOM JSON, and a record holding both .JPG and .jpg."""
    folder = tmp_path / "world"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as w:
        w.write({"__key__": "png", "png": encoded(photos[0].jpg, "PNG"), "txt": "a PNG"})
        w.write({"__key__": "webp", "webp": encoded(photos[1].jpg, "WEBP"), "txt": "a WebP"})
        w.write({"__key__": "lossless", "webp": encoded(photos[2].jpg, "WEBP", lossless=True)})
        w.write({"__key__": "motion", "jpg": motion_photo(photos[3].jpg), "json": b'\xef\xbb\xbf{"a": 1}'})
        w.write({"__key__": "both", "JPG": photos[4].jpg, "jpg": photos[5].jpg})
        w.write({"__key__": "plain", "jpg": photos[6].jpg, "json": b'{"b": 2}'})
    return folder


def test_world_shard_readers_agree(world, photos):
    # The webdataset library: every record but the ambiguous one, JSON with a BOM parsed.
    samples = {}
    with pytest.raises(ValueError, match="duplicate"):
        for sample in wds.WebDataset(str(world / "00000.tar"), shardshuffle=False).decode():
            samples[sample["__key__"]] = sample
    assert samples["motion"]["json"] == {"a": 1}

    report = both_passes(world / "00000.tar")
    assert codes(report) == ["ambiguous_extension", "jpeg_trailing_data"]
    assert report.ok and set(report.problem_records()) == {"both"}  # the trailer only informs
    with tarfile.open(world / "00000.tar") as tar:  # Pillow's sizes of the members' own bytes
        expected = {m.name: pillow_size(tar.extractfile(m).read()) for m in tar.getmembers()
                    if role(m.name.split(".", 1)[1]) == "image"}
    assert {i.member: (i.width, i.height) for i in report.images} == expected

    for reader in READERS:
        result, rows = decode_rows(world, reader, report=None)
        assert result.ok and len(rows) == 6
        assert [k for k, r in rows.items() if r.decoded] == ["png", "webp", "lossless", "motion", "plain"]
        assert {rows[k].format for k in ("png", "webp", "lossless", "motion")} == {"png", "webp", "jpeg"}
        for key in ("png", "webp", "lossless", "motion", "plain"):
            assert (rows[key].width, rows[key].height) == (160, 120)
        assert rows["both"].error.startswith("ambiguous_extension")
        assert json.loads(rows["motion"].metadata) == {"a": 1} and rows["motion"].metadata_error is None
        assert not rows["motion"].metadata.startswith("\ufeff")


def test_png_and_webp_records_are_not_missing_images(tmp_path, photos):
    folder = tmp_path / "formats"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as w:
        for n, (fmt, ext) in enumerate((("PNG", "png"), ("WEBP", "webp"), ("PNG", "PNG"))):
            w.write({"__key__": f"{n:03d}", ext: encoded(photos[n].jpg, fmt)})
    ensure_index(Dataset(str(folder)), "00000")
    report = both_passes(folder / "00000.tar", (folder / "00000.idx").read_bytes())
    assert codes(report) == [] and report.index == "fresh"
    assert [(i.width, i.height) for i in report.images] == [(160, 120)] * 3


def test_motion_photos_pass_the_fast_pass_as_informational(tmp_path, photos):
    path = write_members(tmp_path / "m" / "00000.tar",
                         [(f"{n:03d}.jpg", motion_photo(p.jpg, n)) for n, p in enumerate(photos[:4])])
    report = both_passes(path)
    assert codes(report) == ["jpeg_trailing_data"] * 4 and report.ok and not report.problem_records()


# -- the verdict feeds decode, and decode guards itself -------------------------------------------


@pytest.fixture
def flagged(tmp_path, photos) -> Path:
    folder = tmp_path / "flagged"
    write_members(folder / "00000.tar", [
        ("000.jpg", photos[0].jpg), ("000.json", b"{not json"),
        ("001.jpg", with_sof_size(photos[1].jpg, 30000, 30000)),
        ("002.jpg", photos[2].jpg), ("002.txt", b"fine"),
        ("003.jpg", encoded(photos[3].jpg, "PNG")),  # decodable, but validation says not_jpeg
    ])
    return folder


@pytest.mark.parametrize("reader", READERS)
def test_decode_refuses_a_bomb_without_any_report(flagged, reader):
    result, rows = decode_rows(flagged, reader)
    assert result.report == "none"
    assert rows["001"].error.startswith("image_too_large: 30000x30000") and not rows["001"].decoded
    assert [k for k, r in rows.items() if r.decoded] == ["000", "002", "003"]


@pytest.mark.parametrize("reader", READERS)
def test_the_validation_report_fails_its_records(flagged, reader):
    dataset = Dataset(str(flagged))
    report = validate_shard(dataset, "00000")
    assert set(report.problem_records()) == {"000", "001", "003"}
    write_report(dataset, report)
    assert read_report(dataset, "00000").fingerprint == dataset.shard("00000").fingerprint
    result, rows = decode_rows(flagged, reader)
    assert result.report == "used" and result.flagged == 3
    assert rows["000"].error.startswith("bad_json: ") and rows["000"].error.endswith("(validation report)")
    assert rows["003"].error.startswith("not_jpeg: ")
    assert [k for k, r in rows.items() if r.decoded] == ["002"]
    assert rows["002"].caption == "fine"

    # The tar changes after validation: the report is stale and not trusted.
    path = flagged / "00000.tar"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    result, rows = decode_rows(flagged, reader)
    assert result.report == "stale" and result.flagged == 0
    assert [k for k, r in rows.items() if r.decoded] == ["000", "002", "003"]


def test_cli_validate_writes_the_report_decode_reads(flagged, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["validate", str(flagged), "--output", str(out), "--json", "--workers", "1"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["report"].endswith("validation/00000.json")
    assert cli.main(["decode", str(flagged), "--output", str(out), "--device", "cpu", "--json"]) == 0
    decoded = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert decoded["ok"] and decoded["report"] == "used" and decoded["flagged"] == 3
    assert decoded["decoded"] == 1


# -- exit codes and messages ------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path, photos) -> dict[str, Path]:
    good = write_members(tmp_path / "good" / "00000.tar", [(f"{n:03d}.jpg", p.jpg) for n, p in enumerate(photos[:4])])
    data = good.read_bytes()
    paths = {
        "lfs": tmp_path / "lfs" / "00000.tar", "text": tmp_path / "text" / "00000.tar",
        "empty": tmp_path / "empty" / "00000.tar", "truncated": tmp_path / "truncated" / "00000.tar",
    }
    for p in paths.values():
        p.parent.mkdir()
    paths["lfs"].write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9\n")
    paths["text"].write_text("this is not a tar\n" * 100)
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "compressed").mkdir()
    (tmp_path / "compressed" / "00000.tar.gz").write_bytes(gzip.compress(data))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "00000.tar").write_bytes(data)
    (tmp_path / "mixed" / "00001.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    (tmp_path / "mixed" / "00002.tgz").write_bytes(gzip.compress(data))
    (tmp_path / "mixed" / "00003.tar.gz").write_bytes(data)  # a plain tar under a compressed name
    paths["compressed"] = tmp_path / "compressed"
    paths["mixed"] = tmp_path / "mixed"
    return paths


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curator_assets.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_decode_exit_codes(bad_inputs):
    names = ["lfs", "text", "empty", "truncated", "compressed", "mixed"]
    done = _cli("decode", *(str(bad_inputs[n]) for n in names), "--device", "cpu", "--json")
    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    by_shard = {r["shard"]: r for r in rows if r["shard"]}
    assert by_shard[str(bad_inputs["lfs"])]["code"] == "not_a_tar"
    assert "Git LFS pointer" in by_shard[str(bad_inputs["lfs"])]["error"]
    assert by_shard[str(bad_inputs["text"])]["code"] == "not_a_tar"
    assert by_shard[str(bad_inputs["empty"])]["code"] == "tar_truncated"
    truncated = by_shard[str(bad_inputs["truncated"])]
    assert truncated["ok"] is False and truncated["shard_errors"][0]["code"] == "tar_truncated"
    assert truncated["decoded"] >= 1 and truncated["manifest"]  # what could be read is in the manifest
    assert by_shard[str(bad_inputs["mixed"] / "00000.tar")]["ok"] is True
    # What a file is comes from its bytes: compressed streams are named by their magic, with a
    # command that makes a shard of them; a plain tar named .tar.gz is decoded as the tar it is.
    compressed = {"compressed/00000.tar.gz": ("gzip", "gzip -dc"), "mixed/00001.tar.zst": ("zstd", "zstd -dc"),
                  "mixed/00002.tgz": ("gzip", "gzip -dc")}
    for name, (kind, command) in compressed.items():
        row = by_shard[str(bad_inputs["compressed"].parent / name)]
        assert row["code"] == "not_a_tar" and f"{kind}-compressed" in row["error"] and command in row["error"]
    misnamed = by_shard[str(bad_inputs["mixed"] / "00003.tar.gz")]
    assert misnamed["ok"] is True and misnamed["decoded"] == 4
    assert "Traceback" not in done.stderr


def test_index_and_validate_name_non_tars(bad_inputs):
    done = _cli("index", str(bad_inputs["lfs"]), str(bad_inputs["text"]), str(bad_inputs["compressed"]), "--json")
    assert done.returncode == 1
    rows = {r["shard"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert rows[str(bad_inputs["lfs"])]["code"] == rows[str(bad_inputs["text"])]["code"] == "not_a_tar"
    gz = rows[str(bad_inputs["compressed"] / "00000.tar.gz")]
    assert gz["code"] == "not_a_tar" and "gzip-compressed" in gz["error"]
    done = _cli("validate", str(bad_inputs["lfs"]), str(bad_inputs["truncated"]), "--json")
    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [p["code"] for p in rows[0]["problems"]][0] == "not_a_tar"
    assert "tar_truncated" in [p["code"] for p in rows[1]["problems"]]


def test_decode_of_an_indexed_truncated_tar_is_not_ok(tmp_path, photos):
    path = write_members(tmp_path / "t" / "00000.tar", [(f"{n:03d}.jpg", p.jpg) for n, p in enumerate(photos[:4])])
    ensure_index(Dataset(str(path.parent)), "00000")
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])  # cut inside the last image
    result, rows = decode_shard(Dataset(str(path.parent)), "00000", CPU, write=False)
    assert not result.ok and result.shard_errors[0][0] == "tar_truncated"
    assert len(rows) == 4 and not rows[-1].decoded and all(r.decoded for r in rows[:-1])
    assert np.sum([r.decoded for r in rows]) == 3


def test_record_level_problems_are_what_decode_fails(flagged):
    dataset = Dataset(str(flagged))
    strict = validate_shard(dataset, "00000", severities={"bad_json": "error", "image_too_large": "info"})
    assert set(strict.problem_records()) == {"000", "003"}  # an error still fails its record; info never does
    assert not strict.ok
    write_members(flagged / "00001.tar", [("000.jpg", b"\xff\xd8\xff"), ("000.jpg", b"x")])
    dup = validate_shard(dataset, "00001")
    assert "duplicate_record_id" in {p.code for p in dup.problems}  # shard-level: blocks the shard instead
    assert set(dup.problem_records()) == {"000"}
    assert {p.code for p in dup.problem_records()["000"]} == {"jpeg_truncated", "not_jpeg"}


def test_shards_are_what_their_bytes_say_whatever_their_name(bad_inputs, tmp_path):
    listing = Dataset(str(bad_inputs["mixed"])).list_shards()
    assert [s.key for s in listing.shards] == ["00000", "00001", "00002", "00003"] and not listing.rejected
    dataset = Dataset(str(bad_inputs["mixed"]))
    assert dataset.index_path("00003") == str(bad_inputs["mixed"] / "00003.idx")
    report = validate_shard(dataset, "00003")
    assert report.ok and report.records == 4
    with tarfile.open(bad_inputs["mixed"] / "00003.tar.gz", "r:") as t:  # tarfile agrees: a plain tar
        assert len(t.getmembers()) == 4
    problems = [p for p in validate_shard(dataset, "00002").problems if p.severity == "error"]
    assert [p.code for p in problems] == ["not_a_tar"] and "gzip-compressed" in problems[0].detail
    # A single file named directly, with a name no shard has: read as the tar it is.
    odd = tmp_path / "odd" / "shard-0.bin"
    odd.parent.mkdir()
    odd.write_bytes((bad_inputs["mixed"] / "00000.tar").read_bytes())
    alone = Dataset(str(odd)).list_shards()
    assert [s.key for s in alone.shards] == ["shard-0.bin"] and validate_shard(Dataset(str(odd)), "shard-0.bin").ok
