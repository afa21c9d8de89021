"""Shared fixtures: small real shards (real photos from scikit-image / scikit-learn) in a temp dir."""

from __future__ import annotations

import gc
import io
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from curator_assets.cli.demo import PhotoRecord, photo_records, write_shard

pytest_plugins = ["curator_assets_tests.emulators"]


@pytest.fixture(autouse=True)
def collect_what_the_test_left():
    """Objects a test leaves to the garbage collector are collected when the test ends. A Dagster
    instance entered and never exited (a schedule context, say) resets Dagster's state whenever
    it happens to be collected; collecting here makes such a leak fail the test that made it (and
    only it), every time, rather than a later test that loads definitions."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def photos() -> list[PhotoRecord]:
    """40 distinct real-photo JPEG records (crops of the bundled photos), 160x120."""
    return list(photo_records(40, seed=7, size=(160, 120)))


def add_member(tar: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def write_members(path: Path, members: Iterable[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> Path:
    """A tar with exactly these (name, data) members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


@pytest.fixture
def make_shard(tmp_path: Path, photos: list[PhotoRecord]) -> Callable[..., Path]:
    """make_shard(name="00000.tar", n=10, fmt=GNU) -> path of a shard of n photo records."""

    def make(name: str = "00000.tar", n: int = 10, fmt: int = tarfile.GNU_FORMAT, folder: Path | None = None) -> Path:
        path = (folder or tmp_path / "dataset") / name
        write_shard(path, photos[:n], fmt=fmt)
        return path

    return make
