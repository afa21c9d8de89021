"""`curator-assets index` and `demo` as a user runs them: a separate process, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from curator_assets.index import parse_index


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curator_assets.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_index_folder_json(tmp_path: Path, make_shard) -> None:
    make_shard("00000.tar", n=4)
    make_shard("sub/00001.tar", n=6)
    res = cli("index", str(tmp_path / "dataset"), "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["key"], r["records"], r["members"], r["reused"]) for r in rows] == [
        ("00000", 4, 12, False), ("sub/00001", 6, 18, False)]
    for r in rows:
        assert len(parse_index(Path(r["index"]).read_bytes())) == r["records"]
    again = [json.loads(line) for line in cli("index", str(tmp_path / "dataset"), "--json").stdout.splitlines()]
    assert all(r["reused"] for r in again)
    forced = [json.loads(line) for line in
              cli("index", str(tmp_path / "dataset"), "--json", "--force").stdout.splitlines()]
    assert not any(r["reused"] for r in forced)


def test_bad_shards_named_and_others_still_indexed(tmp_path: Path, make_shard) -> None:
    good = make_shard("00000.tar", n=3)
    root = good.parent
    (root / "00001.tar").write_bytes(b"")  # empty
    data = good.read_bytes()
    (root / "00002.tar").write_bytes(data[: len(data) // 2])  # truncated
    (root / "00003.tar").write_bytes(b"PK\x03\x04 a zip file, not a tar" * 40)  # not a tar
    make_shard("00004.tar", n=2)
    res = cli("index", str(root))
    assert res.returncode == 1
    for bad in ("00001.tar", "00002.tar", "00003.tar"):
        assert bad in res.stderr, res.stderr
        assert not (root / bad).with_suffix(".idx").exists()
    assert "truncat" in res.stderr or "ends" in res.stderr
    assert "not a tar archive" in res.stderr
    assert (root / "00000.idx").exists() and (root / "00004.idx").exists()


def test_individual_tar_files_and_index_dir(tmp_path: Path, make_shard) -> None:
    a = make_shard("a.tar", n=2)
    b = make_shard("b.tar", n=3)
    out = tmp_path / "idx"
    res = cli("index", str(a), str(b), "--index-dir", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.idx", "b.idx"]
    assert not a.with_suffix(".idx").exists()


def test_missing_path_no_shards_unwritable(tmp_path: Path, make_shard) -> None:
    res = cli("index", str(tmp_path / "missing"))
    assert res.returncode == 1 and "missing" in res.stderr
    (tmp_path / "empty-folder").mkdir()
    res = cli("index", str(tmp_path / "empty-folder"))
    assert res.returncode == 1 and "no shards found" in res.stderr
    make_shard("00000.tar", n=2)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    res = cli("index", str(tmp_path / "dataset"), "--index-dir", str(blocker / "sub"))
    assert res.returncode == 1 and "00000.tar" in res.stderr and "cannot write" in res.stderr


def test_index_does_not_import_dagster(tmp_path: Path, make_shard) -> None:
    make_shard(n=1)
    code = ("import sys; from curator_assets.cli import main; rc = main(['index', {!r}]); "
            "print('dagster' in sys.modules, 'pyarrow' in sys.modules)".format(str(tmp_path / "dataset")))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip().splitlines()[-1] == "False False"


def test_demo_builds_real_photo_shards(tmp_path: Path) -> None:
    res = cli("demo", str(tmp_path / "demo"), "--shards", "2", "--records", "20")
    assert res.returncode == 0, res.stderr
    import io
    import tarfile

    from PIL import Image

    shards = sorted((tmp_path / "demo").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    with tarfile.open(shards[1]) as t:
        names = t.getnames()
        img = Image.open(io.BytesIO(t.extractfile(names[0]).read()))
        img.load()
        meta = json.loads(t.extractfile(names[2]).read())
    assert len(names) == 60 and names[0].endswith(".jpg") and names[1].endswith(".txt")
    assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])
    assert names[0] == f"{meta['key']}.jpg"
