"""Export: shards written by real writers in, checked by independent readers out.

Inputs come from the webdataset library's TarWriter, tarfile (GNU and PAX), GNU tar and bsdtar,
compressed with gzip/bzip2/xz/zstd, and the damaged corpus of :mod:`malformed`. Outputs are read
by tarfile, GNU tar, the webdataset library, ``wds2idx`` (the indexes must be byte-identical),
DALI's reader (CPU) and Pillow, and validated by ``curator-assets validate``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curator_assets.cli import main as cli_main
from curator_assets.formats.compressed import compression_of
from curator_assets.steps.export import ExportError, ExportOptions, export_dataset, overlap_problem
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets_tests import malformed
from curator_assets_tests.test_index import dali_read_all, wds2idx
from curator_assets_tests.test_realworld_tars import (
    bsdtar,
    bsdtar_command,
    gnu_tar,
    stage,
    wds_samples,
    webdataset_tar,
)

REPO = Path(__file__).resolve().parent.parent


# -- the corpus ----------------------------------------------------------------------------------


def members_of(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every regular member, as Python's tarfile reads the archive."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def records_of(path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Records by the WebDataset key rule, from tarfile's members."""
    out: list[tuple[str, list[tuple[str, bytes]]]] = []
    for name, data in members_of(path):
        folder, _, base = name.rpartition("/")
        if not base or base[0] == "." or "." not in base:
            continue
        key = (folder + "/" if folder else "") + base.split(".", 1)[0]
        if out and out[-1][0] == key:
            out[-1][1].append((name, data))
        else:
            out.append((key, [(name, data)]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> Path:
    """One dataset, one shard per writer; shard 00004 repeats a key and an image of shard 00000."""
    root = tmp_path_factory.mktemp("export") / "src"
    root.mkdir()
    p = photos
    webdataset_tar(root / "00000.tar", wds_samples(p))
    files = [(f"gnu/{p[i].key}.jpg", p[i].jpg) for i in range(6, 9)] + [
        (f"gnu/{p[9].key}.txt", b"caption"), (f"gnu/{p[9].key}.jpg", p[9].jpg)]
    staged = stage(root.parent / "stage-gnu", files)
    gnu_tar(root / "00001.tar", staged, "--format=gnu", names=tuple(n for n, _ in files))
    files = [(f"bsd/{'d' * 120}/{p[i].key}.jpg", p[i].jpg) for i in range(10, 13)]
    bsdtar(root / "00002.tar", stage(root.parent / "stage-bsd", files), files, "pax")
    malformed.write_tar(root / "00003.tar", malformed.shard_members(p[13:], 3), fmt=tarfile.PAX_FORMAT)
    # the same key as shard 00000's first record, and the same image as its fifth
    dup = [("ünïcode/日本-000001.jpg", p[20].jpg), ("000005.jpg", p[4].jpg), ("000099.jpg", p[21].jpg)]
    malformed.write_tar(root / "00004.tar", dup, fmt=tarfile.GNU_FORMAT)
    return root


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory) -> tuple[Path, object]:
    dst = tmp_path_factory.mktemp("export-out") / "dst"
    result = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4))
    return dst, result


def manifest(dst: Path) -> list[dict]:
    return pq.read_table(dst / "manifest.parquet").to_pylist()


# -- the core ------------------------------------------------------------------------------------


def test_every_record_is_accounted_for_and_kept_ones_are_byte_identical(corpus, exported) -> None:
    dst, result = exported
    assert result.ok, result.errors
    rows = manifest(dst)
    sources = {s.stem: records_of(s) for s in sorted(corpus.glob("*.tar"))}
    assert Counter(r["source_shard"] for r in rows) == {k: len(v) for k, v in sources.items()}
    out_records = {}
    for tar in sorted(dst.glob("*.tar")):
        for key, comps in records_of(tar):
            assert key not in out_records, f"key {key} twice in the output"
            out_records[key] = (tar.stem, comps)
    kept = [r for r in rows if r["reason"] is None]
    assert len(kept) == len(out_records) == result.kept
    for row in kept:
        src = dict(sources[row["source_shard"]])[row["source_key"]]
        shard, comps = out_records[row["output_key"]]
        assert shard == row["output_shard"]
        suffix = len(row["source_key"])
        assert [(n[suffix:], d) for n, d in src] == [(n[len(row["output_key"]):], d) for n, d in comps]
        image = next(d for n, d in comps if n.lower().endswith((".jpg", ".jpeg")))
        assert hashlib.sha256(image).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(image)) as im:
            assert im.size == (row["width"], row["height"])
    # the duplicate image of shard 00000's fifth record: left out, and the manifest says whose it is
    dup = next(r for r in rows if r["source_shard"] == "00004" and r["source_key"] == "000005")
    assert dup["reason"] == "duplicate_of:00000/000005" and dup["output_key"] is None
    # the key shard 00000 already used: made unique by the source shard as a folder
    renamed = next(r for r in rows if r["source_shard"] == "00004" and r["source_key"] == "ünïcode/日本-000001")
    assert renamed["output_key"] == "00004/ünïcode/日本-000001"
    assert result.renamed == 1 and result.left_out == {"duplicate": 1}


def test_output_shards_hold_n_records_in_input_order(exported) -> None:
    dst, result = exported
    rows = [r for r in manifest(dst) if r["reason"] is None]
    tars = sorted(dst.glob("*.tar"))
    assert [t.stem for t in tars] == [f"{i:05d}" for i in range(result.shards)]
    counts = [len(records_of(t)) for t in tars]
    assert counts[:-1] == [4] * (len(tars) - 1) and 1 <= counts[-1] <= 4
    in_order = [key for t in tars for key, _ in records_of(t)]
    assert in_order == [r["output_key"] for r in rows]


def test_output_tars_are_plain_posix_with_fixed_metadata(exported) -> None:
    dst, _ = exported
    for tar_path in sorted(dst.glob("*.tar")):
        assert compression_of(tar_path.read_bytes()[:8]) is None
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) == (0, 0, 0, 0o644, "", "")
                assert m.isfile()
        assert tar_path.stat().st_size % (20 * 512) == 0
        # GNU tar and bsdtar list the same names tarfile reads
        names = [n for n, _ in members_of(tar_path)]
        for tool in ("tar", bsdtar_command()):
            listed = subprocess.run([tool, "-tf", str(tar_path)], check=True, capture_output=True).stdout
            assert listed.decode().splitlines() == names, tool


def test_indexes_are_byte_identical_to_wds2idx_and_dali_reads_them(exported) -> None:
    dst, _ = exported
    for tar_path in sorted(dst.glob("*.tar")):
        idx = tar_path.with_suffix(".idx")
        assert idx.read_bytes() == wds2idx(tar_path), tar_path.name
        expected = [(k, dict(c)) for k, c in records_of(tar_path)]
        samples = dali_read_all(tar_path, idx, ["jpg;JPG;jpeg", "txt;Txt"])
        assert len(samples) == len(expected)
        for (source, (image, _txt)), (key, comps) in zip(samples, expected, strict=True):
            name = source.rsplit(":", 1)[-1]
            assert name.startswith(key + ".") and image == comps[name]


def test_webdataset_reads_the_output(exported) -> None:
    import webdataset as wds

    dst, result = exported
    urls = [str(t) for t in sorted(dst.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == result.kept
    assert len({s["__key__"] for s in samples}) == result.kept


def test_validate_reports_no_problem_in_the_output(exported, capsys) -> None:
    dst, _ = exported
    assert cli_main(["validate", str(dst), "--json"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    import json

    assert lines and all(json.loads(line)["problems"] == [] for line in lines)


def test_a_rerun_with_nothing_changed_writes_nothing(corpus, exported) -> None:
    dst, _ = exported
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.rglob("*") if p.is_file()}
    result = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4))
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.rglob("*") if p.is_file()}
    assert after == before
    assert result.written == [] and not result.manifest_written and result.unchanged == result.shards


def test_exports_are_deterministic_and_shuffle_is_seeded(corpus, exported, tmp_path) -> None:
    dst, _ = exported
    again = tmp_path / "again"
    export_dataset(str(corpus), str(again), ExportOptions(records_per_shard=4))
    names = sorted(p.name for p in dst.iterdir() if p.suffix in (".tar", ".idx", ".parquet"))
    assert names == sorted(p.name for p in again.iterdir() if p.is_file())
    assert all((dst / n).read_bytes() == (again / n).read_bytes() for n in names)
    orders = []
    for seed, folder in ((1, "s1"), (1, "s1b"), (2, "s2")):
        export_dataset(str(corpus), str(tmp_path / folder), ExportOptions(records_per_shard=4, shuffle_seed=seed))
        orders.append([k for t in sorted((tmp_path / folder).glob("*.tar")) for k, _ in records_of(t)])
        assert (tmp_path / folder / "00000.idx").read_bytes() == wds2idx(tmp_path / folder / "00000.tar")
    plain = [k for t in sorted(dst.glob("*.tar")) for k, _ in records_of(t)]
    assert orders[0] == orders[1] and orders[0] != orders[2] and orders[0] != plain
    in_order = {k: c for t in sorted(dst.glob("*.tar")) for k, c in records_of(t)}
    shuffled = {k: c for t in sorted((tmp_path / "s2").glob("*.tar")) for k, c in records_of(t)}
    assert shuffled == in_order  # the same records, byte for byte, read out of order
    assert sorted(orders[0]) == sorted(orders[2]) == sorted(plain)
    s1 = tmp_path / "s1"
    assert all((s1 / n).read_bytes() == (tmp_path / "s1b" / n).read_bytes() for n in os.listdir(s1)
               if (s1 / n).is_file())


def test_a_shuffle_over_more_inputs_than_open_files(corpus, tmp_path, monkeypatch) -> None:
    """With one input file open at a time (inputs closed and opened again as the shuffle jumps),
    the bytes are those of the export that keeps them all open."""
    from curator_assets.steps.export_tar import SourceFiles

    options = ExportOptions(records_per_shard=4, shuffle_seed=3)
    export_dataset(str(corpus), str(tmp_path / "all-open"), options)
    monkeypatch.setattr(SourceFiles, "MAX_OPEN", 1)
    export_dataset(str(corpus), str(tmp_path / "one-open"), options)
    names = sorted(p.name for p in (tmp_path / "all-open").glob("*.*") if p.is_file())
    assert names and all((tmp_path / "all-open" / n).read_bytes() == (tmp_path / "one-open" / n).read_bytes()
                         for n in names)


def test_added_shards_write_only_the_tail(corpus, exported, tmp_path, photos) -> None:
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    dst = tmp_path / "dst"
    first = export_dataset(str(src), str(dst), ExportOptions(records_per_shard=4))
    before = {p.name: p.stat().st_ino for p in dst.glob("*.tar")}
    malformed.write_tar(src / "00005.tar", malformed.shard_members(photos[30:], 3))
    result = export_dataset(str(src), str(dst), ExportOptions(records_per_shard=4))
    last = f"{first.shards - 1:05d}"
    assert result.written[0] == last and result.unchanged == first.shards - 1
    assert all(dst.joinpath(n).stat().st_ino == ino for n, ino in before.items() if n != last + ".tar")
    assert result.kept == first.kept + 3


def test_member_headers_are_what_tarfile_writes() -> None:
    """The ustar fast path against tarfile's own PAX-format headers, names and sizes at every limit."""
    import random
    import string

    from curator_assets.formats.tar_headers import member_header

    rng = random.Random(5)
    names = ["a.jpg", "x" * 100, "x" * 101, "ü/日本.jpg", "a b.jpg", "a\x01b.jpg", "d" * 120 + "/k.jpg"]
    alphabet = string.ascii_letters + "/._-"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 110))) for _ in range(300)]
    for name in names:
        for size in (0, 1, 511, 8**11 - 1, 8**11, rng.randint(0, 10**9)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
            assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), name


# -- options -------------------------------------------------------------------------------------


def test_keep_duplicates_and_include_failed(tmp_path, photos) -> None:
    src = tmp_path / "src"
    broken = photos[1].jpg[: len(photos[1].jpg) // 2] + bytes(200)  # header intact, data cut: decode fails?
    members = malformed.record_members(photos[0]) + [("b.jpg", photos[0].jpg), ("c.jpg", broken)]
    malformed.write_tar(src / "00000.tar", members)
    plain = export_dataset(str(src), str(tmp_path / "a"), ExportOptions())
    rows = {r["source_key"]: r for r in manifest(tmp_path / "a")}
    assert rows["b"]["reason"] == f"duplicate_of:00000/{photos[0].key}"
    assert rows["c"]["reason"].startswith(("validation:", "decode:"))
    both = export_dataset(str(src), str(tmp_path / "b"), ExportOptions(keep_duplicates=True, include_failed=True))
    rows_b = {r["source_key"]: r for r in manifest(tmp_path / "b")}
    assert rows_b["b"]["reason"] is None
    assert both.kept == plain.kept + 1 + (rows["c"]["reason"].startswith("decode:"))


def test_stored_validation_reports_are_used(tmp_path, photos) -> None:
    """A fresh report under <SRC>/_curator decides: made stricter, it leaves a record out."""
    src = tmp_path / "src"
    jpg = photos[0].jpg + b"trailer"
    malformed.write_tar(src / "00000.tar", [("a.jpg", jpg), ("b.jpg", photos[1].jpg)])
    first = export_dataset(str(src), str(tmp_path / "dst"), ExportOptions())
    assert first.kept == 2  # a trailer after a complete JPEG is only info by default
    assert cli_main(["validate", str(src), "--write-report", "--severity", "jpeg_trailing_data=warning"]) == 0
    assert (src / "_curator" / "validation" / "00000.json").exists()
    again = export_dataset(str(src), str(tmp_path / "dst"), ExportOptions())  # the new report is read
    rows = {r["source_key"]: r for r in manifest(tmp_path / "dst")}
    assert rows["a"]["reason"] == "validation:jpeg_trailing_data" and rows["b"]["reason"] is None
    assert again.kept == 1 and again.written == ["00000"] and again.manifest_written


def test_stored_indexes_reports_and_manifests_give_the_same_output(corpus, exported, tmp_path) -> None:
    """After index, validate --write-report and decode (the pipeline's outputs), export reads the
    records from the .idx instead of scanning, and the verdicts from the stored files: same bytes."""
    dst, _ = exported
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    assert cli_main(["index", str(src)]) == 0
    cli_main(["validate", str(src), "--write-report"])
    assert cli_main(["decode", str(src)]) == 0
    out = tmp_path / "out"
    export_dataset(str(src), str(out), ExportOptions(records_per_shard=4))
    for p in sorted(dst.glob("*.tar")) + sorted(dst.glob("*.idx")) + [dst / "manifest.parquet"]:
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


# -- damaged and compressed input ------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("damaged")
    cases = malformed.build(root / "cases", photos)
    src = root / "src"
    src.mkdir()
    for case in cases:
        shutil.copy(case.path, src / f"{case.name}.tar")
    dst = root / "dst"
    result = export_dataset(str(src), str(dst), ExportOptions(records_per_shard=16, keep_duplicates=True))
    return cases, src, dst, result


def test_damaged_shards_give_up_their_readable_records(damaged, capsys) -> None:
    cases, src, dst, result = damaged
    rows = manifest(dst)
    per_shard = Counter(r["source_shard"] for r in rows)
    cut = Counter(r["source_shard"] for r in rows if r["reason"] == "validation:tar_truncated")
    for case in cases:
        # a record whose last member the tar cuts short is in the manifest too, left out as tar_truncated
        assert per_shard[case.name] - cut[case.name] <= case.records <= per_shard[case.name], case.name
        if case.records == 0:
            assert any(case.name in e for e in result.errors), case.name
    assert len(result.errors) == sum(1 for c in cases if c.records == 0)
    kept = [r for r in rows if r["reason"] is None]
    assert kept and all(r["decoded"] for r in kept)
    left = Counter(r["reason"].split(":")[0] for r in rows if r["reason"])
    assert left["validation"] > 0 and set(left) <= {"validation", "decode"}
    # what went out is whole: every reader agrees and validation finds nothing wrong
    assert sum(len(records_of(t)) for t in dst.glob("*.tar")) == len(kept)
    for tar_path in sorted(dst.glob("*.tar")):
        assert tar_path.with_suffix(".idx").read_bytes() == wds2idx(tar_path)
        report = validate_shard(Dataset(str(dst)), tar_path.stem)
        assert [p for p in report.problems if p.severity != "info"] == [], report.problems  # info: complete JPEGs
    for _key, comps in (rc for t in sorted(dst.glob("*.tar")) for rc in records_of(t)):
        image = next((d for n, d in comps if n.lower().endswith((".jpg", ".jpeg", ".png"))), None)
        assert image is not None
        with Image.open(io.BytesIO(image)) as im:
            im.load()
    # the CLI: one line per shard that gave nothing, naming it, and a non-zero exit
    assert cli_main(["export", str(src), "--output", str(dst), "--records-per-shard", "16", "--keep-duplicates"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(result.errors) and all(str(src) in line for line in err)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def test_compressed_shards_are_recognised_by_their_bytes(corpus, exported, tmp_path) -> None:
    """Every compression, under any name, gives the output the plain shards give."""
    dst, _ = exported
    src = tmp_path / "src"
    src.mkdir()
    tars = sorted(corpus.glob("*.tar"))
    writers = [(".tar.gz", gzip.compress), (".tar", gzip.compress), (".tar.bz2", bz2.compress),
               (".tar.xz", lzma.compress), (".tar.zst", _zstd)]
    for tar_path, (suffix, compress) in zip(tars, writers, strict=True):
        (src / (tar_path.stem + suffix)).write_bytes(compress(tar_path.read_bytes()))
    (src / (tars[-1].stem + ".tgz")).unlink(missing_ok=True)
    out = tmp_path / "dst"
    result = export_dataset(str(src), str(out), ExportOptions(records_per_shard=4))
    assert result.ok, result.errors
    for p in sorted(dst.glob("*.tar")) + sorted(dst.glob("*.idx")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert not (out / ".export" / "work").exists()


def test_a_plain_tar_named_tar_gz_and_a_damaged_stream(corpus, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tars = sorted(corpus.glob("*.tar"))
    shutil.copy(tars[0], src / "00000.tar.gz")  # plain bytes under a compressed name
    (src / "00001.tar.gz").write_bytes(gzip.compress(tars[1].read_bytes())[:-4000])  # cut short
    result = export_dataset(str(src), str(tmp_path / "dst"), ExportOptions())
    rows = manifest(tmp_path / "dst")
    assert Counter(r["source_shard"] for r in rows)["00000"] == len(records_of(tars[0]))
    assert len(result.errors) == 1 and "00001.tar.gz" in result.errors[0] and "gzip" in result.errors[0]


# -- where the output may go, and a killed export ------------------------------------------------


def test_output_inside_or_equal_to_the_input_is_refused(corpus, tmp_path, capsys) -> None:
    with pytest.raises(ExportError, match="inside the dataset"):
        export_dataset(str(corpus), str(corpus / "out"))
    with pytest.raises(ExportError, match="dataset folder itself"):
        export_dataset(str(corpus), str(corpus) + "/")
    assert overlap_problem(Dataset(str(corpus)), Dataset(str(corpus / "_curator" / "curated"))) is None
    assert cli_main(["export", str(corpus), "--output", str(corpus / "x")]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert not (corpus / "x").exists() and not (corpus / "out").exists()


def test_a_killed_export_resumes_without_rewriting_finished_shards(corpus, exported, tmp_path) -> None:
    src = tmp_path / "src"
    for i in range(4):  # several copies of the corpus: enough output shards to be killed among
        (src / f"c{i}").mkdir(parents=True)
        for tar_path in sorted(corpus.glob("*.tar")):
            shutil.copy(tar_path, src / f"c{i}" / tar_path.name)
    clean = tmp_path / "clean"
    options = ["--records-per-shard", "1", "--keep-duplicates"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curator_assets.cli", "export", str(src), *options]
    subprocess.run([*cmd, "--output", str(clean)], check=True, capture_output=True, env=env)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([*cmd, "--output", str(dst)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (dst / "00003.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # polls for the state it needs (a shard finished)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dst / "manifest.parquet").exists(), "the export finished before it could be killed"
    for tar_path in dst.glob("*.tar"):  # no partial shard is ever visible
        assert tar_path.read_bytes() == (clean / tar_path.name).read_bytes()
    done = {p.name: p.stat().st_ino for p in dst.glob("*.tar")}
    subprocess.run([*cmd, "--output", str(dst)], check=True, capture_output=True, env=env)
    names = sorted(p.name for p in clean.iterdir() if p.is_file())
    assert names == sorted(p.name for p in dst.iterdir() if p.is_file())
    assert all((dst / n).read_bytes() == (clean / n).read_bytes() for n in names)
    recorded = json.loads((dst / ".export" / "state.json").read_bytes())["shards"]
    assert len(recorded) == len(list(clean.glob("*.tar")))
    rewritten = [n for n, ino in done.items() if (dst / n).stat().st_ino != ino]
    assert len(rewritten) <= 1, rewritten  # at most the shard renamed in the instant before the kill
    assert not list(dst.glob(".curator-tmp-*"))


def test_an_input_removed_while_it_is_exported_stops_the_export(corpus, tmp_path) -> None:
    """An input shard deleted after it was planned, before its records are copied: an error naming
    it (the CLI's one line, exit 2), no output shard and no manifest."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(corpus, src)
    tars = sorted(src.glob("*.tar"))

    def log(line: str) -> None:
        if line.startswith("reading ") and line.endswith(tars[-1].name):
            tars[0].unlink()  # planned already; its records go out only once every input is planned

    with pytest.raises(ExportError, match=f"{tars[0].name}: removed while it was being exported") as info:
        export_dataset(str(src), str(dst), ExportOptions(records_per_shard=1000), log=log)
    assert info.value.code == "source_changed"
    assert not list(dst.glob("*.tar")) and not (dst / "manifest.parquet").exists()


def test_shards_are_written_while_later_sources_are_planned(corpus, exported, tmp_path) -> None:
    """Without a shuffle an output shard goes out as soon as its records are planned: the first
    one is on disk while the last source is still being read. (Written only after planning, it
    would never appear here, and the test fails at its deadline.)"""
    dst = tmp_path / "dst"
    seen: list[bool] = []
    last = sorted(corpus.glob("*.tar"))[-1]

    def log(line: str) -> None:
        if line.startswith("reading ") and line.endswith(last.name):
            deadline = time.monotonic() + 60
            while not (dst / "00000.tar").exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # polls for the state it needs: the writer's first shard
            seen.append((dst / "00000.tar").exists() and (dst / "00000.idx").exists())

    result = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4), log=log)
    assert seen == [True]
    ref, _ = exported
    names = sorted(p.name for p in ref.iterdir() if p.suffix in (".tar", ".idx", ".parquet"))
    assert result.ok and names == sorted(p.name for p in dst.iterdir() if p.is_file())
    assert all((dst / n).read_bytes() == (ref / n).read_bytes() for n in names)


def test_more_shards_than_the_streamed_names_hold(corpus, exported, tmp_path, monkeypatch) -> None:
    """Shards written while planning are named at the usual width; when there turn out to be more
    shards than that width holds, the narrow ones are renamed to the wider names (a shard's bytes
    do not depend on its name: none is written twice; here with one digit, as it would go past
    100,000 shards)."""
    from curator_assets.steps import export as export_module

    monkeypatch.setattr(export_module, "MIN_NAME_WIDTH", 1)
    dst = tmp_path / "dst"
    lines: list[str] = []
    result = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=1), log=lines.append)
    assert result.ok and result.shards >= 11
    assert len(result.written) == result.shards and result.removed == []  # each shard's bytes written once
    assert sum(line.startswith("renamed ") for line in lines) == 10  # 0-9 became 00-09
    width = len(str(result.shards - 1))
    tars = sorted(p.name for p in dst.glob("*.tar"))
    assert tars == [f"{i:0{width}d}.tar" for i in range(result.shards)]
    assert sorted(p.name for p in dst.glob("*.idx")) == [t[:-4] + ".idx" for t in tars]
    ref, _ = exported
    kept = [k for t in sorted(ref.glob("*.tar")) for k, _ in records_of(t)]
    assert [k for t in tars for k, _ in records_of(dst / t)] == kept
    rows = manifest(dst)
    assert {r["output_shard"] for r in rows if r["output_shard"]} == {t[:-4] for t in tars}
    state = json.loads((dst / ".export" / "state.json").read_bytes())
    assert sorted(state["shards"]) == [t[:-4] for t in tars]
    again = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=1))
    assert again.written == [] and again.removed == []


def test_the_journal_keeps_finished_shards_and_skips_a_torn_line(corpus, exported, tmp_path) -> None:
    """A run killed after some shards left them in the journal (state.json not yet rewritten);
    the next run trusts those and rewrites none of them, and a line cut short by the kill is
    ignored."""
    dst = tmp_path / "dst"
    first = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4))
    state_path, journal = dst / ".export" / "state.json", dst / ".export" / "journal.jsonl"
    state = json.loads(state_path.read_bytes())
    assert not journal.exists()  # emptied once the state holds it all
    lines = [json.dumps({"shard": n, "entry": e}) for n, e in sorted(state["shards"].items())]
    journal.write_text("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2])
    state_path.write_text(json.dumps({**state, "shards": {}}))  # as if killed before the state was written
    inodes = {p.name: p.stat().st_ino for p in dst.glob("*.tar")}
    again = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4))
    assert again.written == [] and again.unchanged == first.shards
    assert {p.name: p.stat().st_ino for p in dst.glob("*.tar")} == inodes
    assert json.loads(state_path.read_bytes())["shards"] == state["shards"] and not journal.exists()


class Killed(BaseException):
    """Stands for the process being killed at one exact point (raised from the state's journal)."""


def _killed_at_record(monkeypatch, nth: int) -> None:
    """The export dies when it is about to record its ``nth`` written shard: the shard's tar and
    index are in place, the journal does not vouch for them yet."""
    from curator_assets.steps.export_state import ExportState

    real, calls = ExportState.record, []

    def record(self, name, entry):
        calls.append(name)
        if len(calls) == nth:
            raise Killed(name)
        return real(self, name, entry)

    monkeypatch.setattr(ExportState, "record", record)


def test_a_shard_replaced_but_not_recorded_is_not_trusted(corpus, tmp_path, monkeypatch) -> None:
    """A run killed between a shard's rename and its journal line: the earlier run's entry for that
    name must not vouch for the new bytes (same size: another shuffle of the same records). The
    next run writes it again; the output is byte-identical to a clean export."""
    dst, clean = tmp_path / "dst", tmp_path / "clean"
    one = ExportOptions(records_per_shard=1000, shuffle_seed=1, keep_duplicates=True)
    export_dataset(str(corpus), str(clean), one)
    sizes = [(clean / n).stat().st_size for n in ("00000.tar", "00000.idx")]
    for seed in range(2, 200):  # another order whose tar and index have the same sizes as this one's
        export_dataset(str(corpus), str(tmp_path / str(seed)), one._replace(shuffle_seed=seed))
        if [(tmp_path / str(seed) / n).stat().st_size for n in ("00000.tar", "00000.idx")] == sizes:
            break
    else:
        pytest.fail("no shuffle of the corpus gives an index of the same size")
    export_dataset(str(corpus), str(dst), one)
    with monkeypatch.context() as m:
        _killed_at_record(m, 1)
        with pytest.raises(Killed):
            export_dataset(str(corpus), str(dst), one._replace(shuffle_seed=seed))
    assert (dst / "00000.tar").read_bytes() != (clean / "00000.tar").read_bytes()  # the other shuffle is in place
    assert (dst / "00000.tar").stat().st_size == (clean / "00000.tar").stat().st_size
    again = export_dataset(str(corpus), str(dst), one)
    assert again.written == ["00000"]
    for name in ("00000.tar", "00000.idx", "manifest.parquet"):
        assert (dst / name).read_bytes() == (clean / name).read_bytes(), name


def test_a_shard_written_but_not_recorded_is_removed_when_no_longer_wanted(corpus, tmp_path, monkeypatch) -> None:
    """A killed run left a shard no entry knows of; the next run has fewer shards: that one is
    removed (a reader globbing DST/*.tar would read its records twice)."""
    dst = tmp_path / "dst"
    export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=1000))
    with monkeypatch.context() as m:
        _killed_at_record(m, 2)
        with pytest.raises(Killed):
            export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=4))
    assert (dst / "00001.tar").exists()
    again = export_dataset(str(corpus), str(dst), ExportOptions(records_per_shard=1000))
    assert again.ok and again.shards == 1 and "00001" in again.removed
    assert sorted(p.name for p in dst.iterdir() if p.is_file()) == ["00000.idx", "00000.tar", "manifest.parquet"]


def test_a_line_torn_by_a_kill_does_not_swallow_the_next_one(tmp_path) -> None:
    import fsspec

    from curator_assets.steps.export_state import ExportState

    (tmp_path / ".export").mkdir()
    (tmp_path / ".export" / "journal.jsonl").write_text('{"shard": "00000", "entry": {"digest": "a"}}\n{"shard": "000')
    state = ExportState(fsspec.filesystem("file"), str(tmp_path))
    assert state.load()["shards"] == {"00000": {"digest": "a"}}
    state.record("00001", {"digest": "b"})
    state.forget("00000")
    state.close()
    again = ExportState(fsspec.filesystem("file"), str(tmp_path)).load()
    assert again["shards"] == {"00000": None, "00001": {"digest": "b"}}


def _lease_fs():
    """An fsspec store that is not local disk (leases, not flocks): fsspec's in-memory one."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.store.clear()
    return fs


def test_a_lease_stamped_in_the_future_is_held(monkeypatch) -> None:
    """The holder's clock a little ahead of ours: its fresh lease looks renewed in the future; it
    is still held (taking it over would put two writers on one output)."""
    from curator_assets.steps.export_state import ExportBusy, WriterLease

    fs = _lease_fs()
    for ahead in (3.0, 500.0):
        fs.pipe("/out/.export/lease.json", json.dumps({"token": "other", "host": "h", "pid": 7,
                                                        "renewed": time.time() + ahead}).encode())
        with pytest.raises(ExportBusy, match="pid 7"):
            WriterLease(fs, "/out", "memory://out").acquire()


def test_a_lease_taken_over_stops_its_first_holder(monkeypatch) -> None:
    """Another export took the lease (this one paused past LEASE_S): at its next renewal the first
    holder finds a token not its own, leaves that lease alone and is told it lost (it stops)."""
    from curator_assets.steps import export_state

    monkeypatch.setattr(export_state, "RENEW_S", 0.05)
    fs = _lease_fs()
    lost = []
    lease = export_state.WriterLease(fs, "/out", "memory://out", on_lost=lambda: lost.append(True))
    lease.acquire()
    lease.check()
    theirs = json.dumps({"token": "other", "host": "h2", "pid": 9, "renewed": time.time()}).encode()
    fs.pipe("/out/.export/lease.json", theirs)
    lease._renewer.join(30)  # the renewer ends when it finds the lease lost
    assert lost == [True] and "host h2, pid 9" in lease.lost
    with pytest.raises(export_state.ExportBusy, match="took over"):
        lease.check()
    lease.release()
    assert fs.cat("/out/.export/lease.json") == theirs  # the new holder's lease is left alone


def test_a_lease_not_renewed_in_time_is_lost(monkeypatch) -> None:
    """Renewals that keep failing (the store unreachable): once the last one that landed is older
    than the lease can be trusted, the holder stops rather than write beside a new holder."""
    from curator_assets.steps import export_state

    monkeypatch.setattr(export_state, "RENEW_S", 0.05)
    monkeypatch.setattr(export_state, "LEASE_S", 0.3)
    fs = _lease_fs()
    lease = export_state.WriterLease(fs, "/out", "memory://out")
    lease.acquire()

    def unreachable(*_args, **_kwargs):
        raise ConnectionError("the store is unreachable")

    monkeypatch.setattr(fs, "cat_file", unreachable)
    lease._renewer.join(30)
    assert lease.lost and "could not be renewed" in lease.lost


def test_a_spooled_source_is_spooled_again_when_the_source_changed(corpus, tmp_path) -> None:
    """A killed run leaves its spooled plain tars for the next; one whose compressed source was
    replaced since is not reused (its records would be the old ones)."""
    from curator_assets.steps.export_sources import Workspace, list_sources

    src = tmp_path / "src"
    src.mkdir()
    tars = sorted(corpus.glob("*.tar"))
    (src / "00000.tar.gz").write_bytes(gzip.compress(tars[0].read_bytes()))
    work = Workspace(lambda: str(tmp_path / "work"))
    dataset = Dataset(str(src))
    (source,), _ = list_sources(dataset)
    assert work.spool(dataset, source) == "gzip"
    assert Path(work.spool_path(source.key)).read_bytes() == tars[0].read_bytes()
    (src / "00000.tar.gz").write_bytes(gzip.compress(tars[1].read_bytes()))
    (changed,), _ = list_sources(Dataset(str(src)))
    assert changed.fingerprint != source.fingerprint
    assert work.spool(dataset, changed) == "gzip"
    assert Path(work.spool_path(source.key)).read_bytes() == tars[1].read_bytes()
    assert work.spool(dataset, changed) == "gzip"  # unchanged since: reused


_HOLD = """
import sys
import fsspec
from curator_assets.steps.export_state import WriterLease
lease = WriterLease(fsspec.filesystem(sys.argv[1], **eval(sys.argv[2])), sys.argv[3], sys.argv[4])
lease.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _hold_lease(protocol: str, options: dict, root: str, url: str) -> subprocess.Popen:
    """Another process holding DST's lock (lease) until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, protocol, repr(options), root, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_export_into_the_same_output_stops_while_the_first_runs(corpus, tmp_path, capsys) -> None:
    """Another process writing DST (holding its lock): the export stops at once with exit 2 and a
    line naming that process, writing nothing; once that process is gone (killed: the kernel drops
    its lock), the export runs."""
    dst = tmp_path / "dst"
    holder = _hold_lease("file", {}, str(dst), str(dst))
    try:
        code = cli_main(["export", str(corpus), "--output", str(dst)])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and "another export is writing it" in err, err
        assert not list(dst.glob("*.tar")) and not (dst / "manifest.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(["export", str(corpus), "--output", str(dst)]) == 0
    assert (dst / "manifest.parquet").exists()


@pytest.mark.cloud
def test_an_object_store_output_is_leased(s3_store, corpus, tmp_path, monkeypatch) -> None:
    """On an object store a lease object stands for the lock: held and renewed, it stops a second
    export; left by a killed holder, it is taken over once older than LEASE_S."""
    from curator_assets.steps import export_state

    bucket = s3_store.new_bucket()
    out_url = s3_store.url(f"{bucket}/curated")
    holder = _hold_lease("s3", s3_store.storage_options, f"{bucket}/curated", out_url)
    try:
        with pytest.raises(ExportError, match=f"another export is writing it .*pid {holder.pid}") as info:
            export_dataset(str(corpus), out_url, ExportOptions(), dst_storage_options=s3_store.storage_options)
        assert info.value.code == "output_busy"
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ExportError, match="another export"):  # its lease is fresh: the holder may be alive
        export_dataset(str(corpus), out_url, ExportOptions(), dst_storage_options=s3_store.storage_options)
    monkeypatch.setattr(export_state, "LEASE_S", 0.5)
    time.sleep(0.6)  # the lease ages past LEASE_S (the holder is known dead: no renewal can come)
    result = export_dataset(str(corpus), out_url, ExportOptions(), dst_storage_options=s3_store.storage_options)
    assert result.ok and result.kept
    fs = s3_store.filesystem(fresh=True)
    assert not fs.exists(f"{bucket}/curated/.export/lease.json")  # released at the end


@pytest.mark.cloud
def test_an_export_whose_lease_is_taken_over_stops(s3_store, corpus, monkeypatch) -> None:
    """Mid-export another export takes the lease over: this one stops with output_busy before its
    manifest or state is written, and leaves the other's lease in place."""
    import threading

    from curator_assets.steps import export_state

    monkeypatch.setattr(export_state, "RENEW_S", 0.05)
    bucket = s3_store.new_bucket()
    fs = s3_store.filesystem(fresh=True)
    lease_path = f"{bucket}/curated/.export/lease.json"
    theirs = json.dumps({"token": "other", "host": "h2", "pid": 9, "renewed": time.time() + 60}).encode()
    taken: list[bool] = []

    def log(line: str) -> None:
        if line.startswith("reading ") and not taken:
            fs.pipe(lease_path, theirs)
            taken.append(True)
            deadline = time.monotonic() + 60
            while any(t.name == "export-lease" for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.01)  # polls for the state it needs: the renewer has found the lease lost

    with pytest.raises(ExportError, match="another export took over") as info:
        export_dataset(str(corpus), s3_store.url(f"{bucket}/curated"), ExportOptions(records_per_shard=4),
                       dst_storage_options=s3_store.storage_options, log=log)
    assert info.value.code == "output_busy" and taken
    assert not fs.exists(f"{bucket}/curated/manifest.parquet")
    assert not fs.exists(f"{bucket}/curated/.export/state.json")
    assert fs.cat(lease_path) == theirs


# -- the Dagster asset ---------------------------------------------------------------------------


def test_curated_shards_asset_shows_counts_and_a_picture(corpus, exported, tmp_path) -> None:
    import dagster as dg

    from curator_assets.definitions import build_definitions
    from curator_assets.defs.export_assets import curated_shards
    from curator_assets.defs.resources import ShardStorage

    dst, first = exported
    src = tmp_path / "src"
    shutil.copytree(corpus, src)
    storage = ShardStorage(dataset_url=str(src))
    defs = build_definitions(storage)
    spec = defs.resolve_asset_graph().get(dg.AssetKey("curated_shards"))
    assert spec.group_name == "dataset" and spec.automation_condition is None
    assert {k.path[-1] for k in spec.parent_keys} == {"decoded_images", "dataset_validation_summary",
                                                      "dataset_decode_summary"}
    with dg.instance_for_test() as instance:
        config = {"ops": {"curated_shards": {"config": {"records_per_shard": 4}}}}
        result = dg.materialize([curated_shards], resources={"storage": storage}, instance=instance,
                                run_config=config, raise_on_error=True)
        md = result.asset_materializations_for_node("curated_shards")[0].metadata
    out = src / "_curator" / "curated"
    assert md["kept"].value == first.kept and md["shards"].value == first.shards
    assert md["left_out_by_reason"].value == {"duplicate": 1}
    assert md["outcome"].value.startswith("![export](data:image/png;base64,")
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in dst.glob("*.tar"))


# -- object stores -------------------------------------------------------------------------------


@pytest.mark.cloud
def test_export_from_and_to_an_object_store(object_store, corpus, exported, tmp_path) -> None:
    """Each object store (S3 on moto, GCS on its emulator, Azure Blob on Azurite) in and out, one shard
    gzip-compressed: the same bytes as the local export; a rerun writes nothing."""
    dst, first = exported
    local = tmp_path / "up"
    shutil.copytree(corpus, local)
    (local / "00002.tar.gz").write_bytes(gzip.compress((local / "00002.tar").read_bytes()))
    (local / "00002.tar").unlink()
    bucket = object_store.new_bucket()
    src_url = object_store.upload(local, f"{bucket}/src")
    out_url = object_store.url(f"{bucket}/curated")
    options = ExportOptions(records_per_shard=4)
    result = export_dataset(src_url, out_url, options, storage_options=object_store.storage_options)
    assert result.ok, result.errors
    assert result.kept == first.kept and result.shards == first.shards
    fs = object_store.filesystem(fresh=True)
    for p in sorted(dst.glob("*.tar")) + sorted(dst.glob("*.idx")) + [dst / "manifest.parquet"]:
        assert fs.cat_file(f"{bucket}/curated/{p.name}") == p.read_bytes(), p.name
    again = export_dataset(src_url, out_url, options, storage_options=object_store.storage_options)
    assert again.written == [] and not again.manifest_written
    with pytest.raises(ExportError, match="inside the dataset"):
        export_dataset(src_url, object_store.url(f"{bucket}/src/out"), storage_options=object_store.storage_options)
