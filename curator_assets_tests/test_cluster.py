"""Cluster mode with the real components on loopback: Redis (broker and result backend), Postgres
(the instance, deploy/cluster/dagster.yaml), `dagster-daemon` with the shard sensor, and two
Celery workers started with `dagster-celery worker start`:

* worker-a on the default and gpu queues (``-q dagster,gpu``, two pool processes);
* worker-b on the default queue only.

The shards arrive as files; the sensor turns them into runs (one shard per run here), the daemon
launches them from the queue, each run's steps go to the workers. The tests share one cluster
and run in file order: placement and the `gpu` pool at limit 1, the control at limit 2, then a
worker killed in the middle of a decode.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from curator_assets.cli.demo import PhotoRecord, photo_records, write_shard
from curator_assets_tests.cluster_services import postgres_server, redis_server
from curator_assets_tests.decoder_processes import DecoderFreezer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER_A, WORKER_B, WORKER_C = "worker-a", "worker-b", "worker-c"
PIPELINE_STEPS = ("shard_index", "shard_validation", "decoded_images")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Cluster:
    home: Path
    dataset: Path
    env: dict[str, str]
    celery_yaml: Path
    instance: object
    logs: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    records: dict[str, list[PhotoRecord]] = field(default_factory=dict)

    def start_worker(self, name: str, queues: str, concurrency: int) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        cmd = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(self.celery_yaml),
               "-q", queues, "-n", name, "--", f"--concurrency={concurrency}"]
        self.workers[name] = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        deadline = time.time() + 120
        while b" ready." not in (self.logs / f"{name}.log").read_bytes():
            if self.workers[name].poll() is not None or time.time() > deadline:
                pytest.fail(f"celery worker {name} did not start:\n{self.tail(name)}")
            time.sleep(0.5)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker, its pool processes and their decoder processes, all at once."""
        os.killpg(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()

    def add_shards(self, names: list[str], records: int, start: int) -> None:
        pool = list(photo_records(records * len(names), seed=11, size=(160, 120), start=start))
        for i, name in enumerate(names):
            chunk = pool[i * records:(i + 1) * records]
            write_shard(self.dataset / f"{name}.tar", chunk)
            self.records[name] = chunk

    def tail(self, name: str, size: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


def _config_files(tmp: Path, home: Path) -> Path:
    """The shipped instance and Celery files, with two settings made small for a 2-core test:
    four runs at once, and a killed worker's step handed on after 60 s (instead of 2 h)."""
    instance = yaml.safe_load((REPO / "deploy" / "cluster" / "dagster.yaml").read_text())
    instance["concurrency"]["runs"]["max_concurrent_runs"] = 4
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    celery = yaml.safe_load((REPO / "deploy" / "cluster" / "celery.yaml").read_text())
    options = celery["execution"]["config"]["config_source"]["broker_transport_options"]
    options.update({"visibility_timeout": 60, "unacked_restore_interval": 2, "unacked_restore_throttle": 1})
    path = tmp / "celery.yaml"
    path.write_text(yaml.safe_dump(celery))
    return path


def _environment(home: Path, dataset: Path, celery_yaml: Path, redis_url: str, pg_env: dict[str, str]
                 ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CURATOR_", "DAGSTER_"))}
    return {**env, **pg_env, "DAGSTER_HOME": str(home), "CURATOR_EXECUTOR": "celery",
            "CURATOR_CELERY_CONFIG": str(celery_yaml), "CURATOR_CELERY_BROKER": f"{redis_url}/0",
            "CURATOR_CELERY_BACKEND": f"{redis_url}/1", "CURATOR_DATASET_URL": str(dataset),
            "CURATOR_SENSOR_INTERVAL": "1", "CURATOR_RUN_SLOTS": "100",  # one shard per run
            "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO),
            "DAGSTER_GRPC_TIMEOUT_SECONDS": "300",  # a code server on a loaded 2-core machine answers slowly
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    import dagster as dg

    tmp = tmp_path_factory.mktemp("cluster")
    home, dataset, logs = tmp / "home", tmp / "dataset", tmp / "logs"
    for d in (home, dataset, logs):
        d.mkdir()
    with redis_server(tmp / "redis") as redis_url, postgres_server() as pg, pytest.MonkeyPatch.context() as mp:
        celery_yaml = _config_files(tmp, home)
        env = _environment(home, dataset, celery_yaml, redis_url, pg.env())
        for k, v in pg.env().items():
            mp.setenv(k, v)  # this process reads the same instance
        instance = dg.DagsterInstance.from_config(str(home))  # creates the schema before the others start
        c = Cluster(home, dataset, env, celery_yaml, instance, logs)
        c.start_worker(WORKER_A, "dagster,gpu", concurrency=2)
        c.start_worker(WORKER_B, "dagster", concurrency=1)
        daemon_log = open(logs / "daemon.log", "wb")
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], cwd=REPO,
                                  env=env, stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield c
        finally:
            for proc in [daemon, *c.workers.values()]:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in [daemon, *c.workers.values()]:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            daemon_log.close()
            instance.dispose()


def _wait_runs(c: Cluster, keys: list[str], before: set[str], timeout: float = 420) -> list:
    """The ``shard_pipeline`` runs created since ``before`` (run IDs), once each of ``keys`` has
    a successful one and all of them are finished (a failed run may still get its retry)."""
    import dagster as dg

    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [r for r in c.instance.get_runs(dg.RunsFilter(job_name="shard_pipeline")) if r.run_id not in before]
        ok = {_shard_of(r) for r in runs if r.status == dg.DagsterRunStatus.SUCCESS}
        if ok >= set(keys) and all(r.is_finished for r in runs):
            return runs
        time.sleep(2)
    pytest.fail(f"{len(keys)} shards did not complete in {timeout:.0f} s\n--- daemon\n{c.tail('daemon')}\n"
                + "".join(f"--- {n}\n{c.tail(n)}\n" for n in c.workers))


def _run_ids(c: Cluster) -> set[str]:
    return {r.run_id for r in c.instance.get_runs()}


def _shard_of(run) -> str:
    return run.tags["dagster/partition"]


def _step_workers(c: Cluster, run_id: str) -> list[tuple[str, str]]:
    """(step, Celery worker) for every task a worker started for this run, in order."""
    out = []
    for entry in c.instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev and ev.event_type_value == "ENGINE_EVENT" and ev.step_key and ev.engine_event_data:
            worker = ev.engine_event_data.metadata.get("Celery worker")
            if worker is not None:
                out.append((ev.step_key, str(worker.value).split("@")[0]))
    return out


def _decode_intervals(c: Cluster, runs) -> list[tuple[float, float]]:
    """(start, end) of each run's decode step, from its STEP_START and STEP_SUCCESS events."""
    out = []
    for run in runs:
        times = {e.dagster_event.event_type_value: e.timestamp for e in c.instance.all_logs(run.run_id)
                 if e.dagster_event and e.dagster_event.step_key == "decoded_images"
                 and e.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS")}
        assert set(times) == {"STEP_START", "STEP_SUCCESS"}, (run.run_id, times)
        out.append((times["STEP_START"], times["STEP_SUCCESS"]))
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one time (an end at the same instant as a start closes first)."""
    marks = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda m: (m[0], m[1]))
    best = now = 0
    for _, delta in marks:
        now += delta
        best = max(best, now)
    return best


def _assert_manifest(c: Cluster, key: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(c.dataset / "_curator" / "manifests" / f"{key}.parquet",
                          columns=["record_id", "decoded", "sha256"]).to_pylist()
    expected = [(r.key, True, hashlib.sha256(r.jpg).hexdigest()) for r in c.records[key]]
    assert [(row["record_id"], row["decoded"], row["sha256"]) for row in table] == expected, key


def _assert_all_succeeded(c: Cluster, runs, keys: list[str]) -> list:
    """Every shard's run succeeded and its manifest is right; returns the successful runs. A run
    the daemon could not launch (a code server too slow to answer on a loaded machine) fails
    before any step and is retried by the daemon (`run_retries`): such a run is allowed only
    when its retry succeeded."""
    import dagster as dg

    done = [r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]
    assert sorted(_shard_of(r) for r in done) == sorted(keys), f"{[(_shard_of(r), r.status) for r in runs]}"
    retried = {r.tags.get("dagster/parent_run_id") for r in done}
    for run in runs:
        if run.status != dg.DagsterRunStatus.SUCCESS:
            assert run.run_id in retried, f"{_shard_of(run)}: {run.status}\n{c.tail('daemon')}"
            assert not _step_workers(c, run.run_id), f"{_shard_of(run)}: a step failed"
    for key in keys:
        _assert_manifest(c, key)
    return done


def test_dozen_shards_across_two_workers(cluster: Cluster) -> None:
    from dagster._core.run_coordinator import QueuedRunCoordinator

    assert isinstance(cluster.instance.run_coordinator, QueuedRunCoordinator)
    assert type(cluster.instance.run_storage).__name__ == "PostgresRunStorage"
    keys = [f"{i:05d}" for i in range(12)]
    cluster.add_shards(keys, records=6, start=0)
    runs = _assert_all_succeeded(cluster, _wait_runs(cluster, keys, set()), keys)

    placed: dict[str, set[str]] = {step: set() for step in PIPELINE_STEPS}
    for run in runs:
        steps = _step_workers(cluster, run.run_id)
        assert sorted(s for s, _ in steps) == sorted(PIPELINE_STEPS), steps  # each step ran once
        for step, worker in steps:
            placed[step].add(worker)
    assert placed["shard_index"] | placed["shard_validation"] == {WORKER_A, WORKER_B}, placed
    assert placed["decoded_images"] == {WORKER_A}, placed  # the only worker on the gpu queue

    # The `gpu` pool (limit 1, deploy/cluster/dagster.yaml) holds across runs and workers, though
    # worker-a has two pool processes that could decode side by side.
    assert max_overlap(_decode_intervals(cluster, runs)) == 1


def test_pool_limit_two_allows_two_decodes(cluster: Cluster) -> None:
    """The control: at limit 2 the same measurement does see two decodes at once. Runs reach
    their decode step seconds apart on a loaded machine, so every decoder process is held with
    SIGSTOP as it appears until two steps, in two worker processes, hold the pool's two slots."""
    cluster.instance.event_log_storage.set_concurrency_slots("gpu", 2)
    before = _run_ids(cluster)
    keys = [f"{i:05d}" for i in range(12, 16)]  # four runs: all start at once (max_concurrent_runs 4)
    with DecoderFreezer({w.pid for w in cluster.workers.values()}) as freezer:
        cluster.add_shards(keys, records=200, start=100)
        _wait_two_held(cluster, freezer)
        held = freezer.callers()
    runs = _assert_all_succeeded(cluster, _wait_runs(cluster, keys, before), keys)
    assert len(held) == 2, held  # two step processes (worker-a has two pool processes), though four runs waited
    assert max_overlap(_decode_intervals(cluster, runs)) == 2


def _wait_two_held(c: Cluster, freezer: DecoderFreezer, timeout: float = 300) -> None:
    """Until both slots of the `gpu` pool are claimed and two decode steps have started (STEP_START
    written) and cannot end: their decoders are held. A claimed slot alone is no started step."""
    import dagster as dg

    started = dg.RunsFilter(job_name="shard_pipeline", statuses=[dg.DagsterRunStatus.STARTED])
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = c.instance.event_log_storage.get_concurrency_info("gpu")
        if len(info.claimed_slots) == 2 and len(freezer.callers()) >= 2:
            events = [set(_step_events(c, r.run_id, "decoded_images")) for r in c.instance.get_runs(started)]
            decoding = [e for e in events if "STEP_START" in e and not e & {"STEP_SUCCESS", "STEP_FAILURE"}]
            if len(decoding) >= 2:
                return
        time.sleep(0.2)
    pytest.fail(f"fewer than 2 decodes held at once in {timeout:.0f} s: {freezer.frozen}")


def _wait_decode_started(c: Cluster, worker: str, timeout: float = 300) -> str:
    """The run whose decode step ``worker`` has taken and started (STEP_START written)."""
    import dagster as dg

    started = dg.RunsFilter(job_name="shard_pipeline", statuses=[dg.DagsterRunStatus.STARTED])
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in c.instance.get_runs(started):
            if (("decoded_images", worker) in _step_workers(c, run.run_id)
                    and "STEP_START" in _step_events(c, run.run_id, "decoded_images")):
                return run.run_id
        time.sleep(0.1)
    pytest.fail(f"no decode started on {worker} in {timeout:.0f} s\n{c.tail(worker)}")


def _step_events(c: Cluster, run_id: str, step: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in c.instance.all_logs(run_id)
            if e.dagster_event and e.dagster_event.step_key == step
            and e.dagster_event.event_type_value.startswith("STEP_")]


def test_worker_killed_mid_decode_is_retried_elsewhere(cluster: Cluster) -> None:
    """worker-a is SIGKILLed (with its pool and decoder processes) in the middle of a decode. Its
    step was never acknowledged (task_acks_late): once the visibility timeout passes, Redis hands
    it to worker-c, a new worker on the gpu queue, and the run completes."""
    import dagster as dg

    cluster.instance.event_log_storage.set_concurrency_slots("gpu", 1)
    key = "00016"
    before = _run_ids(cluster)
    cluster.add_shards([key], records=1500, start=2000)
    run_id = _wait_decode_started(cluster, WORKER_A)
    os.killpg(cluster.workers[WORKER_A].pid, signal.SIGSTOP)  # freeze it where it is, then check
    assert "STEP_SUCCESS" not in _step_events(cluster, run_id, "decoded_images"), "decode ended before the kill"
    cluster.kill_worker(WORKER_A)
    cluster.start_worker(WORKER_C, "gpu", concurrency=1)

    run = next(r for r in _wait_runs(cluster, [key], before) if r.run_id == run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS, cluster.tail("daemon")
    decode_workers = [w for s, w in _step_workers(cluster, run_id) if s == "decoded_images"]
    assert decode_workers == [WORKER_A, WORKER_C]
    assert _step_events(cluster, run_id, "decoded_images").count("STEP_START") == 2
    _assert_manifest(cluster, key)
