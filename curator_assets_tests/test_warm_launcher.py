"""The warm run launcher (curator_assets/instance/launcher.py) under a real `dagster-daemon` with the repo's
dagster.yaml: the sensor's runs fork from the daemon's warm run server and behave as runs of
Dagster's own launcher do (a bad shard fails alone, terminate cancels, a worker killed with
SIGKILL fails its run and the next run still runs), and a new daemon makes a new server."""

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
from dagster._core.instance import InstanceRef
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from curator_assets.decode_worker import GATE_DIR_ENV
from curator_assets.demo import photo_records, write_shard
from curator_assets.instance.launcher import LAUNCHER_TAG, SERVER_PID_TAG, WORKER_PID_TAG, WarmRunLauncher

REPO = Path(__file__).resolve().parents[1]
START = "dagster/asset_partition_range_start"

pytestmark = pytest.mark.slow


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
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch) -> Iterator[Daemon]:
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


@pytest.fixture
def instance(daemon: Daemon) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(daemon.home))) as inst:
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


def worker_start(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[int, int]:
    """(pid, parent pid) the run's worker recorded in its "Started process for run" event."""
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if entry.message.startswith("Started process for run"):
            metadata = entry.dagster_event.engine_event_data.metadata
            return int(metadata["pid"].value), int(metadata["fork_server_pid"].value)
    raise AssertionError(f"no worker start event in run {run.run_id}")


def assert_forked_warm(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int:
    """The run ran in a worker forked by the warm server; returns the server's pid."""
    run = instance.get_run_by_id(run.run_id)
    assert run.tags.get(LAUNCHER_TAG) == "warm", run.tags
    pid, parent = worker_start(instance, run)
    assert pid == int(run.tags[WORKER_PID_TAG])
    assert parent == int(run.tags[SERVER_PID_TAG])
    return parent


def first_batch(daemon: Daemon, instance: dg.DagsterInstance) -> int:
    """Four shards over two run slots, [00000, 00001] and [00002, 00003], 00001 not a tar: it
    fails alone, the other shards are decoded, both runs forked warm. Returns the server pid."""
    import pyarrow.parquet as pq

    bad, good = finished_run(instance, daemon, "00000"), finished_run(instance, daemon, "00002")
    assert good.status == dg.DagsterRunStatus.SUCCESS, daemon.log()
    assert bad.status == dg.DagsterRunStatus.FAILURE
    step_failures = [e.dagster_event.step_failure_data.error.message
                     for e in instance.all_logs(bad.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]
    assert step_failures and all("00001" in m and "00000" not in m for m in step_failures), step_failures
    servers = {assert_forked_warm(instance, bad), assert_forked_warm(instance, good)}
    assert len(servers) == 1  # one warm server per daemon
    decoded = instance.get_materialized_partitions(dg.AssetKey("decoded_images"))
    assert {"00000", "00002", "00003"} <= decoded and "00001" not in decoded
    for key, n in (("00000", 3), ("00002", 2), ("00003", 2)):
        table = pq.read_table(daemon.dataset / "_curator" / "manifests" / f"{key}.parquet")
        assert table.num_rows == n and all(table.column("decoded").to_pylist())
    assert not (daemon.dataset / "_curator" / "manifests" / "00001.parquet").exists()
    return servers.pop()


def held_decode(daemon: Daemon, instance: dg.DagsterInstance, key: str) -> dg.DagsterRun:
    """A new shard's run, started and held in its decode by the decoder workers' gate (a test hook:
    a run of a small shard would otherwise end before a test could act on it)."""
    gate = daemon.tmp_path / "gate"
    for leftover in gate.iterdir():
        leftover.unlink()
    (gate / "closed").touch()
    shard(daemon, key, 200, seed=int(key))
    running = started_run(instance, daemon, key)
    wait_for(f"the decode of {key} to be held", lambda: any(p.name != "closed" for p in gate.iterdir()), daemon)
    return running


def open_gate(daemon: Daemon) -> None:
    (daemon.tmp_path / "gate" / "closed").unlink(missing_ok=True)


def terminate_and_kill(daemon: Daemon, instance: dg.DagsterInstance, server: int) -> None:
    # Terminate (as the UI does, from another process than the daemon): the run is canceled.
    running = held_decode(daemon, instance, "00004")
    launcher = instance.run_launcher
    assert launcher.check_run_worker_health(running).status == WorkerStatus.RUNNING
    assert launcher.terminate(running.run_id)
    canceled = finished_run(instance, daemon, "00004")
    open_gate(daemon)
    assert canceled.status == dg.DagsterRunStatus.CANCELED
    assert assert_forked_warm(instance, canceled) == server

    # A worker killed with SIGKILL: its run is failed, and says why.
    doomed = held_decode(daemon, instance, "00005")
    os.kill(int(doomed.tags[WORKER_PID_TAG]), signal.SIGKILL)
    killed = finished_run(instance, daemon, "00005")
    open_gate(daemon)
    assert killed.status == dg.DagsterRunStatus.FAILURE
    messages = [e.message for e in instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]
    assert any("signal 9" in m for m in messages), messages
    assert launcher.check_run_worker_health(killed).status == WorkerStatus.FAILED


def test_sensor_runs_fork_from_the_warm_server(daemon: Daemon, instance: dg.DagsterInstance) -> None:
    shard(daemon, "00000", 3, seed=0)
    (daemon.dataset / "00001.tar").write_bytes(b"garbage" * 300)  # not a tar: fails alone
    shard(daemon, "00002", 2, seed=2)
    shard(daemon, "00003", 2, seed=3)
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    daemon.extra_env["CURATOR_RUN_SLOTS"] = "2"  # two runs at once (the default spreads over one)
    (daemon.tmp_path / "gate").mkdir()
    daemon.extra_env[GATE_DIR_ENV] = str(daemon.tmp_path / "gate")  # open unless a test closes it
    daemon.start()
    server = first_batch(daemon, instance)
    terminate_and_kill(daemon, instance, server)

    # The next run still runs, from the same server.
    shard(daemon, "00006", 2, seed=6)
    after = finished_run(instance, daemon, "00006")
    assert after.status == dg.DagsterRunStatus.SUCCESS, daemon.log()
    assert assert_forked_warm(instance, after) == server

    # A new daemon makes a new warm server.
    daemon.stop()
    daemon.start()
    shard(daemon, "00007", 2, seed=7)
    restarted = finished_run(instance, daemon, "00007")
    assert restarted.status == dg.DagsterRunStatus.SUCCESS, daemon.log()
    assert assert_forked_warm(instance, restarted) != server


def test_fallback_to_dagsters_default_launcher(daemon: Daemon, instance: dg.DagsterInstance) -> None:
    """``CURATOR_RUN_LAUNCHER=default``: runs go through the code server, as without the block."""
    shard(daemon, "00000", 2, seed=0)
    daemon.extra_env["CURATOR_RUN_LAUNCHER"] = "default"
    daemon.start()
    run = finished_run(instance, daemon, "00000")
    assert run.status == dg.DagsterRunStatus.SUCCESS, daemon.log()
    assert LAUNCHER_TAG not in run.tags and WORKER_PID_TAG not in run.tags
    assert GRPC_INFO_TAG in run.tags  # launched through the code server


def _launches_runs_here(queue) -> None:
    from curator_assets.instance.launcher import launches_runs

    queue.put(launches_runs())


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_run_worker_is_not_the_launching_process(monkeypatch, method: str) -> None:
    """A process that multiprocessing starts (a run worker forked by the warm server) carries the
    daemon's sys.argv; it must not take itself for the daemon and start a fork server of its own."""
    import multiprocessing

    from curator_assets.instance.launcher import launches_runs

    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / "dagster-daemon"), "run"])
    assert launches_runs()  # the daemon itself
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_launches_runs_here, args=(queue,))
    child.start()
    answer = queue.get(timeout=120)
    child.join(timeout=60)
    assert answer is False
