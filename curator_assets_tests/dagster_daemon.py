"""A real ``dagster-daemon`` on a temporary DAGSTER_HOME with the repo's single-machine
dagster.yaml, and helpers to follow its runs (fixtures ``daemon`` and ``instance``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.cli.demo import photo_records, write_shard
from curator_assets.instance.launcher import LAUNCHER_TAG, SERVER_PID_TAG, WORKER_PID_TAG

REPO = Path(__file__).resolve().parents[1]
START = "dagster/asset_partition_range_start"


class Daemon:
    """``dagster-daemon run`` on a temporary DAGSTER_HOME, restartable."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.home = tmp_path / "home"
        self.dataset = tmp_path / "dataset"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "CURATOR_DATASET_URL": str(self.dataset),
               "CURATOR_SENSOR_INTERVAL": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}
        env.pop("CURATOR_RUN_LAUNCHER", None)
        env.update(self.extra_env)
        log = open(self.tmp_path / f"daemon-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
            # In its home: dagster.yaml's relative paths (step outputs, compute logs) land there.
            cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp_path.glob("daemon-*.log")))


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path, monkeypatch) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    d.home.mkdir()
    d.dataset.mkdir()
    shutil.copy(REPO / "dagster.yaml", d.home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(d.home))
    dg.DagsterInstance.get().dispose()  # create the storage before the daemon and the runs race to
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(name="instance")
def instance_fixture(daemon: Daemon) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(daemon.home)) as inst:
        yield inst


def shard(daemon: Daemon, key: str, n: int, seed: int = 0) -> None:
    write_shard(daemon.dataset / f"{key}.tar", list(photo_records(n, seed=seed, size=(500, 375), start=seed * 1000)))


def wait_for(what: str, predicate: Callable[[], object], daemon: Daemon, timeout: float = 300) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert daemon.proc is not None and daemon.proc.poll() is None, "dagster-daemon exited:\n" + daemon.log()
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n" + daemon.log())


def run_of(instance: dg.DagsterInstance, first_key: str) -> dg.DagsterRun | None:
    # A range's first partition, or the partition of a run of one shard.
    runs = [r for r in instance.get_runs() if r.job_name == "shard_pipeline"
            and first_key in (r.tags.get(START), r.tags.get("dagster/partition"))]
    return runs[0] if runs else None


def finished_run(instance: dg.DagsterInstance, daemon: Daemon, first_key: str) -> dg.DagsterRun:
    return wait_for(f"the run of {first_key} to end",
                    lambda: (r := run_of(instance, first_key)) is not None and r.is_finished and r, daemon)


def started_run(instance: dg.DagsterInstance, daemon: Daemon, first_key: str) -> dg.DagsterRun:
    return wait_for(f"the run of {first_key} to start",
                    lambda: (r := run_of(instance, first_key)) is not None
                    and r.status == dg.DagsterRunStatus.STARTED and WORKER_PID_TAG in r.tags and r, daemon)


def worker_start(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, int | None]:
    """(pid, fork server pid) the run's worker recorded in its "Started process for run" event
    (None: not forked by a fork server, as Dagster's own launcher starts it)."""
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if entry.message.startswith("Started process for run"):
            metadata = entry.dagster_event.engine_event_data.metadata
            server = metadata.get("fork_server_pid")
            return int(metadata["pid"].value), None if server is None else int(server.value)
    raise AssertionError(f"no worker start event in run {run.run_id}")


def assert_forked_warm(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int:
    """The run ran in a worker forked by the warm server; returns the server's pid."""
    run = instance.get_run_by_id(run.run_id)
    assert run.tags.get(LAUNCHER_TAG) == "warm", run.tags
    pid, parent = worker_start(instance, run)
    assert pid == int(run.tags[WORKER_PID_TAG])
    assert parent == int(run.tags[SERVER_PID_TAG])
    return parent




def process_parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """Every process below ``root`` now (children, their children, ...), from /proc."""
    parents = {int(p): process_parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, q in parents.items() if q in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
