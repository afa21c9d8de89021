"""The validation asset, its checks (evaluated in its step, per shard), the decode's refusal of a
shard with shard-level errors, and the dataset summary, on a real Dagster instance."""


import json
import tarfile
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.definitions import build_definitions
from curator_assets.defs import assets, checks, jobs
from curator_assets.defs.partitions import range_tags, shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.formats.report import read_report
from curator_assets.store.dataset import Dataset
from curator_assets_tests import malformed

SHARD_ASSETS = [assets.shard_index, assets.shard_validation, assets.decoded_images]


@pytest.fixture
def dataset_dir(tmp_path: Path, photos) -> Path:
    folder = tmp_path / "ds"
    malformed.write_tar(folder / "good.tar", malformed.shard_members(photos, 5))
    # A record ID twice: the tar indexes fine, but readers would see two samples with one ID.
    malformed.write_tar(folder / "dup.tar",
                        malformed.shard_members(photos[10:], 4) + malformed.record_members(photos[11]))
    # A bad caption: a record-level warning only.
    members = malformed.shard_members(photos[20:], 4)
    members[1] = (members[1][0], b"caf\xe9")
    malformed.write_tar(folder / "warn.tar", members)
    # Shares two records with good.tar.
    malformed.write_tar(folder / "overlap.tar", malformed.shard_members(photos[3:], 4))
    return folder


def _run(instance, folder: Path, key: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        SHARD_ASSETS, partition_key=key, instance=instance,
        resources={"storage": ShardStorage(dataset_url=str(folder))}, raise_on_error=False,
    )


def _keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers()}


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _decoded(result: dg.ExecuteInProcessResult) -> list[str]:
    return [m.partition for m in result.asset_materializations_for_node("decoded_images")]


def test_error_check_passes_on_a_clean_shard_and_a_bad_one_is_not_decoded(dataset_dir):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["good", "dup", "warn"])

        good = _run(instance, dataset_dir, "good")
        assert good.success
        assert _checks(good) == {"index_written": True, "check_shard_has_no_errors": True,
                                 "check_shard_records_readable": True}
        meta = good.asset_materializations_for_node("shard_validation")[0].metadata
        assert meta["records"].value == 5 and meta["errors"].value == 0 and meta["warnings"].value == 0
        assert meta["index"].value == "fresh"  # shard_index ran first in the same run
        report_path = Path(meta["report_path"].value)
        assert json.loads(report_path.read_text())["records"] == 5

        dup = _run(instance, dataset_dir, "dup")
        assert not dup.success
        assert _checks(dup) == {"index_written": True, "check_shard_has_no_errors": False,
                                "check_shard_records_readable": True}
        meta = dup.asset_materializations_for_node("shard_validation")[0].metadata
        assert meta["errors"].value == 1 and meta["counts"].value == {"duplicate_record_id": 1}
        evaluation = next(e for e in dup.get_asset_check_evaluations() if e.check_name == "check_shard_has_no_errors")
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert "duplicate_record_id" in evaluation.description
        assert _decoded(dup) == []
        failure = next(e for e in dup.all_events if e.is_step_failure and e.step_key == "decoded_images")
        assert "duplicate_record_id" in failure.step_failure_data.error.message

        warn = _run(instance, dataset_dir, "warn")
        assert warn.success  # warnings never block
        assert _checks(warn) == {"index_written": True, "check_shard_has_no_errors": True,
                                 "check_shard_records_readable": False}
        report = read_report(Dataset(str(dataset_dir)), "warn")
        assert Counter(p.code for p in report.problems) == Counter(bad_text=1)
        assert _decoded(good) == ["good"] and _decoded(warn) == ["warn"]


def test_one_run_over_several_shards_fails_only_the_bad_one(dataset_dir):
    """A run over a range of shards: each shard gets its own materializations and check results
    (per partition), the shard with a shard-level error alone is not decoded, and the partition
    status shows exactly that."""
    keys = ["good", "dup", "warn"]
    job = build_definitions(ShardStorage(dataset_url=str(dataset_dir))).resolve_job_def("shard_pipeline")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", keys)
        res = job.execute_in_process(instance=instance, tags=range_tags(keys), raise_on_error=False)
        assert not res.success
        assert len(instance.get_runs()) == 1
        for name in ("shard_index", "shard_validation"):
            assert sorted(m.partition for m in res.asset_materializations_for_node(name)) == sorted(keys)
        assert instance.get_materialized_partitions(dg.AssetKey("decoded_images")) == {"good", "warn"}
        by_shard = {(e.partition, e.check_name): e.passed for e in res.get_asset_check_evaluations()}
        assert by_shard[("dup", "check_shard_has_no_errors")] is False
        assert by_shard[("good", "check_shard_has_no_errors")] is True
        assert by_shard[("warn", "check_shard_records_readable")] is False
        assert len(by_shard) == 3 * 3  # three checks per shard, each under its own partition
        status = instance.get_status_by_partition(dg.AssetKey("decoded_images"), keys, shards)
        assert {k: v.value for k, v in status.items()} == {"good": "MATERIALIZED", "dup": "FAILED",
                                                           "warn": "MATERIALIZED"}
        metas = {m.partition: m.metadata for m in res.asset_materializations_for_node("shard_validation")}
        assert metas["dup"]["errors"].value == 1 and metas["good"]["errors"].value == 0


def test_a_truncated_shard_is_validated_not_crashed(dataset_dir):
    """The index step records the damage, validation still counts every readable record, and
    the decode refuses the shard."""
    data = (dataset_dir / "good.tar").read_bytes()
    with tarfile.open(dataset_dir / "good.tar") as tar:
        cut = tar.getmembers()[7].offset_data + 10  # inside the third record's caption
        readable = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.offset_data + m.size <= cut}
    (dataset_dir / "cut.tar").write_bytes(data[:cut])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("shards", ["cut"])
        res = _run(instance, dataset_dir, "cut")
        assert not res.success  # the shard is not decoded, by design
        assert _checks(res)["index_written"] is False
        assert _checks(res)["check_shard_has_no_errors"] is False
        meta = res.asset_materializations_for_node("shard_validation")[0].metadata
        assert "tar_truncated" in meta["counts"].value
        assert meta["records"].value == len(readable)  # every record with a readable member
        assert _decoded(res) == []


def test_dataset_summary_asset_and_its_check(dataset_dir):
    storage = ShardStorage(dataset_url=str(dataset_dir))
    with dg.instance_for_test() as instance:
        keys = ["dup", "good", "overlap", "warn"]
        instance.add_dynamic_partitions("shards", keys)
        for key in keys:
            _run(instance, dataset_dir, key)
        result = dg.materialize(
            [assets.dataset_validation_summary, checks.check_record_ids_unique_across_shards],
            instance=instance, resources={"storage": storage},
        )
    assert result.success
    meta = result.asset_materializations_for_node("dataset_validation_summary")[0].metadata
    assert meta["shards"].value == 4 and meta["validated"].value == 4
    assert meta["cross_shard_duplicate_ids"].value == 2  # photos 3 and 4 are in good and overlap
    assert meta["counts"].value == {"bad_text": 1, "duplicate_record_id": 1}
    assert meta["failed_shards"].value == ["dup"]
    summary = json.loads(Path(meta["summary_path"].value).read_text())
    shared = _keys(dataset_dir / "good.tar") & _keys(dataset_dir / "overlap.tar")
    assert summary["cross_shard_duplicates"] == {k: ["good", "overlap"] for k in sorted(shared)}
    evaluation = result.get_asset_check_evaluations()[0]
    assert evaluation.passed is False and evaluation.severity == dg.AssetCheckSeverity.WARN


def test_definitions_wire_the_validation_assets():
    defs = build_definitions(ShardStorage(dataset_url="unused"))
    graph = defs.get_repository_def().asset_graph
    check_names = {k.name for k in graph.asset_check_keys}
    assert {"check_shard_has_no_errors", "check_shard_records_readable",
            "check_record_ids_unique_across_shards"} <= check_names
    assert graph.get(dg.AssetKey("shard_validation")).group_name == "shards"
    # The per-shard job selects the "shards" group; the dataset summary is not in it.
    assert graph.get(dg.AssetKey("dataset_validation_summary")).group_name == "dataset"
    job_keys = jobs.shard_pipeline.selection.resolve(graph)
    assert dg.AssetKey("shard_validation") in job_keys
    assert dg.AssetKey("dataset_validation_summary") not in job_keys
    # Evaluated inside the validation step, per shard (not a separate step per check).
    spec = graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey("shard_validation"), "check_shard_has_no_errors"))
    assert spec.partitions_def == shards
    assert dg.AssetKey("shard_validation") in {s.asset_key for s in assets.shard_validation.check_specs}
