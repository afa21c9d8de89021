"""The same shards from local disk and from an S3 server (moto, on loopback), side by side:
``index``, ``validate`` and ``decode`` (the CLI verbs, one process each), wall time per step and
bytes read per step against the shards' size.

    python benchmarks/bench_remote.py                 # 4 shards x 500 photos
    python benchmarks/bench_remote.py --shards 2 --records 2000

moto serves every request from one Python process, so its latency is far lower than a real
store's and its bandwidth is that of one core: the ratio is an upper bound on what the store
path costs in CPU, not a forecast of S3. Bytes read are exact (what the verbs report in their
``--json`` rows: payload bytes returned by the store).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import bin_of, machine, photo_dataset  # noqa: E402

BUCKET = "bench"
STEPS = ("index", "validate", "decode")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([bin_of("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start")


def upload(folder: Path, endpoint: str, env: dict[str, str]) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    for tar in sorted(folder.glob("*.tar")):
        fs.put_file(str(tar), f"{BUCKET}/ds/{tar.name}")
    return f"s3://{BUCKET}/ds"


def run_steps(target: str, output: str, env: dict[str, str]) -> dict[str, tuple[float, int]]:
    """(wall seconds, bytes read) of each verb over ``target``."""
    exe = bin_of("curator-assets")
    out = {}
    for step in STEPS:
        extra = ["--output", output] if step == "decode" else []
        start = time.perf_counter()
        proc = subprocess.run([exe, step, target, *extra, "--json"], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{step} {target} failed:\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        out[step] = (seconds, sum(int(r.get("bytes_read") or 0) for r in rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--records", type=int, default=500)
    args = ap.parse_args()
    source = photo_dataset(f"remote-{args.shards}x{args.records}", args.shards, args.records)
    size = sum(p.stat().st_size for p in source.glob("*.tar"))
    print(machine())
    print(f"{args.shards} shards x {args.records} photos, {size / 1e6:.1f} MB of tars")
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        local = Path(tmp) / "local"
        shutil.copytree(source, local, ignore=shutil.ignore_patterns("*.idx", "_curator", ".complete"))
        moto, endpoint = start_moto(Path(tmp) / "moto.log")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_ENDPOINT_URL": endpoint, "CURATOR_ENDPOINT_URL": endpoint}
        try:
            url = upload(local, endpoint, env)
            local_figures = run_steps(str(local), str(Path(tmp) / "local-out"), env)
            remote_figures = run_steps(url, f"s3://{BUCKET}/out", env)
        finally:
            moto.terminate()
            moto.wait()
    print(f"{'step':<10}{'local s':>9}{'s3 s':>9}{'s3/local':>10}{'local read':>12}{'s3 read':>10}")
    for step in STEPS:
        (ls, lb), (rs, rb) = local_figures[step], remote_figures[step]
        print(f"{step:<10}{ls:>9.2f}{rs:>9.2f}{rs / ls:>9.2f}x{lb / size:>11.3f}x{rb / size:>9.3f}x")
    total_l = sum(v[0] for v in local_figures.values())
    total_r = sum(v[0] for v in remote_figures.values())
    print(f"{'all':<10}{total_l:>9.2f}{total_r:>9.2f}{total_r / total_l:>9.2f}x   (bytes read: x the tars' size)")


if __name__ == "__main__":
    main()
