"""Cluster mode against the embedded default: the same shards through Celery workers on one
machine (Redis, Postgres, the daemon and the workers on loopback, as in tests/test_cluster.py).

    python benchmarks/bench_cluster.py                      # 8 shards x 500 photos
    python benchmarks/bench_cluster.py --shards 8 --records 500 --slots 4

* ``cli``: the three CLI verbs, the work itself (bench_pipeline.cli_pass).
* ``embedded``: the same sensor and daemon on the repo's dagster.yaml (SQLite, in-process executor).
* ``celery, 1 worker`` and ``celery, 2 workers``: deploy/cluster/dagster.yaml (Postgres) and
  deploy/cluster/celery.yaml; each worker takes both queues (``-q dagster,gpu``, one pool
  process), standing for one GPU machine; the ``gpu`` pool is set to the number of workers.

Each path is timed from the first run's creation to the last run's end. Orchestration seconds
per shard: (path wall - cli wall) / shards. Every manifest is compared with the CLI's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_pipeline import _all_runs_over, _done, cli_pass, same_manifests  # noqa: E402
from common import bin_of, machine, photo_dataset  # noqa: E402

from curator_assets_tests.cluster_services import postgres_server, redis_server  # noqa: E402


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _worker(name: str, env: dict[str, str], home: Path) -> subprocess.Popen:
    log = home / f"{name}.log"
    proc = _start([bin_of("dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y",
                   env["CURATOR_CELERY_CONFIG"], "-q", "dagster,gpu", "-n", name, "--", "--concurrency=1"], env, log)
    deadline = time.time() + 120
    while b" ready." not in log.read_bytes():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"worker {name} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def _env(home: Path, folder: Path, redis_url: str, pg_env: dict[str, str], slots: int) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CURATOR_", "DAGSTER_"))}
    return {**base, **pg_env, "DAGSTER_HOME": str(home), "CURATOR_EXECUTOR": "celery",
            "CURATOR_CELERY_CONFIG": str(REPO / "deploy" / "cluster" / "celery.yaml"),
            "CURATOR_CELERY_BROKER": f"{redis_url}/0", "CURATOR_CELERY_BACKEND": f"{redis_url}/1",
            "CURATOR_DATASET_URL": str(folder), "CURATOR_SENSOR_INTERVAL": "1", "CURATOR_RUN_SLOTS": str(slots),
            "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}


def _db_size(pg) -> tuple[int, int]:
    """(bytes of the instance database, event rows)."""
    import psycopg2

    with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.db) as conn:
        with conn.cursor() as cur:
            cur.execute("select pg_database_size(current_database()), (select count(*) from event_logs)")
            size, events = cur.fetchone()
    return int(size), int(events)


def _timed(instance, keys: set[str], timeout: float, where: Path) -> dict:
    """Wait for every shard; then the ``shard_pipeline`` runs' span (the dataset summaries that
    the automation sensor adds are left out) and their launch delay."""
    import dagster as dg

    deadline = time.time() + timeout
    while time.time() < deadline and not (_all_runs_over(instance) and _done(instance, keys)):
        time.sleep(1.0)
    if not _done(instance, keys):
        raise SystemExit(f"not every shard completed in {timeout:.0f} s; see {where}")
    records = instance.get_run_records(dg.RunsFilter(job_name="shard_pipeline"))
    first = min(r.create_timestamp.timestamp() for r in records)
    last = max(r.end_time for r in records if r.end_time)
    ok = all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
    launch = sum(r.start_time - r.create_timestamp.timestamp() for r in records) / len(records)
    return {"runs": len(records), "wall": last - first, "all_success": ok, "launch": launch}


def embedded_pass(folder: Path, home: Path, keys: set[str], slots: int, timeout: float) -> dict:
    """The default: the repo's dagster.yaml (SQLite), the in-process executor, the same daemon."""
    import dagster as dg

    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in _env(home, folder, "redis://unused", {}, slots).items()
           if not k.startswith("CURATOR_CELERY") and k != "CURATOR_EXECUTOR"}
    instance = dg.DagsterInstance.from_config(str(home))
    procs = [_start([bin_of("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env, home / "daemon.log")]
    try:
        return _timed(instance, keys, timeout, home)
    finally:
        _stop(procs)
        instance.dispose()


def celery_pass(folder: Path, home: Path, keys: set[str], workers: int, slots: int, timeout: float) -> dict:
    import dagster as dg

    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "cluster" / "dagster.yaml", home / "dagster.yaml")
    with redis_server(home / "redis") as redis_url, postgres_server() as pg:
        env = _env(home, folder, redis_url, pg.env(), slots)
        os.environ.update(pg.env())
        instance = dg.DagsterInstance.from_config(str(home))
        instance.event_log_storage.set_concurrency_slots("gpu", workers)
        empty, _ = _db_size(pg)
        procs = [_worker(f"worker-{i}", env, home) for i in range(workers)]
        procs.append(_start([bin_of("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env,
                            home / "daemon.log"))
        try:
            result = _timed(instance, keys, timeout, home)
            size, events = _db_size(pg)
            return {**result, "db_bytes_per_shard": (size - empty) / len(keys), "events_per_shard": events / len(keys)}
        finally:
            _stop(procs)
            instance.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--slots", type=int, default=4, help="runs the sensor spreads the shards over")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    source = photo_dataset(f"pipeline-{args.shards}x{args.records}", args.shards, args.records)
    keys = {p.stem for p in source.glob("*.tar")}
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: Path(tmp) / name for name in ("cli", "embedded", "celery1", "celery2")}
        for d in dirs.values():
            shutil.copytree(source, d, ignore=shutil.ignore_patterns(".complete"))
        cli_wall = cli_pass(dirs["cli"])
        rows.append(("embedded: in-process, SQLite", embedded_pass(dirs["embedded"], Path(tmp) / "home0", keys,
                                                                  args.slots, args.timeout)))
        for n in (1, 2):
            result = celery_pass(dirs[f"celery{n}"], Path(tmp) / f"home{n}", keys, n, args.slots, args.timeout)
            rows.append((f"celery, {n} worker{'s' if n > 1 else ''}, Postgres", result))
        same = all(same_manifests(dirs["cli"], dirs[name], keys) for name in ("embedded", "celery1", "celery2"))
    images = args.shards * args.records
    print(f"machine: {machine()}")
    print(f"dataset: {args.shards} shards x {args.records} photos ({images} images), {args.slots} run slots")
    print(f"{'path':<40}{'runs':>5}{'wall s':>9}{'images/s':>10}{'orch s/shard':>14}")
    print(f"{'cli: index + validate + decode':<40}{'-':>5}{cli_wall:>9.2f}{images / cli_wall:>10.0f}{'-':>14}")
    for label, r in rows:
        print(f"{label:<40}{r['runs']:>5}{r['wall']:>9.2f}{images / r['wall']:>10.0f}"
              f"{(r['wall'] - cli_wall) / args.shards:>14.2f}")
    for label, r in rows:
        print(f"{label}: queued -> started {r['launch']:.1f} s a run" + (
            f"; instance {r['events_per_shard']:.0f} events, {r['db_bytes_per_shard'] / 1024:.0f} KiB a shard"
            if "events_per_shard" in r else ""))
    print(f"2 workers vs 1: {rows[1][1]['wall'] / rows[2][1]['wall']:.2f}x; "
          f"all runs succeeded: {all(r['all_success'] for _, r in rows)}; manifests identical: {same}")


if __name__ == "__main__":
    main()
