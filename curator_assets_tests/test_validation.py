"""Shard validation: the malformed corpus, clean shards in every tar format, reports, the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from curator_assets.cli import main
from curator_assets.formats.report import (
    CODES,
    DEFAULT_SEVERITIES,
    ERROR,
    WARNING,
    ShardReport,
    read_report,
    resolve_severities,
    summarize,
    write_report,
)
from curator_assets.formats.sniff import jpeg_header
from curator_assets.steps.validate import fast_validate, summarize_dataset, validate_file, validate_shard, write_summary
from curator_assets.store.dataset import Dataset
from curator_assets_tests import malformed

DEFAULT_PIXELS = 100_000_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> dict[str, malformed.Case]:
    root = tmp_path_factory.mktemp("corpus")
    return {c.name: c for c in malformed.build(root, photos)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, photos) -> dict[str, malformed.Case]:
    root = tmp_path_factory.mktemp("clean")
    return {c.name: c for c in malformed.build(root, photos, clean=True)}


def _validate(case: malformed.Case, **kw) -> ShardReport:
    with open(case.path, "rb") as f:
        return validate_file(f, shard=str(case.path), max_pixels=case.max_pixels or DEFAULT_PIXELS, **kw)


def _codes(report: ShardReport) -> Counter[str]:
    return Counter(p.code for p in report.problems)


def _comparable(report: ShardReport) -> dict:
    data = report.to_json()
    data.pop("seconds")
    return data


def test_corpus_is_large_and_built_three_ways(corpus):
    """Judged on the shards themselves: GNU and POSIX headers, members only GNU tar writes (a
    sparse file, which tarfile cannot write), and damage (byte surgery) in most cases."""
    assert len(corpus) >= 25 and set(corpus) == set(malformed.BUILDERS)
    magics = Counter()
    for c in corpus.values():
        with open(c.path, "rb") as f:
            head = f.read(512)
        magics[head[257:265]] += len(head) == 512
    assert magics[b"ustar  \0"] >= 20 and magics[b"ustar\x0000"] >= 1, magics  # GNU; POSIX (PAX)
    with tarfile.open(corpus["sparse_gnu_tar"].path) as tar:
        assert [m.name for m in tar.getmembers() if m.issparse()] == ["holes.bin"]
    damaged = [c.name for c in corpus.values() if c.codes]
    assert len(damaged) >= 20, damaged


@pytest.mark.parametrize("name", sorted(malformed.BUILDERS))
def test_malformed_tar_alone(corpus, name):
    case = corpus[name]
    report = _validate(case)
    assert _codes(report) == case.expected_for_file()
    assert report.records == case.records
    assert len(report.record_ids) == case.records
    for p in report.problems:
        assert p.severity == DEFAULT_SEVERITIES[p.code]
        assert p.detail
    assert report.ok == (not any(DEFAULT_SEVERITIES[c] == ERROR for c in case.expected_for_file()))


@pytest.mark.parametrize("name", sorted(malformed.BUILDERS))
def test_malformed_shard_of_a_dataset(corpus, name):
    case = corpus[name]
    report = validate_shard(Dataset(str(case.folder)), malformed.SHARD, max_pixels=case.max_pixels or DEFAULT_PIXELS)
    assert _codes(report) == case.expected_for_shard()
    assert report.records == case.records
    assert report.shard == str(case.path)


@pytest.mark.parametrize("name", sorted(malformed.CLEAN_BUILDERS))
def test_clean_shards_have_no_problems(clean, name):
    case = clean[name]
    report = validate_shard(Dataset(str(case.folder)), malformed.SHARD)
    assert report.problems == []
    assert report.ok and report.index == "fresh"
    assert report.records == case.records
    # Image facts agree with Pillow's reading of every image member.
    expected = []
    with tarfile.open(case.path) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg"):
                img = Image.open(io.BytesIO(tar.extractfile(m).read()))
                expected.append((m.name, img.size[0], img.size[1], img.mode, bool(img.info.get("progressive"))))
    got = [(i.member, i.width, i.height, i.mode, i.progressive) for i in report.images]
    assert got == expected


def test_fast_pass_and_precise_pass_agree_on_every_shard(corpus, clean):
    proven = 0
    for case in [*corpus.values(), *clean.values()]:
        index = case.path.with_suffix(".idx")
        idx = index.read_bytes() if index.exists() else None
        fast = _validate(case, index_bytes=idx, expect_index=True)
        precise = _validate(case, index_bytes=idx, expect_index=True, fast=False)
        assert _comparable(fast) == _comparable(precise), case.name
        proven += not fast.problems
    assert proven >= 5  # the clean shards really went through the fast pass


def test_the_vectorised_pass_proves_plain_shards_and_declines_the_rest(corpus, clean):
    def fast(case: malformed.Case) -> ShardReport | None:
        index = case.path.with_suffix(".idx")
        with open(case.path, "rb") as f:
            return fast_validate(
                f.fileno(), lambda o, n: os.pread(f.fileno(), n, o), case.path.stat().st_size, shard="s", key=None,
                index_bytes=index.read_bytes() if index.exists() else None, expect_index=True,
                max_pixels=DEFAULT_PIXELS, levels=DEFAULT_SEVERITIES,
            )

    for name in ("clean_ustar", "clean_gnu", "clean_gnu_tar_gnu", "clean_upper_case_and_padding",
                 "clean_progressive", "clean_gnu_tar_with_directories"):
        assert fast(clean[name]) is not None, name
    # PAX and GNU long-name headers, a v1.1 index, and every shard-level problem: the precise pass.
    for name in ("clean_pax", "clean_gnu_long_names", "clean_v11_index"):
        assert fast(clean[name]) is None, name
    for name, case in corpus.items():
        if any(DEFAULT_SEVERITIES[c] == ERROR for c in case.codes) or "missing_image" in case.codes:
            assert fast(case) is None, name


@pytest.mark.parametrize("variant", ["leading_zero", "double_space", "no_final_newline", "crlf", "tab",
                                     "extra_line", "v11"])
def test_index_text_variants_give_one_answer(clean, tmp_path, variant):
    case = clean["clean_gnu"]
    text = case.path.with_suffix(".idx").read_bytes()
    first_offset = text.split(b"\n")[1].split(b" ")[1]
    changed = {
        "leading_zero": text.replace(b" " + first_offset + b" ", b" 0" + first_offset + b" ", 1),
        "double_space": text.replace(b"jpg ", b"jpg  ", 1),
        "no_final_newline": text[:-1],
        "crlf": text.replace(b"\n", b"\r\n"),
        "tab": text.replace(b"jpg ", b"jpg\t", 1),
        "extra_line": text + b"jpg 0 0 x.jpg\n",
        "v11": malformed.index_text(malformed.index_from_tarfile(case.path), "v1.1"),
    }[variant]
    assert changed != text
    with open(case.path, "rb") as f:
        fast = validate_file(f, index_bytes=changed, expect_index=True)
    with open(case.path, "rb") as f:
        precise = validate_file(f, index_bytes=changed, expect_index=True, fast=False)
    assert _comparable(fast) == _comparable(precise)
    # Readers accept the first three; the rest are reported as one index error.
    codes = [p.code for p in fast.problems]
    if variant in ("leading_zero", "no_final_newline", "v11"):
        assert codes == [] and fast.index == "fresh"
    else:
        assert len(codes) == 1 and codes[0] in ("idx_unreadable", "idx_stale") and not fast.ok


def test_record_level_problems_are_found_by_the_fast_pass(corpus):
    # These shards are otherwise clean, so the vectorised pass handles them and hands the
    # suspicious members alone to the precise checks.
    for name in ("png_named_jpg", "jpeg_truncated", "jpeg_trailing_data", "bad_json", "bad_text",
                 "decompression_bomb", "over_configured_pixel_limit"):
        case = corpus[name]
        report = _validate(case)
        assert _codes(report) == case.codes
        assert all(p.record_id for p in report.problems)
        # What a decoder skips; a complete JPEG with a trailer is only informational: it decodes.
        assert bool(report.problem_records()) == (name != "jpeg_trailing_data")


def test_image_facts_of_a_progressive_jpeg(photos):
    buf = io.BytesIO()
    Image.open(io.BytesIO(photos[0].jpg)).convert("L").save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    header = jpeg_header(lambda pos, n: data[pos : pos + n], len(data))
    assert (header.width, header.height, header.components, header.process) == (*Image.open(buf).size, 1,
                                                                                  "progressive")
    assert header.progressive and header.mode == "L"


def test_every_shard_is_judged_on_its_own(corpus, clean, tmp_path):
    # Damaged shards beside good ones: each report is what the shard gives alone.
    names = ["truncated_mid_image", "garbage", "split_record", "bad_json"]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for n, name in enumerate(names):
        shutil.copy(corpus[name].path, folder / f"{n:05d}.tar")
    shutil.copy(clean["clean_gnu"].path, folder / "00009.tar")
    dataset = Dataset(str(folder))
    keys = [s.key for s in dataset.list_shards().shards]
    assert keys == ["00000", "00001", "00002", "00003", "00009"]
    for key, name in zip(keys, [*names, None], strict=True):
        report = validate_shard(dataset, key)
        if name is None:
            assert _codes(report) == Counter(idx_missing=1)
            assert report.records == clean["clean_gnu"].records
        else:
            assert _codes(report) == corpus[name].expected_for_shard()
            assert report.records == corpus[name].records


def test_a_stream_gives_the_same_report(corpus):
    case = corpus["truncated_with_bad_json"]

    class Stream(io.RawIOBase):
        def __init__(self, data: bytes):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.inner.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    streamed = validate_file(Stream(case.path.read_bytes()), shard=str(case.path))
    assert _comparable(streamed) == _comparable(_validate(case))


def test_severities_are_configurable(corpus):
    case = corpus["png_named_jpg"]
    assert _validate(case).ok
    strict = _validate(case, severities={"not_jpeg": "error"})
    assert not strict.ok and strict.problems[0].severity == ERROR
    lenient = _validate(corpus["split_record"], severities={"split_record": "warning"})
    assert lenient.ok and {p.severity for p in lenient.problems} == {WARNING}
    with pytest.raises(ValueError, match="unknown validation code"):
        resolve_severities({"no_such_code": "error"})
    with pytest.raises(ValueError, match="must be 'error', 'warning' or 'info'"):
        resolve_severities({"not_jpeg": "fatal"})
    # Shard-level problems are errors, record-level ones warnings, by default.
    for code in ("tar_truncated", "tar_bad_header", "unsupported_member", "duplicate_record_id", "split_record",
                 "bad_record_id", "idx_unreadable", "idx_stale"):
        assert CODES[code][0] == ERROR
    for code in ("idx_missing", "missing_image", "not_jpeg", "jpeg_truncated", "image_too_large", "bad_json",
                 "bad_text"):
        assert CODES[code][0] == WARNING


def test_report_round_trip_through_storage(corpus, tmp_path):
    case = corpus["bad_json"]
    dataset = Dataset(str(case.folder), output_url=str(tmp_path / "out"))
    report = validate_shard(dataset, malformed.SHARD)
    url = write_report(dataset, report)
    assert url == str(tmp_path / "out" / "validation" / f"{malformed.SHARD}.json")
    stored = json.loads(Path(url).read_text())
    assert stored["counts"] == {"bad_json": 1, "idx_missing": 1}
    assert stored["records"] == case.records and len(stored["images"]) == case.records
    assert _comparable(read_report(dataset, malformed.SHARD)) == _comparable(report)
    assert read_report(dataset, "no-such-shard") is None
    assert not [p for p in (tmp_path / "out" / "validation").iterdir() if p.name.endswith(".tmp")]


def test_validation_over_a_non_local_store(corpus):
    # fsspec's in-memory store has no file descriptor: the seek/read path and PUT writes.
    import fsspec

    case = corpus["truncated_mid_text"]
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/validation-test/ds/00000.tar", case.path.read_bytes())
    try:
        dataset = Dataset("memory://validation-test/ds")
        report = validate_shard(dataset, "00000")
        assert _codes(report) == case.expected_for_shard()
        assert report.records == case.records
        write_report(dataset, report)
        assert read_report(dataset, "00000").records == case.records
    finally:
        fs.rm("/validation-test", recursive=True)


def _tar_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}


def test_dataset_summary_finds_record_ids_in_several_shards(photos, tmp_path):
    folder = tmp_path / "ds"
    malformed.write_tar(folder / "00000.tar", malformed.shard_members(photos, 6))
    malformed.write_tar(folder / "00001.tar", malformed.shard_members(photos[4:], 6))  # shares two records
    malformed.write_tar(folder / "00002.tar", malformed.shard_members(photos[20:], 3) + [("x.json", b"{")])
    malformed.write_tar(folder / "00003.tar", malformed.shard_members(photos[30:], 2))  # never validated
    dataset = Dataset(str(folder))
    for key in ("00000", "00001", "00002"):
        write_report(dataset, validate_shard(dataset, key))
    summary = summarize_dataset(dataset)

    shared = _tar_keys(folder / "00000.tar") & _tar_keys(folder / "00001.tar")
    assert len(shared) == 2
    assert summary.cross_shard_duplicates == {k: ["00000", "00001"] for k in sorted(shared)}
    assert summary.shards == 4 and summary.validated == 3 and summary.not_validated == ["00003"]
    assert summary.counts == {"bad_json": 1, "idx_missing": 3, "missing_image": 1}
    assert summary.shards_by_code["bad_json"] == ["00002"]
    assert summary.records == 6 + 6 + 4
    assert summary.ok == 3 and summary.failed_shards == []
    url = write_summary(dataset, summary)
    assert json.loads(Path(url).read_text())["duplicate_ids"] == 2


def test_summary_counts_a_shared_id_once_per_shard():
    a = ShardReport("a", "a", records=3, record_ids=["x", "x", "y"])
    b = ShardReport("b", "b", records=1, record_ids=["x"])
    c = ShardReport("c", "c", records=1, record_ids=["x"])
    assert summarize([("a", a), ("b", b), ("c", c)]).cross_shard_duplicates == {"x": ["a", "b", "c"]}


# -- the CLI ----------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, list[str]]:
    code = main(["validate", "--workers", "1", *args])
    return code, capsys.readouterr().out.splitlines()


def test_cli_json_lines(corpus, clean, capsys):
    code, lines = _cli(capsys, "--json", str(corpus["split_record"].folder), str(clean["clean_ustar"].folder))
    assert code == 1
    rows = [json.loads(line) for line in lines]
    assert [set(r) for r in rows] == [{"shard", "ok", "records", "problems"}] * 2
    split, good = rows
    assert split["shard"] == str(corpus["split_record"].path) and split["ok"] is False
    assert split["records"] == corpus["split_record"].records
    assert Counter(p["code"] for p in split["problems"]) == corpus["split_record"].expected_for_shard()
    assert all(set(p) == {"code", "severity", "record_id", "member", "detail"} for p in split["problems"])
    assert good == {"shard": str(clean["clean_ustar"].path), "ok": True, "records": clean["clean_ustar"].records,
                    "problems": []}


def test_cli_exit_status_and_pixel_limit(clean, capsys):
    folder = str(clean["clean_gnu"].folder)
    code, lines = _cli(capsys, folder)
    assert code == 0 and lines == [f"{clean['clean_gnu'].path}: ok, {clean['clean_gnu'].records} records"]
    # Over the limit is a warning: reported, exit status still 0.
    code, lines = _cli(capsys, "--json", "--max-pixels", "100", folder)
    row = json.loads(lines[0])
    assert code == 0 and row["ok"]
    assert Counter(p["code"] for p in row["problems"]) == Counter(image_too_large=clean["clean_gnu"].records)
    code, lines = _cli(capsys, "--json", "--max-pixels", "100", "--severity", "image_too_large=error", folder)
    assert code == 1 and not json.loads(lines[0])["ok"]


def test_cli_unreadable_path_is_an_error_line(tmp_path, capsys):
    code, lines = _cli(capsys, "--json", str(tmp_path / "missing"))
    assert code == 1
    row = json.loads(lines[0])
    assert row["ok"] is False and row["records"] == 0 and row["problems"][0]["code"] == "shard_unreadable"


def test_cli_console_entry_point(corpus):
    done = subprocess.run(
        [sys.executable, "-m", "curator_assets.cli", "validate", str(corpus["garbage"].folder),
         str(corpus["bad_text"].folder)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "not_a_tar" in done.stdout and "bad_text" in done.stdout
