"""Shard sensor at scale: 10,000 local shards (empty tars), a real sqlite-backed Dagster instance.

Times (1) the first tick, which lists everything, adds 10,000 partitions in one request and
asks for 10,000 runs; (2) a tick with nothing new; (3) a tick after 10 new shards arrive.
"Apply" is what the daemon does with the result (adding the partitions to the instance).

    python benchmarks/bench_sensor.py [--shards 10000]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import dagster as dg
from common import machine

from curator_assets.defs.resources import ShardStorage
from curator_assets.defs.sensors import shard_sensor


def make_empty_shards(root: Path, n: int, start: int = 0) -> None:
    empty = root / "_empty.tar.src"
    if not empty.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(empty, "w"):
            pass
    blob = empty.read_bytes()
    for i in range(start, start + n):
        folder = root / f"part-{i // 1000:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:06d}.tar").write_bytes(blob)


def tick(instance, storage, cursor):
    t0 = time.perf_counter()
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    result = shard_sensor(ctx)
    t1 = time.perf_counter()
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    t2 = time.perf_counter()
    return result, t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dataset"
        make_empty_shards(root, args.shards)
        storage = ShardStorage(dataset_url=str(root))
        (Path(tmp) / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "home")) as instance:
            first, eval1, apply1 = tick(instance, storage, None)
            second, eval2, apply2 = tick(instance, storage, first.cursor)
            make_empty_shards(root, 10, start=args.shards)
            third, eval3, apply3 = tick(instance, storage, first.cursor)
            n_parts = len(instance.get_dynamic_partitions("shards"))
    print(f"machine: {machine()}")
    print(f"{'tick':<28}{'evaluate s':>12}{'apply s':>10}{'runs':>8}{'target':>10}")
    print(f"{'first (10,000 new)':<28}{eval1:>12.2f}{apply1:>10.2f}{len(first.run_requests):>8}{'< 30 s':>10}")
    print(f"{'nothing new':<28}{eval2:>12.2f}{apply2:>10.2f}{len(second.run_requests or []):>8}{'< 3 s':>10}")
    print(f"{'10 new shards':<28}{eval3:>12.2f}{apply3:>10.2f}{len(third.run_requests):>8}{'':>10}")
    print(f"partitions in the instance: {n_parts}; cursor size {len(first.cursor) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
