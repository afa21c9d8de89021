"""Crash containment: a decoder that dies on an image fails that record, never the caller.

Real failures, nothing in the package switched on for tests: the test sends the decoder worker
that holds a chosen record a real SIGSEGV (a crash), SIGSTOP (a worker that never answers: a
hang) or SIGKILL, and checks the restarts, exactly which records were replayed one at a time and
every record's row. The demo's damaged shard (two 512-byte blocks swapped between two JPEGs)
kills DALI's CPU decoder when it decodes in the caller's process; contained, every run of it
completes with the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from curator_assets import cli
from curator_assets.cli.demo import build_demo, write_shard
from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard, iter_batches
from curator_assets.formats.manifest import read_manifest
from curator_assets.steps.decode.worker import SHM_DIR, ContainedDecoder, crash_reason, hang_reason
from curator_assets.store.dataset import Dataset

ROOT = Path(__file__).resolve().parent.parent
BAD = 5  # the record whose worker the test stops or kills
CONTAINED = DecodeOptions(device="cpu", batch_size=4, pipelines=2, contain_crashes=True)
SIGSEGV = f"decoder crashed (signal {int(signal.SIGSEGV)}): SIGSEGV"


@dataclasses.dataclass
class Sends:
    """What the caller sent its decoder workers: the record positions of each call, in order."""

    calls: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    hits: int = 0  # how many times the worker was signalled
    pids: list[int] = dataclasses.field(default_factory=list)  # the worker of each call

    def alone_after(self, n: int) -> list[int]:
        """The records sent one at a time, from call ``n`` on."""
        return [c[0] for c in self.calls[n:] if len(c) == 1]


@pytest.fixture
def dataset(tmp_path: Path, photos) -> Path:
    """Two shards of 12 ordinary records."""
    write_shard(tmp_path / "ds" / "00000.tar", list(photos[:12]))
    write_shard(tmp_path / "ds" / "00001.tar", list(photos[12:24]))
    return tmp_path / "ds"


@pytest.fixture
def signal_on(monkeypatch, photos) -> Iterator:
    """signal_on(signum, times) -> Sends: from then on, each time a decoder worker is handed the
    batch that holds record BAD of shard 00000 (at most ``times`` times), the test sends that
    worker process ``signum`` (from this process, as an operator or the kernel would), then lets
    the call go on."""
    positions = {p.jpg: n for n, p in enumerate(photos[:12])}
    run = ContainedDecoder.run

    def arm(signum: int, times: int = 1000) -> Sends:
        sends = Sends()

        def spied(self, arrays, keep_pixels=None):
            if self.pid is None:
                self.build()
            sent = tuple(positions.get(bytes(a), -1) for a in arrays)
            sends.calls.append(sent)
            sends.pids.append(self.pid)
            if BAD in sent and sends.hits < times:
                sends.hits += 1
                os.kill(self.pid, signum)
            return run(self, arrays, keep_pixels)

        monkeypatch.setattr(ContainedDecoder, "run", spied)
        return sends

    yield arm


def summary(rows) -> list[tuple]:
    return [(r.record_id, r.decoded, r.width, r.height, r.channels, r.sha256, r.caption, r.error) for r in rows]


def shm_leftovers() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"curator-decode-{os.getpid()}-")]


def gone(pid: int | None) -> bool:
    """The process has exited and been reaped (not even a zombie is left)."""
    return pid is None or not os.path.exists(f"/proc/{pid}")


def decode_with(options: DecodeOptions, dataset: Path, keys=("00000",)) -> tuple[list, int, list[int]]:
    """(results with rows per key, the workers' restarts, every worker pid seen) of one decoder."""
    decoder = ShardDecoder(options)
    try:
        out = [decode_shard(Dataset(str(dataset)), key, decoder=decoder, write=False) for key in keys]
        restarts = sum(d.restarts for d in decoder.decoders)
        pids = [d.pid for d in decoder.decoders]
    finally:
        decoder.close()
    return out, restarts, pids


def test_a_crashing_decoder_fails_only_that_record(dataset: Path, signal_on) -> None:
    (reference,), _, _ = decode_with(CONTAINED, dataset)
    ref_result, ref_rows = reference
    assert ref_result.decoded == 12

    sends = signal_on(signal.SIGSEGV)
    ((result, rows), (nxt, next_rows)), restarts, _ = decode_with(CONTAINED, dataset, ("00000", "00001"))

    batch = next(c for c in sends.calls if BAD in c)
    assert batch == (4, 5, 6, 7)  # batches of 4 in tar order
    first = sends.calls.index(batch)
    # The batch that crashed, replayed one record at a time in tar order on fresh workers; only
    # the record that crashes its worker again fails.
    assert sends.alone_after(first + 1)[:4] == [4, 5, 6, 7]
    assert sends.hits == 2 and restarts == 2  # the batch, then the record alone
    assert len(rows) == 12 and result.decoded == 11 and result.failed == 1 and result.ok
    bad = rows[BAD]
    assert not bad.decoded and bad.error == crash_reason(signal.SIGSEGV, None) == SIGSEGV
    assert bad.sha256 == ref_rows[BAD].sha256 and bad.caption == ref_rows[BAD].caption
    expected = summary(ref_rows)
    assert [s for n, s in enumerate(summary(rows)) if n != BAD] == [s for n, s in enumerate(expected) if n != BAD]
    assert nxt.decoded == 12 and all(r.decoded for r in next_rows)  # the next shard decodes too
    assert shm_leftovers() == []


def test_a_killed_worker_costs_one_replay_and_no_record(dataset: Path, signal_on) -> None:
    """A worker killed with SIGKILL once (the OOM killer, say): its batch is replayed one record
    at a time on a fresh worker and every record decodes."""
    sends = signal_on(signal.SIGKILL, times=1)
    ((result, rows),), restarts, _ = decode_with(dataclasses.replace(CONTAINED, pipelines=1), dataset)
    assert sends.calls == [(0, 1, 2, 3), (4, 5, 6, 7), (4,), (5,), (6,), (7,), (8, 9, 10, 11)]
    assert sends.hits == 1 and restarts == 1
    assert len(set(sends.pids)) == 2 and gone(sends.pids[1])  # the killed worker is reaped
    assert result.decoded == 12 and all(r.decoded and r.error is None for r in rows)
    assert shm_leftovers() == []


def test_a_worker_killed_on_every_try_fails_only_that_record(dataset: Path, signal_on) -> None:
    sends = signal_on(signal.SIGKILL)
    ((result, rows),), restarts, _ = decode_with(dataclasses.replace(CONTAINED, pipelines=1), dataset)
    assert sends.calls == [(0, 1, 2, 3), (4, 5, 6, 7), (4,), (5,), (6,), (7,), (8, 9, 10, 11)]
    assert sends.hits == 2 and restarts == 2
    assert [r.error for r in rows] == [f"decoder crashed (signal {int(signal.SIGKILL)}): SIGKILL" if n == BAD
                                       else None for n in range(12)]
    assert result.decoded == 11 and result.failed == 1
    assert shm_leftovers() == []


def test_a_hanging_decoder_fails_only_that_record_in_bounded_time(dataset: Path, signal_on) -> None:
    """A worker that stops answering (SIGSTOP: as a codec in an endless loop) is killed after the
    timeout; the batch is replayed record by record, and only the record that hangs again fails."""
    sends = signal_on(signal.SIGSTOP)
    options = dataclasses.replace(CONTAINED, pipelines=1, worker_timeout=2)
    ((result, rows),), restarts, _ = decode_with(options, dataset)
    assert sends.calls == [(0, 1, 2, 3), (4, 5, 6, 7), (4,), (5,), (6,), (7,), (8, 9, 10, 11)]
    assert sends.hits == 2 and restarts == 2  # the batch hung, then the record alone: killed each time
    assert len(rows) == 12 and result.decoded == 11 and result.failed == 1
    assert rows[BAD].error == hang_reason(2) == "decoder hung (no answer in 2 s)"
    assert [r.decoded for r in rows] == [n != BAD for n in range(12)]
    stopped = {sends.pids[1], sends.pids[3]}  # the workers given the batch, then record BAD alone
    assert len(stopped) == 2 and all(gone(p) for p in stopped)  # killed and reaped
    assert shm_leftovers() == []


class Interrupted(BaseException):
    """What Dagster raises in a step's thread when its run is terminated (a BaseException)."""


def test_an_interrupt_does_not_wait_for_a_hung_worker(dataset: Path, signal_on) -> None:
    """A run terminated while a decoder worker hangs: the interrupt (raised from a signal handler,
    as Dagster's is) kills the workers instead of waiting worker_timeout for the batch nobody will
    read; the same decoder then decodes the next shard with fresh workers."""
    import threading
    import time

    sends = signal_on(signal.SIGSTOP, times=1)
    options = dataclasses.replace(CONTAINED, pipelines=1, worker_timeout=600)

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=_interrupt_once_stopped, args=(sends,), daemon=True)
    decoder = ShardDecoder(options)
    try:
        watcher.start()
        with pytest.raises(Interrupted):
            decode_shard(Dataset(str(dataset)), "00000", decoder=decoder, write=False)
        stopped = sends.pids[1]  # the worker given the batch with record BAD, then stopped
        deadline = time.monotonic() + 60  # far below worker_timeout: the abort, not the timeout
        while not gone(stopped) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(stopped) and sends.hits == 1
        result, rows = decode_shard(Dataset(str(dataset)), "00001", decoder=decoder, write=False)
        assert result.decoded == 12 and all(r.decoded for r in rows)
        assert decoder.decoders[0].pid not in (None, stopped)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        decoder.close()
    assert shm_leftovers() == []


def _interrupt_once_stopped(sends: Sends) -> None:
    """Signal this process once the worker holding record BAD is stopped (state T in /proc)."""
    import time

    while True:
        if sends.hits and len(sends.pids) > 1:
            try:
                if Path(f"/proc/{sends.pids[1]}/stat").read_text().split()[2] == "T":
                    break
            except (FileNotFoundError, IndexError):
                pass
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGUSR1)


def test_contained_pixels_match_in_process_decoding(dataset: Path, signal_on) -> None:
    def pixels(contain: bool) -> dict[str, np.ndarray]:
        out = {}
        for batch in iter_batches(str(dataset), device="cpu", batch_size=4, contain_crashes=contain):
            out.update({rid: np.array(img) for rid, img in zip(batch.record_ids, batch.image_list, strict=True)})
        return out

    plain = pixels(False)
    sends = signal_on(signal.SIGSEGV)
    contained = pixels(True)
    assert sends.hits == 2
    assert len(plain) == 24 and len(contained) == 23  # the crashing record is the one missing
    assert set(plain) - set(contained) == {f"{BAD:09d}"}
    for rid, img in contained.items():
        assert img.dtype == np.uint8 and np.array_equal(img, plain[rid]), rid
    assert shm_leftovers() == []


def test_the_cli_survives_a_crash_with_its_usual_status(dataset: Path, tmp_path: Path, signal_on, capsys) -> None:
    sends = signal_on(signal.SIGSEGV)
    out = tmp_path / "out"
    rc = cli.main(["decode", str(dataset), "--device", "cpu", "--batch-size", "4", "--output", str(out), "--json"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert rc == 0 and sends.hits == 2  # records that fail are rows, not a failed command
    assert [(d["key"], d["decoded"], d["failed"]) for d in lines] == [("00000", 11, 1), ("00001", 12, 0)]
    assert lines[0]["errors"] == [{"record_id": f"{BAD:09d}", "error": SIGSEGV}]
    table = read_manifest(Dataset(str(dataset), output_url=str(out)), "00000").to_pylist()
    assert [r["error"] for r in table] == [SIGSEGV if n == BAD else None for n in range(12)]


def swap_blocks(path: Path) -> None:
    """Swap two 512-byte blocks between two JPEGs of the shard: the second block of the 11th
    with the first (its headers) of the 201st. In process, DALI's CPU decoder dies with SIGSEGV
    on this shard in every run tried here."""
    with tarfile.open(path) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    a, b = jpgs[10], jpgs[200]
    with open(path, "r+b") as f:
        offsets = (a.offset_data + 512, b.offset_data)
        blocks = []
        for off in offsets:
            f.seek(off)
            blocks.append(f.read(512))
        for off, block in zip(offsets, reversed(blocks), strict=True):
            f.seek(off)
            f.write(block)


SWAPPED_RUNS = """
import json, sys
from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard
from curator_assets.store.dataset import Dataset
decoder = ShardDecoder(DecodeOptions(device="cpu", contain_crashes=sys.argv[3] == "contained"))
for _ in range(int(sys.argv[2])):
    result, rows = decode_shard(Dataset(sys.argv[1]), "00000", decoder=decoder, write=False)
    print(json.dumps({"records": result.records, "decoded": result.decoded,
                      "failed": [(r.position, r.error) for r in rows if not r.decoded]}), flush=True)
decoder.close()
"""


def swapped_runs(shard: Path, runs: int, how: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SWAPPED_RUNS, str(shard.parent), str(runs), how], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_swapped_blocks_shard_crashes_dali_in_process_and_never_the_caller(tmp_path: Path) -> None:
    (shard,) = build_demo(tmp_path / "demo", shards=1, records_per_shard=250)
    swap_blocks(shard)
    # Decoded in the caller's process, the shard kills it with SIGSEGV (a few passes; each try
    # so far died in its first three). Should DALI stop crashing on it, this fails: the shard no
    # longer proves anything and the containment tests need another crasher.
    codes = []
    for _ in range(3):
        codes.append(swapped_runs(shard, 3, "in-process").returncode)
        if codes[-1] == -signal.SIGSEGV:
            break
    assert codes[-1] == -signal.SIGSEGV, codes

    proc = swapped_runs(shard, 4, "contained")
    assert proc.returncode == 0, proc.stderr[-2000:]  # never a signal: the caller survives every run
    runs = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert len(runs) == 4
    for run in runs:  # the same rows every time: the two JPEGs that lost a block fail, each saying why
        assert run["records"] == 250 and run["decoded"] == 248
        (lost, lost_error), (headless, headless_error) = run["failed"]
        assert lost == 10 and lost_error.startswith("DALI could not decode the image (nvImageCodec failure")
        assert headless == 200 and headless_error.startswith("not an image: no image format decode accepts")
