"""A `curator-assets run` killed with SIGKILL while it decodes (the OOM killer, a pre-empted node)
leaves a persistent instance usable: the next `run` frees the dead run's `gpu` pool slot and
completes, and no partial output is visible."""

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

from curator_assets.demo import photo_records, write_shard

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _claimed(home: Path) -> int:
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        return len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots)


def test_a_run_killed_while_decoding_does_not_wedge_the_next(tmp_path: Path, monkeypatch) -> None:
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
    while time.time() < deadline and first.poll() is None and _claimed(home) == 0:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before its decode step could be caught"
    assert _claimed(home) == 1  # the decode step holds the gpu slot
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert _claimed(home) == 1  # a dead process cannot give its slot back

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "marked failed" in second.stderr
    assert _claimed(home) == 0
    manifests = sorted(p.name for p in (dataset / "_curator" / "manifests").iterdir())
    assert manifests == ["00000.parquet", "00001.parquet", "00002.parquet"]  # no temp file left visible
    with dg.DagsterInstance.get() as instance:
        statuses = sorted(r.status.value for r in instance.get_runs())
    assert statuses.count("FAILURE") == 1 and "STARTED" not in statuses
