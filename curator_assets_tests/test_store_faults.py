"""Store faults on real emulators (S3, GCS, Azure Blob) through a fault-injecting proxy.

Transient faults (5xx, resets, truncated bodies, slow answers) are retried and change nothing in
what the verbs write; faults that outlast the retries, and refusals, fail that shard alone with
one line naming it; a store that never answers fails in bounded time. No credential value shows
up in any output or written file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curator_assets.cli.demo import PhotoRecord, write_shard
from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard
from curator_assets.steps.index import ensure_index
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import STORE_DENIED, STORE_TIMEOUT, STORE_UNAVAILABLE, StorageError
from curator_assets_tests.emulators import ObjectStore
from curator_assets_tests.faultproxy import FaultProxy, reads, touches

pytestmark = pytest.mark.cloud

KEYS = ("00000", "00001", "00002")
# Small timeouts and few retries keep the failing cases quick; the storage options and the
# environment variables are two ways of setting the same policy.
FAST_OPTIONS = {"store_timeout": 2, "store_retries": 3}
FAST_ENV = {"CURATOR_STORE_TIMEOUT": "2", "CURATOR_STORE_RETRIES": "3"}


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory, photos: list[PhotoRecord]) -> Path:
    root = tmp_path_factory.mktemp("faults-source") / "ds"
    for n, key in enumerate(KEYS):
        write_shard(root / f"{key}.tar", photos[6 * n : 6 * n + 6])
    return root


@pytest.fixture(scope="module")
def local_indexes(local_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The indexes the same code builds on local disk."""
    copy = tmp_path_factory.mktemp("faults-local") / "ds"
    shutil.copytree(local_dataset, copy)
    ds = Dataset(str(copy))
    return {key: Path(ensure_index(ds, key).index_url).read_bytes() for key in KEYS}


@pytest.fixture(scope="module")
def decoder() -> ShardDecoder:
    return ShardDecoder(DecodeOptions(device="cpu", batch_size=4, pipelines=1))


class Faulty:
    """A store reached through a fresh proxy, with the dataset in a new bucket."""

    def __init__(self, store: ObjectStore, local_dataset: Path):
        self.store = store
        self.local = local_dataset
        self.proxy = FaultProxy(urllib.parse.urlparse(store.endpoint).port)
        endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.options = dict(store.storage_options)
        self.cli_env, self.cli_args = dict(store.cli_env), list(store.cli_args)
        if store.name == "azure":
            proxied = endpoint + urllib.parse.urlparse(store.endpoint).path
            conn = self.options["connection_string"].replace(store.endpoint, proxied)
            self.options["connection_string"] = conn
            self.cli_env["AZURE_STORAGE_CONNECTION_STRING"] = conn
        else:
            self.options["endpoint_url"] = endpoint
            self.cli_env.pop("AWS_ENDPOINT_URL", None)
            self.cli_args = [a for a in self.cli_args if not a.startswith("endpoint_url=")]
            if self.cli_args and self.cli_args[-1] == "--storage-option":
                self.cli_args.pop()
            if store.name == "s3":
                self.cli_env["AWS_ENDPOINT_URL"] = endpoint
            else:
                self.cli_args += ["--storage-option", f"endpoint_url={endpoint}"]
        self.bucket = store.new_bucket()
        self.url = store.upload(local_dataset, f"{self.bucket}/ds")

    def shard_url(self, key: str) -> str:
        return f"{self.url}/{key}.tar"

    def dataset(self) -> Dataset:
        return Dataset(self.url, {**self.options, **FAST_OPTIONS})

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).parent / "curator-assets"
        return subprocess.run(
            [str(exe), *args, *self.cli_args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.cli_env, **FAST_ENV, **(env or {})},
        )

    def written(self) -> dict[str, bytes]:
        """Every object in the bucket (read around the proxy)."""
        fs = self.store.filesystem(fresh=True)
        return {p: fs.cat_file(p) for p in fs.find(self.bucket)}


@pytest.fixture
def faulty(object_store: ObjectStore, local_dataset: Path):
    f = Faulty(object_store, local_dataset)
    yield f
    f.proxy.stop()


def outputs(dataset: Dataset, decoder: ShardDecoder) -> dict[str, tuple]:
    """Index, validate and decode every shard: (index bytes, report, manifest columns) per key."""
    out = {}
    for key in KEYS:
        ensure_index(dataset, key, force=True)
        report = validate_shard(dataset, key).summary_json()
        decode_shard(dataset, key, decoder=decoder)
        manifest = dataset.read_bytes(dataset.output_path("manifests", key, ".parquet"), fs=dataset.output_fs)
        out[key] = (dataset.read_index_bytes(key), report, pq.read_table(io.BytesIO(manifest)).to_pydict())
    return out


def rows_of(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {Path(r["shard"]).name[:-4]: r for r in rows}


def assert_no_secret(faulty: Faulty, *texts: str) -> None:
    secret = faulty.store.secret
    if secret is None:
        return
    for text in texts:
        assert secret not in text
    for path, data in faulty.written().items():
        assert secret.encode() not in data, path


def test_transient_faults_are_retried_and_change_nothing(faulty, decoder, local_indexes):
    clean = outputs(faulty.dataset(), decoder)
    assert {k: v[0] for k, v in clean.items()} == local_indexes
    assert all(v[1]["ok"] for v in clean.values())

    p = faulty.proxy
    injected = [
        p.inject("status", 503, times=2, match=reads("00001.tar")),
        p.inject("truncate", times=1, match=reads("00000.tar")),
        p.inject("reset", times=1, match=reads("00002.tar")),
        p.inject("status", 500, times=1, match=touches("00001.idx")),
        p.inject("delay", times=3, seconds=0.3),
    ]
    faulted = outputs(faulty.dataset(), decoder)
    assert [f.hits for f in injected] == [f.times for f in injected]  # every fault was met
    assert faulted == clean
    assert_no_secret(faulty)


def test_refusal_fails_that_shard_at_once(faulty):
    fault = faulty.proxy.inject("status", 403, match=reads("00001.tar"))
    dataset = faulty.dataset()
    with pytest.raises(StorageError) as caught:
        ensure_index(dataset, "00001", force=True)
    assert caught.value.code == STORE_DENIED
    assert faulty.shard_url("00001") in str(caught.value) and "\n" not in str(caught.value)
    assert fault.hits == 1  # a refusal is not retried
    assert not ensure_index(dataset, "00002", force=True).reused


@pytest.mark.parametrize("verb", ["index", "validate", "decode"])
def test_faults_outlasting_the_retries_fail_only_that_shard(faulty, local_indexes, verb):
    kind, status = {"index": ("reset", 0), "validate": ("truncate", 0), "decode": ("status", 503)}[verb]
    if verb == "decode":  # decode reads through the index
        dataset = faulty.dataset()
        for key in KEYS:
            ensure_index(dataset, key)
    fault = faulty.proxy.inject(kind, status, match=reads("00001.tar"))
    extra = {"index": ["--force"], "validate": [], "decode": ["--device", "cpu"]}[verb]
    proc = faulty.cli(verb, faulty.url, "--json", *extra)

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    rows = rows_of(proc)
    assert sorted(rows) == list(KEYS)
    bad = rows["00001"]
    assert not bad["ok"]
    attempts = 1 + int(FAST_ENV["CURATOR_STORE_RETRIES"])
    if faulty.store.name == "azure" and kind != "status":
        # azure-storage-blob's downloader retries a body cut short 3 times inside each attempt.
        assert fault.hits == 3 * attempts
    else:
        assert fault.hits == attempts
    if verb == "validate":
        [problem] = bad["problems"]
        assert problem["code"] == "shard_unreadable" and f"[{STORE_UNAVAILABLE}]" in problem["detail"]
        assert faulty.shard_url("00001") in problem["detail"]
    else:
        assert bad["code"] == STORE_UNAVAILABLE
        assert faulty.shard_url("00001") in bad["error"]
        [line] = [x for x in proc.stderr.splitlines() if "00001" in x]
        assert faulty.shard_url("00001") in line
    for key in ("00000", "00002"):
        assert rows[key]["ok"], rows[key]
        if verb != "decode":  # one pass over the tar (decode reads only the indexed members)
            assert rows[key]["bytes_read"] == (faulty.local / f"{key}.tar").stat().st_size
    if verb == "index":
        fs = faulty.store.filesystem(fresh=True)
        assert {k: fs.cat_file(f"{faulty.bucket}/ds/{k}.idx") for k in ("00000", "00002")} == {
            k: local_indexes[k] for k in ("00000", "00002")}
    if verb == "decode":
        assert all(rows[k]["decoded"] == rows[k]["records"] == 6 for k in ("00000", "00002"))
    assert_no_secret(faulty, proc.stdout, proc.stderr)


def test_a_store_that_never_answers_fails_in_bounded_time(faulty):
    faulty.proxy.inject("blackhole", match=reads("00001.tar"))
    # The subprocess's own timeout is the bound: without one, a verb would wait for minutes.
    proc = faulty.cli("index", faulty.url, "--json", env={"CURATOR_STORE_TIMEOUT": "1"}, timeout=120)
    assert proc.returncode == 1
    rows = rows_of(proc)
    assert rows["00001"]["code"] == STORE_TIMEOUT and faulty.shard_url("00001") in rows["00001"]["error"]
    assert rows["00000"]["ok"] and rows["00002"]["ok"]
    assert "Traceback" not in proc.stderr
    assert_no_secret(faulty, proc.stdout, proc.stderr)


_NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                   "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
                   "AZURE_STORAGE_CONNECTION_STRING": ""}
_FAKE_SECRET = "FAKEsecretVALUE+d7c9e1f0b4a2"


@pytest.mark.parametrize("store_name", ["s3", "azure"])  # the GCS emulator checks no credentials
@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_single_shard_url_with_bad_credentials_is_one_line(store_name, credentials, local_dataset, request):
    store: ObjectStore = request.getfixturevalue(f"{store_name}_store")
    faulty = Faulty(store, local_dataset)
    try:
        if credentials == "none":
            env = {k: v for k, v in _NO_CREDENTIALS.items()}
        elif store_name == "s3":
            env = {"AWS_SECRET_ACCESS_KEY": _FAKE_SECRET}
        else:
            env = {"AZURE_STORAGE_CONNECTION_STRING": faulty.cli_env["AZURE_STORAGE_CONNECTION_STRING"].replace(
                store.secret, "RkFLRXNlY3JldFZBTFVFK2Q3YzllMWYwYjRhMg==")}
        proc = faulty.cli("index", faulty.shard_url("00001"), env=env, timeout=120)
    finally:
        faulty.proxy.stop()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "00001.tar" in lines[0]
    for secret in (store.secret, _FAKE_SECRET, "RkFLRXNlY3JldFZBTFVFK2Q3YzllMWYwYjRhMg=="):
        assert secret not in proc.stdout + proc.stderr
