"""Export throughput: `curator-assets export SRC --output DST` against `cat` over the same bytes.

Real-photo shards (500x375 JPEGs with captions and JSON), warm page cache, whole processes timed
(start-up included), passes interleaved, medians. Both sides write to the same disk and make their
output durable (`cat ... > out && sync out`; export fsyncs each shard before its rename).

Rows:
- `cat` of every input tar into one file, then `sync` of that file;
- export after the pipeline ran (each shard's .idx, validation report and decode manifest stored):
  what a user exporting a curated dataset pays: the indexes are read instead of a header scan,
  then the copy;
- export of a fresh dataset (no report, no manifest: it validates and decodes every image itself,
  on the CPU here), once;
- a rerun with nothing changed.
Peak RSS of each export process is printed beside its time.

    python benchmarks/bench_export.py [--shards 4] [--records 2000] [--repeat 5] [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bin_of, machine, photo_dataset


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one process. The peak is GNU time's (%M): the rusage a
    process forked from this one reports carries this process's own peak (Linux keeps the larger
    of the two across exec), which the dataset's generation makes large."""
    prefix = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    argv = prefix + (["sh", "-c", cmd] if shell else list(cmd))
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed: {done.stderr.decode()[-2000:]}")
    last = done.stderr.decode().strip().splitlines()[-1:] if prefix else []
    return seconds, (int(last[0]) / 1024 if last and last[0].isdigit() else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true", help="skip the export that validates and decodes itself")
    args = ap.parse_args()

    data = photo_dataset(f"photos-{args.shards}x{args.records}", args.shards, args.records)
    # Byte-compiled as an installed package is (PYTHONDONTWRITEBYTECODE, set in some environments,
    # would make every run compile the modules again).
    import compileall

    import curator_assets

    compileall.compile_dir(os.path.dirname(curator_assets.__file__), quiet=1)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    tars = sorted(data.glob("*.tar"))
    total = sum(t.stat().st_size for t in tars)
    cli = bin_of("curator-assets")
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=data.parent))
    try:
        fresh = work / "fresh"
        fresh.mkdir()
        for t in tars:  # the same bytes without the stored verdicts
            os.link(t, fresh / t.name)
        if not (data / "_curator" / "manifests").exists() or not (data / "00000.idx").exists():
            print("indexing, storing validation reports and decode manifests (once) ...", flush=True)
            subprocess.run([cli, "index", str(data)], check=True, stdout=subprocess.DEVNULL)
            subprocess.run([cli, "validate", str(data), "--write-report"], stdout=subprocess.DEVNULL)
            subprocess.run([cli, "decode", str(data)], check=True, stdout=subprocess.DEVNULL)
        for t in tars:
            t.read_bytes()
        cat_out = work / "cat.out"
        cat_cmd = f"cat {' '.join(str(t) for t in tars)} > {cat_out} && sync {cat_out}"
        cats, exports, rss = [], [], []
        for i in range(args.repeat):
            cats.append(timed(cat_cmd, shell=True)[0])
            cat_out.unlink()
            dst = work / f"dst{i}"
            seconds, peak = timed([cli, "export", str(data), "--output", str(dst), "--keep-duplicates"])
            exports.append(seconds)
            rss.append(peak)
            if i:
                shutil.rmtree(dst)
        rerun, rerun_rss = timed([cli, "export", str(data), "--output", str(work / "dst0"), "--keep-duplicates"])
        cold = cold_rss = float("nan")
        same = None
        if not args.no_cold:
            cold, cold_rss = timed([cli, "export", str(fresh), "--output", str(work / "cold"), "--keep-duplicates"])
            same = all(_same_file(work / "dst0" / n, work / "cold" / n)
                       for n in os.listdir(work / "cold") if n.endswith((".tar", ".idx")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, total, statistics.median(cats), statistics.median(exports), max(rss), rerun, rerun_rss, cold,
           cold_rss, same)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (compared in chunks: a shard may be gigabytes)."""
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


def report(args, total: int, cat_s: float, export_s: float, rss: float, rerun: float, rerun_rss: float,
           cold: float, cold_rss: float, same: bool | None) -> None:
    mb = total / 1e6
    print(f"# export: {args.shards} shards x {args.records} records, {mb:.0f} MB; {machine()}; "
          f"{time.strftime('%Y-%m-%d')}; median of {args.repeat}")
    print("| run | s | MB/s | vs cat (throughput) | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| `cat` + `sync` | {cat_s:.3f} | {mb / cat_s:.0f} | 1.00x | |")
    print(f"| export, verdicts stored | {export_s:.3f} | {mb / export_s:.0f} | {cat_s / export_s:.2f}x | {rss:.0f} |")
    print(f"| export, rerun, nothing changed | {rerun:.3f} | | | {rerun_rss:.0f} |")
    if same is not None:
        print(f"| export, validates + decodes itself (CPU) | {cold:.3f} | {mb / cold:.0f} | {cat_s / cold:.2f}x "
              f"| {cold_rss:.0f} |")
        print(f"identical output either way: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
