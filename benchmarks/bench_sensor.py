"""Shard sensor at scale: 100,000 shards (empty tars) on local disk and on S3 through a
``moto_server`` on loopback, a real sqlite-backed Dagster instance.

Times (1) the first tick, which lists everything, adds every partition in one request and asks
for the runs (several shards per run); (2) a tick with nothing new; (3) a tick after 10 new
shards arrive. "Apply" is what the daemon does with the result (adding the partitions).
On S3 the store's requests per tick are counted from the server's request log: one listing
(paginated, 1,000 keys a page), never a request per object.

    python benchmarks/bench_sensor.py [--shards 100000] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
from common import bin_of, machine

from curator_assets.defs.resources import ShardStorage
from curator_assets.defs.sensors import shard_sensor


def empty_tar(root: Path) -> bytes:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "_empty.tar.src"
    with tarfile.open(path, "w"):
        pass
    return path.read_bytes()


def shard_names(n: int, start: int = 0) -> list[str]:
    return [f"part-{i // 1000:03d}/{i:06d}.tar" for i in range(start, start + n)]


def make_local(root: Path, names: list[str], blob: bytes) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)


def tick(instance, storage, cursor):
    t0 = time.perf_counter()
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    result = shard_sensor(ctx)
    t1 = time.perf_counter()
    if isinstance(result, dg.SkipReason):
        raise SystemExit(f"the tick skipped: {result.skip_message}")
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    t2 = time.perf_counter()
    return result, t1 - t0, t2 - t1


class Moto:
    def __init__(self, tmp: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = tmp / "moto.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([bin_of("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("moto_server did not start")

    def requests(self) -> int:
        self.log.flush()
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if '" 20' in line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def upload(endpoint: str, bucket: str, names: list[str], blob: bytes) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    if not names or names[0].endswith("000000.tar"):
        client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=bucket, Key=f"ds/{n}", Body=blob), names))


def scenario(label: str, storage: ShardStorage, grow, n: int, tmp: Path, count=None) -> list[tuple]:
    home = tmp / f"home-{label}"
    home.mkdir()
    rows = []
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        before = count() if count else 0
        first, e1, a1 = tick(instance, storage, None)
        mid = count() if count else 0
        second, e2, a2 = tick(instance, storage, first.cursor)
        after2 = count() if count else 0
        grow()
        mid3 = count() if count else 0
        third, e3, a3 = tick(instance, storage, first.cursor)
        after3 = count() if count else 0
        parts = len(instance.get_dynamic_partitions("shards"))
    reqs = [mid - before, after2 - mid, after3 - mid3] if count else ["-"] * 3
    rows.append((f"{label}: first ({n:,} new)", e1, a1, len(first.run_requests), reqs[0]))
    rows.append((f"{label}: nothing new", e2, a2, len(second.run_requests or []), reqs[1]))
    rows.append((f"{label}: 10 new shards", e3, a3, len(third.run_requests), reqs[2]))
    return rows, parts, len(first.cursor)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--s3-shards", type=int, default=0, help="shards on S3 (default: --shards)")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("CURATOR_RUN_SLOTS", "2")
    out = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        blob = empty_tar(tmp)
        root = tmp / "dataset"
        make_local(root, shard_names(args.shards), blob)
        rows, parts, cursor = scenario("local", ShardStorage(dataset_url=str(root)),
                                       lambda: make_local(root, shard_names(10, args.shards), blob), args.shards, tmp)
        out.append((rows, parts, cursor))
        if not args.no_s3:
            moto = Moto(tmp)
            n3 = args.s3_shards or args.shards
            try:
                t = time.perf_counter()
                upload(moto.endpoint, "bench", shard_names(n3), blob)
                print(f"(uploaded {n3:,} objects to moto in {time.perf_counter() - t:.0f} s)")
                storage = ShardStorage(dataset_url="s3://bench/ds", endpoint_url=moto.endpoint,
                                       aws_access_key_id="bench", aws_secret_access_key="bench")
                rows, parts, cursor = scenario(
                    "s3 (moto)", storage,
                    lambda: upload(moto.endpoint, "bench", shard_names(10, n3), blob),
                    n3, tmp, count=moto.requests)
                out.append((rows, parts, cursor))
            finally:
                moto.stop()
    print(f"machine: {machine()}")
    print(f"{'tick':<34}{'evaluate s':>12}{'apply s':>10}{'runs':>8}{'store requests':>16}")
    for rows, parts, cursor in out:
        for label, ev, ap_, runs, reqs in rows:
            print(f"{label:<34}{ev:>12.2f}{ap_:>10.2f}{runs:>8}{reqs!s:>16}")
        print(f"  partitions: {parts:,}; cursor {cursor / 1024:.0f} KiB")
    print("Dagster's sensor timeout: 60 s per tick")


if __name__ == "__main__":
    main()
