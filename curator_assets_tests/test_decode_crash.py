"""Crash containment: a decoder that dies on an image fails that record, never the caller.

A real DALI segfault is not reproducible on demand, so the worker's test hook stands in for it:
with ``CURATOR_TEST_CRASH_MARKER`` set, the worker kills itself with SIGSEGV on a batch holding
an image whose bytes contain the marker. The real case (two 512-byte blocks swapped between two
JPEGs of a demo shard) is decoded too, in a child process so that a crash would show as a
failed test rather than end the test run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curator_assets import cli
from curator_assets.cli.demo import build_demo, write_shard
from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard, iter_batches
from curator_assets.formats.manifest import read_manifest
from curator_assets.steps.decode.worker import CRASH_MARKER_ENV, HANG_MARKER_ENV, SHM_DIR, crash_reason, hang_reason
from curator_assets.store.dataset import Dataset

ROOT = Path(__file__).resolve().parent.parent
MARKER = b"curator-test-crash-here"
BAD = 5  # the record whose image carries the marker
CONTAINED = DecodeOptions(device="cpu", batch_size=4, pipelines=2, contain_crashes=True)


def with_comment(jpg: bytes, text: bytes) -> bytes:
    """The JPEG with a COM segment after its SOI: still the same image to every decoder."""
    return jpg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpg[2:]


@pytest.fixture
def dataset(tmp_path: Path, photos) -> Path:
    """Two shards of 12 records; record ``BAD`` of the first one carries the marker."""
    recs = list(photos[:12])
    recs[BAD] = dataclasses.replace(recs[BAD], jpg=with_comment(recs[BAD].jpg, MARKER))
    write_shard(tmp_path / "ds" / "00000.tar", recs)
    write_shard(tmp_path / "ds" / "00001.tar", list(photos[12:24]))
    return tmp_path / "ds"


def summary(rows) -> list[tuple]:
    return [(r.record_id, r.decoded, r.width, r.height, r.channels, r.sha256, r.caption, r.error) for r in rows]


def shm_leftovers() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"curator-decode-{os.getpid()}-")]


def test_a_crashing_decoder_fails_only_that_record(dataset: Path, monkeypatch) -> None:
    ds = Dataset(str(dataset))
    reference, ref_rows = decode_shard(ds, "00000", CONTAINED, write=False)
    assert reference.decoded == 12  # without the hook the marked image is an ordinary JPEG

    monkeypatch.setenv(CRASH_MARKER_ENV, MARKER.decode())
    decoder = ShardDecoder(CONTAINED)
    try:
        result, rows = decode_shard(ds, "00000", decoder=decoder, write=False)
        nxt, next_rows = decode_shard(ds, "00001", decoder=decoder, write=False)
        restarts = sum(d.restarts for d in decoder.decoders)
    finally:
        decoder.close()

    assert len(rows) == 12 and result.decoded == 11 and result.failed == 1 and result.ok
    bad = rows[BAD]
    assert not bad.decoded and bad.error == crash_reason(signal.SIGSEGV, None)
    assert bad.error == f"decoder crashed (signal {int(signal.SIGSEGV)}): SIGSEGV"
    assert bad.sha256 == ref_rows[BAD].sha256 and bad.caption == ref_rows[BAD].caption
    expected = summary(ref_rows)
    assert [s for n, s in enumerate(summary(rows)) if n != BAD] == [s for n, s in enumerate(expected) if n != BAD]
    assert restarts >= 2  # the batch crashed, then the record alone: a fresh worker each time
    assert nxt.decoded == 12 and all(r.decoded for r in next_rows)  # the next shard decodes too
    assert shm_leftovers() == []


def test_a_hanging_decoder_fails_only_that_record_in_bounded_time(dataset: Path, monkeypatch) -> None:
    """A worker that stops answering (a codec in an endless loop) is killed after the timeout;
    the batch is replayed record by record, and only the record that hangs again fails."""
    monkeypatch.setenv(HANG_MARKER_ENV, MARKER.decode())
    options = dataclasses.replace(CONTAINED, pipelines=1, worker_timeout=4)
    decoder = ShardDecoder(options)
    try:
        result, rows = decode_shard(Dataset(str(dataset)), "00000", decoder=decoder, write=False)
        pids = [d.pid for d in decoder.decoders]
        restarts = sum(d.restarts for d in decoder.decoders)
    finally:
        decoder.close()
    assert len(rows) == 12 and result.decoded == 11 and result.failed == 1
    assert rows[BAD].error == hang_reason(4) == "decoder hung (no answer in 4 s)"
    assert all(r.decoded for n, r in enumerate(rows) if n != BAD)
    assert restarts == 2  # the batch hung, then the record alone: killed each time
    for pid in pids:  # no hung worker is left behind
        assert pid is None or not os.path.exists(f"/proc/{pid}") or "zombie" not in open(f"/proc/{pid}/status").read()
    assert shm_leftovers() == []


def test_contained_pixels_match_in_process_decoding(dataset: Path, monkeypatch) -> None:
    def pixels(contain: bool) -> dict[str, np.ndarray]:
        out = {}
        for batch in iter_batches(str(dataset), device="cpu", batch_size=4, contain_crashes=contain):
            out.update({rid: np.array(img) for rid, img in zip(batch.record_ids, batch.image_list, strict=True)})
        return out

    plain = pixels(False)
    monkeypatch.setenv(CRASH_MARKER_ENV, MARKER.decode())
    contained = pixels(True)
    assert len(plain) == 24 and len(contained) == 23  # the marked record is the one missing
    assert set(plain) - set(contained) == {f"{BAD:09d}"}
    for rid, img in contained.items():
        assert img.dtype == np.uint8 and np.array_equal(img, plain[rid]), rid
    assert shm_leftovers() == []


def test_the_cli_survives_a_crash_with_its_usual_status(dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(CRASH_MARKER_ENV, MARKER.decode())
    out = tmp_path / "out"
    rc = cli.main(["decode", str(dataset), "--device", "cpu", "--batch-size", "4", "--output", str(out), "--json"])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert rc == 0  # records that fail are rows, not a failed command
    assert [(d["key"], d["decoded"], d["failed"]) for d in lines] == [("00000", 11, 1), ("00001", 12, 0)]
    assert lines[0]["errors"][0]["error"].startswith("decoder crashed (signal")
    table = read_manifest(Dataset(str(dataset), output_url=str(out)), "00000").to_pylist()
    assert [r["decoded"] for r in table].count(False) == 1 and table[BAD]["error"].startswith("decoder crashed")


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
decoder = ShardDecoder(DecodeOptions(device="cpu"))  # contained: the default
for _ in range(int(sys.argv[2])):
    result, rows = decode_shard(Dataset(sys.argv[1]), "00000", decoder=decoder, write=False)
    print(json.dumps({"records": result.records, "decoded": result.decoded, "failed": result.failed,
                      "errors": [e for _, e in result.errors]}), flush=True)
decoder.close()
"""


def test_the_swapped_blocks_shard_never_crashes_the_caller(tmp_path: Path) -> None:
    (shard,) = build_demo(tmp_path / "demo", shards=1, records_per_shard=250)
    swap_blocks(shard)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(CRASH_MARKER_ENV, None)
    proc = subprocess.run([sys.executable, "-c", SWAPPED_RUNS, str(shard.parent), "4"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # never a signal: the caller survives every run
    runs = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert len(runs) == 4
    for run in runs:
        assert run["records"] == 250 and run["decoded"] + run["failed"] == 250
        assert run["decoded"] >= 248  # only the two JPEGs that lost a block may fail
