"""The Dagster shell for discovery and indexing: the shard sensor and the shard_index asset."""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.defs.assets import shard_index
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.defs.sensors import decode_cursor, shard_sensor
from curator_assets.index import parse_index


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def tick(instance: dg.DagsterInstance, storage: ShardStorage, cursor: str | None = None):
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    result = shard_sensor(ctx)
    # Apply what the daemon would apply.
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_adds_partitions_requests_runs_and_is_idempotent(tmp_path: Path, make_shard, instance) -> None:
    make_shard("00000.tar", n=2)
    make_shard("part-a/00001.tar", n=2)
    make_shard("bad,name.tar", n=1)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    first = tick(instance, storage)
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "part-a/00001"]
    assert [r.partition_key for r in first.run_requests] == ["00000", "part-a/00001"]
    assert len({r.run_key for r in first.run_requests}) == 2
    assert set(decode_cursor(first.cursor)) == {"00000", "part-a/00001"}

    second = tick(instance, storage, first.cursor)
    assert not second.run_requests and not second.dynamic_partitions_requests
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "part-a/00001"]

    make_shard("00002.tar", n=2)
    third = tick(instance, storage, second.cursor or first.cursor)
    assert [r.partition_key for r in third.run_requests] == ["00002"]
    assert [list(r.partition_keys) for r in third.dynamic_partitions_requests] == [["00002"]]


def test_sensor_requests_a_run_for_a_changed_shard(tmp_path: Path, make_shard, instance) -> None:
    path = make_shard("00000.tar", n=2)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    first = tick(instance, storage)
    make_shard("00000.tar", n=3)
    later = time.time() + 30
    os.utime(path, (later, later))
    second = tick(instance, storage, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["00000"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert not second.dynamic_partitions_requests


def test_sensor_skips_when_the_dataset_is_missing(tmp_path: Path, instance) -> None:
    storage = ShardStorage(dataset_url=str(tmp_path / "nowhere"))
    result = tick(instance, storage)
    assert isinstance(result, dg.SkipReason) and "nowhere" in result.skip_message


def test_shard_index_materializes_and_reuses(tmp_path: Path, make_shard, instance) -> None:
    path = make_shard("00000.tar", n=5)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    instance.add_dynamic_partitions(shards.name, ["00000"])
    res = dg.materialize([shard_index], partition_key="00000", instance=instance, resources={"storage": storage})
    assert res.success
    md = res.asset_materializations_for_node("shard_index")[0].metadata
    assert md["records"].value == 5 and md["members"].value == 15 and md["reused"].value is False
    assert md["bytes"].value == path.stat().st_size
    assert md["idx_path"].value == str(path.with_suffix(".idx"))
    assert len(parse_index(path.with_suffix(".idx").read_bytes())) == 5

    again = dg.materialize([shard_index], partition_key="00000", instance=instance, resources={"storage": storage})
    assert again.asset_materializations_for_node("shard_index")[0].metadata["reused"].value is True

    forced = dg.materialize([shard_index], partition_key="00000", instance=instance,
                            resources={"storage": storage},
                            run_config={"ops": {"shard_index": {"config": {"force": True}}}})
    assert forced.asset_materializations_for_node("shard_index")[0].metadata["reused"].value is False


def test_shard_index_reports_a_corrupt_shard_without_crashing(tmp_path: Path, make_shard, instance) -> None:
    make_shard("00000.tar", n=2)
    bad = tmp_path / "dataset" / "00001.tar"
    bad.write_bytes(b"garbage" * 300)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    instance.add_dynamic_partitions(shards.name, ["00000", "00001"])
    res = dg.materialize([shard_index], partition_key="00001", instance=instance, resources={"storage": storage},
                         raise_on_error=False)
    assert res.success
    md = res.asset_materializations_for_node("shard_index")[0].metadata
    assert md["indexed"].value is False and "not a tar archive" in md["error"].value
    checks = res.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("index_written", False)]
    assert not bad.with_suffix(".idx").exists()
    ok = dg.materialize([shard_index], partition_key="00000", instance=instance, resources={"storage": storage})
    assert [(c.check_name, c.passed) for c in ok.get_asset_check_evaluations()] == [("index_written", True)]


def test_shard_index_fails_when_the_store_fails(tmp_path: Path, make_shard, instance) -> None:
    make_shard("00000.tar", n=2)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the index folder should be")
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"), index_url=str(blocker / "idx"))
    instance.add_dynamic_partitions(shards.name, ["00000"])
    res = dg.materialize([shard_index], partition_key="00000", instance=instance, resources={"storage": storage},
                         raise_on_error=False)
    assert not res.success
    failure = [e for e in res.all_events if e.is_step_failure][0]
    assert "00000" in failure.step_failure_data.error.message


def test_run_command_runs_every_shard_through_dagster(tmp_path: Path, make_shard) -> None:
    import io
    import json

    from curator_assets.runner import run_pipeline

    make_shard("00000.tar", n=3)
    good = make_shard("00001.tar", n=4)
    data = good.read_bytes()
    (good.parent / "00002.tar").write_bytes(data[: len(data) // 2])  # truncated copy of 00001
    out = io.StringIO()
    rc = run_pipeline(str(tmp_path / "dataset"), as_json=True, out=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    shard_rows, dataset_row = rows[:-1], rows[-1]
    assert [r["shard"] for r in shard_rows] == ["00000", "00001", "00002"]
    assert [r["assets"]["shard_index"]["records"] for r in shard_rows[:2]] == [3, 4]
    assert [r["assets"]["decoded_images"]["decoded"] for r in shard_rows[:2]] == [3, 4]
    assert [r["ok"] for r in shard_rows] == [True, True, False]
    assert shard_rows[2]["assets"]["shard_index"]["indexed"] is False
    assert shard_rows[2]["checks"]["check_shard_has_no_errors"] is False
    assert "decoded_images" not in shard_rows[2]["assets"]
    with tarfile.open(good) as t:
        keys = {m.name.split(".")[0] for m in t.getmembers() if m.offset_data < len(data) // 2}
    assert dataset_row["dataset"]["cross_shard_duplicate_ids"] == len(keys)
    assert rc == 1


def test_catch_up_schedule_requests_incomplete_shards(tmp_path: Path, make_shard, instance) -> None:
    from curator_assets.defs.schedules import PIPELINE_ASSETS, catch_up_schedule

    make_shard("00000.tar", n=2)
    make_shard("00001.tar", n=2)
    instance.add_dynamic_partitions(shards.name, ["00000", "00001"])
    # Mark 00000 as complete by recording a materialization of every pipeline asset.
    for name in PIPELINE_ASSETS:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=name, partition="00000"))
    ctx = dg.build_schedule_context(instance=instance)
    requests = catch_up_schedule(ctx)
    assert [r.partition_key for r in requests] == ["00001"]
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=PIPELINE_ASSETS[0], partition="00001"))
    assert [r.partition_key for r in catch_up_schedule(dg.build_schedule_context(instance=instance))] == ["00001"]
    for name in PIPELINE_ASSETS[1:]:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=name, partition="00001"))
    assert isinstance(catch_up_schedule(dg.build_schedule_context(instance=instance)), dg.SkipReason)
