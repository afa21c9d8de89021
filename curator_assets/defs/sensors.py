"""The shard sensor: discovers shards, adds partitions, and requests a run per new or changed shard."""


import base64
import hashlib
import json
import os
import zlib

import dagster as dg

from curator_assets.defs.jobs import shard_pipeline
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.storage import StorageError


def short_fingerprint(fingerprint: str) -> str:
    return hashlib.blake2b(fingerprint.encode(), digest_size=6).hexdigest()


def encode_cursor(seen: dict[str, str]) -> str:
    # Compressed so that 100,000 shards still fit a cursor comfortably.
    raw = json.dumps(seen, separators=(",", ":"), sort_keys=True).encode()
    return "z1:" + base64.b64encode(zlib.compress(raw, 6)).decode()


def decode_cursor(cursor: str | None) -> dict[str, str]:
    if not cursor or not cursor.startswith("z1:"):
        return {}
    try:
        return json.loads(zlib.decompress(base64.b64decode(cursor[3:])))
    except (ValueError, zlib.error):
        return {}


@dg.sensor(
    job=shard_pipeline,
    minimum_interval_seconds=int(os.environ.get("CURATOR_SENSOR_INTERVAL", "30")),
    description="Lists the dataset; adds new shards as partitions and runs the shard pipeline on new or changed ones.",
)
def shard_sensor(context: dg.SensorEvaluationContext, storage: ShardStorage) -> dg.SensorResult | dg.SkipReason:
    try:
        listing = storage.dataset().list_shards()
    except StorageError as exc:
        return dg.SkipReason(f"cannot list the dataset: {exc}")
    for path, why in listing.rejected:
        context.log.warning(f"skipping {path}: {why}")

    # Read the existing keys once: has_dynamic_partition per key is slow at scale.
    existing = set(context.instance.get_dynamic_partitions(shards.name))
    seen = decode_cursor(context.cursor)
    current = {s.key: short_fingerprint(s.fingerprint) for s in listing.shards}

    new_keys = [k for k in current if k not in existing]
    gone = sorted(existing.difference(current))
    if gone:
        # Kept, not deleted: their materializations and manifests stay visible in the UI.
        context.log.warning(f"{len(gone)} partition(s) no longer have a shard, e.g. {', '.join(gone[:5])}")
    changed = [k for k, fp in current.items() if k in existing and k in seen and seen[k] != fp]
    run_requests = [
        dg.RunRequest(partition_key=k, run_key=f"{k}@{current[k]}", tags={"curator/reason": "new shard"})
        for k in new_keys
    ] + [
        dg.RunRequest(partition_key=k, run_key=f"{k}@{current[k]}", tags={"curator/reason": "shard changed"})
        for k in changed
    ]
    if not run_requests and seen == current:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new or changed shards among {len(current)}"))
    if new_keys or changed:
        context.log.info(f"{len(new_keys)} new shard(s), {len(changed)} changed, {len(current)} in all")
    return dg.SensorResult(
        dynamic_partitions_requests=[shards.build_add_request(new_keys)] if new_keys else [],
        run_requests=run_requests,
        cursor=encode_cursor(current),
    )
