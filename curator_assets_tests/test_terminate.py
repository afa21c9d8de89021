"""Terminating a run, under a real `dagster-daemon`, in the warm run launcher and in Dagster's own
(``CURATOR_RUN_LAUNCHER=default``): the run's step is held where a terminate can reach it, a read
of the dataset that the store never answers (the dataset is on the S3 emulator behind a proxy
that black-holes the step's read), then the run is terminated from this process as the UI does.

Each step (index, validate, decode) in turn: the run ends CANCELED with its step interrupted (not
failed by the store's timeout, which is far longer than the test), the ``gpu`` pool holds no slot
afterwards, no process of the run is left, and a run after it succeeds. A run worker killed with
SIGKILL fails its run, says so, and leaves no decoder process behind.
"""

from __future__ import annotations

import os
import signal
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.launcher import WorkerStatus

from curator_assets.cli.demo import photo_records, write_shard
from curator_assets.defs.partitions import DECODE_POOL
from curator_assets.instance.launcher import LAUNCHER_TAG
from curator_assets_tests.dagster_daemon import (  # noqa: F401 - the fixtures daemon and instance
    Daemon,
    daemon_fixture,
    descendants,
    finished_run,
    instance_fixture,
    run_of,
    running,
    wait_for,
    worker_start,
)
from curator_assets_tests.emulators import ObjectStore
from curator_assets_tests.faultproxy import FaultProxy, Request, reads

pytestmark = pytest.mark.slow

# What the store does not answer to hold each step: its first read of something the step before
# it wrote (the index step reads the tar; validation, the index the index step wrote; decoding,
# the report validation wrote).
HOLDS: dict[str, Callable[[str], Callable[[Request], bool]]] = {
    "shard_index": lambda key: reads(f"{key}.tar"),
    "shard_validation": lambda key: reads(f"{key}.idx"),
    "decoded_images": lambda key: reads(f"{key}.json"),
}


class Store:
    """A bucket on the S3 emulator, reached by the daemon's runs through a fault proxy."""

    def __init__(self, store: ObjectStore, tmp_path: Path) -> None:
        self.fs = store.filesystem(fresh=True)
        self.proxy = FaultProxy(urllib.parse.urlparse(store.endpoint).port)
        self.bucket = store.new_bucket()
        self.url = store.url(f"{self.bucket}/ds")
        self.local = tmp_path / "shards"
        endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.env = {**store.credentials_env, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                    "CURATOR_DATASET_URL": self.url, "CURATOR_ENDPOINT_URL": endpoint,
                    "CURATOR_STORE_TIMEOUT": "600", "CURATOR_STORE_RETRIES": "1"}

    def add_shard(self, key: str, n: int = 20) -> None:
        path = self.local / f"{key}.tar"
        write_shard(path, list(photo_records(n, seed=int(key), size=(320, 240), start=int(key) * 1000)))
        self.fs.put_file(str(path), f"{self.bucket}/ds/{key}.tar")  # around the proxy

    def held(self, key: str) -> bool:
        return any(what == "blackhole" and path.endswith(key) for _, path, what in list(self.proxy.requests))


@pytest.fixture
def store(s3_store: ObjectStore, tmp_path: Path) -> Iterator[Store]:
    s = Store(s3_store, tmp_path)
    yield s
    s.proxy.stop()


def step_events(instance: dg.DagsterInstance, run_id: str, step: str) -> list[dg.DagsterEventType]:
    return [e.dagster_event.event_type for e in instance.all_logs(run_id)
            if e.dagster_event is not None and e.step_key == step]


def held_run(daemon: Daemon, instance: dg.DagsterInstance, store: Store, key: str, step: str
             ) -> tuple[dg.DagsterRun, int, set[int]]:
    """A new shard whose run is started and held in ``step`` by a read the store does not answer:
    (the run, its worker's pid, the processes under the worker)."""
    store.proxy.inject("blackhole", match=HOLDS[step](key))
    store.add_shard(key)
    wait_for(f"{step} of {key} to be held", lambda: store.held(
        {"shard_index": f"{key}.tar", "shard_validation": f"{key}.idx", "decoded_images": f"{key}.json"}[step]),
        daemon)
    run = run_of(instance, key)
    assert run is not None
    events = step_events(instance, run.run_id, step)
    assert dg.DagsterEventType.STEP_START in events and dg.DagsterEventType.STEP_SUCCESS not in events, events
    pid, _ = worker_start(instance, run)
    return instance.get_run_by_id(run.run_id), pid, descendants(pid)


def gpu_slots_claimed(instance: dg.DagsterInstance) -> int:
    return len(instance.event_log_storage.get_concurrency_info(DECODE_POOL).claimed_slots)


def all_gone(pids: set[int]) -> bool:
    return not any(running(p) for p in pids)


def terminate_each_step(daemon: Daemon, instance: dg.DagsterInstance, store: Store, launcher: str) -> None:
    for n, step in enumerate(HOLDS):
        key = f"{n:05d}"
        run, pid, below = held_run(daemon, instance, store, key, step)
        assert (run.tags.get(LAUNCHER_TAG) == "warm") == (launcher == "warm"), run.tags
        if step == "decoded_images":
            assert gpu_slots_claimed(instance) == 1  # the decode holds the pool's slot
            assert below, "the decode step started no decoder process"
        assert instance.run_launcher.terminate(run.run_id)
        canceled = finished_run(instance, daemon, key)
        assert canceled.status == dg.DagsterRunStatus.CANCELED, (step, canceled.status, daemon.log())
        events = step_events(instance, run.run_id, step)
        assert dg.DagsterEventType.STEP_SUCCESS not in events
        failures = [e.dagster_event.step_failure_data.error for e in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE) if e.step_key == step]
        # Interrupted by the terminate, not failed by the store (a timeout or an error of the read).
        assert failures and all(f.cls_name == "DagsterExecutionInterruptedError" for f in failures), failures
        assert gpu_slots_claimed(instance) == 0
        left = {pid, *below}
        wait_for("the run's processes to end", lambda left=left: all_gone(left), daemon, timeout=60)
        store.proxy.reset()  # let go of the black-holed read


@pytest.mark.parametrize("launcher", ["warm", "default"])
def test_terminate_cancels_each_step(daemon: Daemon, instance: dg.DagsterInstance, store: Store,
                                     launcher: str) -> None:
    daemon.extra_env.update(store.env)
    if launcher == "default":
        daemon.extra_env["CURATOR_RUN_LAUNCHER"] = "default"
    daemon.start()
    terminate_each_step(daemon, instance, store, launcher)
    # The slot and the launcher are free: the next shard's run succeeds.
    store.add_shard("00003")
    after = finished_run(instance, daemon, "00003")
    assert after.status == dg.DagsterRunStatus.SUCCESS, daemon.log()


def test_a_killed_warm_run_worker_fails_its_run(daemon: Daemon, instance: dg.DagsterInstance, store: Store) -> None:
    # Run monitoring, which frees a dead run's pool slots, looks every 2 s instead of every 2 minutes.
    config = yaml.safe_load((daemon.home / "dagster.yaml").read_text())
    config["run_monitoring"]["poll_interval_seconds"] = 2
    (daemon.home / "dagster.yaml").write_text(yaml.safe_dump(config))
    daemon.extra_env.update(store.env)
    daemon.start()
    run, pid, below = held_run(daemon, instance, store, "00000", "decoded_images")
    assert below and instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    os.kill(pid, signal.SIGKILL)
    killed = finished_run(instance, daemon, "00000")
    assert killed.status == dg.DagsterRunStatus.FAILURE
    messages = [e.message for e in instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]
    assert any("signal 9" in m for m in messages), messages
    assert instance.run_launcher.check_run_worker_health(killed).status == WorkerStatus.FAILED
    wait_for("the decoder processes to end", lambda: all_gone(below), daemon, timeout=60)
    store.proxy.reset()
    store.add_shard("00001")
    # A killed worker cannot give its `gpu` slot back: Dagster's run monitoring frees it
    # (free_slots_after_run_end_seconds after the run ended).
    wait_for("run monitoring to free the gpu slot", lambda: gpu_slots_claimed(instance) == 0, daemon)
    after = finished_run(instance, daemon, "00001")
    assert after.status == dg.DagsterRunStatus.SUCCESS, daemon.log()
