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
from curator_assets.formats.idx import parse_index

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def schedule_tick(schedule, instance: dg.DagsterInstance):
    """One evaluation of a schedule, as the daemon runs it. The context is closed at once: it opens
    an instance of its own from the ref, and left to the garbage collector it would reset Dagster's
    current-instance state at an arbitrary later moment."""
    with dg.build_schedule_context(instance=instance) as ctx:
        return schedule(ctx)


def tick(instance: dg.DagsterInstance, storage: ShardStorage, cursor: str | None = None):
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    result = shard_sensor(ctx)
    # Apply what the daemon applies, in its order: asset events, then partition requests.
    for event in getattr(result, "asset_events", None) or []:
        instance.report_runless_asset_event(event)
    for request in getattr(result, "dynamic_partitions_requests", None) or []:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
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


def test_a_removed_shard_leaves_the_partitions_and_comes_back_as_new(tmp_path: Path, make_shard, instance) -> None:
    from curator_assets.defs.partitions import PIPELINE_ASSETS

    make_shard("00000.tar", n=2)
    gone = make_shard("00001.tar", n=2)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    first = tick(instance, storage)
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="decoded_images", partition="00001"))
    gone.unlink()
    second = tick(instance, storage, first.cursor)
    assert instance.get_dynamic_partitions("shards") == ["00000"]  # shown as what the store holds
    assert not second.run_requests
    # Its history is kept, and an observation per asset says where its outputs are.
    history = instance.fetch_materializations(dg.AssetKey("decoded_images"), limit=10).records
    assert [r.partition_key for r in history] == ["00001"]
    for name in PIPELINE_ASSETS:
        obs = instance.fetch_observations(dg.AssetKey(name), limit=10).records
        assert [o.partition_key for o in obs] == ["00001"], name
        md = obs[0].asset_observation.metadata
        assert md["removed"].value is True
        assert md["manifest"].value.endswith("_curator/manifests/00001.parquet")
        assert md["shard"].value.endswith("dataset/00001.tar")
    # Nothing more happens while it stays gone; when it is back, it is a new shard again.
    third = tick(instance, storage, second.cursor)
    assert isinstance(third, dg.SensorResult) and not third.run_requests and not third.dynamic_partitions_requests
    make_shard("00001.tar", n=3)
    back = tick(instance, storage, third.cursor)
    assert [r.partition_key for r in back.run_requests] == ["00001"]
    assert back.run_requests[0].tags["curator/reason"] == "new shard"
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "00001"]


def test_an_empty_listing_removes_nothing(tmp_path: Path, make_shard, instance) -> None:
    """A dataset that suddenly lists no shards (a wrong URL, a permission change) is not taken
    as every shard deleted."""
    for name in ("00000.tar", "00001.tar"):
        make_shard(name, n=1)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    first = tick(instance, storage)
    for tar in (tmp_path / "dataset").glob("*.tar"):
        tar.unlink()
    result = tick(instance, storage, first.cursor)
    assert isinstance(result, dg.SkipReason) and "nothing removed" in result.skip_message
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "00001"]


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

    from curator_assets.cli.runner import run_pipeline

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
    requests = schedule_tick(catch_up_schedule, instance)
    assert [r.partition_key for r in requests] == ["00001"]
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=PIPELINE_ASSETS[0], partition="00001"))
    assert [r.partition_key for r in schedule_tick(catch_up_schedule, instance)] == ["00001"]
    for name in PIPELINE_ASSETS[1:]:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=name, partition="00001"))
    assert isinstance(schedule_tick(catch_up_schedule, instance), dg.SkipReason)


def test_sensor_batches_new_shards_into_ranged_runs_each_shard_its_own_partition(
    tmp_path: Path, make_shard, instance, monkeypatch
) -> None:
    """Five new shards over two run slots: two runs (3 + 2 shards), each a range of consecutive
    partitions; running them gives every shard its own materializations and check results, and
    the decode step of a run builds its DALI pipelines once for all its shards."""
    from curator_assets.decode import DecodeOptions
    from curator_assets.definitions import build_definitions
    from curator_assets.defs import partitions
    from curator_assets.steps.decode.shared import shared_decoder

    monkeypatch.setenv("CURATOR_RUN_SLOTS", "2")
    names = [f"{i:05d}" for i in range(5)]
    for name in names:
        make_shard(f"{name}.tar", n=2)
    storage = ShardStorage(dataset_url=str(tmp_path / "dataset"))
    result = tick(instance, storage)
    ranges = [(r.tags.get(partitions.RANGE_START_TAG), r.tags.get(partitions.RANGE_END_TAG))
              for r in result.run_requests]
    assert ranges == [("00000", "00002"), ("00003", "00004")]
    assert all(r.partition_key is None and r.run_key for r in result.run_requests)
    assert [r.tags["curator/shards"] for r in result.run_requests] == ["3", "2"]

    job = build_definitions(storage).resolve_job_def("shard_pipeline")
    decoder = shared_decoder(DecodeOptions(pipelines=2))
    builds_before = [d.builds for d in decoder.decoders]
    for request in result.run_requests:
        run = job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
        assert run.success
    assert len(instance.get_runs()) == 2
    for name in ("shard_index", "shard_validation", "decoded_images"):
        assert instance.get_materialized_partitions(dg.AssetKey(name)) == set(names)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("decoded_images"), asset_partitions=names), limit=10).records
    assert sorted(r.partition_key for r in records) == names  # one each, with its own metadata
    assert {r.asset_materialization.metadata["manifest_path"].value.rsplit("/", 1)[-1] for r in records} == {
        f"{n}.parquet" for n in names}
    assert [d.builds for d in decoder.decoders] == builds_before  # built once (or before), never per shard


def test_run_slots_follow_the_run_queue_and_the_decode_pool(tmp_path: Path, monkeypatch) -> None:
    """The shipped instance (max_concurrent_runs 2, pool default 1): new shards are spread over
    one run, since decodes take turns; with three gpu slots, over the two runs the queue allows;
    CURATOR_RUN_SLOTS overrides both; pools without a limit leave the queue's."""
    import shutil

    from curator_assets.defs.partitions import DECODE_POOL, run_slots

    monkeypatch.delenv("CURATOR_RUN_SLOTS", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # the shipped file's storage lives there
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert run_slots(inst) == 1
        inst.event_log_storage.set_concurrency_slots(DECODE_POOL, 3)
        assert run_slots(inst) == 2
        monkeypatch.setenv("CURATOR_RUN_SLOTS", "5")
        assert run_slots(inst) == 5
    with dg.instance_for_test() as bare:  # Dagster's run queue, pools without a limit: the queue's
        monkeypatch.delenv("CURATOR_RUN_SLOTS")
        assert run_slots(bare) == bare.get_concurrency_config().run_queue_config.max_concurrent_runs


def test_batch_size_and_contiguous_ranges() -> None:
    from curator_assets.defs.partitions import batch_size, contiguous_ranges

    assert batch_size(1, slots=2, most=16) == 1  # a trickle runs at once
    assert batch_size(8, slots=2, most=16) == 4
    assert batch_size(100_000, slots=2, most=16) == 16
    order = ["a", "b", "c", "d", "e", "f"]
    assert contiguous_ranges(["e", "a", "b", "d", "zz"], order, 2) == [["a", "b"], ["d", "e"]]
    assert contiguous_ranges(["a", "c", "e"], order, 5) == [["a"], ["c"], ["e"]]


def test_run_command_honours_output_and_index_dir(tmp_path: Path, make_shard) -> None:
    """`run --output/--index-dir`: indexes, reports and manifests go there, never into the dataset."""
    import subprocess
    import sys

    make_shard("00000.tar", n=2)
    make_shard("00001.tar", n=3)
    out, idx = tmp_path / "out", tmp_path / "idx"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.run([sys.executable, "-m", "curator_assets.cli", "run", str(tmp_path / "dataset"),
                           "--output", str(out), "--index-dir", str(idx)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == ["00000.tar", "00001.tar"]
    assert sorted(p.name for p in idx.iterdir()) == ["00000.idx", "00001.idx"]
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["00000.parquet", "00001.parquet"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["00000.json", "00001.json"]
    assert f"manifests: {out}/manifests" in proc.stdout


def test_catch_up_schedule_batches_incomplete_shards_into_ranges(instance, monkeypatch) -> None:
    from curator_assets.defs import partitions
    from curator_assets.defs.schedules import PIPELINE_ASSETS, catch_up_schedule

    monkeypatch.setenv("CURATOR_RUN_SLOTS", "1")
    keys = ["a", "b", "c", "d", "e"]
    instance.add_dynamic_partitions(shards.name, keys)
    for name in PIPELINE_ASSETS:  # "c" is complete; the others are not
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=name, partition="c"))
    requests = schedule_tick(catch_up_schedule, instance)
    spans = [(r.partition_key, r.tags.get(partitions.RANGE_START_TAG), r.tags.get(partitions.RANGE_END_TAG))
             for r in requests]
    assert spans == [(None, "a", "b"), (None, "d", "e")]  # never a range over the complete shard
    assert len({r.run_key for r in requests}) == 2


def test_cursor_round_trips_and_reads_the_earlier_form() -> None:
    import base64
    import json
    import zlib

    from curator_assets.defs.sensors import encode_cursor, short_fingerprint

    seen = {f"part-{i // 100:03d}/{i:06d}": short_fingerprint(str(i)) for i in range(1000)}
    assert decode_cursor(encode_cursor(seen)) == seen
    assert decode_cursor(encode_cursor({})) == {}
    earlier = "z1:" + base64.b64encode(zlib.compress(json.dumps(seen).encode())).decode()
    assert decode_cursor(earlier) == seen
    assert decode_cursor("garbage") == {} and decode_cursor("z2:!!!") == {}
