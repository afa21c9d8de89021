"""A seeded mutation fuzzer: damaged real shards and indexes through index, validate and decode.

Small shards from real writers (the webdataset library's TarWriter, tarfile's GNU and ustar
formats) and their indexes are mutated (byte flips, mostly in headers; truncation; zeroed,
swapped, duplicated and inserted 512-byte blocks; deleted, duplicated, swapped and edited
index lines) and every verb runs on every mutant, in process. For each:

* no traceback: only the project's own errors (``TarError``, ``IndexFormatError``,
  ``DecodeError``, ``StorageError``) or problems with the documented codes;
* every verb returns (a thread guard fails the test instead of hanging the suite);
* every record decode plans is in the manifest, decoded or with its reason, and a record that
  tarfile (recovering, ``ignore_zeros``) finds but decode does not is covered by a shard problem;
* never one member's bytes under another record's ID: each decoded row's sha256 is that of the
  member tarfile reads at that offset, under that name;
* an index that ``index`` writes or keeps describes the tar as tarfile reads it.

A small sample of mutants also goes through the CLI in subprocesses with a timeout: no hang,
no traceback. ``CURATOR_FUZZ_SEED`` and ``CURATOR_FUZZ_MUTANTS`` change the seed and the count.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import subprocess
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curator_assets.decode import DecodeError, DecodeOptions, ShardDecoder, decode_shard
from curator_assets.formats.idx import IndexFormatError, parse_index
from curator_assets.formats.report import CODES, ERROR
from curator_assets.formats.tar_members import TarError, split_key
from curator_assets.steps.index import ensure_index
from curator_assets.steps.validate import validate_shard
from curator_assets.store.dataset import Dataset
from curator_assets.store.errors import StorageError
from curator_assets_tests.test_realworld_tars import tarfile_tar, webdataset_tar

SEED = int(os.environ.get("CURATOR_FUZZ_SEED", "20261201"))
MUTANTS = int(os.environ.get("CURATOR_FUZZ_MUTANTS", "300"))
BLOCK = 512
OURS = (TarError, IndexFormatError, DecodeError, StorageError)


@dataclass
class Seed:
    name: str
    tar: bytes
    idx: bytes
    headers: list[int]  # offsets of every header block (extension headers included)
    originals: dict[str, str]  # member name -> sha256 of its bytes, before any mutation
    placed: dict[str, tuple[int, int]]  # member name -> (data offset, size), before any mutation


def seed_files(photos, n: int) -> list[tuple[str, bytes]]:
    return [f for p in photos[n : n + 4] for f in ((f"{p.key}.jpg", p.jpg), (f"{p.key}.txt", p.caption.encode()),
                                                    (f"{p.key}.json", b'{"n": %d}' % n))]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, photos) -> list[Seed]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    samples = [{"__key__": f"ünï/{p.key}", "jpg": p.jpg, "txt": p.caption} for p in photos[:4]]
    long = [(f"{'d' * 110}/{name}", data) for name, data in seed_files(photos, 4)]
    paths = {
        "webdataset": webdataset_tar(root / "wds.tar", samples),
        "tarfile_gnu": tarfile_tar(root / "gnu.tar", long, tarfile.GNU_FORMAT),
        "tarfile_ustar": tarfile_tar(root / "ustar.tar", seed_files(photos, 8), tarfile.USTAR_FORMAT, dirs=False),
    }
    out = []
    for name, path in paths.items():
        folder = root / name
        folder.mkdir()
        (folder / "00000.tar").write_bytes(path.read_bytes())
        ensure_index(Dataset(str(folder)), "00000")
        with tarfile.open(path) as tar:
            headers = sorted({b for m in tar.getmembers() for b in range(m.offset, m.offset_data, BLOCK)})
            originals = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                         for m in tar.getmembers() if m.isreg()}
            placed = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}
        out.append(Seed(name, path.read_bytes(), (folder / "00000.idx").read_bytes(), headers, originals, placed))
    return out


# -- mutations -------------------------------------------------------------------------------------


def mutate_tar(rng: random.Random, seed: Seed) -> tuple[bytes, str]:
    data = bytearray(seed.tar)
    blocks = len(data) // BLOCK
    kind = rng.choice(["flip_header", "flip_header", "flip_any", "truncate", "zero_block", "swap_blocks",
                       "hole", "duplicate_block", "size_field"])
    if kind in ("flip_header", "flip_any"):
        for _ in range(rng.randint(1, 6)):
            base = rng.choice(seed.headers) if kind == "flip_header" else 0
            at = base + rng.randrange(BLOCK if kind == "flip_header" else len(data))
            data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "zero_block":
        at = rng.choice(seed.headers) if rng.random() < 0.7 else rng.randrange(blocks) * BLOCK
        data[at : at + BLOCK] = bytes(BLOCK)
    elif kind == "swap_blocks":
        a, b = sorted(rng.sample(range(blocks), 2))
        data[a * BLOCK : (a + 1) * BLOCK], data[b * BLOCK : (b + 1) * BLOCK] = (
            data[b * BLOCK : (b + 1) * BLOCK], data[a * BLOCK : (a + 1) * BLOCK])
    elif kind == "hole":
        at = rng.choice(seed.headers)
        data[at:at] = bytes(BLOCK * rng.choice([1, 2, 8, 21]))
    elif kind == "duplicate_block":
        at = rng.choice(seed.headers)
        data[at:at] = data[at : at + BLOCK]
    else:  # a size field rewritten: negative, huge, garbage, or off by a block
        at = rng.choice(seed.headers)
        field = rng.choice([b"\xff" * 12, b"\x80" + (1 << 80).to_bytes(11, "big")[-11:], b"-0000000001\0",
                            b"-0000001750\0", b"77777777777\0", b"zz\0", b"%011o\0" % rng.randrange(1 << 20)])
        data[at + 124 : at + 136] = field
        if rng.random() < 0.7:  # with a checksum that matches, so the header looks real
            data[at + 148 : at + 156] = b" " * 8
            data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + BLOCK])
    return bytes(data), kind


def mutate_index(rng: random.Random, idx: bytes) -> tuple[bytes, str]:
    head, *lines = idx.decode("utf-8", "surrogateescape").splitlines()
    kind = rng.choice(["delete", "duplicate", "swap", "offset", "size", "digit", "truncate", "garbage", "count"])
    if kind == "delete" and len(lines) > 1:
        del lines[rng.randrange(len(lines))]
    elif kind == "duplicate":
        n = rng.randrange(len(lines))
        lines.insert(n, lines[n])
    elif kind == "swap" and len(lines) > 1:
        a, b = rng.sample(range(len(lines)), 2)
        lines[a], lines[b] = lines[b], lines[a]
    elif kind in ("offset", "size"):
        n = rng.randrange(len(lines))
        fields = lines[n].split(" ")
        at = 4 * rng.randrange(len(fields) // 4) + (1 if kind == "offset" else 2)
        fields[at] = str(max(0, int(fields[at]) + rng.choice([-BLOCK, BLOCK, 1, -1, 10 * BLOCK])))
        lines[n] = " ".join(fields)
    elif kind == "digit":
        n = rng.randrange(len(lines))
        text = list(lines[n])
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        text[rng.choice(digits)] = str(rng.randrange(10))
        lines[n] = "".join(text)
    elif kind == "truncate":
        raw = idx[: rng.randrange(len(idx))]
        return raw, kind
    elif kind == "garbage":
        raw = bytearray(idx)
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), kind
    count = len(lines) + (rng.choice([-1, 1]) if kind == "count" else 0)  # else a count that agrees
    return (f"{head.split()[0]} {count}\n" + "\n".join(lines) + "\n").encode("utf-8", "surrogateescape"), kind


def make_mutant(rng: random.Random, seed: Seed) -> tuple[bytes, bytes | None, str]:
    roll = rng.random()
    if roll < 0.4:
        tar, kind = mutate_tar(rng, seed)
        return tar, seed.idx, f"tar:{kind}"
    if roll < 0.6:
        tar, kind = mutate_tar(rng, seed)
        return tar, None, f"tar:{kind},no-idx"
    if roll < 0.85:
        idx, kind = mutate_index(rng, seed.idx)
        return seed.tar, idx, f"idx:{kind}"
    tar, tkind = mutate_tar(rng, seed)
    idx, ikind = mutate_index(rng, seed.idx)
    return tar, idx, f"tar:{tkind},idx:{ikind}"


# -- the independent reader ------------------------------------------------------------------------


def tarfile_view(data: bytes, path: Path) -> dict[int, tuple[str, int, str]]:
    """data offset -> (name, size, sha256) of every regular member tarfile finds, recovering
    past zeros and bad headers (``ignore_zeros``), up to where it gives up."""
    found: dict[int, tuple[str, int, str]] = {}
    last = -1
    try:
        with tarfile.open(path, ignore_zeros=True, errors="surrogateescape") as tar:
            while len(found) < 10_000:
                try:
                    m = tar.next()
                except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError):
                    break
                if m is None or m.offset <= last or m.size < 0:  # tarfile takes negative sizes: stop there
                    break
                last = m.offset
                if m.isreg() and not m.issparse() and m.offset_data + m.size <= len(data):
                    member = data[m.offset_data : m.offset_data + m.size]
                    found[m.offset_data] = (m.name, m.size, hashlib.sha256(member).hexdigest())
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError):
        pass
    return found


def record_keys(view: dict[int, tuple[str, int, str]]) -> set[str]:
    keys = set()
    for name, _, _ in view.values():
        base = name.rpartition("/")[2]
        if base and not base.startswith(".") and "." in base:
            keys.add(split_key(name)[0])
    return keys


# -- the checks ------------------------------------------------------------------------------------


def bounded(pool: ThreadPoolExecutor, call, *args):
    return pool.submit(call, *args).result(timeout=120)  # a hang fails the test instead of the suite


def check_validate(dataset: Dataset, what: str) -> set[str]:
    """The codes of the mutant's problems (all of them documented)."""
    report = validate_shard(dataset, "00000")
    codes = {p.code for p in report.problems}
    assert not codes - set(CODES), (what, codes - set(CODES))
    return codes


def refused(exc: Exception, what: str) -> str:
    """A verb's refusal: one of the project's errors, naming the shard; its class name."""
    assert isinstance(exc, OURS), (what, exc)
    assert "00000" in str(exc), (what, str(exc))  # the user is told which shard
    return type(exc).__name__


def check_decode(dataset: Dataset, data: bytes, view, seed: Seed, decoder: ShardDecoder, what: str) -> str:
    """``manifest`` when the rows were checked and the manifest written matches them, else the
    name of the project's error that refused the shard."""
    try:
        result, rows = decode_shard(dataset, "00000", decoder=decoder)
    except OURS as exc:
        return refused(exc, what)
    for row in rows:
        assert row.decoded or row.error, (what, row)
        if row.sha256 is None:
            continue
        assert split_key(row.member)[0] == row.record_id, (what, row)
        if seed.originals.get(row.member) == row.sha256:
            continue  # exactly that member's bytes as the writer wrote them, under its own name
        if row.offset in view:  # tarfile's reading of that member: same name, same bytes
            assert view[row.offset][0] == row.member and view[row.offset][2] == row.sha256, (what, row)
        else:  # beyond where tarfile gives up: the header right there must say this size
            info = tarfile.TarInfo.frombuf(data[row.offset - BLOCK : row.offset], "utf-8", "surrogateescape")
            assert info.size == row.size, (what, row)
            assert hashlib.sha256(data[row.offset : row.offset + row.size]).hexdigest() == row.sha256
    missing = record_keys(view) - {r.record_id for r in rows}
    assert not missing or result.problems, (what, missing)
    # The manifest, read back with pyarrow: every row as decode returned it.
    table = pq.read_table(result.manifest_url)
    assert table.column("record_id").to_pylist() == [r.record_id for r in rows], what
    assert table.column("decoded").to_pylist() == [r.decoded for r in rows], what
    assert table.column("sha256").to_pylist() == [r.sha256 for r in rows], what
    return "manifest"


def check_index(dataset: Dataset, folder: Path, data: bytes, view, seed: Seed, what: str) -> str:
    """``index`` when the index written or kept was checked against the tar, else the name of
    the project's error that refused the shard."""
    try:
        ensure_index(dataset, "00000")
    except OURS as exc:
        return refused(exc, what)
    index = parse_index((folder / "00000.idx").read_bytes())
    for record in index.records:
        for comp in record.components:
            member = data[comp.offset : comp.offset + comp.size]
            if seed.placed.get(comp.name) == (comp.offset, comp.size) and (
                    seed.originals[comp.name] == hashlib.sha256(member).hexdigest()):
                continue  # that member where the writer put it, its bytes untouched
            # Otherwise tarfile's reading (GNU tar and tarfile differ on some damage, such as two
            # long-name headers in a row, where the writer's layout above decides).
            assert view.get(comp.offset, (None,))[:2] == (comp.name, comp.size), (what, comp)
    return "index"


@dataclass
class Outcome:
    kind: str  # the mutation: "tar:<kind>[,no-idx]", "idx:<kind>", "tar:<kind>,idx:<kind>"
    tar_intact: bool  # the mutation left the tar's bytes as they were
    idx: bytes | None  # the index given beside the tar
    seed: Seed
    codes: set[str]  # validation's problem codes
    decoded: str  # "manifest" or the error that refused the shard
    indexed: str  # "index" or the error that refused the shard


# The seeded run (300 mutants) measured 207 through the row and manifest checks and 108 through
# the index checks; these minimums fail the test when the checks stop being reached.
MIN_MANIFEST, MIN_INDEX = 0.6, 0.3  # shares of the mutants
SHARD_ERRORS = {code for code, (severity, _) in CODES.items() if severity == ERROR}  # a tar or index at fault


def check_outcomes(outcomes: list[Outcome]) -> None:
    """The layers each mutant reached, and what each class of mutant must produce."""
    reached = Counter(o.decoded for o in outcomes) + Counter(o.indexed for o in outcomes)
    assert reached["manifest"] >= MIN_MANIFEST * len(outcomes), reached
    assert reached["index"] >= MIN_INDEX * len(outcomes), reached
    for o in outcomes:
        what = (o.kind, sorted(o.codes), o.decoded, o.indexed)
        if o.tar_intact:
            # A damaged index beside an intact tar: validation names it, decode refuses to
            # trust it (a stale index would put one member's bytes under another ID), index
            # rebuilds it.
            assert o.indexed == "index", what
            if o.idx == o.seed.idx:  # a mutation that changed nothing (a digit for itself)
                assert o.codes == set() and o.decoded == "manifest", what
            elif o.codes == {"idx_stale"}:
                assert o.decoded == "StaleIndexError", what
            else:
                assert o.codes == {"idx_unreadable"} and o.decoded == "DecodeError", what
            continue
        if o.idx is None:
            assert "idx_missing" in o.codes and o.decoded != "StaleIndexError", what
        if o.indexed != "index":  # the index step refuses only a shard validation finds at fault
            assert o.codes & SHARD_ERRORS - {"idx_stale", "idx_unreadable"}, what
        if o.decoded != "manifest":  # so does decode
            assert o.codes & SHARD_ERRORS, what


def test_mutants_of_real_shards_through_every_verb(tmp_path: Path, seeds) -> None:
    rng = random.Random(SEED)
    decoder = ShardDecoder(DecodeOptions(device="cpu", batch_size=4, pipelines=1))
    kinds: set[str] = set()
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(1) as pool:
        for n in range(MUTANTS):
            seed = seeds[n % len(seeds)]
            tar, idx, kind = make_mutant(rng, seed)
            what = f"seed {SEED} mutant {n} ({seed.name}, {kind})"
            kinds.add(kind.split(",")[0])
            folder = tmp_path / f"m{n}"
            folder.mkdir()
            (folder / "00000.tar").write_bytes(tar)
            if idx is not None:
                (folder / "00000.idx").write_bytes(idx)
            view = tarfile_view(tar, folder / "00000.tar")
            dataset = Dataset(str(folder))
            codes = bounded(pool, check_validate, dataset, what)
            decoded = bounded(pool, check_decode, dataset, tar, view, seed, decoder, what)
            indexed = bounded(pool, check_index, dataset, folder, tar, view, seed, what)
            outcomes.append(Outcome(kind, tar == seed.tar, idx, seed, codes, decoded, indexed))
    assert len(kinds) >= 15  # the mix really covers the mutation kinds
    check_outcomes(outcomes)


def test_a_sample_of_mutants_through_the_cli_never_hangs_or_tracebacks(tmp_path: Path, seeds) -> None:
    rng = random.Random(SEED + 1)
    folder = tmp_path / "ds"
    folder.mkdir()
    for n in range(6):
        seed = seeds[n % len(seeds)]
        tar, idx, _ = make_mutant(rng, seed)
        (folder / f"{n:05d}.tar").write_bytes(tar)
        if idx is not None:
            (folder / f"{n:05d}.idx").write_bytes(idx)
    command = [sys.executable, "-m", "curator_assets.cli"]
    for verb in (["validate", str(folder)], ["decode", str(folder), "--output", str(tmp_path / "out"), "--device",
                                             "cpu"], ["index", str(folder)]):
        # Bounded memory: index and validate run under a 2 GiB address-space limit (DALI's
        # reservations alone exceed any such limit, so decode's peak is read afterwards).
        limit = None if verb[0] == "decode" else _address_space_limit
        done = subprocess.run([*command, *verb], capture_output=True, text=True, timeout=300, preexec_fn=limit)
        assert done.returncode in (0, 1), (verb, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr, (verb, done.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 4 << 20, peak_kib  # the largest child process so far stayed under 4 GiB


def _address_space_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_one_key_rule_the_fast_and_the_precise_pass_agree(tmp_path: Path, seeds, photos, monkeypatch) -> None:
    """The record-key rule is written twice for speed: the vectorised pass (steps/validate_fast.py)
    and tar_members.group_records. On every seed, a shard of awkward names (dots in folders, a
    upper-case extension) and 150 mutants, both give the same
    record IDs and problems; the vectorised pass must have proven some of them itself."""
    from curator_assets.steps import validate as validate_step
    from curator_assets.steps.validate import validate_file

    proven = []
    real_fast = validate_step.fast_validate
    monkeypatch.setattr(validate_step, "fast_validate",
                        lambda *a, **k: proven.append(r := real_fast(*a, **k)) or r)
    awkward = tarfile_tar(tmp_path / "awkward.tar", [
        ("a/b.c/000031.jpg", photos[0].jpg), ("a/b.c/000031.txt", b"one"),
        ("x.y/z/0001.JPG", photos[2].jpg), ("x.y/z/0001.json", b"{}"), ("0002.jpg", photos[3].jpg),
    ], tarfile.USTAR_FORMAT, dirs=False)
    rng = random.Random(SEED + 1)
    cases = [(s.tar, s.idx) for s in seeds] + [(awkward.read_bytes(), None)]
    for _ in range(150):
        seed = rng.choice(seeds)
        cases.append((mutate_tar(rng, seed)[0], seed.idx))
    path = tmp_path / "case.tar"
    for tar, idx in cases:
        path.write_bytes(tar)
        reports = []
        for fast in (True, False):
            with open(path, "rb") as f:
                reports.append(validate_file(f, index_bytes=idx, expect_index=idx is not None, fast=fast))
        fast_report, precise = reports
        assert fast_report.record_ids == precise.record_ids
        assert sorted((p.code, p.record_id, p.member) for p in fast_report.problems) == sorted(
            (p.code, p.record_id, p.member) for p in precise.problems)
    assert sum(r is not None for r in proven) >= len(seeds) + 1  # every clean seed and the awkward shard
    with open(awkward, "rb") as f:
        awkward_ids = validate_file(f).record_ids
    assert proven[-1] is not None  # the vectorised pass itself proved the awkward shard
    with tarfile.open(awkward) as t:  # tarfile's names, cut at the first dot of the basename
        names = [m.name.rpartition("/") for m in t.getmembers() if m.isreg()]
        expected = list(dict.fromkeys(f"{d}{s}{b.split('.', 1)[0]}" for d, s, b in names if not b.startswith(".")))
    assert awkward_ids == expected == ["a/b.c/000031", "x.y/z/0001", "0002"]
