"""The shard sensor: discovers shards, adds partitions, and requests a run per new or changed shard."""


import base64
import hashlib
import json
import os
import posixpath
import zlib

import dagster as dg

from curator_assets.defs.jobs import shard_pipeline
from curator_assets.defs.partitions import (
    PIPELINE_ASSETS,
    batch_size,
    contiguous_ranges,
    run_request,
    run_slots,
    shards,
)
from curator_assets.defs.resources import ShardStorage
from curator_assets.store.errors import StorageError


def short_fingerprint(fingerprint: str) -> str:
    return hashlib.blake2b(fingerprint.encode(), digest_size=6).hexdigest()


def encode_cursor(seen: dict[str, str]) -> str:
    """The keys, sorted, one per line (they compress to a byte or two each: neighbours share
    their prefix), then each key's 6-byte fingerprint in binary (which no compressor shrinks):
    ~8 bytes per shard once base64'd, 0.8 MB at 100,000 shards."""
    keys = sorted(seen)
    raw = "\n".join(keys).encode() + b"\0" + b"".join(bytes.fromhex(seen[k]) for k in keys)
    return "z2:" + base64.b64encode(zlib.compress(raw, 9)).decode()


def decode_cursor(cursor: str | None) -> dict[str, str]:
    if not cursor or cursor[:3] not in ("z1:", "z2:"):
        return {}
    try:
        raw = zlib.decompress(base64.b64decode(cursor[3:]))
        if cursor.startswith("z1:"):  # the earlier JSON form
            return json.loads(raw)
        names, _, fps = raw.partition(b"\0")
        keys = names.decode().split("\n") if names else []
        size = len(fps) // max(1, len(keys))
        return {k: fps[i * size:(i + 1) * size].hex() for i, k in enumerate(keys)}
    except (ValueError, zlib.error, UnicodeDecodeError):
        return {}


def _requests(keys: list[str], order: list[str], current: dict[str, str], reason: str,
              slots: int) -> list[dg.RunRequest]:
    """Runs for ``keys``, several shards per run: consecutive partitions (a range tag selects by
    position), ``batch_size`` of them per run. The run key names the range and the shards'
    fingerprints, so a retried tick never launches the same work twice."""
    out = []
    for chunk in contiguous_ranges(keys, order, batch_size(len(keys), slots)):
        digest = short_fingerprint("|".join(f"{k}@{current[k]}" for k in chunk))
        run_key = f"{chunk[0]}@{current[chunk[0]]}" if len(chunk) == 1 else f"{chunk[0]}..{chunk[-1]}@{digest}"
        out.append(run_request(chunk, run_key, {"curator/reason": reason}))
    return out


@dg.sensor(
    job=shard_pipeline,
    minimum_interval_seconds=int(os.environ.get("CURATOR_SENSOR_INTERVAL", "30")),
    default_status=(dg.DefaultSensorStatus.STOPPED if os.environ.get("CURATOR_AUTOMATION") == "off"
                    else dg.DefaultSensorStatus.RUNNING),
    description="Lists the dataset; adds new shards as partitions and runs the shard pipeline on new or changed "
    "ones, several shards per run.",
)
def shard_sensor(context: dg.SensorEvaluationContext, storage: ShardStorage) -> dg.SensorResult | dg.SkipReason:
    # One listing per tick (no request per object), one read of the partitions, a cursor of one
    # short fingerprint per shard (zlib-compressed). Batching: the new shards of a tick, in
    # listing order, become runs of consecutive partitions; ``batch_size`` spreads them over the
    # run slots (``run_slots``: the fewer of max_concurrent_runs and the decode pool's slots, or
    # CURATOR_RUN_SLOTS) with at most CURATOR_MAX_SHARDS_PER_RUN (16) per run, so one new shard runs
    # alone and at once, 8 on a CPU-only machine one run of 8, and 100,000 6,250 runs of 16.
    try:
        listing = storage.dataset().list_shards()
    except StorageError as exc:
        return dg.SkipReason(f"cannot list the dataset: {exc}")
    for path, why in listing.rejected[:20]:
        context.log.warning(f"skipping {path}: {why}")

    # Read the existing keys once: has_dynamic_partition per key is slow at scale.
    existing_order = list(context.instance.get_dynamic_partitions(shards.name))
    existing = set(existing_order)
    seen = decode_cursor(context.cursor)
    current = {s.key: short_fingerprint(s.fingerprint) for s in listing.shards}

    if seen and not current:
        # An empty listing of a dataset that had shards is far likelier a wrong URL, a permission
        # change or a store hiccup than every shard deleted: nothing is removed on its say-so.
        return dg.SkipReason(f"the dataset lists no shards where {len(seen)} were: nothing removed; "
                             "check the URL and credentials (the tick after a real deletion removes them)")
    new_keys = [k for k in current if k not in existing]
    gone = sorted(k for k in existing.difference(current) if k in seen)  # since the last tick
    if gone:
        context.log.warning(f"{len(gone)} shard(s) removed from the store, e.g. {', '.join(gone[:5])}: "
                            "their partitions are deleted, their outputs kept")
        existing_order = [k for k in existing_order if k not in set(gone)]
    changed = [k for k, fp in current.items() if k in existing and k in seen and seen[k] != fp]
    # A shard that was gone at the last tick and is back (the usual way to replace an object)
    # is processed again, whatever its bytes.
    returned = [k for k in current if k in existing and k not in seen] if seen else []
    changed += returned
    order = existing_order + new_keys  # the partitions' order once the add request is applied
    slots = run_slots(context.instance)
    run_requests = (_requests(new_keys, order, current, "new shard", slots)
                    + _requests(changed, order, current, "shard changed", slots))
    if not run_requests and seen == current:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new or changed shards among {len(current)}"))
    if new_keys or changed:
        context.log.info(f"{len(new_keys)} new shard(s), {len(changed)} changed, {len(current)} in all: "
                         f"{len(run_requests)} run(s)")
    partition_requests = [shards.build_add_request(new_keys)] if new_keys else []
    if gone:
        partition_requests.append(shards.build_delete_request(gone))
    return dg.SensorResult(
        dynamic_partitions_requests=partition_requests,
        run_requests=run_requests,
        asset_events=removal_records(storage, gone),
        cursor=encode_cursor(current),
    )


def removal_records(storage: ShardStorage, gone: list[str]) -> list[dg.AssetObservation]:
    """What is kept of a removed shard. Its partition is deleted, so the UI shows only the shards
    the store holds and the dataset summaries (which read the listing) no longer count it; its
    materializations stay in each asset's event history, its index, report and manifest stay where
    they were written, and this observation (recorded before the partition goes) says where. A
    shard that comes back is a new partition again and is processed again."""
    if not gone:
        return []
    dataset = storage.dataset()
    out = []
    for key in gone:
        metadata = {
            "removed": True,
            "shard": dataset.url_of(posixpath.join(dataset.root, key + ".tar")),
            "report": dataset.url_of(dataset.output_path("validation", key, ".json"), dataset.output_fs),
            "manifest": dataset.url_of(dataset.output_path("manifests", key, ".parquet"), dataset.output_fs),
        }
        out += [dg.AssetObservation(asset_key=name, partition=key, metadata=metadata,
                                    description="shard removed from the store; its outputs are kept")
                for name in PIPELINE_ASSETS]
    return out
