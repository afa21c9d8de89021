"""What a step knows of a shard comes from one place (steps/state.py), read once per step: the tar's info,
the .idx (info, bytes, parsed once) and the stored report. Counted on a real local dataset whose store
calls are tallied (the calls themselves go through), on shards written by the webdataset library."""

from __future__ import annotations

from collections import Counter

import pytest

from curator_assets.decode import DecodeOptions, ShardDecoder, decode_shard
from curator_assets.formats.report import write_report
from curator_assets.steps import state as state_module
from curator_assets.steps.index import ensure_index
from curator_assets.steps.state import load_shard_state
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets_tests.test_realworld_tars import wds_samples, webdataset_shards


class CountingDataset(Dataset):
    """A real dataset that tallies what each step asks of the store."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def shard(self, key):
        self.calls["shard"] += 1
        return super().shard(key)

    def index_info(self, key):
        self.calls["index_info"] += 1
        return super().index_info(key)

    def read_index_bytes(self, key):
        self.calls["read_index_bytes"] += 1
        return super().read_index_bytes(key)

    def read_bytes(self, path, *, fs=None):
        self.calls["read_bytes"] += 1  # the stored report
        return super().read_bytes(path, fs=fs)


@pytest.fixture
def dataset(tmp_path, photos, monkeypatch):
    webdataset_shards(tmp_path / "ds", wds_samples(photos))
    ds = CountingDataset(str(tmp_path / "ds"))
    parses = Counter()
    real = state_module.parse_index

    def counted(data, source="index"):
        parses["parse_index"] += 1
        return real(data, source)

    monkeypatch.setattr(state_module, "parse_index", counted)
    ds.parses = parses
    return ds


def test_each_step_reads_each_thing_once(dataset):
    key = dataset.list_shards().shards[0].key
    built = ensure_index(dataset, key)
    assert not built.reused
    dataset.calls.clear()
    again = ensure_index(dataset, key)
    assert again.reused and again.index_fingerprint == built.index_fingerprint
    assert dataset.calls == {"shard": 1, "index_info": 1, "read_index_bytes": 1}

    dataset.calls.clear()
    report = validate_shard(dataset, key)
    assert report.ok and report.index == "fresh" and report.index_fingerprint == built.index_fingerprint
    assert dataset.calls == {"shard": 1, "index_info": 1, "read_index_bytes": 1}
    write_report(dataset, report)

    dataset.calls.clear()
    dataset.parses.clear()
    decoder = ShardDecoder(DecodeOptions(device="cpu", batch_size=4, pipelines=1))
    try:
        result, rows = decode_shard(dataset, key, decoder=decoder, write=False)
    finally:
        decoder.close()
    assert result.report == "used" and result.plan_source == "index" and len(rows) == report.records
    assert dataset.calls == {"shard": 1, "read_index_bytes": 1, "read_bytes": 1}
    assert dataset.parses == {"parse_index": 1}


def test_state_holds_what_the_store_holds(dataset):
    key = dataset.list_shards().shards[0].key
    bare = load_shard_state(dataset, key, report=True)
    assert (bare.index_info, bare.index_bytes, bare.report, bare.index_fingerprint) == (None, None, None, None)
    ensure_index(dataset, key)
    state = load_shard_state(dataset, key)
    assert state.index_bytes == dataset.read_index_bytes(key)
    assert state.index_url == dataset.index_path(key)  # a local index: its path
    assert state.parsed_index() is state.parsed_index()
    assert len(state.parsed_index()) == len(validate_shard(dataset, key).record_ids)
