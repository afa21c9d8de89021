"""The dataset decode summary and its pictures, from real decoded shards and the manifest writer."""

from __future__ import annotations

import io
import json
import os

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard
from curator_assets.formats.manifest import ManifestRow, manifest_table, write_manifest
from curator_assets.steps.summary import (
    MAX_PICTURE_BYTES,
    SUMMARY_COLUMNS,
    contact_sheet,
    error_code,
    failures_picture,
    png_markdown,
    read_columns,
    sample_members,
    size_picture,
    summarize_decode,
)
from curator_assets.store.dataset import Dataset
from curator_assets.store.fs import counting_reads
from curator_assets_tests.conftest import write_members

BAD = b"\xff\xd8\xff\xdb not a JPEG at all"


def _records(photos, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for p in photos:
        out += [(f"{prefix}{p.key}.jpg", p.jpg), (f"{prefix}{p.key}.txt", p.caption.encode())]
    return out


@pytest.fixture(scope="module")
def decoded(tmp_path_factory, photos):
    """Three decoded shards: 00001 repeats two images of 00000 under other names; 00002 has a
    broken JPEG and a record without an image."""
    root = tmp_path_factory.mktemp("summary")
    folder = root / "ds"
    write_members(folder / "00000.tar", _records(photos[:20]))
    write_members(folder / "00001.tar", _records(photos[20:26]) + _records(photos[:2], prefix="copy-"))
    write_members(folder / "00002.tar", _records(photos[26:30]) + [
        ("zz-bad.jpg", BAD), ("zz-text.txt", b"no image here")])
    dataset = Dataset(str(folder), output_url=str(root / "out"))
    decoder = ShardDecoder(DecodeOptions(device="cpu"))
    rows = {k: decode_shard(dataset, k, decoder=decoder, report=None)[1] for k in ("00000", "00001", "00002")}
    return dataset, rows, photos


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.verify()
    return Image.open(io.BytesIO(data))


def test_counts_failures_and_duplicates_across_shards(decoded):
    dataset, rows, photos = decoded
    s = summarize_decode(dataset, ["00000", "00001", "00002", "00099"])
    assert (s.shards, s.manifests, s.missing) == (4, 3, ["00099"])
    assert (s.records, s.decoded, s.failed, s.no_image) == (20 + 8 + 6, 32, 1, 1)
    assert s.bytes == sum(r.size or 0 for rs in rows.values() for r in rs)
    assert s.bytes == sum(len(p.jpg) for p in photos[:30]) + sum(len(p.jpg) for p in photos[:2]) + len(BAD)
    assert s.devices == {"cpu": 3} and s.seconds > 0 and s.images_per_second > 0
    assert s.failures_by_code.total() == 2 and set(s.failures_by_shard) == {"00002"}
    assert s.failures_by_code["no_image"] == 1
    assert len(s.widths) == len(s.heights) == 32 and set(s.widths.tolist()) == {160}
    assert (s.duplicate_images, s.duplicate_records) == (2, 4)
    by_sha = {ex["sha256"]: sorted(map(tuple, ex["places"])) for ex in s.duplicate_examples}
    import hashlib

    for p in photos[:2]:
        assert by_sha[hashlib.sha256(p.jpg).hexdigest()] == [("00000", f"{p.key}.jpg"), ("00001", f"copy-{p.key}.jpg")]
    md = s.metadata()
    assert json.loads(json.dumps(md))["duplicate_images"] == 2


def test_error_codes_are_short_and_stable():
    assert error_code("image_too_large: 20000x20000 pixels") == "image_too_large"
    assert error_code("DALI could not decode the image (x); Pillow: broken") == "decode_failed"
    assert error_code("no image member (components: txt)") == "no_image"
    assert error_code("Something Else happened") == "not_decoded" == error_code(None)


def test_pictures_are_valid_pngs_under_the_limit(decoded):
    dataset, rows, _ = decoded
    s = summarize_decode(dataset, ["00000", "00001", "00002"])
    for data in (size_picture(s), failures_picture(s), failures_picture(summarize_decode(dataset, ["00000"]))):
        assert len(data) < MAX_PICTURE_BYTES
        assert _png(data).size[0] > 200
    empty = summarize_decode(dataset, [])
    assert _png(size_picture(empty)).size[0] > 200
    md = png_markdown(b"\x89PNG")
    assert md.startswith("![sheet](data:image/png;base64,") and md.endswith(")")


def test_contact_sheet_draws_sixteen_thumbnails_from_the_tar(decoded):
    dataset, rows, _ = decoded
    samples = sample_members(rows["00000"])
    assert len(samples) == 16
    data = contact_sheet(dataset, "00000", samples)
    assert data is not None and len(data) < MAX_PICTURE_BYTES
    img = _png(data).convert("RGB")
    assert img.size == (4 * 98, 4 * 98)
    assert len({tuple(p) for p in np.asarray(img.resize((16, 16))).reshape(-1, 3)}) > 20  # not blank
    small = contact_sheet(dataset, "00000", samples, max_bytes=20_000)
    assert small is not None and len(small) <= 20_000 and _png(small).size[0] < 4 * 98
    # the broken JPEG is no sample; a shard of failures only draws nothing
    assert all(r.decoded for r in rows["00002"] if (r.offset, r.size) in sample_members(rows["00002"]))


def _synthetic(dataset, key: str, n: int, caption_bytes: int) -> None:
    rows = [ManifestRow(i, f"{key}-{i}", key, f"{key}-{i}.jpg", 512 * (i + 1), 1000, 64, 48, 3, True,
                        caption=os.urandom(caption_bytes // 2).hex(), sha256=os.urandom(32).hex())
            for i in range(n)]
    write_manifest(dataset, key, manifest_table(rows, {"device": "gpu", "seconds": 0.5}))


def test_only_the_needed_columns_are_read(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        dataset = Dataset(str(tmp_path), output_url="memory://summary-test/out")
        for key in ("00000", "00001"):
            _synthetic(dataset, key, 50, caption_bytes=40_000)  # ~2 MB of captions per manifest
        total = sum(fs.info(f"/summary-test/out/manifests/{k}.parquet")["size"] for k in ("00000", "00001"))
        table, info = read_columns(dataset, "00000", SUMMARY_COLUMNS)
        assert table.column_names == SUMMARY_COLUMNS and info["device"] == "gpu"
        with counting_reads() as read:  # reads in this thread are counted: one thread
            s = summarize_decode(dataset, ["00000", "00001"], threads=1)
        assert summarize_decode(dataset, ["00000", "00001"]).metadata() == s.metadata()
        assert (s.records, s.decoded, s.devices, s.seconds) == (100, 100, {"gpu": 2}, 1.0)
        assert 0 < read[0] < total / 4, (read[0], total)  # a read-ahead block or two, no captions
        full = pq.read_table(io.BytesIO(fs.cat_file("/summary-test/out/manifests/00000.parquet")))
        assert "caption" in full.column_names  # the column skipped is there
    finally:
        fs.rm("/summary-test", recursive=True)


def test_decode_materialization_embeds_the_contact_sheet_and_summary_asset(tmp_path, photos):
    from curator_assets.defs.assets import dataset_decode_summary, decoded_images, shard_index, shard_validation
    from curator_assets.defs.partitions import shards
    from curator_assets.defs.resources import ShardStorage

    folder = tmp_path / "ds"
    write_members(folder / "00000.tar", _records(photos[:18]))
    write_members(folder / "00001.tar", _records(photos[:3], prefix="again-"))
    storage = ShardStorage(dataset_url=str(folder), output_url=str(tmp_path / "out"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shards.name, ["00000", "00001"])
        for key in ("00000", "00001"):
            result = dg.materialize([shard_index, shard_validation, decoded_images], partition_key=key,
                                    instance=instance, resources={"storage": storage})
            assert result.success
        md = result.asset_materializations_for_node("decoded_images")[0].metadata
        assert md["contact_sheet"].value.startswith("![sheet](data:image/png;base64,")
        assert "width x height x channels" in md["preview"].value
        result = dg.materialize([dataset_decode_summary], instance=instance, resources={"storage": storage})
        assert result.success
        md = {k: getattr(v, "value", v) for k, v in
              result.asset_materializations_for_node("dataset_decode_summary")[0].metadata.items()}
    assert (md["records"], md["decoded"], md["duplicate_images"], md["manifests"]) == (21, 21, 3, 2)
    assert md["image_sizes"].startswith("![image sizes](data:image/png;base64,")
    assert md["failures_by_shard"].startswith("![failures by shard](data:image/png;base64,")
    assert "3 image(s) found in more than one shard" in md["summary"]


def test_a_damaged_manifest_is_reported_not_fatal(tmp_path):
    dataset = Dataset(str(tmp_path), output_url=str(tmp_path / "out"))
    _synthetic(dataset, "00000", 5, caption_bytes=10)
    _synthetic(dataset, "00001", 5, caption_bytes=10)
    (tmp_path / "out" / "manifests" / "00001.parquet").write_bytes(b"PAR1 not a parquet file")
    s = summarize_decode(dataset, ["00000", "00001"])
    assert (s.manifests, s.records, s.missing) == (1, 5, [])
    assert [k for k, _ in s.unreadable] == ["00001"]
