"""Local-disk behaviour of the dataset storage: keys, listing, fingerprints, atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curator_assets.formats.idx import parse_index
from curator_assets.steps.index import ensure_index
from curator_assets.store.atomic import STALE_TEMP_S, write_atomic
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError, UnsafeKeyError, redact, secret_values
from curator_assets.store.fs import StorePolicy
from curator_assets.store.keys import key_for_relpath


def test_keys_recursive_any_case(tmp_path: Path, make_shard) -> None:
    root = tmp_path / "dataset"
    make_shard("00000.tar", n=2)
    make_shard("part-a/00001.tar", n=2)
    make_shard("part-b/deep/00002.TAR", n=2)
    (root / "notes.txt").write_text("not a shard")
    (root / ".cache").mkdir()
    make_shard(".cache/00009.tar", n=1)
    listing = Dataset(str(root)).list_shards()
    assert [s.key for s in listing.shards] == ["00000", "part-a/00001", "part-b/deep/00002"]
    assert listing.rejected == []
    sizes = {s.key: s.size for s in listing.shards}
    assert sizes["part-a/00001"] == (root / "part-a/00001.tar").stat().st_size
    # file:// URLs name the same shards
    assert [s.key for s in Dataset(f"file://{root}").list_shards().shards] == [s.key for s in listing.shards]


def test_unsafe_keys_are_rejected_by_name(tmp_path: Path, make_shard) -> None:
    make_shard("good.tar", n=1)
    make_shard("bad,name.tar", n=1)
    make_shard("range...x.tar", n=1)
    listing = Dataset(str(tmp_path / "dataset")).list_shards()
    assert [s.key for s in listing.shards] == ["good"]
    reasons = " ".join(why for _, why in listing.rejected)
    assert "bad,name.tar" in reasons and "range...x.tar" in reasons
    with pytest.raises(UnsafeKeyError, match="bad,name"):
        key_for_relpath("bad,name.tar")


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such dataset folder"):
        Dataset(str(tmp_path / "nope")).list_shards()


def test_fingerprint_changes_when_the_shard_changes(tmp_path: Path, make_shard) -> None:
    path = make_shard(n=3)
    ds = Dataset(str(path.parent))
    before = ds.shard("00000").fingerprint
    assert before == ds.list_shards().shards[0].fingerprint
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 1024)
    later = time.time() + 5
    os.utime(path, (later, later))
    assert ds.shard("00000").fingerprint != before


def test_single_tar_url(tmp_path: Path, make_shard) -> None:
    path = make_shard("x/00007.tar", n=2)
    make_shard("x/00008.tar", n=2)
    ds = Dataset(str(path))
    assert [s.key for s in ds.list_shards().shards] == ["00007"]
    assert ds.index_path("00007") == str(path.with_suffix(".idx"))


def test_separate_index_location(tmp_path: Path, make_shard) -> None:
    path = make_shard("part/00000.tar", n=4)
    idx_root = tmp_path / "indexes"
    ds = Dataset(str(tmp_path / "dataset"), index_url=str(idx_root))
    result = ensure_index(ds, "part/00000")
    assert Path(result.index_url) == idx_root / "part" / "00000.idx"
    assert not path.with_suffix(".idx").exists()
    assert len(parse_index((idx_root / "part" / "00000.idx").read_bytes())) == 4
    assert ds.output_path("manifests", "part/00000", ".parquet").startswith(str(idx_root / "_curator"))


def test_index_reuse_and_refresh(tmp_path: Path, make_shard, photos) -> None:
    path = make_shard(n=5)
    ds = Dataset(str(path.parent))
    first = ensure_index(ds, "00000")
    assert not first.reused and first.records == 5
    second = ensure_index(ds, "00000")
    assert second.reused
    third = ensure_index(ds, "00000", previous={"tar_fingerprint": second.tar_fingerprint,
                                                   "index_fingerprint": second.index_fingerprint})
    assert third.reused
    # Rewrite the shard with a different record count: the index is stale and rebuilt.
    from curator_assets.cli.demo import write_shard

    write_shard(path, photos[:7])
    later = time.time() + 10
    os.utime(path, (later, later))
    fourth = ensure_index(ds, "00000", previous={"tar_fingerprint": second.tar_fingerprint,
                                                    "index_fingerprint": second.index_fingerprint})
    assert not fourth.reused and fourth.records == 7
    assert ensure_index(ds, "00000", force=True).reused is False


def test_stale_index_newer_than_tar_is_caught_by_spot_check(tmp_path: Path, make_shard, photos) -> None:
    a = make_shard("a.tar", n=5)
    b = make_shard("b.tar", n=5, folder=tmp_path / "other")
    ds_b = Dataset(str(b.parent))
    ensure_index(ds_b, "b")
    # Give shard a the index of another shard (newer than a): must not be reused.
    b.with_suffix(".idx").replace(a.with_suffix(".idx"))
    from curator_assets.cli.demo import write_shard

    write_shard(a, photos[10:15])
    old = time.time() - 100
    os.utime(a, (old, old))
    result = ensure_index(Dataset(str(a.parent)), "a")
    assert not result.reused


def test_write_atomic_leaves_old_or_new(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    target = tmp_path / "out" / "f.bin"
    write_atomic(fs, str(target), b"old")

    # A failure while writing (here: a non-bytes payload) leaves the old file and no temp file.
    with pytest.raises(TypeError):
        write_atomic(fs, str(target), object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    write_atomic(fs, str(target), b"new")
    assert target.read_bytes() == b"new"


def test_unwritable_index_location(tmp_path: Path, make_shard) -> None:
    make_shard(n=2)
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    ds = Dataset(str(tmp_path / "dataset"), index_url=str(blocker / "idx"))
    with pytest.raises(StorageError, match="cannot write"):
        ensure_index(ds, "00000")


def test_modified_time_in_every_form_a_store_reports() -> None:
    import datetime

    from curator_assets.store.keys import modified_at

    when = datetime.datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=datetime.UTC)
    assert modified_at({"mtime": when.timestamp()}) == when.timestamp()  # local disk
    assert modified_at({"LastModified": when}) == when.timestamp()  # S3
    assert modified_at({"last_modified": when}) == when.timestamp()  # Azure
    assert modified_at({"updated": "2026-11-24T10:00:00.123Z"}) == when.timestamp()  # GCS
    assert modified_at({"size": 3}) is None


def test_longest_legal_shard_name_is_indexed_and_reported(tmp_path: Path, make_shard) -> None:
    # 250 bytes with ".tar": its .idx and report names (250 and 251 bytes) fit the 255-byte limit;
    # the temp files of the atomic writes must fit too.
    name = "r" * 246 + ".tar"
    make_shard(name, n=3)
    dataset = Dataset(str(tmp_path / "dataset"))
    [shard] = dataset.list_shards().shards
    result = ensure_index(dataset, shard.key)
    assert not result.reused and result.records == 3
    idx = Path(dataset.index_path(shard.key))
    assert len(idx.name.encode()) == 250
    assert len(parse_index(idx.read_bytes())) == 3
    report = Path(dataset.write_output("validation", shard.key, ".json", b"{}").removeprefix("file://"))
    assert report.read_bytes() == b"{}"
    leftovers = [p.name for p in idx.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


_HANG_IN_WRITE = """
import os, sys, time
from curator_assets.store.atomic import write_atomic
from curator_assets.store.fs import LocalFS

def hang(fd):  # inside the write window: temp file written, not yet renamed
    print("in-window", flush=True)
    time.sleep(120)

os.fsync = hang
write_atomic(LocalFS(), sys.argv[1], b"partial " * 1000)
"""

_WRITE = """
import sys
from curator_assets.store.atomic import write_atomic
from curator_assets.store.fs import LocalFS
write_atomic(LocalFS(), sys.argv[1], b"next write")
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True, **kwargs)


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    writer = _python(_HANG_IN_WRITE, str(folder / "00000.idx"))
    try:
        assert writer.stdout.readline().strip() == "in-window"
        [temp] = [p for p in folder.iterdir()]
        assert temp.name.startswith(".") and temp.stat().st_size > 0
        # A write by another process while the writer is alive leaves its temp file alone.
        other = _python(_WRITE, str(folder / "00001.idx"))
        assert other.wait(60) == 0
        assert temp.exists()
    finally:
        writer.kill()
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    assert not (folder / "00000.idx").exists()  # no partial file visible under the real name
    assert temp.exists()

    # An old temp file from a writer on another machine (its pid means nothing here) goes when stale.
    foreign = folder / ".curator-tmp-00000000-1-abcd"
    foreign.write_bytes(b"x")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(foreign, (old, old))
    recent_foreign = folder / ".curator-tmp-00000000-1-beef"
    recent_foreign.write_bytes(b"x")

    nxt = _python(_WRITE, str(folder / "00002.idx"))
    assert nxt.wait(60) == 0
    assert sorted(p.name for p in folder.iterdir()) == [recent_foreign.name, "00001.idx", "00002.idx"]
    assert (folder / "00002.idx").read_bytes() == b"next write"


def test_store_policy_from_options_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURATOR_STORE_TIMEOUT", raising=False)
    monkeypatch.delenv("CURATOR_STORE_RETRIES", raising=False)
    policy, rest = StorePolicy.split({"endpoint_url": "http://x"})
    assert (policy.timeout, policy.retries, rest) == (30.0, 4, {"endpoint_url": "http://x"})
    monkeypatch.setenv("CURATOR_STORE_TIMEOUT", "7")
    monkeypatch.setenv("CURATOR_STORE_RETRIES", "0")
    assert StorePolicy.split({})[0][:2] == (7.0, 0)
    policy, rest = StorePolicy.split({"store_timeout": 2.5, "store_retries": 1, "anon": True})
    assert (policy.timeout, policy.retries, rest) == (2.5, 1, {"anon": True})
    with pytest.raises(StorageError):
        StorePolicy.split({"store_timeout": "soon"})


def test_messages_never_carry_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envSECRETvalue123")
    options = {"connection_string": "AccountName=a;AccountKey=keyVALUE99==;BlobEndpoint=http://h/a;",
               "secret": "optSECRET456", "endpoint_url": "http://127.0.0.1:9000"}
    text = ("failed with AccountKey=keyVALUE99== and optSECRET456, envSECRETvalue123, "
            "https://h/a/c/b?sv=1&sig=SIGvalue%2B1&se=2 X-Amz-Signature=abcdef0123")
    out = redact(text, options)
    for secret in ("keyVALUE99", "optSECRET456", "envSECRETvalue123", "SIGvalue", "abcdef0123"):
        assert secret not in out
    assert "http://127.0.0.1:9000" not in secret_values(options)
