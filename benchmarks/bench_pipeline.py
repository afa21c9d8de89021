"""The path users take against the core: the same shards through the CLI verbs and through the
shard sensor under a real ``dagster-daemon``, side by side in one run.

    python benchmarks/bench_pipeline.py                      # 8 shards x 500 photos
    python benchmarks/bench_pipeline.py --shards 4 --records 5000

* ``cli``: ``curator-assets index DIR``, ``validate DIR``, ``decode DIR`` (one process each),
  wall time of the three from the first start to the last exit.
* ``dagster``: a temporary ``DAGSTER_HOME`` with the repo's ``dagster.yaml``, the repo's
  ``workspace.yaml``, ``dagster-daemon run`` started first (the sensor at its shipped 30 s interval,
  whose first tick comes as the daemon starts; ``CURATOR_SENSOR_INTERVAL`` to change it). Timed from the
  first run's launch (its creation in the instance) to the last run's end, and also from the
  daemon's start to the last run's end (what a user waits for).

* ``dagster (own)``: the same, with ``CURATOR_RUN_LAUNCHER=default``: the same ``dagster.yaml`` on
  Dagster's own run launcher (the code server starts each run) and SQLite storage, as on a Dagster
  version the instance accelerators were not tested on (``curator_assets/instance``).

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
from statistics import median

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common import CpuMeter, bin_of, machine, photo_dataset  # noqa: E402

PIPELINE = ("shard_index", "shard_validation", "decoded_images")


def cli_pass(folder: Path) -> float:
    exe = bin_of("curator-assets")
    start = time.perf_counter()
    for verb in (["index"], ["validate"], ["decode", "--output", str(folder / "_curator")]):
        proc = subprocess.run([exe, verb[0], str(folder), *verb[1:], "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cli {verb[0]} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def run_pass(folder: Path) -> float:
    """``curator-assets run DIR``: the embedded default (in-process Dagster, throw-away instance)."""
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    start = time.perf_counter()
    proc = subprocess.run([bin_of("curator-assets"), "run", str(folder), "--json"], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _done(instance, keys: set[str]) -> bool:
    import dagster as dg

    finished = set(keys)
    for name in PIPELINE:
        finished &= instance.get_materialized_partitions(dg.AssetKey(name))
    return finished == keys


def dagster_pass(folder: Path, home: Path, keys: set[str], timeout: float, own: bool = False) -> dict:
    """``own``: Dagster's own run launcher and storage (CURATOR_RUN_LAUNCHER=default)."""
    import dagster as dg

    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATOR_DATASET_URL": str(folder),
           "DAGSTER_DISABLE_TELEMETRY": "1"}  # the sensor at its shipped interval unless CURATOR_SENSOR_INTERVAL is set
    env.pop("CURATOR_RUN_LAUNCHER", None)
    if own:
        env["CURATOR_RUN_LAUNCHER"] = "default"
    os.environ["DAGSTER_HOME"] = str(home)
    dg.DagsterInstance.get().dispose()  # create the storage before two processes race to create it
    log = open(home / "daemon.log", "wb")
    started = time.time()
    proc = subprocess.Popen([bin_of("dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with dg.DagsterInstance.get() as instance:
            deadline = time.time() + timeout
            # Poll lightly (runs only, once a second): the instance is a sqlite file the daemon and
            # the runs write to, and a busy reader slows them down.
            while time.time() < deadline:
                if proc.poll() is not None:
                    raise SystemExit("dagster-daemon exited:\n" + (home / "daemon.log").read_text()[-3000:])
                time.sleep(1.0)
                if _all_runs_over(instance) and _done(instance, keys):
                    break
            if not _done(instance, keys):
                raise SystemExit(f"not every shard completed in {timeout:.0f} s; see {home / 'daemon.log'}")
            records = instance.get_run_records()
            first = min(r.create_timestamp.timestamp() for r in records)
            last = max(r.end_time for r in records if r.end_time)
            ok = all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
            return {"runs": len(records), "wall": last - first, "from_daemon_start": last - started,
                    "window": (first, last), "all_success": ok, "breakdown": breakdown(instance, records)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def breakdown(instance, records) -> list[str]:
    """Per run: queued -> started (daemon launch), started -> first step (process start and
    imports), each step's seconds, last step -> end."""
    lines = []
    for r in sorted(records, key=lambda r: r.create_timestamp):
        created = r.create_timestamp.timestamp()
        steps: dict[str, list[float]] = {}
        marks: dict[str, float] = {}
        compute: dict[str, float] = {}
        for entry in instance.all_logs(r.dagster_run.run_id):
            ev = entry.dagster_event
            if ev and ev.is_step_materialization:
                mat = ev.step_materialization_data.materialization
                secs = mat.metadata.get("seconds")
                if secs is not None:
                    name = mat.asset_key.path[-1]
                    compute[name] = compute.get(name, 0.0) + float(secs.value)
            if ev and ev.event_type_value in ("PIPELINE_ENQUEUED", "PIPELINE_DEQUEUED", "PIPELINE_STARTING",
                                              "PIPELINE_START"):
                marks.setdefault(ev.event_type_value.split("_")[1].lower(), entry.timestamp - created)
            if ev and ev.step_key and ev.event_type_value in ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE"):
                steps.setdefault(ev.step_key, []).append(entry.timestamp)
        first_step = min((t[0] for t in steps.values()), default=r.start_time or created)
        last_step = max((t[-1] for t in steps.values()), default=r.end_time or created)
        parts = ", ".join(f"{k} {t[-1] - t[0]:.2f} (core {compute.get(k, 0):.2f})" for k, t in steps.items())
        start = r.start_time or created
        queue = " ".join(f"{k} +{v:.1f}" for k, v in marks.items())
        lines.append(f"  run of {r.dagster_run.tags.get('curator/shards', '1')} shard(s): [{queue}], "
                     f"to first step {first_step - start:.2f} s, steps [{parts}], "
                     f"after last step {(r.end_time or last_step) - last_step:.2f} s")
    return lines


def _all_runs_over(instance) -> bool:
    runs = instance.get_runs()
    return bool(runs) and all(r.is_finished for r in runs)


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
    ap.add_argument("--keep", type=Path, help="work in this new folder and keep it (the instance, for a look after)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved passes of the three paths (medians reported)")
    ap.add_argument("--slots", type=int, default=0, help="CURATOR_RUN_SLOTS for the sensor (default: its own)")
    args = ap.parse_args()
    if args.slots:
        os.environ["CURATOR_RUN_SLOTS"] = str(args.slots)
    source = photo_dataset(f"pipeline-{args.shards}x{args.records}", args.shards, args.records)
    keys = {p.stem for p in source.glob("*.tar")}
    images = args.shards * args.records
    passes = [one_pass(source, keys, args, i) for i in range(args.repeat)]
    print(f"machine: {machine()}")
    print(f"dataset: {args.shards} shards x {args.records} photos ({images} images); "
          f"{args.repeat} interleaved pass(es) of each path, median")
    print(f"{'path':<44}{'wall s':>9}{'images/s':>10}{'ratio':>8}   each pass")
    cli_wall = median(p["cli"] for p in passes)
    for label, name in (("cli: index + validate + decode", "cli"), ("run: curator-assets run (embedded)", "run"),
                        (f"dagster: sensor + daemon, warm ({passes[-1]['runs']} run(s))", "dagster"),
                        ("  from the daemon start", "from_daemon_start"),
                        (f"dagster: sensor + daemon, own ({passes[-1]['own_runs']} run(s))", "own"),
                        ("  from the daemon start", "own_from_daemon_start")):
        wall = median(p[name] for p in passes)
        each = " / ".join(f"{p[name]:.2f}" for p in passes)
        print(f"{label:<44}{wall:>9.2f}{images / wall:>10.0f}{cli_wall / wall:>8.2f}   {each}")
    ratios = " / ".join(f"{p['cli'] / p['dagster']:.2f}" for p in passes)
    print(f"dagster (warm) vs cli in each pass (back to back): {ratios}")
    ratios = " / ".join(f"{p['cli'] / p['own']:.2f}" for p in passes)
    print(f"dagster (own launcher and storage) vs cli in each pass: {ratios}")
    for i, p in enumerate(passes):
        print(f"pass {i + 1}: {p['cpu']}")
        print("\n".join(p["breakdown"]))
    dg_wall = median(p["dagster"] for p in passes)
    print(f"orchestration s per shard: {(dg_wall - cli_wall) / args.shards:.2f}; "
          f"all runs succeeded: {all(p['all_success'] and p['own_success'] for p in passes)}; "
          f"manifests identical: {all(p['same'] for p in passes)}")


def one_pass(source: Path, keys: set[str], args, i: int) -> dict:
    """The three paths back to back on fresh copies of the dataset, with the cores' use of each."""
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch) / f"pass{i + 1}"
        cli_dir, run_dir, dg_dir, own_dir = tmp / "cli", tmp / "run", tmp / "dagster", tmp / "own"
        for d in (cli_dir, run_dir, dg_dir, own_dir):
            shutil.copytree(source, d, ignore=shutil.ignore_patterns(".complete"))
        with CpuMeter() as cpu:
            t0 = time.time()
            cli_wall = cli_pass(cli_dir)
            t1 = time.time()
            run_wall = run_pass(run_dir)
            t2 = time.time()
            dg = dagster_pass(dg_dir, tmp / "home", keys, args.timeout)
            own = dagster_pass(own_dir, tmp / "home-own", keys, args.timeout, own=True)
        same = all(same_manifests(cli_dir, d, keys) for d in (dg_dir, run_dir, own_dir))
    return {"cli": cli_wall, "run": run_wall, "dagster": dg["wall"], "from_daemon_start": dg["from_daemon_start"],
            "runs": dg["runs"], "all_success": dg["all_success"], "breakdown": dg["breakdown"] + own["breakdown"],
            "own": own["wall"], "own_from_daemon_start": own["from_daemon_start"], "own_runs": own["runs"],
            "own_success": own["all_success"], "same": same,
            "cpu": f"cli {cpu.line(t0, t1)}; run {cpu.line(t1, t2)}; dagster {cpu.line(*dg['window'])}; "
                   f"own {cpu.line(*own['window'])}"}

if __name__ == "__main__":
    main()
