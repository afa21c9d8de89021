"""Index build: `curator-assets index DIR` (one process) vs DALI's `wds2idx` run on each tar.

4 shards x 2,000 records of 500x375 real-photo JPEGs with captions and JSON (~64 MB a shard),
warm page cache, median of 5 runs each, whole processes timed (start-up included). The two
outputs are compared byte for byte.

    python benchmarks/bench_index.py [--shards 4] [--records 2000] [--repeat 5] [--no-wheel]

Two rows for ours: the development (editable) install, and the package installed from its
wheel into a bare virtualenv, as users get it (no editable import hook at start-up; indexing
local shards needs nothing beyond the standard library).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import best_of, bin_of, machine, photo_dataset, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-wheel", action="store_true", help="skip the installed-wheel row")
    args = ap.parse_args()

    data = photo_dataset(f"photos-{args.shards}x{args.records}", args.shards, args.records)
    tars = sorted(data.glob("*.tar"))
    total_mb = sum(t.stat().st_size for t in tars) / 1e6
    for t in tars:  # warm the page cache
        t.read_bytes()
    # Byte-compile the package as an installed wheel would be (PYTHONDONTWRITEBYTECODE, set in
    # some environments, would otherwise make every run recompile our modules at start-up).
    import compileall

    import curator_assets

    compileall.compile_dir(str(Path(curator_assets.__file__).parent), quiet=1)
    ours_dir = Path(tempfile.mkdtemp(prefix="idx-ours-"))
    wds_dir = Path(tempfile.mkdtemp(prefix="idx-wds2idx-"))
    curator, wds2idx = bin_of("curator-assets"), bin_of("wds2idx")

    def ours() -> None:
        run([curator, "index", str(data), "--index-dir", str(ours_dir), "--force"])

    def theirs() -> None:
        for t in tars:
            run([wds2idx, str(t), str(wds_dir / (t.stem + ".idx"))])

    wheel_cli = None if args.no_wheel else installed_wheel_cli()
    wheel_dir = Path(tempfile.mkdtemp(prefix="idx-wheel-"))

    def ours_wheel() -> None:
        run([wheel_cli, "index", str(data), "--index-dir", str(wheel_dir), "--force"])

    ours_med, ours_min = best_of(ours, args.repeat)
    wds_med, wds_min = best_of(theirs, args.repeat)
    wheel_med, wheel_min = best_of(ours_wheel, args.repeat) if wheel_cli else (None, None)
    identical = all((ours_dir / (t.stem + ".idx")).read_bytes() == (wds_dir / (t.stem + ".idx")).read_bytes()
                    for t in tars)
    records = args.shards * args.records
    print(f"machine: {machine()}")
    print(f"dataset: {len(tars)} shards, {records} records, {total_mb:.0f} MB")
    print(f"{'tool':<34}{'median s':>10}{'min s':>10}{'records/s':>12}")
    print(f"{'curator-assets index DIR':<34}{ours_med:>10.3f}{ours_min:>10.3f}{records / ours_med:>12.0f}")
    if wheel_med:
        label = "  same, installed from the wheel"
        print(f"{label:<34}{wheel_med:>10.3f}{wheel_min:>10.3f}{records / wheel_med:>12.0f}")
    print(f"{'wds2idx per tar':<34}{wds_med:>10.3f}{wds_min:>10.3f}{records / wds_med:>12.0f}")
    print(f"speed-up (median): {wds_med / ours_med:.1f}x editable install"
          + (f", {wds_med / wheel_med:.1f}x installed wheel" if wheel_med else "")
          + f"   identical output: {identical}")
    shutil.rmtree(ours_dir)
    shutil.rmtree(wds_dir)
    shutil.rmtree(wheel_dir)


def installed_wheel_cli() -> str:
    """Build this project's wheel and install it, without dependencies, into a fresh venv."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    where = Path(tempfile.mkdtemp(prefix="curator-wheel-"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(where), str(root)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    wheel = next(where.glob("*.whl"))
    subprocess.run([str(where / "venv" / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(where / "venv" / "bin" / "curator-assets")


if __name__ == "__main__":
    main()
