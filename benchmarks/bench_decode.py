"""Decode throughput and memory, side by side in one run.

    python benchmarks/bench_decode.py             # throughput on a 2,000-record shard of 500x375 photos
    python benchmarks/bench_decode.py --memory    # + peak RSS while decoding a ~2 GB shard (builds it once)

Contenders, all on the same shard (real-photo JPEGs, quality 75-95, with captions and JSON):

* ``ours``: :func:`curator_assets.decode.decode_shard` (index -> stream reader -> DALI CPU/GPU
  decoder -> Parquet manifest), and :func:`iter_batches` (the same, pixels handed to Python);
  also with DALI's own webdataset reader (``reader="dali"``) and through a non-local fsspec
  store (``memory://``), which takes the ranged-read path that object stores use.
* ``limit``: libjpeg-turbo (simplejpeg) decoding the same JPEG bytes, already in memory, in a
  thread pool on every core. Nothing that also reads the tar can beat it by much.
* ``NeMo Curator's configuration``: one DALI pipeline per shard with ``fn.readers.webdataset``,
  ``ext=["jpg"]``, no index, the CPU decoder, batch 100, 8 threads, each image copied to host.
  (NeMo passes ``device_id=0``, which cannot build on a machine without CUDA; ``device_id=None``
  is the only way its configuration runs here.) Pipeline build is timed, as NeMo builds one per task.
* ``webdataset + Pillow``: the webdataset library reading the tar, Pillow decoding, one process.
* ``containment off`` / ``containment on``: :func:`decode_shard` through one decoder built before
  the timed runs, DALI in this process or in supervised worker processes
  (:mod:`curator_assets.steps.decode.worker`): the steady-state cost of crash containment on a clean
  shard. The one-off cost of starting the workers is printed beside the table. The other
  ``ours`` rows build their decoder in each timed run, in process (as before containment).

    python benchmarks/bench_decode.py --only containment --repeat 7   # just that pair

Each contender runs in a process of its own (same malloc settings for all; see ``worker``),
``--repeat`` times, interleaved; the table shows the median and best images/s, and ratios of
medians. Cached shards live under ``benchmarks/data/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE.parent))


# ---------------------------------------------------------------------------------------------
# Data


def photo_shard(records: int = 2000, size: tuple[int, int] = (500, 375)) -> Path:
    """The cached benchmark shard (built once), with its .idx."""
    from curator_assets.cli.demo import photo_records, write_shard
    from curator_assets.steps.index import ensure_index
    from curator_assets.store.dataset import Dataset

    folder = DATA / f"photos-{records}-{size[0]}x{size[1]}"
    path = folder / "00000.tar"
    if not path.exists():
        print(f"building {path} ({records} records) ...", flush=True)
        write_shard(path, list(photo_records(records, size=size, quality=(75, 95))))
    ensure_index(Dataset(str(folder)), "00000")
    return path


def big_shard(target_bytes: int = 2 << 30) -> Path:
    """A ~2 GB shard: 2,000 distinct photos repeated under new keys (decoding cost is per image,
    so repeats measure memory just as well; building 60,000 distinct crops takes many minutes)."""
    from curator_assets.cli.demo import photo_records
    from curator_assets.steps.index import ensure_index
    from curator_assets.store.dataset import Dataset

    folder = DATA / "big-2g"
    path = folder / "00000.tar"
    if not path.exists():
        print(f"building {path} (~{target_bytes >> 20} MiB) ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        base = list(photo_records(2000, size=(500, 375), quality=(75, 95), seed=11))
        tmp = path.with_name(".00000.tar.tmp")
        written = 0
        n = 0
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            while written < target_bytes:
                rec = base[n % len(base)]
                key = f"{n:09d}"
                for ext, data in (("jpg", rec.jpg), ("txt", rec.caption.encode()),
                                  ("json", json.dumps({"key": key, **rec.metadata}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 1_700_000_000
                    import io

                    tar.addfile(info, io.BytesIO(data))
                    written += 512 + (len(data) + 511) // 512 * 512
                n += 1
        os.replace(tmp, path)
    ensure_index(Dataset(str(folder)), "00000")
    return path


def jpeg_bytes(path: Path) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.lower().endswith(".jpg")]


# ---------------------------------------------------------------------------------------------
# Contenders: each returns the number of images it decoded


def run_limit(jpegs: list[bytes], threads: int, fastdct: bool = False) -> int:
    import simplejpeg

    def one(data: bytes):
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fastdct)

    with ThreadPoolExecutor(threads) as pool:
        return sum(1 for _ in pool.map(one, jpegs, chunksize=8))


def run_dali_alone(jpegs: list[bytes], threads: int, batch_size: int = 64, pipelines: int = 2) -> int:
    """DALI's CPU decoder on the same bytes, already in memory, laid out as ours is (two
    pipelines side by side, each a batch at a time): what the decoder itself costs."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.tensors import TensorListCPU

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in jpegs]
    batches = [arrays[i : i + batch_size] for i in range(0, len(arrays), batch_size)]

    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads // pipelines), device_id=None,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(name="encoded", no_copy=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipes = [pipeline() for _ in range(pipelines)]
    for pipe in pipes:
        pipe.build()

    def work(k: int) -> int:
        n = 0
        for batch in batches[k::pipelines]:
            pipes[k].feed_input("encoded", TensorListCPU(batch, ""))
            (out,) = pipes[k].run()
            n += len(out)
        return n

    with ThreadPoolExecutor(pipelines) as pool:
        return sum(pool.map(work, range(pipelines)))


def run_ours(path: Path, output: str, batch_size: int | None, reader: str = "auto", device: str = "auto",
             url: str | None = None, fast_idct: bool = False) -> int:
    from curator_assets.decode import DecodeOptions, decode_shard
    from curator_assets.store.dataset import Dataset

    ds = Dataset(url or str(path.parent), output_url=output)
    options = DecodeOptions(batch_size=batch_size, reader=reader, device=device, fast_idct=fast_idct,
                            contain_crashes=False)
    result, _ = decode_shard(ds, "00000", options)
    assert result.failed == 0 and result.decoded == result.records, result.as_dict()
    return result.decoded


def run_contained(path: Path, output: str, batch_size: int | None, device: str, contain: bool):
    """decode_shard through one decoder (built now, outside the timed runs), contained or not."""
    from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard
    from curator_assets.store.dataset import Dataset

    t = time.perf_counter()
    decoder = ShardDecoder(DecodeOptions(batch_size=batch_size, device=device, contain_crashes=contain))
    print(f"startup {time.perf_counter() - t:.2f}", file=sys.stderr, flush=True)
    ds = Dataset(str(path.parent), output_url=output)

    def run() -> int:
        result, _ = decode_shard(ds, "00000", decoder=decoder)
        assert result.failed == 0 and result.decoded == result.records, result.as_dict()
        return result.decoded

    return run


def run_ours_iter(path: Path, batch_size: int | None, device: str = "auto") -> int:
    from curator_assets.decode import iter_batches

    n = 0
    for batch in iter_batches([str(path)], batch_size=batch_size, device=device):
        n += len(batch.image_list)
    return n


def run_nemo(path: Path, batch_size: int = 100, threads: int = 8) -> int:
    """NeMo Curator's ImageReaderStage configuration, on the CPU."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None)
    def pipeline():
        raw = fn.readers.webdataset(paths=[str(path)], ext=["jpg"], missing_component_behavior="skip")
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    pipe = pipeline()
    pipe.build()
    total = int(next(iter(pipe.epoch_size().values())))
    done = 0
    images = []
    while done < total:
        (out,) = pipe.run()
        out = out.as_cpu()
        take = min(len(out), total - done)
        for i in range(take):
            item = out.at(i)
            images.append(item if isinstance(item, np.ndarray) else np.asarray(item))
        done += take
        images.clear()  # NeMo keeps them in its task; dropping them keeps memory out of the timing
    return done


def run_wds_pillow(path: Path) -> int:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("rgb8"):
        if "jpg" in sample:
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Memory


def peak_rss_child(code: str) -> tuple[float, str]:
    """Peak RSS (MiB) of a fresh Python process running ``code``; and its last output line."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(HERE.parent))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    data = json.loads(lines[-1])
    return data["peak_rss_mib"], data


MEMORY_CODE = """
import json, sys, time
sys.path.insert(0, {root!r})
from curator_assets.decode import DecodeOptions, decode_shard, iter_batches
from curator_assets.store.dataset import Dataset
mode = {mode!r}
t = time.perf_counter()
if mode == "manifest":
    r, _ = decode_shard(Dataset({folder!r}, output_url={out!r}), "00000", DecodeOptions(batch_size={bs!r}))
    n = r.decoded
    assert r.decoded == r.records, r.as_dict()
elif mode == "iter":
    n = 0
    for b in iter_batches([{tar!r}], batch_size={bs!r}):
        n += len(b.image_list)
else:
    import nvidia.dali, pyarrow, numpy
    n = 0
dt = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"peak_rss_mib": hwm / 1024, "images": n, "seconds": dt}}))
"""


def memory_mode(batch_size: int | None) -> None:
    path = big_shard()
    size = path.stat().st_size
    print(f"\nmemory: {path} ({size / (1 << 30):.2f} GiB)")
    with tempfile.TemporaryDirectory() as out:
        for mode in ("baseline", "manifest", "iter"):
            code = MEMORY_CODE.format(root=str(HERE.parent), mode=mode, folder=str(path.parent), out=out,
                                      tar=str(path), bs=batch_size)
            peak, data = peak_rss_child(code)
            what = {"baseline": "imports only (DALI, numpy, pyarrow)", "manifest": "decode_shard -> manifest",
                    "iter": "iter_batches (pixels to Python)"}[mode]
            rate = f"{data['images'] / data['seconds']:.0f} images/s" if data["images"] else ""
            verdict = "" if mode == "baseline" else ("  OK (<= 1024 MiB)" if peak <= 1024 else "  OVER 1024 MiB")
            print(f"  {what:40s} peak RSS {peak:7.0f} MiB  {data['images']:6d} images  {rate}{verdict}")


# ---------------------------------------------------------------------------------------------


# Every contender runs in a process of its own, all alive at once and driven in turn (one timed run
# each per round). Sharing one process skews the figures: measured here, NeMo's configuration ran
# at ~1,950 images/s right after our decoder had run in the same process and ~2,800 on its own,
# and the simplejpeg limit moved between ~3,400 and ~3,700 with the state of malloc. So each
# process also gets the same malloc settings: large buffers (decoded images) reuse the heap
# instead of a fresh mmap per image, which is the fastest case for every contender.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def contenders(args, cores: int, tmp: str) -> dict:
    """Name -> a zero-argument callable that decodes the shard once and returns the image count."""
    bs = args.batch_size
    path = photo_shard(args.records)
    jpegs = jpeg_bytes(path)
    found = {
        "limit: simplejpeg, thread pool": lambda: run_limit(jpegs, cores),
        "DALI CPU decoder alone, 2 pipelines": lambda: run_dali_alone(jpegs, cores),
        "ours: decode_shard (manifest)": lambda: run_ours(path, tmp, bs, device=args.device),
        "ours: iter_batches (pixels)": lambda: run_ours_iter(path, bs, device=args.device),
        "ours: DALI webdataset reader": lambda: run_ours(path, tmp, bs, reader="dali", device=args.device),
        "ours: fsspec ranged reads": lambda: run_ours(path, tmp, bs, device=args.device, url="memory://bench"),
        "NeMo Curator's configuration": lambda: run_nemo(path),
        # The same pair with libjpeg-turbo's fast IDCT on both sides (ours: --fast-idct).
        "limit, fast IDCT": lambda: run_limit(jpegs, cores, fastdct=True),
        "ours: decode_shard, fast IDCT": lambda: run_ours(path, tmp, bs, device=args.device, fast_idct=True),
    }
    if not args.quick:
        found["webdataset + Pillow"] = lambda: run_wds_pillow(path)
    for name, contain in (("ours: containment off", False), ("ours: containment on", True)):
        found[name] = _lazy(lambda c=contain: run_contained(path, tmp, bs, args.device, c))
    if args.only:
        keep = {"limit: simplejpeg, thread pool", "NeMo Curator's configuration", "ours: decode_shard (manifest)",
                "DALI CPU decoder alone, 2 pipelines"}
        found = {k: v for k, v in found.items() if args.only in k or k in keep}
    return found


def _lazy(make):
    """A contender whose setup (a decoder to build) happens on its first call, in its worker."""
    state: list = []

    def run() -> int:
        if not state:
            state.append(make())
        return state[0]()

    return run


def cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (the decoder workers of
    containment), from /proc: the CPU column counts every process that decodes."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return total
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids = f.read().split()
            for pid in kids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            continue
    return total


def worker(args, name: str) -> int:
    """One contender: warm up once, then one timed run per line read from stdin."""
    from curator_assets.steps.decode.options import available_cores

    with tempfile.TemporaryDirectory() as tmp:
        if name == "ours: fsspec ranged reads":
            import fsspec

            path = photo_shard(args.records)
            mem = fsspec.filesystem("memory")
            mem.pipe("/bench/00000.tar", path.read_bytes())
            mem.pipe("/bench/00000.idx", path.with_suffix(".idx").read_bytes())
        run = contenders(args, available_cores(), tmp)[name]
        run()
        print("ready", flush=True)
        for _ in sys.stdin:
            c = cpu_seconds()
            t = time.perf_counter()
            n = run()
            print(json.dumps([n, time.perf_counter() - t, cpu_seconds() - c]), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="our batch size (default: the library's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS on a ~2 GB shard")
    parser.add_argument("--quick", action="store_true", help="skip the slow webdataset + Pillow baseline")
    parser.add_argument("--only", metavar="TEXT", help="only the contenders whose name has TEXT (and the baselines)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args, args.worker)

    from curator_assets.decode import DecodeOptions
    from curator_assets.steps.decode.options import available_cores, resolve_device

    bs = args.batch_size
    cores = available_cores()
    device = resolve_device(args.device)
    path = photo_shard(args.records)
    jpegs = jpeg_bytes(path)
    print(f"shard: {path} ({path.stat().st_size / 1e6:.1f} MB, {len(jpegs)} JPEGs, "
          f"mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB)")
    print(f"machine: {cores} cores; decode device: {device.name} ({device.reason}); "
          f"our batch size {DecodeOptions(batch_size=bs).for_device(device).batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        names = list(contenders(args, cores, tmp))
    passthrough = [f"--records={args.records}", f"--device={args.device}"] + (["--quick"] if args.quick else [])
    passthrough += [f"--only={args.only}"] if args.only else []
    if bs:
        passthrough.append(f"--batch-size={bs}")
    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
    procs = {}
    try:
        for name in names:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *passthrough], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs[name] = proc
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit(f"{name}: the worker did not start (exit {proc.wait()})")
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name, proc in procs.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                n, seconds, cpu_seconds = json.loads(proc.stdout.readline())
                if n != len(jpegs):
                    raise SystemExit(f"{name}: decoded {n} of {len(jpegs)} images")
                times[name].append(n / seconds)
                cpu[name].append(cpu_seconds / n * 1e6)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()

    med = {k: statistics.median(v) for k, v in times.items()}
    limit = med["limit: simplejpeg, thread pool"]
    nemo = med["NeMo Curator's configuration"]
    print(f"\n{'images/s':36s} {'median':>9s} {'best':>9s}  {'x limit':>8s} {'x NeMo':>8s}  {'CPU us/image':>12s}"
          f"   ({args.repeat} runs, one process each)")
    for name, rates in times.items():
        print(f"{name:36s} {med[name]:9.0f} {max(rates):9.0f}  {med[name] / limit:8.2f} {med[name] / nemo:8.2f}"
              f"  {statistics.median(cpu[name]):12.0f}")
    ours = med["ours: decode_shard (manifest)"]
    print(f"\ntargets: ours >= 0.9x limit: {ours / limit:.2f}x {'OK' if ours >= 0.9 * limit else 'MISSED'}; "
          f"ours >= 1.5x NeMo: {ours / nemo:.2f}x {'OK' if ours >= 1.5 * nemo else 'MISSED'}")
    print(f"ceilings: DALI's decoder alone {med['DALI CPU decoder alone, 2 pipelines'] / limit:.2f}x the limit; "
          f"the limit itself {limit / nemo:.2f}x NeMo's configuration")
    if "limit, fast IDCT" in med:
        fast, fast_limit = med["ours: decode_shard, fast IDCT"], med["limit, fast IDCT"]
        print(f"with fast IDCT on both sides: ours {fast / fast_limit:.2f}x its limit, {fast / nemo:.2f}x NeMo's "
              f"configuration; ours fast vs the accurate limit {fast / limit:.2f}x")
    on, off = med["ours: containment on"], med["ours: containment off"]
    print(f"crash containment on a clean shard: {on:.0f} vs {off:.0f} images/s, cost {(1 - on / off) * 100:+.1f}% "
          f"(target: under 5%) {'OK' if on >= 0.95 * off else 'MISSED'}")

    if args.memory:
        memory_mode(bs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
