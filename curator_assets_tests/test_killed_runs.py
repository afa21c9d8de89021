"""A `curator-assets run` killed with SIGKILL in any of its steps (the OOM killer, a pre-empted
node) leaves a persistent instance usable: the next `run` marks the dead run failed, frees its
`gpu` pool slot and completes, and no partial output is visible."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.cli.demo import photo_records, write_shard

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _claimed(home: Path) -> int:
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        return len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots)


def _in_step(home: Path, step: str) -> bool:
    """Whether the latest run has started ``step`` (the event log, as the UI reads it)."""
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs(limit=1)
        if not runs:
            return False
        records = instance.get_records_for_run(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START).records
        return any(r.event_log_entry.step_key == step for r in records)


def _leftovers(root: Path) -> list[str]:
    """Files a reader could mistake for output: temp files of interrupted writes."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name.startswith("."))


@pytest.mark.parametrize("step", ["shard_index", "shard_validation", "decoded_images"])
def test_a_run_killed_in_any_step_does_not_wedge_the_next(tmp_path: Path, monkeypatch, step: str) -> None:
    dataset = tmp_path / "dataset"
    for s in range(3):
        write_shard(dataset / f"{s:05d}.tar", list(photo_records(150, seed=s, size=(500, 375), start=s * 150)))
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    dg.DagsterInstance.get().dispose()  # create the storage once, before the runs race to
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    cmd = [sys.executable, "-m", "curator_assets.cli", "run", str(dataset)]

    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not _in_step(home, step):
        time.sleep(0.02)
    assert first.poll() is None, f"the run ended before {step} could be caught"
    if step == "decoded_images":
        while time.time() < deadline and _claimed(home) == 0:
            time.sleep(0.02)
        assert _claimed(home) == 1  # the decode step holds the gpu slot
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    if step == "decoded_images":
        assert _claimed(home) == 1  # a dead process cannot give its slot back

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "marked failed" in second.stderr
    assert _claimed(home) == 0
    manifests = sorted(p.name for p in (dataset / "_curator" / "manifests").iterdir())
    assert manifests == ["00000.parquet", "00001.parquet", "00002.parquet"]  # no temp file left visible
    assert sorted(p.name for p in dataset.glob("*.idx")) == ["00000.idx", "00001.idx", "00002.idx"]
    reports = sorted(p.name for p in (dataset / "_curator" / "validation").iterdir())
    assert reports == ["00000.json", "00001.json", "00002.json"]
    assert _leftovers(dataset) == []  # what the killed writer left is cleaned up by the next write
    with dg.DagsterInstance.get() as instance:
        statuses = sorted(r.status.value for r in instance.get_runs())
    assert statuses.count("FAILURE") == 1 and "STARTED" not in statuses
