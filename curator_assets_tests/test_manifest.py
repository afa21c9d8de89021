"""The Parquet manifest: schema, atomic write through the dataset, read back by pandas and pyarrow."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curator_assets.cli.demo import write_shard
from curator_assets.decode import DecodeOptions, decode_shard
from curator_assets.formats.manifest import (
    COLUMNS,
    SCHEMA,
    ManifestRow,
    manifest_bytes,
    manifest_info,
    manifest_table,
    markdown_preview,
    read_manifest,
    write_manifest,
)
from curator_assets.steps.index import ensure_index
from curator_assets.store.dataset import Dataset
from curator_assets_tests.conftest import write_members

REQUIRED = ["record_id", "shard", "member", "offset", "size", "width", "height", "channels", "decoded", "error",
            "caption", "metadata", "sha256"]


def test_schema_has_the_required_columns():
    assert set(REQUIRED) <= set(COLUMNS)
    assert SCHEMA.field("decoded").type == "bool"
    assert not SCHEMA.field("record_id").nullable and not SCHEMA.field("decoded").nullable


def test_decoded_shard_manifest_is_readable_by_pandas(tmp_path, photos):
    folder = tmp_path / "ds"
    write_members(folder / "00000.tar", [
        *[(f"{p.key}.{e}", d) for p in photos[:5]
          for e, d in (("jpg", p.jpg), ("txt", p.caption.encode()), ("json", json.dumps(p.metadata).encode()))],
        ("broken.jpg", b"\xff\xd8\xff\xe0 not really"), ("broken.txt", b"a caption"),
    ])
    ds = Dataset(str(folder), output_url=str(tmp_path / "out"))
    ensure_index(ds, "00000")
    result, _ = decode_shard(ds, "00000", DecodeOptions(device="cpu", batch_size=2))
    path = tmp_path / "out" / "manifests" / "00000.parquet"
    assert result.manifest_url == str(path)

    df = pd.read_parquet(path)
    assert list(df.columns) == COLUMNS
    assert df["decoded"].dtype == bool
    assert len(df) == 6
    with tarfile.open(folder / "00000.tar") as tar:
        images = {m.name: (m.offset_data, m.size, tar.extractfile(m).read())
                  for m in tar.getmembers() if m.name.endswith(".jpg")}
    for rec in df.itertuples():
        offset, size, data = images[rec.member]
        assert (rec.offset, rec.size, rec.sha256) == (offset, size, hashlib.sha256(data).hexdigest())
        if rec.decoded:
            with Image.open(io.BytesIO(data)) as im:
                assert (rec.width, rec.height, rec.channels) == (*im.size, 3)
            assert json.loads(rec.metadata)["key"] == rec.record_id
        else:
            assert rec.record_id == "broken" and rec.error and pd.isna(rec.width)
    assert df.loc[df.record_id == "broken", "caption"].item() == "a caption"

    info = manifest_info(pq.read_table(path))
    assert info["shard"] == "00000" and info["records"] == 6 and info["decoded"] == 5 and info["failed"] == 1
    assert info["device"] == "cpu" and info["plan"] == "index"


def test_write_is_atomic_and_replaces_the_previous_manifest(tmp_path, photos):
    folder = tmp_path / "ds"
    write_shard(folder / "part-a" / "00003.tar", photos[:3])
    ds = Dataset(str(folder))
    rows = [ManifestRow(position=0, record_id="x", shard="part-a/00003", decoded=True, width=1, height=1, channels=3)]
    url = write_manifest(ds, "part-a/00003", manifest_table(rows, {"note": "first"}))
    assert url == str(folder / "_curator" / "manifests" / "part-a" / "00003.parquet")
    decode_shard(ds, "part-a/00003", DecodeOptions(device="cpu"))
    table = read_manifest(ds, "part-a/00003")
    assert table.column("record_id").to_pylist() == [p.key for p in photos[:3]]
    assert "note" not in manifest_info(table)
    # No temporary files are left beside it.
    assert os.listdir(folder / "_curator" / "manifests" / "part-a") == ["00003.parquet"]


def test_manifest_round_trips_every_column():
    rows = [
        ManifestRow(position=0, record_id="a/b.c/1", shard="s", member="a/b.c/1.jpg", offset=512, size=10,
                    width=4, height=3, channels=3, decoded=True, caption="ünï | cöde\nline", metadata='{"k": 1}',
                    sha256="0" * 64, format="jpeg", source_channels=1, extensions=["jpg", "txt"]),
        ManifestRow(position=1, record_id="b", shard="s", error="no image member (components: txt)",
                    extensions=["txt"], metadata_error="the .json is not valid JSON"),
    ]
    table = pq.read_table(io.BytesIO(manifest_bytes(manifest_table(rows))))
    back = [ManifestRow(**r) for r in table.to_pylist()]
    assert back == rows


def test_markdown_preview_shows_first_rows_and_failures():
    rows = [ManifestRow(position=n, record_id=f"r{n}", shard="s", member=f"r{n}.jpg", decoded=n != 8,
                        width=2, height=2, channels=3, error=None if n != 8 else "bad | bytes",
                        caption="a | b") for n in range(10)]
    md = markdown_preview(rows, limit=3)
    lines = md.splitlines()
    assert lines[0].startswith("| # | record_id")
    assert [ln.split("|")[2].strip() for ln in lines[2:6]] == ["r0", "r1", "r2", "r8"]
    assert "bad \\| bytes" in md and "6 more record(s)" in md


@pytest.mark.parametrize("bad", [{"record_id": None}, {"decoded": None}])
def test_required_values_cannot_be_missing(bad):
    row = ManifestRow(position=0, record_id="a", shard="s")
    for k, v in bad.items():
        setattr(row, k, v)
    with pytest.raises(ValueError, match="missing value"):
        manifest_table([row])
