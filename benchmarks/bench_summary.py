"""The dataset decode summary over many shards' manifests: time and peak memory.

Writes ``--shards`` small synthetic manifests (``--records`` rows each, with captions and JSON
like real ones) with the project's manifest writer into a temp folder, a few images repeated
across shards, then times :func:`summarize_decode` (column-projected reads) and the two pictures,
and reports the peak RSS of the process (``ru_maxrss``) before and after.

    python benchmarks/bench_summary.py [--shards 10000] [--records 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import tempfile
import time

from common import machine

from curator_assets.formats.manifest import ManifestRow, manifest_table, write_manifest
from curator_assets.steps.summary import failures_picture, size_picture, summarize_decode
from curator_assets.store.dataset import Dataset


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_manifests(dataset: Dataset, shards: int, records: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    keys = []
    for s in range(shards):
        key = f"{s:05d}"
        rows = []
        for i in range(records):
            dup = s > 0 and i == 0 and s % 100 == 0  # one image of every 100th shard repeats shard 0's
            sha = hashlib.sha256(b"00000-0" if dup else f"{key}-{i}".encode()).hexdigest()
            ok = rng.random() > 0.01
            w, h = rng.choice([(500, 375), (640, 480), (1024, 768), (375, 500), (800, 800)])
            rows.append(ManifestRow(i, f"{key}-{i:06d}", key, f"{key}-{i:06d}.jpg", 1024 + 512 * i, 40_000,
                                    w if ok else None, h if ok else None, 3 if ok else None, ok,
                                    None if ok else "decode_failed: synthetic",
                                    caption="a caption of about sixty characters, like the demo data",
                                    metadata=json.dumps({"url": f"https://example.com/{key}/{i}.jpg"}),
                                    sha256=sha, format="jpeg", source_channels=3, extensions=["jpg", "txt"]))
        write_manifest(dataset, key, manifest_table(rows, {"device": "gpu", "seconds": 0.25,
                                                           "created": "2026-12-01T00:00:00Z"}))
        keys.append(key)
    return keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Dataset(tmp, output_url=os.path.join(tmp, "out"))
        t = time.perf_counter()
        keys = write_manifests(dataset, args.shards, args.records)
        wrote = time.perf_counter() - t
        folder = os.path.join(tmp, "out", "manifests")
        size = sum(e.stat().st_size for e in os.scandir(folder))
        before = _rss_mib()
        t = time.perf_counter()
        summary = summarize_decode(dataset, keys)
        took = time.perf_counter() - t
        t = time.perf_counter()
        pictures = len(size_picture(summary)) + len(failures_picture(summary))
        drew = time.perf_counter() - t
        after = _rss_mib()
    print(machine())
    print(f"{args.shards} manifests x {args.records} records ({size / 2**20:.0f} MiB on disk, "
          f"written in {wrote:.0f} s)")
    print(f"summarize_decode: {took:.1f} s ({args.shards / took:,.0f} manifests/s, "
          f"{summary.records / took:,.0f} records/s); pictures: {drew:.2f} s, {pictures / 1024:.0f} KiB")
    print(f"records {summary.records}, decoded {summary.decoded}, failed {summary.failed}, "
          f"duplicates {summary.duplicate_images} ({summary.duplicate_records} records)")
    print(f"peak RSS: {before:.0f} MiB before the summary, {after:.0f} MiB after")


if __name__ == "__main__":
    main()
