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
    from curator_assets.cli.demo import photo_records, write_shard

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


class CpuMeter:
    """Samples the machine's CPU counters (``/proc/stat``) in a background thread, so that a
    benchmark can say how busy the cores were over any window of wall-clock time: work that
    waits (idle cores) and work that competes (busy cores) call for different fixes."""

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.samples: list[tuple[float, float, float]] = []  # (time, busy s, total s) summed over cores
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        total = sum(fields[:8])
        return time.time(), (total - idle) / self._tick, total / self._tick

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(self._interval)

    def busy(self, start: float, end: float) -> tuple[float, float]:
        """(busy core-seconds, core-seconds in all) between two ``time.time()`` instants."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0.0, 0.0
        return inside[-1][1] - inside[0][1], inside[-1][2] - inside[0][2]

    def line(self, start: float, end: float) -> str:
        busy, total = self.busy(start, end)
        return f"cores busy {busy:.1f} of {total:.1f} core-s ({100 * busy / total:.0f}%)" if total else "cores: n/a"
