"""Shard storage on real object-store emulators (S3, GCS, Azure Blob), each test run against all three.

Expected values come from the local copy of the same shards, read with Python's tarfile, or from
the index that the same code builds on local disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import dagster as dg
import pytest

from curator_assets.cli.demo import PhotoRecord, write_shard
from curator_assets.defs.assets import shard_index
from curator_assets.defs.resources import SECRET_ENV, ShardStorage
from curator_assets.defs.sensors import shard_sensor
from curator_assets.formats.idx import parse_index
from curator_assets.formats.tar_members import read_members
from curator_assets.steps.index import ensure_index
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError
from curator_assets.store.keys import OUTPUT_DIRNAME
from curator_assets_tests.emulators import ObjectStore

pytestmark = pytest.mark.cloud


# -- the dataset: real photos in three shards, one nested, one with an upper-case suffix ----------


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory, photos: list[PhotoRecord]) -> Path:
    root = tmp_path_factory.mktemp("cloud-source") / "ds"
    write_shard(root / "00000.tar", photos[:8])
    write_shard(root / "part-a" / "00000.tar", photos[8:14], fmt=tarfile.PAX_FORMAT)
    write_shard(root / "00001.TAR", photos[14:20], fmt=tarfile.USTAR_FORMAT)
    (root / "notes.txt").write_text("not a shard\n")
    write_shard(root / ".trash" / "00009.tar", photos[20:22])  # hidden folder: not part of the dataset
    return root


def expected_shards(root: Path) -> dict[str, Path]:
    """key -> local tar, by the dataset rules: every *.tar (any case) outside hidden folders."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel.lower().endswith(".tar") and not any(p.startswith(".") for p in rel.split("/")[:-1]):
            out[rel[:-4]] = path
    return dict(sorted(out.items()))


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular members, by Python's tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


def tar_payload(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


def local_index(local_root: Path, key: str, tmp_path: Path) -> bytes:
    """The index the same code builds for this shard on local disk (in a scratch copy)."""
    copy = tmp_path / "local-copy"
    if not copy.exists():
        shutil.copytree(local_root, copy)
    ds = Dataset(str(copy))
    ensure_index(ds, key, force=True)
    return Path(ds.index_path(key)).read_bytes()


def same_size_rewrite(path: Path) -> bytes:
    """The shard's bytes with one byte of its first JPEG changed: same size, different content."""
    data = bytearray(path.read_bytes())
    name, offset, size = next(m for m in tar_members(path) if m[0].endswith(".jpg"))
    data[offset + size // 2] ^= 0xFF
    return bytes(data)


@pytest.fixture
def remote(object_store: ObjectStore, local_dataset: Path) -> str:
    """The dataset uploaded to a new bucket of the store; its URL."""
    bucket = object_store.new_bucket()
    return object_store.upload(local_dataset, f"{bucket}/ds")


def bucket_path(url: str) -> str:
    return url.split("://", 1)[1]


# -- listing, fingerprints, reads -----------------------------------------------------------------


def test_list_shards_recursive_with_keys_sizes_and_urls(object_store, local_dataset, remote):
    # A name that cannot be a partition key is reported, not fatal.
    object_store.filesystem(fresh=True).pipe_file(f"{bucket_path(remote)}/bad,name.tar", b"\0" * 1024)

    listing = Dataset(remote, object_store.storage_options).list_shards()

    expected = expected_shards(local_dataset)
    assert [s.key for s in listing.shards] == list(expected)
    assert "part-a/00000" in expected and "00001" in expected  # nested and upper-case .TAR
    for shard in listing.shards:
        assert shard.size == expected[shard.key].stat().st_size
        assert shard.url.startswith(object_store.protocol + "://") or object_store.name == "azure"
        assert shard.url.endswith(expected[shard.key].relative_to(local_dataset).as_posix())
        assert shard.fingerprint
    assert len({s.fingerprint for s in listing.shards}) == len(listing.shards)
    assert len(listing.rejected) == 1
    rejected_url, why = listing.rejected[0]
    assert rejected_url.endswith("bad,name.tar") and "partition key" in why


def test_missing_dataset_is_a_clear_error(object_store, remote):
    missing = remote + "-missing"
    with pytest.raises(StorageError, match="no such dataset"):
        Dataset(missing, object_store.storage_options).list_shards()


def test_fingerprint_changes_when_a_shard_is_rewritten(object_store, local_dataset, remote):
    before = {s.key: s for s in Dataset(remote, object_store.storage_options).list_shards().shards}
    target = expected_shards(local_dataset)["00000"]
    new_bytes = same_size_rewrite(target)
    # Rewritten by another writer: the dataset's (cached) filesystem instance must still see it.
    object_store.filesystem(fresh=True).pipe_file(f"{bucket_path(remote)}/00000.tar", new_bytes)

    dataset = Dataset(remote, object_store.storage_options)
    after = {s.key: s for s in dataset.list_shards().shards}
    assert after["00000"].size == before["00000"].size == len(new_bytes)
    assert after["00000"].fingerprint != before["00000"].fingerprint
    assert dataset.shard("00000").fingerprint == after["00000"].fingerprint
    for key in before.keys() - {"00000"}:
        assert after[key].fingerprint == before[key].fingerprint
        assert dataset.shard(key).fingerprint == before[key].fingerprint


def test_ranged_reads_return_the_members_bytes(object_store, local_dataset, remote):
    dataset = Dataset(remote, object_store.storage_options)
    for key, local in expected_shards(local_dataset).items():
        members = tar_members(local)
        # Small blocks: every read below is a ranged request, not one whole-object download.
        with dataset.open_shard(key, block_size=4096) as f:
            for name, offset, size in [members[-1], members[0], members[len(members) // 2]]:
                f.seek(offset)
                assert f.read(size) == tar_payload(local, name)
        with dataset.open_shard(key) as f:
            scanned = read_members(f, dataset.shard(key).url)
        assert [(m.name, m.offset, m.size) for m in scanned] == members


# -- writes ----------------------------------------------------------------------------------------


def test_write_index_and_output_replace_objects_whole(object_store, local_dataset, remote):
    dataset = Dataset(remote, object_store.storage_options)
    fs = object_store.filesystem(fresh=True)
    root = bucket_path(remote)
    for key in ("part-a/00000", "00001"):
        url = dataset.write_index(key, b"first\n")
        # Beside the tar, whatever the case of its suffix.
        assert url.endswith(f"/ds/{key}.idx")
        assert fs.cat_file(f"{root}/{key}.idx") == b"first\n"
        dataset.write_index(key, b"second, longer\n")
        assert dataset.read_index_bytes(key) == b"second, longer\n"
        assert fs.cat_file(f"{root}/{key}.idx") == b"second, longer\n"
    out_url = dataset.write_output("reports", "part-a/00000", ".json", b'{"ok": true}')
    assert out_url.endswith(f"/ds/{OUTPUT_DIRNAME}/reports/part-a/00000.json")
    assert fs.cat_file(f"{root}/{OUTPUT_DIRNAME}/reports/part-a/00000.json") == b'{"ok": true}'

    # Nothing else was written (no temporary objects), and outputs are not shards.
    written = {p[len(root) + 1:] for p in fs.find(root)}
    uploaded = {p.relative_to(local_dataset).as_posix() for p in local_dataset.rglob("*") if p.is_file()}
    assert written - uploaded == {"part-a/00000.idx", "00001.idx", f"{OUTPUT_DIRNAME}/reports/part-a/00000.json"}
    assert [s.key for s in dataset.list_shards().shards] == list(expected_shards(local_dataset))


def test_ensure_index_on_the_store_matches_the_local_build(object_store, local_dataset, remote, tmp_path, photos):
    dataset = Dataset(remote, object_store.storage_options)
    fs = object_store.filesystem(fresh=True)
    for key, local in expected_shards(local_dataset).items():
        result = ensure_index(dataset, key)
        assert not result.reused
        stored = fs.cat_file(dataset.index_path(key))
        assert stored == local_index(local_dataset, key, tmp_path)
        # And it describes the tar as Python's tarfile reads it.
        index = parse_index(stored)
        assert [(c.name, c.offset, c.size) for r in index.records for c in r.components] == tar_members(local)
        assert result.records == len({name.split(".", 1)[0] for name, _, _ in tar_members(local)})

        previous = {"tar_fingerprint": result.tar_fingerprint, "index_fingerprint": result.index_fingerprint}
        again = ensure_index(Dataset(remote, object_store.storage_options), key, previous=previous)
        assert again.reused and again.records == result.records

    # A shard rewritten with other records gets a new index.
    changed = tmp_path / "changed" / "00000.tar"
    write_shard(changed, photos[30:36])
    first = ensure_index(dataset, "part-a/00000")
    fs.put_file(str(changed), f"{bucket_path(remote)}/part-a/00000.tar")
    previous = {"tar_fingerprint": first.tar_fingerprint, "index_fingerprint": first.index_fingerprint}
    rebuilt = ensure_index(Dataset(remote, object_store.storage_options), "part-a/00000", previous=previous)
    assert not rebuilt.reused
    assert rebuilt.tar_fingerprint != first.tar_fingerprint
    index = parse_index(fs.cat_file(dataset.index_path("part-a/00000")))
    assert [(c.name, c.offset, c.size) for r in index.records for c in r.components] == tar_members(changed)


@pytest.mark.parametrize("where", ["local", "other-bucket"])
def test_separate_index_location_leaves_the_dataset_untouched(object_store, local_dataset, remote, tmp_path, where):
    if where == "local":
        index_root = tmp_path / "indexes"
        index_url = str(index_root)
    else:
        index_bucket = object_store.new_bucket()
        index_url = object_store.url(f"{index_bucket}/idx")
    dataset = Dataset(remote, object_store.storage_options, index_url=index_url)
    for key in expected_shards(local_dataset):
        result = ensure_index(dataset, key)
        assert result.index_url.endswith(f"/{key}.idx") and not result.reused
        if where == "local":
            stored = (index_root / f"{key}.idx").read_bytes()
        else:
            stored = object_store.filesystem(fresh=True).cat_file(f"{index_bucket}/idx/{key}.idx")
        assert stored == local_index(local_dataset, key, tmp_path)
        assert dataset.read_index_bytes(key) == stored
    beside = [p for p in object_store.filesystem(fresh=True).find(bucket_path(remote)) if not p.lower().endswith(
        (".tar", ".txt"))]
    assert beside == []


# -- the CLI ---------------------------------------------------------------------------------------


def cli(object_store: ObjectStore, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "curator-assets"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the project with pip install -e '.[dev]'", pytrace=False)
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **object_store.cli_env, **(env or {})},
    )


def test_cli_indexes_a_dataset_on_the_store(object_store, local_dataset, remote, tmp_path):
    proc = cli(object_store, "index", remote, "--json", *object_store.cli_args)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = expected_shards(local_dataset)
    assert sorted(line["key"] for line in lines) == list(expected)
    fs = object_store.filesystem(fresh=True)
    for line in lines:
        assert line["ok"] and not line["reused"]
        assert line["bytes"] == expected[line["key"]].stat().st_size
        assert fs.cat_file(bucket_path(line["index"])) == local_index(local_dataset, line["key"], tmp_path)

    again = cli(object_store, "index", remote, "--json", *object_store.cli_args)
    assert again.returncode == 0, again.stderr
    assert all(json.loads(line)["reused"] for line in again.stdout.splitlines())

    index_bucket = object_store.new_bucket()
    elsewhere = cli(object_store, "index", remote, "--index-dir", object_store.url(f"{index_bucket}/idx"),
                    *object_store.cli_args)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert sorted(p[len(index_bucket) + 5:] for p in fs.find(index_bucket)) == sorted(f"{k}.idx" for k in expected)


@pytest.mark.parametrize("store_name", ["s3", "azure"])  # the GCS emulator checks no credentials
def test_cli_with_wrong_credentials_names_the_dataset(store_name, local_dataset, request):
    store: ObjectStore = request.getfixturevalue(f"{store_name}_store")
    remote = store.upload(local_dataset, f"{store.new_bucket()}/ds")
    wrong = {k: v.replace(store.secret, "A" * len(store.secret)) for k, v in store.cli_env.items()}
    assert wrong != store.cli_env
    proc = cli(store, "index", remote, *store.cli_args, env=wrong)
    assert proc.returncode != 0
    assert bucket_path(remote) in proc.stderr
    assert store.secret not in proc.stderr + proc.stdout


# -- the Dagster resource, sensor and asset --------------------------------------------------------


def storage_resource(object_store: ObjectStore, url: str, monkeypatch: pytest.MonkeyPatch) -> ShardStorage:
    """The resource as a deployment would configure it: endpoint in config, credentials from env."""
    for name, value in object_store.credentials_env.items():
        monkeypatch.setenv(name, value)
    secrets = {field: dg.EnvVar(env) for field, env in SECRET_ENV.items() if env in object_store.credentials_env}
    assert secrets, "the store's credentials must go through the resource"
    endpoint = None if object_store.name == "azure" else object_store.endpoint  # Azure's is in the connection string
    return ShardStorage(dataset_url=url, endpoint_url=endpoint, **secrets)


def test_sensor_and_index_asset_on_the_store(object_store, local_dataset, remote, tmp_path, monkeypatch):
    storage = storage_resource(object_store, remote, monkeypatch)
    expected = expected_shards(local_dataset)
    # Used directly, outside a run (as the headless runner does), the credentials resolve too.
    assert [s.key for s in storage.dataset().list_shards().shards] == list(expected)
    with dg.instance_for_test() as instance:
        result = shard_sensor(dg.build_sensor_context(instance=instance, resources={"storage": storage}))
        assert isinstance(result, dg.SensorResult)
        [add] = result.dynamic_partitions_requests
        assert sorted(add.partition_keys) == list(expected)
        order = list(add.partition_keys)
        covered = []  # the shards of every run: a single one, or a range of consecutive partitions
        for r in result.run_requests:
            start = r.partition_key or r.tags["dagster/asset_partition_range_start"]
            end = r.partition_key or r.tags["dagster/asset_partition_range_end"]
            covered += order[order.index(start): order.index(end) + 1]
        assert sorted(covered) == list(expected)
        instance.add_dynamic_partitions("shards", list(add.partition_keys))

        quiet = shard_sensor(
            dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={"storage": storage})
        )
        assert not (quiet.run_requests if isinstance(quiet, dg.SensorResult) else [])

        run_ids = []
        for key in ("part-a/00000", "00001"):
            outcome = dg.materialize([shard_index], partition_key=key, instance=instance,
                                     resources={"storage": storage})
            assert outcome.success
            run_ids.append(outcome.run_id)
            [mat] = outcome.asset_materializations_for_node("shard_index")
            meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            assert meta["records"] == len({n.split(".", 1)[0] for n, _, _ in tar_members(expected[key])})
            assert meta["bytes"] == expected[key].stat().st_size
            assert meta["reused"] is False
            stored = object_store.filesystem(fresh=True).cat_file(bucket_path(meta["idx_path"]))
            assert stored == local_index(local_dataset, key, tmp_path)

        # A rewritten shard is requested again, as changed.
        object_store.filesystem(fresh=True).pipe_file(
            f"{bucket_path(remote)}/00000.tar", same_size_rewrite(expected["00000"])
        )
        changed = shard_sensor(
            dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={"storage": storage})
        )
        assert [(r.partition_key, r.tags["curator/reason"]) for r in changed.run_requests] == [
            ("00000", "shard changed")
        ]

        # A failing run (no such shard on the store) names the shard in its error.
        instance.add_dynamic_partitions("shards", ["gone"])
        failed = dg.materialize([shard_index], partition_key="gone", instance=instance,
                                resources={"storage": storage}, raise_on_error=False)
        assert not failed.success
        [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "gone" in failure.event_specific_data.error.message
        run_ids.append(failed.run_id)

        if object_store.secret is not None:
            # Metadata, logs, errors and the run record carry the variable's name, never its value.
            logged = []
            for run_id in run_ids:
                logged.append(dg.serialize_value(instance.get_run_by_id(run_id)))
                logged.extend(dg.serialize_value(entry) for entry in instance.all_logs(run_id))
            text = "\n".join(logged)
            assert "shard_index" in text  # the log was read
            assert object_store.secret not in text


# -- decode reads a remote shard once, and decides as it does locally ------------------------


def _decode_corpus(root: Path, photos: list[PhotoRecord]) -> dict[str, Path]:
    """Shards whose member names live in PAX and GNU long-name headers, beside a plain one,
    each indexed; then one made stale (rewritten after indexing) and one damaged in a header."""
    import dataclasses

    from curator_assets.formats.idx import build_index_bytes

    keys = {
        "plain": [r.key for r in photos[:6]],
        "pax": [f"straße-{n}-日本" for n in range(6)],
        "longname": ["d" * 90 + f"/{'k' * 60}-{n}" for n in range(6)],
        "stale": [r.key for r in photos[:6]],
        "damaged": [r.key for r in photos[:6]],
    }
    fmts = {"pax": tarfile.PAX_FORMAT, "longname": tarfile.GNU_FORMAT}
    out = {}
    for name, ks in keys.items():
        recs = [dataclasses.replace(r, key=k) for r, k in zip(photos[:6], ks, strict=True)]
        tar = root / f"{name}.tar"
        write_shard(tar, recs, fmt=fmts.get(name, tarfile.GNU_FORMAT))
        with tar.open("rb") as f:
            (root / f"{name}.idx").write_bytes(build_index_bytes(group_records_of(f)))
        out[name] = tar
    write_shard(out["stale"], [dataclasses.replace(r, caption=r.caption + " (edited)") for r in photos[:6]])
    members = tar_members(out["damaged"])
    at = members[7][1] - 512  # the header of the 8th member: its checksum no longer holds
    data = bytearray(out["damaged"].read_bytes())
    data[at + 148 : at + 156] = b"9999999\0"
    out["damaged"].write_bytes(bytes(data))
    return out


def group_records_of(f):
    from curator_assets.formats.tar_members import group_records

    return group_records(read_members(f))


def _rows(rows) -> list[tuple]:
    return [(r.record_id, r.decoded, r.width, r.height, r.sha256, r.caption, r.error) for r in rows]


def test_remote_decode_reads_a_shard_once_and_agrees_with_local(object_store, tmp_path, photos):
    from curator_assets.decode import DecodeOptions, ShardDecoder, StaleIndexError, decode_shard

    local = tmp_path / "ds"
    corpus = _decode_corpus(local, photos)
    url = object_store.upload(local, f"{object_store.new_bucket()}/ds")
    remote = Dataset(url, object_store.storage_options)
    here = Dataset(str(local))
    decoder = ShardDecoder(DecodeOptions(device="cpu", batch_size=4))
    try:
        for name in ("plain", "pax", "longname", "damaged"):
            want, want_rows = decode_shard(here, name, decoder=decoder, write=False)
            before = remote.fs.bytes_read
            got, got_rows = decode_shard(remote, name, decoder=decoder, write=False)
            size = corpus[name].stat().st_size
            assert _rows(got_rows) == _rows(want_rows), name
            assert (got.decoded, got.failed, got.shard_errors) == (want.decoded, want.failed, want.shard_errors)
            assert got.bytes_read == remote.fs.bytes_read - before, name  # what it says it read
            if name != "damaged":  # planned from the index; verified in the reads of the batches
                assert got.plan_source == "index" and got.bytes_read <= 1.05 * size, (name, got.bytes_read, size)
        for where in (here, remote):
            with pytest.raises(StaleIndexError):
                decode_shard(where, "stale", decoder=decoder, write=False)
    finally:
        decoder.close()
