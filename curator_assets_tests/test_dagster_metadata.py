"""Dagster's standard metadata on the shard assets (row counts, the manifest's column schema,
table previews) and resource settings as environment variables, on a real Dagster instance."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow.parquet as pq

from curator_assets.definitions import build_definitions
from curator_assets.defs.assets import decoded_images, shard_index, shard_validation
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage, storage_from_env
from curator_assets_tests.conftest import write_members


def test_shard_assets_record_dagsters_standard_metadata(tmp_path, photos) -> None:
    records = [m for p in photos[:5]
               for m in ((f"{p.key}.jpg", p.jpg), (f"{p.key}.json", json.dumps(p.metadata).encode()))]
    write_members(tmp_path / "ds" / "00000.tar", records + [("zz-bad.jpg", b"\xff\xd8 not a JPEG")])
    storage = ShardStorage(dataset_url=str(tmp_path / "ds"), output_url=str(tmp_path / "out"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shards.name, ["00000"])
        result = dg.materialize([shard_index, shard_validation, decoded_images], partition_key="00000",
                                instance=instance, resources={"storage": storage})
        assert result.success
        index = result.asset_materializations_for_node("shard_index")[0].metadata
        validation = result.asset_materializations_for_node("shard_validation")[0].metadata
        decoded = result.asset_materializations_for_node("decoded_images")[0].metadata
    manifest = pq.read_table(decoded["manifest_path"].value)
    assert index["dagster/partition_row_count"].value == 6  # 5 photos and the bad one
    assert validation["dagster/partition_row_count"].value == 6
    assert decoded["dagster/partition_row_count"].value == manifest.num_rows == 6
    schema = decoded["dagster/column_schema"].value
    assert isinstance(schema, dg.TableSchema)
    assert [c.name for c in schema.columns] == manifest.schema.names
    assert {c.name: c.type for c in schema.columns}["decoded"] == "bool"
    preview = decoded["preview_table"]
    assert isinstance(preview, dg.TableMetadataValue)
    rows = [r.data for r in preview.records]
    assert [r["record_id"] for r in rows[:5]] == [p.key for p in photos[:5]]
    assert rows[-1]["record_id"] == "zz-bad" and rows[-1]["decoded"] is False and rows[-1]["error"]
    problems = {r.data["code"]: r.data["count"] for r in validation["problems_by_code"].records}
    assert problems == json.loads(json.dumps(validation["counts"].value))


def test_settings_from_the_environment_are_env_vars(monkeypatch, tmp_path) -> None:
    """The resource holds `CURATOR_DATASET_URL` (what the UI shows), never the path or the secret;
    it reads the values where it is used: outside a run, in a sensor, in a run."""
    folder = tmp_path / "ds"
    write_members(folder / "00000.tar", [("a.jpg", b"x")])
    monkeypatch.setenv("CURATOR_DATASET_URL", str(folder))
    monkeypatch.setenv("CURATOR_OUTPUT_URL", str(tmp_path / "out"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-show")
    monkeypatch.delenv("CURATOR_INDEX_URL", raising=False)
    storage = storage_from_env()
    assert isinstance(storage.dataset_url, dg.EnvVar) and storage.dataset_url.env_var_name == "CURATOR_DATASET_URL"
    assert isinstance(storage.output_url, dg.EnvVar) and storage.output_url.env_var_name == "CURATOR_OUTPUT_URL"
    assert isinstance(storage.aws_secret_access_key, dg.EnvVar)
    assert storage.index_url is None
    assert "do-not-show" not in repr(storage) and str(tmp_path) not in repr(storage)
    assert [s.key for s in storage.dataset().list_shards().shards] == ["00000"]  # outside a run: the values
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        assert [s.key for s in ctx.resources.storage.dataset().list_shards().shards] == ["00000"]
        instance.add_dynamic_partitions(shards.name, ["00000"])
        result = dg.materialize([shard_index], partition_key="00000", instance=instance,
                                resources={"storage": build_definitions(storage).resources["storage"]})
        assert result.success
        assert result.asset_materializations_for_node("shard_index")[0].metadata["records"].value == 1
