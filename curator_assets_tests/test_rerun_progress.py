"""rerun-failed reruns only what failed; the progress bar shows on a terminal only; the dataset
summaries follow shard runs through their automation condition."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.cli.demo import photo_records, write_shard
from curator_assets.cli.progress import Bar, Quiet, progress
from curator_assets.cli.runner import rerun_failed, run_pipeline
from curator_assets_tests.conftest import write_members

REPO = Path(__file__).resolve().parents[1]


def _members(photos, keys):
    return [(f"{k}.jpg", p.jpg) for k, p in zip(keys, photos, strict=True)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _runs_by_reason(reason: str) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.get() as instance:
        return [r for r in instance.get_runs() if r.tags.get("curator/reason") == reason
                and r.job_name == "shard_pipeline"]


def _shards_of(run: dg.DagsterRun) -> set[str]:
    if "dagster/partition" in run.tags:
        return {run.tags["dagster/partition"]}
    return {run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]}


def test_rerun_failed_reruns_only_the_failed_shard(tmp_path, home, photos):
    folder = tmp_path / "ds"
    for s in range(3):
        write_shard(folder / f"{s:05d}.tar", photos[s * 4:s * 4 + 4])
    # Record "a" twice, apart: a shard-level error, so the pipeline fails for 00003 alone.
    write_members(folder / "00003.tar", _members(photos[12:15], ["a", "b", "a"]))
    out = io.StringIO()
    assert run_pipeline(str(folder), out=out) == 1
    assert "00003: FAILED" in out.getvalue()

    write_members(folder / "00003.tar", _members(photos[12:15], ["a", "b", "c"]))  # repaired
    out = io.StringIO()
    assert rerun_failed(str(folder), out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "rerunning 1 shard(s)" in text and "00003: ok" in text and "00000:" not in text
    reruns = _runs_by_reason("curator-assets rerun-failed")
    assert [_shards_of(r) for r in reruns] == [{"00003"}]

    out = io.StringIO()
    assert rerun_failed(str(folder), out=out) == 0
    assert "nothing to rerun" in out.getvalue()
    assert len(_runs_by_reason("curator-assets rerun-failed")) == 1


def test_a_shard_that_completed_then_failed_is_rerun(tmp_path, home, photos):
    """Done means the latest attempt of every step succeeded, not "materialized once": a shard
    that completed, was replaced by a broken one and failed is rerun once repaired."""
    folder = tmp_path / "ds"
    for s in range(2):
        write_shard(folder / f"{s:05d}.tar", photos[s * 4:s * 4 + 4])
    assert run_pipeline(str(folder), out=io.StringIO()) == 0
    write_members(folder / "00001.tar", _members(photos[8:11], ["a", "b", "a"]))  # replaced, broken
    out = io.StringIO()
    assert run_pipeline(str(folder), out=out) == 1 and "00001: FAILED" in out.getvalue()

    write_members(folder / "00001.tar", _members(photos[8:11], ["a", "b", "c"]))  # repaired
    out = io.StringIO()
    assert rerun_failed(str(folder), out=out) == 0, out.getvalue()
    assert "rerunning 1 shard(s)" in out.getvalue() and "00001: ok" in out.getvalue()
    assert [_shards_of(r) for r in _runs_by_reason("curator-assets rerun-failed")] == [{"00001"}]


def test_rerun_failed_needs_a_dagster_home(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert rerun_failed(str(tmp_path)) == 2
    assert "DAGSTER_HOME" in capsys.readouterr().err


def _drain(fd: int) -> str:
    import select

    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks).decode(errors="replace")


def test_the_bar_shows_on_a_terminal_only():
    assert isinstance(progress(10, stream=io.StringIO()), Quiet)  # not a terminal: plain lines
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
    with os.fdopen(slave, "w") as tty:
        assert isinstance(progress(10, stream=tty, as_json=True), Quiet) and not progress(1, stream=tty).enabled
        bar = progress(3, stream=tty, desc="decode")
        assert isinstance(bar, Bar)
        for _ in range(3):
            with bar.external():
                pass
            bar.step(images=100)
        bar.close()
        tty.flush()
        shown = _drain(master)
    os.close(master)
    assert "decode" in shown and "3/3" in shown and "images/s" in shown


def test_cli_output_to_a_pipe_has_no_bar(tmp_path):
    import subprocess
    import sys

    for s in range(3):
        write_shard(tmp_path / "ds" / f"{s:05d}.tar", list(photo_records(2, seed=s, size=(64, 48))))
    for extra in ([], ["--json"]):
        done = subprocess.run([sys.executable, "-m", "curator_assets.cli", "index", str(tmp_path / "ds"), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "\r" not in done.stderr and "shard/s" not in done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 3
        if extra:
            assert all(json.loads(line)["ok"] for line in lines)


def test_dataset_summaries_follow_shard_runs_without_a_click(tmp_path, photos):
    from curator_assets.definitions import build_definitions
    from curator_assets.defs.automation import dataset_automation_sensor
    from curator_assets.defs.partitions import shards
    from curator_assets.defs.resources import ShardStorage

    assert dataset_automation_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    folder = tmp_path / "ds"
    for s in range(2):
        write_shard(folder / f"{s:05d}.tar", photos[s * 3:s * 3 + 3])
    defs = build_definitions(ShardStorage(dataset_url=str(folder)))
    summaries = {dg.AssetKey("dataset_validation_summary"), dg.AssetKey("dataset_decode_summary")}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shards.name, ["00000", "00001"])
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # nothing ran yet
        result = defs.resolve_job_def("shard_pipeline").execute_in_process(
            instance=instance, partition_key="00000", raise_on_error=False)
        assert result.success
        # 00001 has not run: it does not hold the summaries back; no per-shard asset is asked for
        after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert after.total_requested == 2
        assert {k for k in summaries if after.get_num_requested(k) == 1} == summaries
        again = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
        assert again.total_requested == 0  # handled: no new shard run, no new request


def _image_shas(tar_path: Path) -> set[str]:
    import hashlib
    import tarfile

    with tarfile.open(tar_path) as t:
        return {hashlib.sha256(t.extractfile(m).read()).hexdigest() for m in t.getmembers() if m.name.endswith(".jpg")}


def _latest_metadata(asset: str) -> dict:
    with dg.DagsterInstance.get() as instance:
        record = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert record is not None, f"{asset} was not materialized"
        return record.asset_materialization.metadata


def test_run_and_rerun_materialize_both_dataset_summaries(tmp_path, home, photos):
    """`run` ends with the validation and the decode summary in the instance (pictures, duplicate
    images by sha256, failures by code) and prints their headlines; so does `rerun-failed`."""
    folder = tmp_path / "ds"
    write_shard(folder / "00000.tar", photos[:6])
    cut = photos[6].jpg[: len(photos[6].jpg) // 2]  # a JPEG cut in half: no end marker
    write_members(folder / "00001.tar", [("k0.jpg", cut), *_members(photos[7:9], ["k1", "k2"])])
    shutil.copy(folder / "00000.tar", folder / "00002.tar")  # the same images under another shard name
    copied = _image_shas(folder / "00002.tar")

    out = io.StringIO()
    assert run_pipeline(str(folder), as_json=True, out=out) == 1  # 00001's records-readable check warns
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["shard"] for r in rows[:-1] if not r["ok"]] == ["00001"]
    summary = rows[-1]
    assert summary["decode"]["duplicate_images"] == len(copied) == 6
    assert summary["decode"]["records"] == 6 + 3 + 6 and summary["decode"]["decoded"] == 6 + 2 + 6
    assert summary["decode"]["failures_by_code"] == {"jpeg_truncated": 1}
    assert summary["dataset"]["cross_shard_duplicate_ids"] == 6

    md = _latest_metadata("dataset_decode_summary")
    assert md["duplicate_images"].value == len(copied)
    for picture in ("image_sizes", "failures_by_shard"):
        assert "data:image/png;base64," in md[picture].value
    assert _latest_metadata("dataset_validation_summary")["cross_shard_duplicate_ids"].value == 6

    write_members(folder / "00003.tar", _members(photos[12:15], ["a", "b", "a"]))  # fails: "a" twice
    assert run_pipeline(str(folder), out=io.StringIO()) == 1
    write_members(folder / "00003.tar", _members(photos[12:15], ["a", "b", "c"]))
    out = io.StringIO()
    rerun_failed(str(folder), out=out)
    lines = out.getvalue().splitlines()
    assert "00003: ok" in out.getvalue()
    decode_line = next(line for line in lines if line.startswith("decode: "))
    assert decode_line.startswith("decode: 17/18 records decoded in 4 manifests, 1 failed (jpeg_truncated 1)")
    assert "6 images in more than one shard" in decode_line
    assert any(line.startswith("dataset: 4/4 shards validated") for line in lines)
    assert _latest_metadata("dataset_decode_summary")["records"].value == 18
