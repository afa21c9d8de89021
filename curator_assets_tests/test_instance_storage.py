"""The single-machine instance's storage (curator_assets/instance/sqlite_storage.py): Dagster's SQLite
files and schema with connections kept open per process. Real instances on temporary
DAGSTER_HOMEs, real processes (a fork, a second interpreter writing at the same time)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.instance import InstanceRef

import curator_assets.instance as instance_package
from curator_assets.instance.launcher import WarmRunLauncher
from curator_assets.instance.sqlite_storage import (
    OPEN_FILES,
    InstanceStorage,
    PooledSqliteEventLogStorage,
    PooledSqliteRunStorage,
)

REPO = Path(__file__).resolve().parents[1]
ASSET = dg.AssetKey("shard_index")


def shipped_home(tmp_path: Path, name: str = "home") -> Path:
    home = tmp_path / name
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return home


def open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def materialize(instance: dg.DagsterInstance, run_id: str, key: str) -> None:
    """A partition's materialization event, stored as a run's step stores it."""
    mat = dg.AssetMaterialization(asset_key=ASSET, partition=key, metadata={"records": int(key)})
    event = DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, "shard_pipeline",
                         event_specific_data=StepMaterializationData(mat))
    instance.handle_new_event(EventLogEntry(user_message="", level=20, job_name="shard_pipeline", run_id=run_id,
                                            error_info=None, timestamp=time.time(), dagster_event=event))


def run_id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


def records_of(instance: dg.DagsterInstance, key: str) -> list[int]:
    result = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=ASSET, asset_partitions=[key]), limit=10)
    return [r.asset_materialization.metadata["records"].value for r in result.records]


def test_the_shipped_instance_uses_the_pooled_storage(tmp_path: Path, monkeypatch) -> None:
    home = shipped_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home) as instance:
        assert instance.get_ref().storage_data.class_name == InstanceStorage.__name__
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        assert isinstance(instance.run_storage, PooledSqliteRunStorage)
        materialize(instance, run_id(1), "00007")
        assert records_of(instance, "00007") == [7]
    # Dagster's own layout, in the shipped file's folder (.dagster_home under DAGSTER_HOME).
    folder = home / ".dagster_home"
    assert (folder / "history" / "runs.db").exists()
    assert (folder / "history" / "runs" / "index.db").exists()
    assert (folder / "history" / "runs" / f"{run_id(1)}.db").exists()
    assert (folder / "schedules" / "schedules.db").exists()


def shipped_yaml_in_dagster_home() -> str:
    """The shipped dagster.yaml with its storage directly in $DAGSTER_HOME (Dagster's default place)."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    del config["storage"]["custom"]["config"]
    return yaml.safe_dump(config)


@pytest.mark.parametrize("why", ["switched off", "untested version"])
def test_off_the_accelerator_the_instance_is_dagsters_own(tmp_path: Path, monkeypatch, caplog, why: str) -> None:
    """With CURATOR_RUN_LAUNCHER=default, or on a Dagster version the accelerators were not tested
    on, the shipped file gives Dagster's own run launcher and SQLite storage (same folder, same
    files: what the pooled storage wrote is read), and one log line says why."""
    home = shipped_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home) as instance:
        materialize(instance, run_id(3), "00003")
    monkeypatch.setattr(instance_package, "_said", threading.Event())
    if why == "switched off":
        monkeypatch.setenv("CURATOR_RUN_LAUNCHER", "default")
        expected = "CURATOR_RUN_LAUNCHER=default"
    else:
        monkeypatch.setattr(instance_package, "running_version", lambda: "1.99.0")
        expected = "Dagster 1.99.0 is not a tested version (1.12.x, 1.13.x)"
    with caplog.at_level(logging.INFO, logger="curator_assets.instance"):
        with open_instance(home) as instance:
            assert type(instance.run_launcher) is dg.DefaultRunLauncher
            assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
            assert type(instance.run_storage).__name__ == "SqliteRunStorage"
            assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
            assert records_of(instance, "00003") == [3]
            materialize(instance, run_id(4), "00004")
    lines = [r.getMessage() for r in caplog.records if r.name == "curator_assets.instance"]
    assert lines == [f"curator_assets.instance: {expected}: using Dagster's own run launcher and storage"]
    monkeypatch.delenv("CURATOR_RUN_LAUNCHER", raising=False)
    monkeypatch.undo()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home) as instance:  # and back: the pooled storage reads what Dagster's wrote
        assert isinstance(instance.run_launcher, WarmRunLauncher)
        assert records_of(instance, "00004") == [4]


@pytest.mark.parametrize(("version", "on"), [("1.12.0", True), ("1.12.22", True), ("1.13.28", True),
                                             ("1.11.9", False), ("1.14.0", False), ("2.0.0", False)])
def test_the_accelerators_run_on_the_tested_versions_only(version: str, on: bool, monkeypatch) -> None:
    monkeypatch.delenv("CURATOR_RUN_LAUNCHER", raising=False)
    assert (instance_package.fallback_reason(version) is None) is on


def test_dagsters_own_storage_and_the_pooled_one_read_each_other(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # Dagster's default SQLite storage
    with open_instance(plain) as instance:
        assert type(instance.event_log_storage).__name__ == "SqliteEventLogStorage"
        materialize(instance, run_id(1), "00001")
        instance.add_dynamic_partitions("shards", ["00001"])
    # The same folder opened with the pooled storage: everything is there, and it writes on.
    (plain / "dagster.yaml").write_text(shipped_yaml_in_dagster_home())
    os.environ["DAGSTER_HOME"] = str(plain)
    try:
        with open_instance(plain) as instance:
            assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
            assert records_of(instance, "00001") == [1]
            assert list(instance.get_dynamic_partitions("shards")) == ["00001"]
            materialize(instance, run_id(2), "00002")
    finally:
        del os.environ["DAGSTER_HOME"]
    (plain / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with open_instance(plain) as instance:
        assert records_of(instance, "00002") == [2]


def test_a_forked_child_writes_with_connections_of_its_own(tmp_path: Path, monkeypatch) -> None:
    home = shipped_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home) as instance:
        materialize(instance, run_id(1), "00001")  # the parent's engines are open now
        pid = os.fork()
        if pid == 0:  # the child: the same instance object, inherited
            code = 1
            try:
                for n in range(2, 12):
                    materialize(instance, run_id(1), f"{n:05d}")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent goes on with its own connections, and sees the child's writes.
        materialize(instance, run_id(1), "00012")
        for n in range(1, 13):
            assert records_of(instance, f"{n:05d}") == [n]
        logs = instance.all_logs(run_id(1), of_type=DagsterEventType.ASSET_MATERIALIZATION)
        assert len(logs) == 12


WRITER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from curator_assets_tests.test_instance_storage import materialize, open_instance, run_id
from pathlib import Path
with open_instance(Path(os.environ["DAGSTER_HOME"])) as instance:
    first = int(sys.argv[2])
    for n in range(first, first + 150):
        materialize(instance, run_id(first), f"{n:05d}")
"""


def test_two_processes_write_at_once_and_nothing_is_lost(tmp_path: Path, monkeypatch) -> None:
    home = shipped_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home):
        pass  # create the databases before two processes race to
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(first)], env=env,
                                stderr=subprocess.PIPE, text=True) for first in (1000, 2000)]
    for proc in writers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    with open_instance(home) as instance:
        keys = instance.get_materialized_partitions(ASSET)
        assert keys == {f"{n:05d}" for first in (1000, 2000) for n in range(first, first + 150)}
        for first in (1000, 2000):
            assert len(instance.all_logs(run_id(first), of_type=DagsterEventType.ASSET_MATERIALIZATION)) == 150


def test_engines_stay_bounded_over_many_runs(tmp_path: Path, monkeypatch) -> None:
    home = shipped_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with open_instance(home) as instance:
        runs = 3 * OPEN_FILES
        for n in range(runs):
            materialize(instance, run_id(n), f"{n:05d}")
        storage = instance.event_log_storage
        assert len(storage._pool._engines) <= OPEN_FILES
        # A run whose engine was closed is read (and written) again through a new one.
        assert len(instance.all_logs(run_id(0), of_type=DagsterEventType.ASSET_MATERIALIZATION)) == 1
        assert len(instance.get_materialized_partitions(ASSET)) == runs


@pytest.mark.parametrize("config", ["storage", "legacy"])
def test_the_classes_load_from_their_own_config(tmp_path: Path, config: str) -> None:
    """Each class builds itself (not Dagster's parent class) from the instance's YAML."""
    home = tmp_path / "home"
    home.mkdir()
    module = "curator_assets.instance.sqlite_storage"
    if config == "storage":
        yaml_text = (f"storage:\n  custom:\n    module: {module}\n    class: PooledSqliteStorage\n"
                     f"    config:\n      base_dir: {home}\n")
    else:
        yaml_text = "".join(
            f"{key}:\n  module: {module}\n  class: {cls}\n  config:\n    base_dir: {home / sub}\n"
            for key, cls, sub in (("run_storage", "PooledSqliteRunStorage", "history"),
                                  ("event_log_storage", "PooledSqliteEventLogStorage", "history/runs"),
                                  ("schedule_storage", "PooledSqliteScheduleStorage", "schedules")))
    (home / "dagster.yaml").write_text(yaml_text)
    with open_instance(home) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        assert isinstance(instance.run_storage, PooledSqliteRunStorage)
        materialize(instance, run_id(5), "00005")
        assert records_of(instance, "00005") == [5]


def test_the_shipped_file_without_dagster_home_keeps_its_storage_beside_it(tmp_path: Path, monkeypatch) -> None:
    """Without DAGSTER_HOME, Dagster's CLI (dg dev, dg check defs) reads the dagster.yaml of the
    current folder: the storage is then in that folder's .dagster_home, as with DAGSTER_HOME set."""
    home = shipped_home(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(home)
    with open_instance(home) as instance:
        materialize(instance, run_id(9), "00009")
        assert records_of(instance, "00009") == [9]
    assert (home / ".dagster_home" / "history" / "runs" / f"{run_id(9)}.db").exists()
