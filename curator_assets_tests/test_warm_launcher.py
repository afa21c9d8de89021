"""The warm run launcher (curator_assets/instance/launcher.py) under a real `dagster-daemon` with the repo's
dagster.yaml: the sensor's runs fork from the daemon's warm run server and behave as runs of
Dagster's own launcher do (a bad shard fails alone, the next run forks from the same server), and
a new daemon makes a new server. Terminating and killing runs: test_terminate.py."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import GRPC_INFO_TAG

from curator_assets.instance.launcher import LAUNCHER_TAG, WORKER_PID_TAG, WarmRunLauncher
from curator_assets_tests.dagster_daemon import (  # noqa: F401 - the fixtures daemon and instance
    Daemon,
    assert_forked_warm,
    daemon_fixture,
    finished_run,
    instance_fixture,
    shard,
)

pytestmark = pytest.mark.slow


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


def test_sensor_runs_fork_from_the_warm_server(daemon: Daemon, instance: dg.DagsterInstance) -> None:
    shard(daemon, "00000", 3, seed=0)
    (daemon.dataset / "00001.tar").write_bytes(b"garbage" * 300)  # not a tar: fails alone
    shard(daemon, "00002", 2, seed=2)
    shard(daemon, "00003", 2, seed=3)
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    daemon.extra_env["CURATOR_RUN_SLOTS"] = "2"  # two runs at once (the default spreads over one)
    daemon.start()
    server = first_batch(daemon, instance)

    # The next run runs from the same server (terminate and a killed worker: test_terminate.py).
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
