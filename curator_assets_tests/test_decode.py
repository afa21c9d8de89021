"""Decoding shards with the real DALI CPU pipeline.

Expected values are computed independently: records and member bytes with Python's tarfile,
pixels with Pillow (EXIF orientation applied, converted to RGB), captions and JSON from the
member bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from curator_assets import cli
from curator_assets.cli.demo import PhotoRecord, write_shard
from curator_assets.decode import DecodeOptions, ShardDecoder, StaleIndexError, decode_shard, iter_batches
from curator_assets.formats.manifest import read_manifest
from curator_assets.steps.decode.options import DeviceUnavailableError, cuda_device_count, resolve_device
from curator_assets.steps.decode.plan import plan_shard
from curator_assets.steps.decode.reader import sniff_image
from curator_assets.steps.index import ensure_index
from curator_assets.store.dataset import Dataset
from curator_assets_tests.conftest import write_members

CPU = DecodeOptions(device="cpu", batch_size=4)


# -- independent expectations -------------------------------------------------------------------


def tar_records(path: Path) -> list[tuple[str, list[tuple[str, str, bytes]]]]:
    """(key, [(ext, member name, data)]) per record, by Python's tarfile and the WebDataset rule
    (key up to the first dot of the basename; consecutive members with one key form a record)."""
    records: list[tuple[str, list]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if not m.isfile() or base.startswith(".") or "." not in base:
                continue
            dot = m.name.index(".", len(m.name) - len(base))
            key, ext = m.name[:dot], m.name[dot + 1 :]
            if not records or records[-1][0] != key:
                records.append((key, []))
            records[-1][1].append((ext, m.name, tar.extractfile(m).read()))
    return records


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def assert_close_to_pillow(pixels: np.ndarray, data: bytes) -> None:
    expected = pillow_rgb(data)
    assert pixels.shape == expected.shape
    assert pixels.dtype == np.uint8
    diff = np.abs(pixels.astype(np.int16) - expected.astype(np.int16))
    # Both are libjpeg-turbo underneath; allow for a different IDCT or colour conversion anyway.
    assert diff.mean() < 1.0, diff.mean()
    assert diff.max() <= 16, diff.max()


def encode(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def without_segment(jpeg: bytes, marker: int) -> bytes:
    """The JPEG with every segment of one marker type removed (e.g. 0xDB: the quantization tables)."""
    out = bytearray(jpeg[:2])
    pos = 2
    while pos < len(jpeg):
        m = jpeg[pos + 1]
        if m == 0xDA:
            out += jpeg[pos:]
            break
        length = (jpeg[pos + 2] << 8) | jpeg[pos + 3]
        if m != marker:
            out += jpeg[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out)


def header_only(jpeg: bytes) -> bytes:
    """The JPEG's segments up to its first scan, then the end-of-image marker: no image data."""
    pos = 2
    while jpeg[pos + 1] != 0xDA:
        pos += 2 + ((jpeg[pos + 2] << 8) | jpeg[pos + 3])
    return jpeg[:pos] + b"\xff\xd9"


def photo_members(photos: list[PhotoRecord]) -> list[tuple[str, bytes]]:
    out = []
    for p in photos:
        out += [(f"{p.key}.jpg", p.jpg), (f"{p.key}.txt", p.caption.encode()),
                (f"{p.key}.json", json.dumps(p.metadata).encode())]
    return out


def rows_by_id(rows) -> dict[str, object]:
    return {r.record_id: r for r in rows}


# -- pixels ---------------------------------------------------------------------------------------


def test_pixels_equal_pillows_decode_of_the_same_bytes(make_shard):
    path = make_shard(n=10)
    expected = {key: dict((e, d) for e, _, d in comps)["jpg"] for key, comps in tar_records(path)}
    seen = {}
    for batch in iter_batches([str(path)], batch_size=4, device="cpu"):
        assert batch.device == "cpu"
        for record_id, pixels in zip(batch.record_ids, batch.image_list, strict=True):
            assert isinstance(pixels, np.ndarray) and pixels.ndim == 3 and pixels.shape[2] == 3
            seen[record_id] = pixels
    assert list(seen) == list(expected)
    # Compared only now: images kept from earlier batches stay intact while later ones decode.
    for record_id, pixels in seen.items():
        assert_close_to_pillow(pixels, expected[record_id])


def test_fast_idct_is_applied_and_stays_close(make_shard):
    path = make_shard(n=6)
    accurate = {rid: img.copy() for b in iter_batches([str(path)], device="cpu")
                for rid, img in zip(b.record_ids, b.image_list, strict=True)}
    fast = {rid: img.copy() for b in iter_batches([str(path)], device="cpu", fast_idct=True)
            for rid, img in zip(b.record_ids, b.image_list, strict=True)}
    assert accurate.keys() == fast.keys() and len(fast) == 6
    diffs = [np.abs(accurate[k].astype(int) - fast[k].astype(int)) for k in fast]
    assert all(a.shape == f.shape for a, f in zip(accurate.values(), fast.values(), strict=True))
    assert any(d.max() > 0 for d in diffs)  # the option reached the decoder
    assert max(d.mean() for d in diffs) < 1.5  # and stays within a few levels on average


def test_grayscale_cmyk_progressive_and_exif_rotated_decode_to_rgb(tmp_path, photos):
    img = Image.open(io.BytesIO(photos[0].jpg)).convert("RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    variants = {
        "gray": encode(img.convert("L")),
        "cmyk": encode(img.convert("CMYK")),
        "progressive": encode(img, progressive=True, quality=85),
        "rotated": encode(img, exif=exif.tobytes()),
    }
    path = write_members(tmp_path / "ds" / "00000.tar", [(f"{k}.jpg", v) for k, v in variants.items()])
    got = {}
    for batch in iter_batches([str(path)], batch_size=8, device="cpu"):
        got.update(zip(batch.record_ids, batch.image_list, strict=True))
    assert set(got) == set(variants)
    for key, data in variants.items():
        assert got[key].shape[2] == 3, key
        assert_close_to_pillow(got[key], data)
    w, h = img.size
    assert got["rotated"].shape[:2] == (w, h)  # turned upright: width and height swap
    assert got["gray"].shape[:2] == (h, w)
    # The sniff reports what the encoded image holds.
    assert sniff_image(variants["gray"]).channels == 1
    assert sniff_image(variants["cmyk"]).channels == 4
    assert sniff_image(variants["progressive"]).progressive


def test_jpeg_and_upper_case_extensions_count_as_images(tmp_path, photos):
    members = [("a.jpeg", photos[0].jpg), ("b.JPG", photos[1].jpg), ("c.Jpeg", photos[2].jpg),
               ("d.png", _png(photos[3].jpg))]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    result, rows = decode_shard(Dataset(str(path)), "00000", CPU)
    assert [r.member for r in rows] == [m for m, _ in members]
    assert all(r.decoded for r in rows), [r.error for r in rows]
    assert [r.format for r in rows] == ["jpeg", "jpeg", "jpeg", "png"]


def _png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "PNG")
    return buf.getvalue()


# -- every record, isolated failures --------------------------------------------------------------


def test_every_record_of_the_shard_is_in_the_manifest(tmp_path, photos):
    members = photo_members(photos[:3]) + [
        ("caption-only.txt", b"a record without an image"),
        ("folder/x.y/rec.seg.jpg", photos[3].jpg),  # extension seg.jpg: not the record's image
        (".hidden.jpg", photos[4].jpg),  # not a component
        ("notes", b"no extension: not a component"),
    ] + photo_members(photos[5:7])
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    ensure_index(Dataset(str(path)), "00000")
    result, rows = decode_shard(Dataset(str(path), output_url=str(tmp_path / "out")), "00000", CPU)

    expected = tar_records(path)
    assert [r.record_id for r in rows] == [k for k, _ in expected]
    assert [r.position for r in rows] == list(range(len(expected)))
    assert [r.extensions for r in rows] == [[e for e, _, _ in comps] for _, comps in expected]
    assert result.records == len(expected) and result.no_image == 2 and result.failed == 0
    assert result.decoded == len(expected) - 2
    for row in rows:
        if row.record_id in ("caption-only", "folder/x.y/rec"):
            assert not row.decoded and row.member is None and "no image member" in row.error
    assert rows_by_id(rows)["caption-only"].caption == "a record without an image"
    table = read_manifest(Dataset(str(path), output_url=str(tmp_path / "out")), "00000")
    assert table.num_rows == len(expected)


def test_a_corrupt_image_is_isolated_and_the_rest_decode(tmp_path, photos):
    bad = {
        "r03": without_segment(photos[3].jpg, 0xDB),  # looks fine to the sniff; DALI fails the batch
        "r06": photos[6].jpg[: len(photos[6].jpg) // 2],  # truncated: no end-of-image marker
        "r09": b"this is not a JPEG at all",
        "r10": b"",
    }
    members = []
    for n, p in enumerate(photos[:12]):
        key = f"r{n:02d}"
        members += [(f"{key}.jpg", bad.get(key, p.jpg)), (f"{key}.txt", p.caption.encode())]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    decoder = ShardDecoder(DecodeOptions(device="cpu", batch_size=8))
    result, rows = decode_shard(Dataset(str(path)), "00000", decoder=decoder)

    assert [r.record_id for r in rows] == [f"r{n:02d}" for n in range(12)]
    failed = {r.record_id: r.error for r in rows if not r.decoded}
    assert set(failed) == set(bad)
    assert "DALI could not decode" in failed["r03"] and "Pillow" in failed["r03"]
    assert "DALI could not decode" in failed["r06"]
    assert "not an image" in failed["r09"]
    assert "empty" in failed["r10"]
    assert result.failed == 4 and result.decoded == 8
    # DALI failed a batch: its pipeline was rebuilt and its records went one by one.
    assert sum(d.builds for d in decoder.decoders) > len(decoder.decoders)
    # The records decoded beside the bad ones are right, and keep their captions.
    by_id = rows_by_id(rows)
    for n in (0, 2, 4, 7, 11):
        row = by_id[f"r{n:02d}"]
        with Image.open(io.BytesIO(photos[n].jpg)) as im:
            assert (row.width, row.height, row.channels) == (*im.size, 3)
        assert row.caption == photos[n].caption
    # sha256 is of the stored bytes, bad or not.
    import hashlib

    assert by_id["r03"].sha256 == hashlib.sha256(bad["r03"]).hexdigest()

    # The streaming API accounts for the same records: decoded in record_ids, the rest in rows.
    decoded_ids, failed_ids = [], []
    for batch in iter_batches([str(path)], batch_size=5, device="cpu"):
        decoded_ids += batch.record_ids
        failed_ids += [r.record_id for r in batch.rows if not r.decoded]
        for record_id, pixels in zip(batch.record_ids, batch.image_list, strict=True):
            assert_close_to_pillow(pixels, photos[int(record_id[1:])].jpg)
    assert sorted(failed_ids) == sorted(bad)
    assert decoded_ids == [f"r{n:02d}" for n in range(12) if f"r{n:02d}" not in bad]


def test_any_number_of_pipelines_gives_the_same_manifest_in_tar_order(tmp_path, photos):
    # Bad records in several batches, so failed batches on different pipelines are replayed
    # one record at a time while other batches decode beside them.
    bad = {3: photos[3].jpg[:200], 9: without_segment(photos[9].jpg, 0xDB), 14: b"\x00" * 64}
    members = []
    for n, p in enumerate(photos[:16]):
        members += [(f"k{n:02d}.jpg", bad.get(n, p.jpg)), (f"k{n:02d}.txt", p.caption.encode())]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    ensure_index(Dataset(str(path)), "00000")
    manifests = {}
    for pipelines in (1, 2, 3):
        options = DecodeOptions(device="cpu", batch_size=3, pipelines=pipelines)
        _, rows = decode_shard(Dataset(str(path)), "00000", options, write=False)
        manifests[pipelines] = [dataclasses.asdict(r) for r in rows]
    assert [r["record_id"] for r in manifests[1]] == [f"k{n:02d}" for n in range(16)]
    assert {r["record_id"] for r in manifests[1] if not r["decoded"]} == {f"k{n:02d}" for n in bad}
    assert manifests[2] == manifests[1] and manifests[3] == manifests[1]
    with pytest.raises(ValueError, match="pipelines"):
        DecodeOptions(pipelines=0)


def test_record_ids_come_from_member_names_not_positions(tmp_path, photos):
    keys = ["zebra-7", "0042", "a/b.c/000031", "0001", "ünïcode-名前"]
    members = []
    for key, p in zip(keys, photos, strict=False):
        members += [(f"{key}.jpg", p.jpg), (f"{key}.txt", p.caption.encode())]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    for with_index in (False, True):
        if with_index:
            ensure_index(Dataset(str(path)), "00000")
        plan = plan_shard(Dataset(str(path)), "00000")
        assert plan.source == ("index" if with_index else "scan")
        _, rows = decode_shard(Dataset(str(path)), "00000", CPU, write=False)
        assert [r.record_id for r in rows] == [k for k, _ in tar_records(path)] == keys
        assert [r.caption for r in rows] == [p.caption for p in photos[: len(keys)]]


def test_captions_and_json_are_joined(tmp_path, photos):
    members = photo_members(photos[:4])
    # A record whose JSON is broken keeps its image and caption; the manifest says why the JSON is missing.
    members += [("broken.jpg", photos[4].jpg), ("broken.txt", "ünïcode caption\n".encode()),
                ("broken.json", b"{not json")]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    _, rows = decode_shard(Dataset(str(path)), "00000", CPU, write=False)
    expected = {key: {e: d for e, _, d in comps} for key, comps in tar_records(path)}
    for row in rows:
        parts = expected[row.record_id]
        assert row.caption == parts["txt"].decode()
        if row.record_id == "broken":
            assert row.decoded and row.metadata is None and "not valid JSON" in row.metadata_error
        else:
            assert json.loads(row.metadata) == json.loads(parts["json"])
            assert row.metadata_error is None


# -- the index ------------------------------------------------------------------------------------


def test_an_index_is_used_and_a_stale_one_is_refused(tmp_path, photos):
    folder = tmp_path / "ds"
    write_shard(folder / "00000.tar", photos[:6])
    ds = Dataset(str(folder))
    ensure_index(ds, "00000")
    plan = plan_shard(ds, "00000")
    assert plan.source == "index" and plan.verify_headers
    # Rewrite the tar (other records, same name) but keep the old index: the offsets now point
    # at other members, which DALI would decode without a word.
    write_shard(folder / "00000.tar", photos[10:13] + photos[:3])
    with pytest.raises(StaleIndexError, match=r"00000\.tar: its \.idx does not match the tar"):
        decode_shard(Dataset(str(folder)), "00000", CPU, write=False)

    # Records appended after indexing: every offset the index has is still right, but the
    # manifest would miss the new records.
    write_shard(folder / "00000.tar", photos[:6])
    ensure_index(ds, "00000", force=True)
    write_shard(folder / "00000.tar", photos[:8])
    with pytest.raises(StaleIndexError, match=r"2 record\(s\) follow the last one it lists"):
        decode_shard(Dataset(str(folder)), "00000", CPU, write=False)

    # Members after the last record that are not records (a hidden file) are no reason to refuse.
    members = [(f"{p.key}.{e}", d) for p in photos[:2] for e, d in (("jpg", p.jpg), ("txt", b"t"))]
    write_members(folder / "00000.tar", members)
    ensure_index(ds, "00000", force=True)
    write_members(folder / "00000.tar", members + [(".DS_Store", b"x" * 700)])
    result, _ = decode_shard(Dataset(str(folder)), "00000", CPU, write=False)
    assert result.decoded == 2 and result.plan_source == "index"


def test_a_v11_index_falls_back_to_a_header_scan_for_names(tmp_path, photos):
    folder = tmp_path / "ds"
    write_shard(folder / "00000.tar", photos[:3])
    ds = Dataset(str(folder))
    ensure_index(ds, "00000")
    v12 = Path(ds.index_path("00000")).read_text().splitlines()
    v11 = ["v1.1 " + v12[0].split()[1]] + [
        " ".join(f for i, f in enumerate(line.split(" ")) if i % 4 != 3) for line in v12[1:]
    ]
    Path(ds.index_path("00000")).write_text("\n".join(v11) + "\n")
    result, rows = decode_shard(Dataset(str(folder)), "00000", CPU, write=False)
    assert result.plan_source == "scan" and any("v1.1" in p for p in result.problems)
    assert [r.record_id for r in rows] == [p.key for p in photos[:3]]


def test_a_truncated_tar_loses_no_record(tmp_path, photos):
    folder = tmp_path / "ds"
    write_shard(folder / "00000.tar", photos[:5])
    data = (folder / "00000.tar").read_bytes()
    with tarfile.open(folder / "00000.tar") as tar:
        last_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    (folder / "00000.tar").write_bytes(data[: last_jpg.offset_data + last_jpg.size // 2])
    result, rows = decode_shard(Dataset(str(folder)), "00000", CPU, write=False)
    assert [r.record_id for r in rows] == [p.key for p in photos[:5]]
    assert [r.decoded for r in rows] == [True] * 4 + [False]
    assert "past the end of the shard" in rows[-1].error
    assert any("tar_truncated" in p for p in result.problems)


# -- readers, stores, the streaming API -----------------------------------------------------------


def test_dali_webdataset_reader_gives_the_same_manifest(tmp_path, photos):
    members = photo_members(photos[:5]) + [("nothing.txt", b"caption, no image"),
                                           ("bad.jpg", without_segment(photos[5].jpg, 0xDB))]
    members += photo_members(photos[6:9]) + [("upper.JPG", photos[9].jpg)]
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    ensure_index(Dataset(str(path)), "00000")
    _, stream = decode_shard(Dataset(str(path)), "00000", CPU, write=False)
    result, native = decode_shard(Dataset(str(path)), "00000",
                                  DecodeOptions(device="cpu", batch_size=4, reader="dali"), write=False)
    assert result.reader == "dali"
    strip = ("error",)  # the texts differ in wording only where DALI's reader hit the bad record
    assert [{k: v for k, v in dataclasses.asdict(r).items() if k not in strip} for r in native] == \
           [{k: v for k, v in dataclasses.asdict(r).items() if k not in strip} for r in stream]
    assert [r.error is None for r in native] == [r.error is None for r in stream]
    assert not rows_by_id(native)["bad"].decoded

    # And the pixels DALI's reader hands out are the image's.
    for batch in iter_batches([str(path)], batch_size=4, device="cpu", reader="dali"):
        for record_id, pixels in zip(batch.record_ids, batch.image_list, strict=True):
            data = dict((m, d) for m, d in members)[rows_by_id(native)[record_id].member]
            assert_close_to_pillow(pixels, data)


def test_a_non_local_store_is_read_through_fsspec_ranges(tmp_path, photos):
    import fsspec

    path = write_members(tmp_path / "ds" / "00000.tar", photo_members(photos[:6]))
    ensure_index(Dataset(str(path)), "00000")
    mem = fsspec.filesystem("memory")
    mem.pipe("/decode-test/00000.tar", path.read_bytes())
    mem.pipe("/decode-test/00000.idx", path.with_suffix(".idx").read_bytes())
    try:
        remote = Dataset("memory://decode-test")
        assert not remote.local
        result, rows = decode_shard(remote, "00000", CPU)
        _, local_rows = decode_shard(Dataset(str(path)), "00000", CPU, write=False)
        assert rows == local_rows
        assert result.plan_source == "index"
        assert mem.exists("/decode-test/_curator/manifests/00000.parquet")
        with pytest.raises(Exception, match="reads local files only"):
            decode_shard(remote, "00000", DecodeOptions(device="cpu", reader="dali"), write=False)
    finally:
        mem.rm("/decode-test", recursive=True)


def test_iter_batches_streams_in_tar_order_within_the_batch_size(tmp_path, photos):
    a = tmp_path / "a" / "00000.tar"
    b = tmp_path / "b" / "00007.tar"
    write_shard(a, photos[:7])
    write_shard(b, photos[7:12])
    ensure_index(Dataset(str(b)), "00007")
    seen = []
    for batch in iter_batches([str(a), (Dataset(str(b.parent)), "00007")], batch_size=3, device="cpu"):
        assert len(batch.rows) <= 3 and len(batch.image_list) <= 3
        assert len({r.shard for r in batch.rows}) == 1  # a batch never spans two shards
        seen += [(batch.shard, rid) for rid in batch.record_ids]
        for row in batch.rows:
            assert row.caption == photos[int(row.record_id)].caption
    assert seen == [("00000", p.key) for p in photos[:7]] + [("00007", p.key) for p in photos[7:12]]
    # A folder stands for every shard in it.
    assert [rid for batch in iter_batches(str(tmp_path / "a"), device="cpu") for rid in batch.record_ids] == \
        [p.key for p in photos[:7]]


@pytest.mark.cloud
def test_decode_on_an_object_store_matches_the_local_decode(object_store, tmp_path, photos):
    local = tmp_path / "ds"
    write_members(local / "00000.tar", photo_members(photos[:6]) + [("bad.jpg", b"not an image")])
    ensure_index(Dataset(str(local)), "00000")
    bucket = object_store.new_bucket()
    url = object_store.upload(local, f"{bucket}/ds")
    remote = Dataset(url, object_store.storage_options)
    result, rows = decode_shard(remote, "00000", CPU)
    _, local_rows = decode_shard(Dataset(str(local)), "00000", CPU, write=False)
    assert rows == local_rows
    assert result.decoded == 6 and result.failed == 1 and result.plan_source == "index"
    assert result.manifest_url.startswith(url) and read_manifest(remote, "00000").num_rows == 7


# -- devices and options --------------------------------------------------------------------------


def test_device_count_and_dali_version_agree_with_dali_itself() -> None:
    """The device count (asked of libcuda) and the manifest's DALI version (from the package
    metadata) are what DALI says, though the process that reads them never imports DALI."""
    script = ("import sys, os\n"
              "from curator_assets.steps.decode.engine import dali_version\n"
              "from curator_assets.steps.decode.options import cuda_device_count\n"
              "ours = (cuda_device_count(), dali_version())\n"
              "assert 'nvidia.dali' not in sys.modules, 'DALI was imported'\n"
              "import nvidia.dali\n"
              "from nvidia.dali import backend\n"
              "try:\n    theirs = int(backend.GetCUDADeviceCount())\n"
              "except Exception:\n    theirs = 0\n"
              "print(ours == (theirs, nvidia.dali.__version__), ours, theirs, nvidia.dali.__version__)\n"
              "os.environ['CUDA_VISIBLE_DEVICES'] = ''\n"
              "print(cuda_device_count())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    agree, hidden = proc.stdout.splitlines()[-2:]
    assert agree.startswith("True"), agree
    assert hidden == "0"  # no device is visible with CUDA_VISIBLE_DEVICES empty


def test_device_choice_is_automatic_and_reported():
    assert resolve_device("cpu").name == "cpu"
    auto = resolve_device("auto")
    if cuda_device_count() == 0:
        assert auto.name == "cpu" and "no CUDA device" in auto.reason
        with pytest.raises(DeviceUnavailableError, match="no usable CUDA device"):
            resolve_device("gpu")
    else:
        assert auto.name == "gpu"
    with pytest.raises(ValueError, match="device must be one of"):
        DecodeOptions(device="tpu")
    with pytest.raises(ValueError, match="batch size"):
        DecodeOptions(batch_size=0)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        DecodeOptions(hw_decoder_load=1.5)


def test_sniff_tells_images_from_other_bytes(photos):
    s = sniff_image(photos[0].jpg)
    with Image.open(io.BytesIO(photos[0].jpg)) as im:
        assert (s.format, s.width, s.height, s.channels, s.error) == ("jpeg", *im.size, 3, None)
    assert sniff_image(_png(photos[0].jpg)).format == "png"
    assert sniff_image(b"GIF89a....").error.startswith("not an image")
    assert sniff_image(photos[0].jpg[:100]).error is not None  # ends before the frame header
    assert sniff_image(photos[0].jpg[: len(photos[0].jpg) - 10]).suspect


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_decode_writes_manifests_and_reports_each_shard(tmp_path, photos, capsys):
    ds = tmp_path / "ds"
    write_shard(ds / "00000.tar", photos[:4])
    write_members(ds / "00001.tar", photo_members(photos[4:6]) + [("bad.jpg", b"junk")])
    out = tmp_path / "out"
    rc = cli.main(["decode", str(ds), "--output", str(out), "--device", "cpu", "--batch-size", "2",
                   "--threads", "1", "--pipelines", "3", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    counts = [(r["key"], r["records"], r["decoded"], r["failed"]) for r in lines]
    assert counts == [("00000", 4, 4, 0), ("00001", 3, 2, 1)]
    assert all(r["device"] == "cpu" and r["ok"] for r in lines)
    assert (out / "manifests" / "00000.parquet").exists() and (out / "manifests" / "00001.parquet").exists()
    assert lines[1]["errors"][0]["record_id"] == "bad"

    rc = cli.main(["decode", str(ds / "00001.tar"), "--output", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "decoded 2/3, 1 failed" in text and "bad: not an image" in text
    assert "on 2 pipeline(s)" in text

    rc = cli.main(["decode", str(ds), "--output", str(out), "--device", "cpu", "--pipelines", "0"])
    assert rc == 2 and "pipelines must be at least 1" in capsys.readouterr().err

    rc = cli.main(["decode", str(tmp_path / "missing"), "--output", str(out), "--device", "cpu"])
    assert rc == 1 and "missing" in capsys.readouterr().err


# -- GPU ------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA GPU (none found)")


@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_matches_pillow_and_exports_dlpack(make_shard):
    from nvidia.dali.tensors import TensorGPU

    path = make_shard(n=12)
    expected = {key: dict((e, d) for e, _, d in comps)["jpg"] for key, comps in tar_records(path)}
    n = 0
    for batch in iter_batches([str(path)], batch_size=5, device="gpu"):
        assert batch.device == "gpu"
        for record_id, tensor in zip(batch.record_ids, batch.image_list, strict=True):
            assert tensor.__dlpack_device__()[0] == 2  # kDLCUDA
            # Consumed through DLPack (by DALI itself: torch and cupy are no dependency), then copied to host.
            pixels = np.asarray(TensorGPU(tensor.__dlpack__()).as_cpu())
            assert np.array_equal(pixels, np.asarray(tensor.as_cpu()))
            cai = tensor.__cuda_array_interface__
            assert tuple(cai["shape"]) == pixels.shape and np.dtype(cai["typestr"]) == np.uint8
            # nvJPEG / the hardware decoder upsample chroma differently from libjpeg-turbo.
            expected_px = pillow_rgb(expected[record_id]).astype(np.int16)
            assert pixels.shape == expected_px.shape and pixels.dtype == np.uint8
            assert np.abs(pixels.astype(np.int16) - expected_px).mean() < 3.0
            n += 1
    assert n == 12


@pytest.mark.gpu
@needs_gpu
def test_gpu_manifest_matches_the_cpu_manifest(tmp_path, photos):
    # "bad": a frame header and no image data, which every decoder refuses; "no-dqt": no
    # quantization tables, which libjpeg-turbo refuses but the JPEG standard leaves undefined, so
    # nvJPEG may decode it: either way it must come out, decoded or with its error.
    members = photo_members(photos[:4]) + [("bad.jpg", header_only(photos[8].jpg)),
                                           ("no-dqt.jpg", without_segment(photos[9].jpg, 0xDB))]
    members += photo_members(photos[4:8])
    path = write_members(tmp_path / "ds" / "00000.tar", members)
    ensure_index(Dataset(str(path)), "00000")
    _, cpu_rows = decode_shard(Dataset(str(path)), "00000", CPU, write=False)
    keep = ("record_id", "width", "height", "channels", "decoded", "sha256", "caption", "metadata")
    expected = [[getattr(r, k) for k in keep] for r in cpu_rows if r.record_id != "no-dqt"]
    cpu_no_dqt = rows_by_id(cpu_rows)["no-dqt"]
    assert not cpu_no_dqt.decoded and cpu_no_dqt.error.startswith("DALI could not decode")
    outcomes = set()
    for reader in ("stream", "dali"):
        result, gpu_rows = decode_shard(Dataset(str(path)), "00000",
                                        DecodeOptions(device="gpu", batch_size=4, reader=reader), write=False)
        assert result.device == "gpu" and result.reader == reader
        assert [r.record_id for r in gpu_rows] == [r.record_id for r in cpu_rows]
        assert [[getattr(r, k) for k in keep] for r in gpu_rows if r.record_id != "no-dqt"] == expected
        bad, no_dqt = rows_by_id(gpu_rows)["bad"], rows_by_id(gpu_rows)["no-dqt"]
        assert not bad.decoded and bad.error.startswith("DALI could not decode")
        # The no-dqt row is one of two things, each whole: decoded at the photo's size with no
        # error, or not decoded with DALI's reason and no size.
        if no_dqt.decoded:
            assert (no_dqt.width, no_dqt.height, no_dqt.channels, no_dqt.error) == (160, 120, 3, None)
        else:
            assert no_dqt.error.startswith("DALI could not decode") and no_dqt.width is None
        assert no_dqt.sha256 == cpu_no_dqt.sha256
        outcomes.add(no_dqt.decoded)
    assert len(outcomes) == 1  # the same GPU decoder behind both readers: the same answer
