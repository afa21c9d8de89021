"""The path users take against the core: the same shards through the CLI verbs and through the
shard sensor under a real ``dagster-daemon``, side by side in one run.

    python benchmarks/bench_pipeline.py                      # 8 shards x 500 photos
    python benchmarks/bench_pipeline.py --shards 4 --records 5000

* ``cli``: ``curator-assets index DIR``, ``validate DIR``, ``decode DIR`` (one process each),
  wall time of the three from the first start to the last exit.
* ``dagster``: a temporary ``DAGSTER_HOME`` with the repo's ``dagster.yaml``, the repo's
  ``workspace.yaml``, ``dagster-daemon run`` started first (sensor interval 1 s). Timed from the
  first run's launch (its creation in the instance) to the last run's end, and also from the
  daemon's start to the last run's end (what a user waits for).

Orchestration seconds per shard: (dagster wall - cli wall) / shards, i.e. what the daemon path
costs on top of the same work done by the core. Every manifest is compared with the CLI's.
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

from common import bin_of, machine, photo_dataset  # noqa: E402

PIPELINE = ("shard_index", "shard_validation", "decoded_images")


def cli_pass(folder: Path) -> float:
    exe = bin_of("curator-assets")
    start = time.perf_counter()
    for verb in (["index"], ["validate"], ["decode", "--output", str(folder / "_curator")]):
        proc = subprocess.run([exe, verb[0], str(folder), *verb[1:], "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cli {verb[0]} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _done(instance, keys: set[str]) -> bool:
    import dagster as dg

    finished = set(keys)
    for name in PIPELINE:
        finished &= instance.get_materialized_partitions(dg.AssetKey(name))
    return finished == keys


def dagster_pass(folder: Path, home: Path, keys: set[str], timeout: float) -> dict:
    import dagster as dg

    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATOR_DATASET_URL": str(folder),
           "CURATOR_SENSOR_INTERVAL": "1", "DAGSTER_DISABLE_TELEMETRY": "1"}
    log = open(home / "daemon.log", "wb")
    started = time.time()
    proc = subprocess.Popen([bin_of("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        os.environ["DAGSTER_HOME"] = str(home)
        with dg.DagsterInstance.get() as instance:
            _start_sensor_if_stopped(home, env)
            deadline = time.time() + timeout
            while time.time() < deadline and not (_done(instance, keys) and _all_runs_over(instance)):
                if proc.poll() is not None:
                    raise SystemExit("dagster-daemon exited:\n" + (home / "daemon.log").read_text()[-3000:])
                time.sleep(0.5)
            if not _done(instance, keys):
                raise SystemExit(f"not every shard completed in {timeout:.0f} s; see {home / 'daemon.log'}")
            records = instance.get_run_records()
            first = min(r.create_timestamp.timestamp() for r in records)
            last = max(r.end_time for r in records if r.end_time)
            ok = all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
            return {"runs": len(records), "wall": last - first, "from_daemon_start": last - started,
                    "all_success": ok}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _all_runs_over(instance) -> bool:
    return all(r.is_finished for r in instance.get_runs())


def _start_sensor_if_stopped(home: Path, env: dict) -> None:
    """Older definitions load the sensor stopped; the current ones start it by default."""
    subprocess.run([bin_of("dagster"), "sensor", "start", "shard_sensor", "-w", str(REPO / "workspace.yaml")],
                   cwd=REPO, env=env, capture_output=True)


def same_manifests(a: Path, b: Path, keys: set[str]) -> bool:
    import pyarrow.parquet as pq

    cols = ["record_id", "decoded", "width", "height", "sha256"]
    for key in keys:
        ta = pq.read_table(a / "_curator" / "manifests" / f"{key}.parquet", columns=cols)
        tb = pq.read_table(b / "_curator" / "manifests" / f"{key}.parquet", columns=cols)
        if not ta.equals(tb):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    source = photo_dataset(f"pipeline-{args.shards}x{args.records}", args.shards, args.records)
    keys = {p.stem for p in source.glob("*.tar")}
    images = args.shards * args.records
    with tempfile.TemporaryDirectory() as tmp:
        cli_dir, dg_dir = Path(tmp) / "cli", Path(tmp) / "dagster"
        for d in (cli_dir, dg_dir):
            shutil.copytree(source, d, ignore=shutil.ignore_patterns(".complete"))
        cli_wall = cli_pass(cli_dir)
        dg = dagster_pass(dg_dir, Path(tmp) / "home", keys, args.timeout)
        same = same_manifests(cli_dir, dg_dir, keys)
    print(f"machine: {machine()}")
    print(f"dataset: {args.shards} shards x {args.records} photos ({images} images)")
    print(f"{'path':<44}{'wall s':>9}{'images/s':>10}{'ratio':>8}")
    print(f"{'cli: index + validate + decode':<44}{cli_wall:>9.2f}{images / cli_wall:>10.0f}{1.0:>8.2f}")
    label = f"dagster: sensor + daemon ({dg['runs']} runs)"
    print(f"{label:<44}{dg['wall']:>9.2f}{images / dg['wall']:>10.0f}{cli_wall / dg['wall']:>8.2f}")
    print(f"{'  from the daemon start':<44}{dg['from_daemon_start']:>9.2f}{images / dg['from_daemon_start']:>10.0f}"
          f"{cli_wall / dg['from_daemon_start']:>8.2f}")
    print(f"orchestration s per shard: {(dg['wall'] - cli_wall) / args.shards:.2f}; "
          f"all runs succeeded: {dg['all_success']}; manifests identical: {same}")


if __name__ == "__main__":
    main()
