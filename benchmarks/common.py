"""Shared helpers for the benchmarks: cached real-photo datasets and timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def photo_dataset(name: str, shards: int, records: int, size=(500, 375), quality=(75, 95)) -> Path:
    """A folder of ``shards`` shards of ``records`` real-photo records each, built once and cached."""
    from curator_assets.demo import photo_records, write_shard

    folder = DATA / name
    marker = folder / ".complete"
    spec = json.dumps({"shards": shards, "records": records, "size": size, "quality": quality})
    if marker.exists() and marker.read_text() == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        recs = list(photo_records(records, seed=100 + s, size=size, quality=quality, start=s * records))
        write_shard(folder / f"{s:05d}.tar", recs)
    marker.write_text(spec)
    return folder


def best_of(fn: Callable[[], object], repeat: int = 5) -> tuple[float, float]:
    """(median, min) wall seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def bin_of(name: str) -> str:
    """A console script of the running interpreter's environment."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name
