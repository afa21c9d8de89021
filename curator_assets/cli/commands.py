"""``curator-assets``: index, validate and decode WebDataset shards without running Dagster.

Start-up is kept lean: each verb imports what it needs when it runs (``index`` never imports
Dagster), so indexing many shards from a shell loop stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator


class _LazyJson:
    """``json``, imported on first use: most runs print no JSON, and start-up time is measured."""

    def __getattr__(self, name: str):
        import json as module

        return getattr(module, name)


json = _LazyJson()


def _err(msg: str) -> None:
    print(f"curator-assets: {msg}", file=sys.stderr)


def storage_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value); a VALUE that reads as JSON (true, 3, {...}) is decoded,
    anything else stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def iter_targets(paths: list[str], *, index_url: str | None = None, output_url: str | None = None,
                 storage_options: dict | None = None) -> Iterator[tuple[object, str | None, str | None]]:
    """For each PATH_OR_URL: (dataset, key, error). A folder yields every shard under it; a
    .tar yields itself. A path that cannot be listed yields (None, None, error)."""
    from curator_assets.store.dataset import Dataset
    from curator_assets.store.errors import StorageError

    for path in paths:
        try:
            dataset = Dataset(path, storage_options, index_url=index_url, output_url=output_url)
            listing = dataset.list_shards()
        except (StorageError, OSError, ValueError) as exc:
            yield None, None, f"{path}: {exc}" if path not in str(exc) else str(exc)
            continue
        for shard_path, why in listing.rejected:
            yield None, None, why if shard_path in why else f"{shard_path}: {why}"
        if not listing.shards and not listing.rejected:
            yield None, None, f"{path}: no shards found (.tar files, or compressed-tar names)"
        for shard in listing.shards:
            yield dataset, shard.key, None


def _listed(args: argparse.Namespace, error_row, *, output_url: str | None = None) -> tuple[list, int]:
    """(dataset, key) for every shard the command line names, and how many paths could not be
    listed (each already reported on stderr, and with --json as ``error_row(message)``)."""
    shards, failures = [], 0
    for dataset, key, error in iter_targets(args.paths, index_url=args.index_dir, output_url=output_url,
                                            storage_options=dict(args.storage_options or [])):
        if error:
            failures += 1
            _err(error)
            if args.json:
                print(json.dumps(error_row(error)), flush=True)
            continue
        shards.append((dataset, key))
    return shards, failures


def _error_row(dataset, key: str, exc: BaseException) -> dict:
    """The row for a shard that failed: its URL, a stable code and a message that names it once."""
    try:
        shard_url = dataset.url_of(dataset.shard_path(key))
    except Exception:  # noqa: BLE001 - the store itself may be what failed
        shard_url = key
    code, text = _error_code(dataset, key, exc)
    msg = text if shard_url in text else f"{shard_url}: {text}"
    return {"shard": shard_url, "key": key, "ok": False, "code": code, "error": msg}


def _error_code(dataset, key: str, exc: BaseException) -> tuple[str, str]:
    """A failed shard's code and message. A tar that fails at its first block is looked at
    once more: a file that is no tar at all (compressed, a Git LFS pointer, text) says so."""
    from curator_assets.formats.tar_members import TarError

    if isinstance(exc, TarError):
        if exc.problem.offset == 0:
            from curator_assets.formats.sniff import not_a_tar

            try:
                with dataset.open_shard(key) as f:
                    why = not_a_tar(f.read(512))
            except OSError:
                why = None
            if why is not None:
                return "not_a_tar", f"{why} (not_a_tar)"
        return exc.problem.code, str(exc)
    code = getattr(exc, "code", None)
    if not isinstance(code, str):
        code = "shard_unreadable" if isinstance(exc, OSError) else "failed"
    return code, str(exc)


def _index_row(target: tuple[object, str, bool]) -> dict:
    """Index one shard; the CLI's row for it (errors included, never raised)."""
    from curator_assets.formats.idx import IndexFormatError
    from curator_assets.formats.tar_members import TarError
    from curator_assets.steps.index import ensure_index
    from curator_assets.store.errors import StorageError
    from curator_assets.store.fs import counting_reads

    dataset, key, force = target
    try:
        with counting_reads() as read:
            r = ensure_index(dataset, key, force=force)
    except (TarError, IndexFormatError, StorageError, OSError) as exc:
        return _error_row(dataset, key, exc)
    row = {
        "shard": r.shard_url, "key": r.key, "ok": True, "index": r.index_url, "records": r.records,
        "members": r.members, "bytes": r.bytes, "seconds": round(r.seconds, 6), "reused": r.reused,
    }
    if not dataset.all_local:  # bytes fetched from the object store (local reads are not counted)
        row["bytes_read"] = read[0]
    return row


def cmd_index(args: argparse.Namespace) -> int:
    shards, failures = _listed(args, lambda error: {"shard": None, "ok": False, "error": error})
    targets = [(dataset, key, args.force) for dataset, key in shards]

    from curator_assets.cli.parallel import map_shards
    from curator_assets.cli.progress import progress

    local = all(d.all_local for d, _, _ in targets)
    with progress(len(targets), as_json=args.json, desc="index", item="records") as bar:
        for row in map_shards(_index_row, targets, args.workers, local=local):
            with bar.external():
                failures += _print_index_row(row, args.json)
            bar.step(row.get("records") or 0)
    return 1 if failures else 0


def _print_index_row(row: dict, as_json: bool) -> int:
    """Print one shard's index row; 1 when it failed."""
    if not row.get("ok"):
        _err(row.get("error", "unknown error"))
        if as_json:
            print(json.dumps(row), flush=True)
        return 1
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        verb = "up to date" if row["reused"] else "indexed"
        print(f"{row['shard']}: {verb} -> {row['index']} ({row['records']} records, {row['members']} members)",
              flush=True)
    return 0


def _validate_row(target: tuple[object, str, int, dict | None, bool]) -> dict:
    """Validate one shard; the report as a dict (a shard that cannot be read is a problem in it).
    With ``write``, the full report goes where decode reads its verdict."""
    from curator_assets.formats.report import write_report
    from curator_assets.steps.validate import unreadable_report, validate_shard
    from curator_assets.store.errors import StorageError
    from curator_assets.store.fs import counting_reads

    dataset, key, max_pixels, severities, write = target
    try:
        with counting_reads() as read:
            report = validate_shard(dataset, key, max_pixels=max_pixels, severities=severities)
        row = report.summary_json()
        if not dataset.all_local:  # bytes fetched from the object store
            row["bytes_read"] = read[0]
        if write:
            row["report"] = write_report(dataset, report)
        return row
    except (StorageError, OSError) as exc:
        try:
            shard_url = dataset.url_of(dataset.shard_path(key))
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            shard_url = key
        return unreadable_report(shard_url, str(exc), severities).summary_json()


def _print_validation(row: dict, limit: int = 20) -> None:
    problems = row["problems"]
    errors = sum(1 for p in problems if p["severity"] == "error")
    infos = sum(1 for p in problems if p["severity"] == "info")
    warnings = len(problems) - errors - infos
    state = "ok" if row["ok"] else "FAILED"
    counts = ", ".join(f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((errors, "error"), (warnings, "warning"),
                                                                     (infos, "note")) if n)
    print(f"{row['shard']}: {state}, {row['records']} records" + (f", {counts}" if counts else ""), flush=True)
    for p in problems[:limit]:
        where = " ".join(x for x in (p["record_id"], p["member"]) if x)
        print(f"  {p['severity']:<7} {p['code']}{f' [{where}]' if where else ''}: {p['detail']}", flush=True)
    if len(problems) > limit:
        print(f"  ... {len(problems) - limit} more (--json lists all)", flush=True)


def cmd_validate(args: argparse.Namespace) -> int:

    from curator_assets.formats.report import resolve_severities
    from curator_assets.steps.validate import unreadable_report

    try:
        severities = dict(args.severities or []) or None
        resolve_severities(severities)
    except ValueError as exc:
        _err(str(exc))
        return 2
    shards, failed = _listed(args, lambda error: unreadable_report(None, error, severities).summary_json(),
                             output_url=args.output)
    write = bool(args.write_report or args.output)
    targets = [(dataset, key, args.max_pixels, severities, write) for dataset, key in shards]

    from curator_assets.cli.parallel import map_shards
    from curator_assets.cli.progress import progress

    local = all(d.all_local for d, *_ in targets)
    rows = map_shards(_validate_row, targets, args.workers, local=local)
    with progress(len(targets), as_json=args.json, desc="validate", item="records") as bar:
        for target, row in zip(targets, rows, strict=True):
            with bar.external():
                failed += _print_validate_row(target, row, severities, args.json)
            bar.step(row.get("records") or 0)
    return 1 if failed else 0


def _print_validate_row(target, row: dict, severities, as_json: bool) -> int:
    """Print one shard's validation; 1 when it is not ok."""
    from curator_assets.steps.validate import unreadable_report

    if "problems" not in row:  # a worker died before reporting this shard
        dataset, key = target[0], target[1]
        row = unreadable_report(dataset.url_of(dataset.shard_path(key)), row.get("error", "worker died"),
                                severities).summary_json()
    if as_json:
        print(json.dumps(row), flush=True)
    else:
        _print_validation(row)
    return 0 if row["ok"] else 1


def _severity(text: str) -> tuple[str, str]:
    code, sep, level = text.partition("=")
    if not sep or not code or not level:
        raise argparse.ArgumentTypeError(f"expected CODE=error|warning|info, got {text!r}")
    return code, level


def cmd_demo(args: argparse.Namespace) -> int:
    from curator_assets.cli.demo import build_demo

    paths = build_demo(args.dir, shards=args.shards, records_per_shard=args.records)
    for p in paths:
        print(p)
    print(f"demo dataset: {len(paths)} shards x {args.records} records in {args.dir}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """Decode every shard; a record that does not decode is a manifest row, not a failure. The
    exit status is 1 when a shard could not be decoded (or listed), or is damaged (a truncated
    tar: its readable records are still in the manifest)."""
    from curator_assets.decode import DecodeError, DecodeOptions, ShardDecoder, decode_shard
    from curator_assets.formats.idx import IndexFormatError
    from curator_assets.formats.tar_members import TarError
    from curator_assets.store.errors import StorageError

    try:
        options = DecodeOptions(device=args.device, batch_size=args.batch_size, num_threads=args.threads or None,
                                hw_decoder_load=args.hw_decoder_load, fast_idct=args.fast_idct,
                                reader=args.reader, pipelines=args.pipelines, max_pixels=args.max_pixels,
                                contain_crashes=args.contain_crashes, worker_timeout=args.worker_timeout)
        decoder = ShardDecoder(options)
    except (ValueError, DecodeError) as exc:
        _err(str(exc))
        return 2
    if not args.json:
        print(f"decoding on {decoder.device.name} ({decoder.device.reason}), batch {decoder.options.batch_size}, "
              f"{options.threads} threads on {options.pipelines} pipeline(s)", flush=True)
    shards, failures = _listed(args, lambda error: {"shard": None, "ok": False, "error": error},
                               output_url=args.output)
    from curator_assets.cli.progress import progress

    with progress(len(shards), as_json=args.json, desc="decode") as bar:
        for dataset, key in shards:
            try:
                result, _ = decode_shard(dataset, key, decoder=decoder)
            except (DecodeError, TarError, IndexFormatError, StorageError, OSError) as exc:
                failures += 1
                row = _error_row(dataset, key, exc)
                with bar.external():
                    _err(row["error"])
                    if args.json:
                        print(json.dumps(row), flush=True)
                bar.step()
                continue
            with bar.external():
                failures += _report_decoded(result, args.json)
            bar.step(result.decoded)
    return 1 if failures else 0


def _report_decoded(result, as_json: bool) -> int:
    """Print one decoded shard; 1 when it is damaged (a truncated tar: its readable records are
    in the manifest, but not all of them)."""
    for code, detail in result.shard_errors if not result.ok else ():
        _err(f"{result.shard_url}: {code}: {detail}")
    if as_json:
        print(json.dumps(result.as_dict()), flush=True)
    else:
        _print_decoded(result)
    return 0 if result.ok else 1


def _print_decoded(result) -> None:
    extra = "".join(f", {n} {what}" for n, what in ((result.failed, "failed"),
                                                    (result.no_image, "without an image")) if n)
    state = "" if result.ok else "FAILED, "
    print(f"{result.shard_url}: {state}decoded {result.decoded}/{result.records}{extra} "
          f"({result.images_per_second:.0f} images/s) -> {result.manifest_url}", flush=True)
    if result.flagged:
        print(f"  {result.flagged} record(s) failed by the validation report", flush=True)
    for note in result.problems:
        print(f"  note: {note}", flush=True)
    for record_id, err in result.errors[:10]:
        print(f"  {record_id}: {err}", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from curator_assets.cli.runner import run_pipeline

    return run_pipeline(args.path, index_url=args.index_dir, output_url=args.output, as_json=args.json,
                        storage_options=dict(args.storage_options or []))


def cmd_rerun_failed(args: argparse.Namespace) -> int:
    from curator_assets.cli.runner import rerun_failed

    return rerun_failed(args.path, index_url=args.index_dir, output_url=args.output, as_json=args.json,
                        storage_options=dict(args.storage_options or []))


def cmd_export(args: argparse.Namespace) -> int:
    """Export SRC to DST; 1 when an input shard gave nothing (its one-line error on stderr), 2
    when the export cannot start (DST inside SRC, a bad option)."""
    from curator_assets.steps.export import ExportError, ExportOptions, export_dataset
    from curator_assets.store.errors import StorageError

    options = ExportOptions(records_per_shard=args.records_per_shard, keep_duplicates=args.keep_duplicates,
                            include_failed=args.include_failed, shuffle_seed=args.shuffle,
                            max_pixels=args.max_pixels)
    log = None if args.json else (lambda msg: print(msg, flush=True))
    try:
        result = export_dataset(args.src, args.output, options, storage_options=dict(args.storage_options or []),
                                log=log)
    except (ExportError, StorageError) as exc:
        _err(str(exc))
        return 2
    for line in result.errors:
        _err(line)
    if args.json:
        print(json.dumps(result.as_dict()), flush=True)
    else:
        for note in result.notes:
            print(f"note: {note}", flush=True)
        left = ", ".join(f"{n} {code}" for code, n in result.left_out.items()) or "none"
        print(f"{result.output}: {result.kept}/{result.records} records kept in {result.shards} shard(s) "
              f"({len(result.written)} written, {result.unchanged} unchanged); left out: {left}", flush=True)
    return 0 if result.ok else 1


def _storage_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_options", action="append", type=storage_option,
                   metavar="KEY=VALUE", help="fsspec storage option, e.g. endpoint_url=http://... (repeatable; "
                   "pass secrets through the environment instead)")


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="write a DALI .idx (wds2idx v1.2) for each shard")
    p.add_argument("paths", nargs="+", metavar="PATH_OR_URL", help="dataset folder(s) or .tar file(s)")
    p.add_argument("--index-dir", metavar="URL", help="write indexes here instead of beside the tars")
    _storage_option_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild indexes that are up to date")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes for local shards (default: one per core)")
    p.add_argument("--json", action="store_true", help="one JSON object per shard per line")
    p.set_defaults(func=cmd_index)


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check tar structure, .idx, record IDs, image headers and side files")
    p.add_argument("paths", nargs="+", metavar="PATH_OR_URL", help="dataset folder(s) or .tar file(s)")
    p.add_argument("--json", action="store_true", help="one JSON object per shard per line")
    p.add_argument("--max-pixels", type=int, default=100_000_000, metavar="N",
                   help="report images with more pixels than this as image_too_large (default: 100 megapixels)")
    p.add_argument("--severity", dest="severities", action="append", type=_severity, metavar="CODE=LEVEL",
                   help="make a problem code an error, a warning or info (repeatable)")
    p.add_argument("--index-dir", metavar="URL", help="where the .idx files are, if not beside the tars")
    p.add_argument("--write-report", action="store_true",
                   help="write each report to <output>/validation/<key>.json, where decode reads its verdict")
    p.add_argument("--output", metavar="URL",
                   help="the output location for --write-report (implies it; default: <dataset>/_curator)")
    _storage_option_arg(p)
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes for local shards (default: one per core)")
    p.set_defaults(func=cmd_validate)


def _add_decode(sub) -> None:
    p = sub.add_parser("decode", help="decode every image with DALI (GPU if available) and write Parquet manifests")
    p.add_argument("paths", nargs="+", metavar="PATH_OR_URL", help="dataset folder(s) or .tar file(s)")
    p.add_argument("--output", metavar="URL", help="where manifests go (default: <dataset>/_curator)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU when a CUDA device is usable, else the CPU (default)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per DALI batch (default: 64 on the CPU, 256 on a GPU)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="DALI worker threads in all, shared by its pipelines (default: one per core)")
    p.add_argument("--pipelines", type=int, default=2, metavar="N",
                   help="DALI pipelines decoding batches side by side (default: 2)")
    p.add_argument("--hw-decoder-load", type=float, default=0.65, metavar="F",
                   help="share of JPEGs for the GPU's hardware decoder, 0-1 (default: 0.65)")
    p.add_argument("--fast-idct", action="store_true",
                   help="libjpeg-turbo's fast IDCT on the CPU path: faster, pixels may differ by a few levels")
    p.add_argument("--max-pixels", type=int, default=100_000_000, metavar="N",
                   help="never decode an image whose header declares more pixels (default: 100 megapixels)")
    p.add_argument("--reader", choices=("auto", "stream", "dali"), default="auto",
                   help="stream: ranged reads through fsspec (any store); dali: DALI's webdataset reader (local)")
    p.add_argument("--contain-crashes", action=argparse.BooleanOptionalAction, default=True,
                   help="decode in worker processes, so a decoder crash on a corrupt image fails that record "
                        "(\"decoder crashed (signal N)\") instead of the command (default: on; "
                        "--reader dali is never contained)")
    p.add_argument("--worker-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a contained decoder with no answer for this long on one batch is killed; the record "
                        "that hangs it fails (\"decoder hung\") and the others decode (default: 300)")
    p.add_argument("--index-dir", metavar="URL", help="where the .idx files are, if not beside the tars")
    _storage_option_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per shard per line")
    p.set_defaults(func=cmd_decode)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build the demo dataset of real photos")
    p.add_argument("dir", nargs="?", default="demo_data", metavar="DIR",
                   help="folder to write it to (default: demo_data)")
    p.add_argument("--shards", type=int, default=4, help="number of shards (default: 4)")
    p.add_argument("--records", type=int, default=250, help="records per shard")
    p.set_defaults(func=cmd_demo)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline through Dagster, in-process")
    p.add_argument("path", metavar="PATH_OR_URL", help="dataset folder (or one .tar), local or a URL")
    p.add_argument("--index-dir", metavar="URL", help="write indexes here instead of beside the tars")
    p.add_argument("--output", metavar="URL",
                   help="where reports and manifests go (default: <index or dataset>/_curator)")
    _storage_option_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per shard, then one for the dataset")
    p.set_defaults(func=cmd_run)


def _add_rerun_failed(sub) -> None:
    p = sub.add_parser("rerun-failed", help="run the pipeline again on the shards whose pipeline failed or is "
                       "incomplete in $DAGSTER_HOME, and on no other")
    p.add_argument("path", metavar="PATH_OR_URL", help="the dataset folder (or URL) that `run` or the sensor used")
    p.add_argument("--index-dir", metavar="URL", help="where the indexes go, as given to `run`")
    p.add_argument("--output", metavar="URL", help="where reports and manifests go, as given to `run`")
    _storage_option_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per shard rerun, then one for the dataset")
    p.set_defaults(func=cmd_rerun_failed)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the records that passed as new shards with indexes and one manifest")
    p.add_argument("src", metavar="SRC", help="dataset folder or URL (plain or compressed .tar shards)")
    p.add_argument("--output", required=True, metavar="DST", help="folder or URL for the shards and manifest.parquet")
    p.add_argument("--records-per-shard", type=int, default=10_000, metavar="N",
                   help="records in each output shard, the last may hold fewer (default: 10000)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep every copy of an image (default: the first in input order, by sha256)")
    p.add_argument("--include-failed", action="store_true",
                   help="keep records whose image failed to decode (validation's verdicts still apply)")
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="spread the records over the shards in a random order given by SEED")
    p.add_argument("--max-pixels", type=int, default=100_000_000, metavar="N",
                   help="for shards validated and decoded by the export: the pixel limit (default: 100 megapixels)")
    _storage_option_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object with the export's counts")
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curator-assets",
        description="Index, validate and decode WebDataset image shards (local, s3://, gs://, az://).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_index(sub)
    _add_validate(sub)
    _add_decode(sub)
    _add_demo(sub)
    _add_run(sub)
    _add_rerun_failed(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
