"""Validation throughput vs a plain sequential read of the same shard.

One shard of 2,000 records (500x375 real-photo JPEGs with captions and JSON, ~70 MB) and its
fresh .idx, warm page cache. Side by side, interleaved so that machine load hits both alike:

- ``cat file > /dev/null``: the anchor, a whole process; timed both through ``sh -c`` and
  exec'd directly (the stricter anchor: no shell start-up), the target is judged on the latter;
- ``validate_shard``: everything `curator-assets validate` checks (tar headers, record IDs,
  the .idx byte for byte, every JPEG's markers and end-of-image marker, every JSON and caption),
  no full decode, in-process;
- the same without the .idx (the header chain is walked), the precise member-by-member pass
  alone, and turning a report into JSON, for reference.

    python benchmarks/bench_validate.py [--records 2000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from common import machine, photo_dataset

from curator_assets.steps.index import ensure_index
from curator_assets.steps.validate import validate_file, validate_shard
from curator_assets.store.dataset import Dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()

    folder = photo_dataset(f"photos-1x{args.records}", 1, args.records)
    dataset = Dataset(str(folder))
    key = dataset.list_shards().shards[0].key
    ensure_index(dataset, key)
    tar = dataset.shard_path(key)
    size = dataset.shard(key).size
    with open(tar, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass

    def cat_shell() -> None:
        subprocess.run(f"cat '{tar}' > /dev/null", shell=True, check=True)

    def cat_exec() -> None:
        subprocess.run(["cat", tar], stdout=subprocess.DEVNULL, check=True)

    def validate() -> None:
        report = validate_shard(dataset, key)
        assert report.ok and not report.problems and report.records == args.records, report.counts()

    def tar_alone() -> None:
        with open(tar, "rb") as f:
            report = validate_file(f)
        assert not report.problems and report.records == args.records

    report = validate_shard(dataset, key)

    def to_json() -> None:
        report.to_bytes()

    def precise() -> None:
        with open(tar, "rb") as f:
            validate_file(f, index_bytes=dataset.read_index_bytes(key), expect_index=True, fast=False)

    rows = (
        ("cat file > /dev/null (sh -c)", cat_shell),
        ("cat file, exec'd, no shell", cat_exec),
        ("validate_shard: all checks", validate),
        ("  the tar alone, no .idx", tar_alone),
        ("  precise pass alone", precise),
        ("report to JSON (separate)", to_json),
    )
    timings: dict[str, list[float]] = {label: [] for label, _ in rows}
    for _, fn in rows:  # one untimed round: imports, caches
        fn()
    for _ in range(args.repeat):
        for label, fn in rows:
            t = time.perf_counter()
            fn()
            timings[label].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in timings.items()}
    low = {k: min(v) for k, v in timings.items()}
    mb = size / 1e6
    anchor = rows[1][0]
    print(f"machine: {machine()}")
    print(f"shard:   {tar}: {args.records} records, {mb:.1f} MB, .idx fresh, warm cache, "
          f"median of {args.repeat} interleaved runs")
    print(f"{'':<34}{'median ms':>10}{'min ms':>9}{'MB/s':>8}{'records/s':>11}{'vs cat':>8}")
    for label, _ in rows:
        print(f"{label:<34}{med[label] * 1e3:>10.1f}{low[label] * 1e3:>9.1f}{mb / med[label]:>8.0f}"
              f"{args.records / med[label]:>11,.0f}{med[anchor] / med[label]:>7.2f}x")
    shell = med[rows[0][0]] / med[rows[2][0]]
    ratio = med[anchor] / med[rows[2][0]]
    print(f"validation throughput / sequential read throughput: {ratio:.2f}x against cat without a shell, "
          f"{shell:.2f}x against `cat file > /dev/null` in sh (target >= 0.5x: {'met' if ratio >= 0.5 else 'NOT met'})")

if __name__ == "__main__":
    main()
