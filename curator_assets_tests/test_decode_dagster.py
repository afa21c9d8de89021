"""The ``decoded_images`` asset on a real Dagster instance, alone and inside the shard pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from curator_assets.definitions import build_definitions
from curator_assets.defs.assets import decoded_images, shard_index, shard_validation
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.steps.decode.options import resolve_device
from curator_assets_tests.conftest import write_members


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def members(photos, keys) -> list[tuple[str, bytes]]:
    out = []
    for key, p in zip(keys, photos, strict=False):
        out += [(f"{key}.jpg", p.jpg), (f"{key}.txt", p.caption.encode()),
                (f"{key}.json", json.dumps(p.metadata).encode())]
    return out


def tar_keys(path: Path) -> list[str]:
    """Record IDs in tar order by Python's tarfile (key = name up to the first dot of the basename)."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            key = m.name[: len(m.name) - len(base) + base.index(".")]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def test_asset_is_gpu_pooled_dali_and_downstream_of_index_and_validation():
    spec = next(iter(decoded_images.specs))
    assert decoded_images.op.pool == "gpu"
    assert "dali" in spec.kinds
    assert spec.group_name == "shards"
    assert {d.asset_key for d in spec.deps} == {shard_index.key, shard_validation.key}
    assert decoded_images.partitions_def == shards
    job = build_definitions(ShardStorage(dataset_url="unused")).resolve_job_def("shard_pipeline")
    assert decoded_images.key in job.asset_layer.executable_asset_keys


def test_decoded_images_materializes_with_metadata_and_manifest(tmp_path, photos, instance):
    folder = tmp_path / "ds"
    path = write_members(folder / "00000.tar", members(photos[:6], [p.key for p in photos[:6]]) + [
        ("zz-bad.jpg", b"\xff\xd8\xff\xdb definitely not a JPEG"), ("zz-bad.txt", b"broken image"),
        ("zz-text-only.txt", b"no image in this record"),
    ])
    storage = ShardStorage(dataset_url=str(folder), output_url=str(tmp_path / "out"))
    instance.add_dynamic_partitions(shards.name, ["00000"])
    result = dg.materialize([shard_index, shard_validation, decoded_images], partition_key="00000",
                            instance=instance, resources={"storage": storage})
    assert result.success
    md = {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node("decoded_images")[0]
          .metadata.items()}
    assert (md["records"], md["decoded"], md["failed"], md["no_image"]) == (8, 6, 1, 1)
    assert md["device"] == resolve_device("auto").name and md["device_reason"]
    assert md["images_per_s"] > 0 and md["bytes_read"] >= sum(len(p.jpg) for p in photos[:6])
    assert "| # | record_id" in md["preview"] and photos[0].key in md["preview"] and "zz-bad" in md["preview"]

    manifest = pq.read_table(md["manifest_path"]).to_pylist()
    assert [r["record_id"] for r in manifest] == tar_keys(path)
    assert [r["decoded"] for r in manifest] == [True] * 6 + [False, False]
    assert manifest[6]["caption"] == "broken image"


def test_decode_config_reaches_the_decoder_and_bad_config_fails_clearly(tmp_path, photos, instance):
    folder = tmp_path / "ds"
    write_members(folder / "00000.tar", members(photos[:3], ["a", "b", "c"]))
    storage = ShardStorage(dataset_url=str(folder))
    instance.add_dynamic_partitions(shards.name, ["00000"])
    config = {"ops": {"decoded_images": {"config": {"device": "cpu", "batch_size": 2, "num_threads": 1,
                                                    "pipelines": 1, "reader": "dali"}}}}
    result = dg.materialize([shard_index, decoded_images], partition_key="00000", instance=instance,
                            resources={"storage": storage}, run_config=config)
    md = result.asset_materializations_for_node("decoded_images")[0].metadata
    assert md["device"].value == "cpu" and md["reader"].value == "dali" and md["decoded"].value == 3

    bad = {"ops": {"decoded_images": {"config": {"device": "tpu"}}}}
    result = dg.materialize([decoded_images], partition_key="00000", instance=instance,
                            resources={"storage": storage}, run_config=bad, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "device must be one of" in failure.step_failure_data.error.message


def test_a_run_starts_its_decoder_while_it_indexes(tmp_path, photos, instance):
    """A run that decodes later in its process builds its decoder from its first step on (in a
    background thread), with the decode step's options, and the decode step uses that one: one
    decoder more in the process, not two. A run without the decode step starts none."""
    from curator_assets.decode import DecodeOptions
    from curator_assets.defs.assets import DecodedImagesConfig, decode_options
    from curator_assets.steps.decode.shared import shared_decoder, shared_decoder_wanted, shared_decoders_built

    assert decode_options(DecodedImagesConfig()) == DecodeOptions()  # what `curator-assets run` starts early
    folder = tmp_path / "ds"
    write_members(folder / "00000.tar", members(photos[:3], ["a", "b", "c"]))
    storage = ShardStorage(dataset_url=str(folder))
    instance.add_dynamic_partitions(shards.name, ["00000"])
    job = build_definitions(storage).resolve_job_def("shard_pipeline")

    def config(batch: int) -> dict:
        return {"ops": {"decoded_images": {"config": {"device": "cpu", "batch_size": batch, "pipelines": 1}}}}

    before = shared_decoders_built()
    result = job.execute_in_process(partition_key="00000", instance=instance, run_config=config(5))
    assert result.success
    assert shared_decoder_wanted(DecodeOptions(device="cpu", batch_size=5, pipelines=1))
    assert shared_decoders_built() == before + 1
    options = DecodeOptions(device="cpu", batch_size=5, pipelines=1)
    decode_start = next(e.timestamp for e in instance.all_logs(result.run_id)
                        if e.dagster_event and e.dagster_event.event_type_value == "STEP_START"
                        and e.dagster_event.step_key == "decoded_images")
    assert shared_decoder(options).created_at < decode_start  # begun before the decode step began
    assert result.asset_materializations_for_node("decoded_images")[0].metadata["decoded"].value == 3

    # Indexing alone, in a fresh process (this one may hold a default decoder already).
    proc = subprocess.run([sys.executable, "-c", INDEX_ONLY, str(folder)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["indexed", "no-decoder"], proc.stdout


INDEX_ONLY = """
import sys
import dagster as dg
from curator_assets.decode import DecodeOptions
from curator_assets.steps.decode.shared import shared_decoder_wanted
from curator_assets.definitions import build_definitions
from curator_assets.defs.assets import shard_index
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
job = build_definitions(ShardStorage(dataset_url=sys.argv[1])).resolve_job_def("shard_pipeline")
with dg.instance_for_test() as instance:
    instance.add_dynamic_partitions(shards.name, ["00000"])
    ok = job.get_subset(asset_selection={shard_index.key}).execute_in_process(partition_key="00000", instance=instance)
    print("indexed" if ok.success else "failed", "decoder" if shared_decoder_wanted(DecodeOptions()) else "no-decoder")
"""


def test_a_shard_level_error_blocks_decoding_in_the_pipeline(tmp_path, photos, instance):
    folder = tmp_path / "ds"
    # Record "a" twice, apart: readers would see two records with one ID (a shard-level error).
    write_members(folder / "00000.tar", members(photos[:3], ["a", "b", "a"]))
    write_members(folder / "00001.tar", members(photos[3:5], ["c", "d"]))
    storage = ShardStorage(dataset_url=str(folder))
    defs = build_definitions(storage)
    job = defs.resolve_job_def("shard_pipeline")
    instance.add_dynamic_partitions(shards.name, ["00000", "00001"])

    blocked = job.execute_in_process(partition_key="00000", instance=instance, raise_on_error=False)
    materialized = {e.asset_key.path[-1] for e in blocked.all_events if e.is_step_materialization
                    for e in [e.step_materialization_data.materialization]}
    assert "shard_validation" in materialized and "decoded_images" not in materialized
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for e in blocked.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["check_shard_has_no_errors"] is False
    # The decode step reads the shard's verdict and refuses it, naming the error: no manifest.
    failure = next(e for e in blocked.all_events if e.is_step_failure and e.step_key == "decoded_images")
    assert "duplicate_record_id" in failure.step_failure_data.error.message
    assert not (folder / "_curator" / "manifests" / "00000.parquet").exists()

    ok = job.execute_in_process(partition_key="00001", instance=instance, raise_on_error=False)
    assert ok.success
    md = ok.asset_materializations_for_node("decoded_images")[0].metadata
    assert md["decoded"].value == 2
