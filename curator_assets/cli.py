"""``curator-assets``: index, validate and decode WebDataset shards without running Dagster.

Start-up is kept lean: each verb imports what it needs when it runs (``index`` never imports
Dagster), so indexing many shards from a shell loop stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator


def _err(msg: str) -> None:
    print(f"curator-assets: {msg}", file=sys.stderr)


def iter_targets(paths: list[str], *, index_url: str | None = None, output_url: str | None = None,
                 storage_options: dict | None = None) -> Iterator[tuple[object, str | None, str | None]]:
    """For each PATH_OR_URL: (dataset, key, error). A folder yields every shard under it; a
    .tar yields itself. A path that cannot be listed yields (None, None, error)."""
    from curator_assets.storage import Dataset, StorageError

    for path in paths:
        try:
            dataset = Dataset(path, storage_options, index_url=index_url, output_url=output_url)
            listing = dataset.list_shards()
        except (StorageError, OSError, ValueError) as exc:
            yield None, None, f"{path}: {exc}" if path not in str(exc) else str(exc)
            continue
        for shard_path, why in listing.rejected:
            yield None, None, why
        if not listing.shards and not listing.rejected:
            yield None, None, f"{path}: no .tar shards found"
        for shard in listing.shards:
            yield dataset, shard.key, None


def cmd_index(args: argparse.Namespace) -> int:
    from curator_assets.index import IndexFormatError, ensure_index
    from curator_assets.storage import StorageError
    from curator_assets.tar_members import TarError

    failures = 0
    for dataset, key, error in iter_targets(args.paths, index_url=args.index_dir):
        if error:
            failures += 1
            _err(error)
            if args.json:
                print(json.dumps({"shard": None, "ok": False, "error": error}), flush=True)
            continue
        try:
            r = ensure_index(dataset, key, force=args.force)
        except (TarError, IndexFormatError, StorageError, OSError) as exc:
            failures += 1
            shard_url = dataset.url_of(dataset.shard_path(key))
            msg = str(exc) if shard_url in str(exc) else f"{shard_url}: {exc}"
            _err(msg)
            if args.json:
                print(json.dumps({"shard": shard_url, "key": key, "ok": False, "error": msg}), flush=True)
            continue
        if args.json:
            print(json.dumps({
                "shard": r.shard_url, "key": r.key, "ok": True, "index": r.index_url, "records": r.records,
                "members": r.members, "bytes": r.bytes, "seconds": round(r.seconds, 6), "reused": r.reused,
            }), flush=True)
        else:
            verb = "up to date" if r.reused else "indexed"
            print(f"{r.shard_url}: {verb} -> {r.index_url} ({r.records} records, {r.members} members)")
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from curator_assets.demo import build_demo

    paths = build_demo(args.dir, shards=args.shards, records_per_shard=args.records)
    for p in paths:
        print(p)
    print(f"demo dataset: {len(paths)} shards x {args.records} records in {args.dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from curator_assets.runner import run_pipeline

    return run_pipeline(args.path, index_url=args.index_dir, output_url=args.output, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curator-assets",
        description="Index, validate and decode WebDataset image shards (local, s3://, gs://, az://).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="write a DALI .idx (wds2idx v1.2) for each shard")
    p.add_argument("paths", nargs="+", metavar="PATH_OR_URL", help="dataset folder(s) or .tar file(s)")
    p.add_argument("--index-dir", metavar="URL", help="write indexes here instead of beside the tars")
    p.add_argument("--force", action="store_true", help="rebuild indexes that are up to date")
    p.add_argument("--json", action="store_true", help="one JSON object per shard per line")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("demo", help="build the demo dataset of real photos")
    p.add_argument("dir", nargs="?", default="demo_data", metavar="DIR")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--records", type=int, default=250, help="records per shard")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the whole pipeline through Dagster, in-process")
    p.add_argument("path", metavar="PATH_OR_URL")
    p.add_argument("--index-dir", metavar="URL")
    p.add_argument("--output", metavar="URL", help="where reports and manifests go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

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
