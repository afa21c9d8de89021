"""The sensor + daemon path on Dagster's own run launcher and SQLite storage: the shipped
dagster.yaml with the accelerators switched off (CURATOR_RUN_LAUNCHER=default), a real
`dagster-daemon` on the repo's workspace.yaml. New shards still go into as few runs as there are
run slots, every shard is indexed, validated and decoded, and the instance says once per process
that it is on Dagster's own launcher and storage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.cli.demo import photo_records, write_shard

REPO = Path(__file__).resolve().parents[1]
FALLBACK_LINE = "CURATOR_RUN_LAUNCHER=default: using Dagster's own run launcher and storage"

pytestmark = pytest.mark.slow


def wait_for(what: str, predicate: Callable[[], object], proc: subprocess.Popen, log: Path,
             timeout: float = 420) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "dagster-daemon exited:\n" + log.read_text(errors="replace")[-4000:]
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n" + log.read_text(errors="replace")[-4000:])


def pipeline_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return [r for r in instance.get_runs() if r.job_name == "shard_pipeline"]


def test_eight_new_shards_are_one_run_on_dagsters_own_launcher(tmp_path: Path, monkeypatch) -> None:
    home, dataset = tmp_path / "home", tmp_path / "dataset"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    keys = [f"{i:05d}" for i in range(8)]
    for i, key in enumerate(keys):
        write_shard(dataset / f"{key}.tar", list(photo_records(4, seed=i, size=(160, 120), start=i * 100)))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CURATOR_RUN_LAUNCHER", "default")
    env = {**os.environ, "CURATOR_DATASET_URL": str(dataset), "CURATOR_SENSOR_INTERVAL": "1",
           "DAGSTER_DISABLE_TELEMETRY": "1"}
    env.pop("CURATOR_RUN_SLOTS", None)
    log = tmp_path / "daemon.log"
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_launcher) is dg.DefaultRunLauncher
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            runs = wait_for("the shard runs to end", lambda: (
                (rs := pipeline_runs(instance)) and all(r.is_finished for r in rs)
                and len(instance.get_materialized_partitions(dg.AssetKey("decoded_images"))) == len(keys) and rs),
                proc, log)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # One gpu slot and two run slots in the shipped file: the 8 new shards are one ranged run.
        assert len(runs) == 1, [(r.tags.get("dagster/asset_partition_range_start"), r.status) for r in runs]
        run = runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["curator/shards"] == "8"
        assert (run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]) \
            == (keys[0], keys[-1])
        assert "curator/run_launcher" not in run.tags  # not forked warm
        for asset in ("shard_index", "shard_validation", "decoded_images"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set(keys), asset
        decoded = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("decoded_images"), asset_partitions=[keys[3]]), limit=1)
        assert decoded.records[0].asset_materialization.metadata["dagster/partition_row_count"].value == 4
    # Dagster's own SQLite layout, in the shipped file's folder.
    assert (home / ".dagster_home" / "history" / "runs.db").exists()
    assert log.read_text(errors="replace").count(FALLBACK_LINE) == 1
