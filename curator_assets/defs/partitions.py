"""The ``shards`` partitions and how several of them go into one run.

A run covers a *range* of shards (Dagster's partition-range tags): the per-shard steps loop over
``context.partition_keys`` in one process, so the cost of a run (a process, imports, DALI
pipelines, the instance connection) is paid once per range, not once per shard. Every shard
keeps its own partition, materializations, check results and failure status.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import dagster as dg

# One partition per shard; keys are shard paths relative to the dataset root, without ".tar".
shards = dg.DynamicPartitionsDefinition(name="shards")

# The per-shard assets, in pipeline order; a shard is done when the last one is materialized.
PIPELINE_ASSETS = ("shard_index", "shard_validation", "decoded_images")

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, "")))
    except ValueError:
        return default


# The most shards one run takes (sensor runs, schedules and UI backfills alike). Big enough that
# a run's fixed cost (~4-6 s on 2 cores: process start, imports, DALI build) is a few percent
# of its work at img2dataset's 10,000 images per shard; small enough that a failed or killed
# run redoes little, and that many runs can share a cluster.
MAX_SHARDS_PER_RUN = _env_int("CURATOR_MAX_SHARDS_PER_RUN", 16)


# The pool the decode step takes a slot of (one decode at a time per GPU, or per CPU machine).
DECODE_POOL = "gpu"


def run_slots(instance: dg.DagsterInstance | None = None) -> int:
    """Runs the sensor and the schedule spread pending shards over: ``CURATOR_RUN_SLOTS`` when
    set, else the smaller of the instance's ``max_concurrent_runs`` and the decode pool's limit,
    else 1.

    Decodes wait for a slot of the ``gpu`` pool, so more runs than slots only add start-ups: on
    a CPU-only machine (limit 1), 8 shards x 500 as 2 runs of 4 took 17.5 s through the daemon,
    as 1 run of 8 11.0 s (`benchmarks/bench_pipeline.py --slots`); the second run's start-up,
    decode workers and writes competed with the first run's decode for the cores, then it waited
    for the slot anyway. A flood still fills ``max_concurrent_runs`` (runs of 16): there the
    next run starts and indexes while the last one decodes."""
    if os.environ.get("CURATOR_RUN_SLOTS"):
        return _env_int("CURATOR_RUN_SLOTS", 1)
    if instance is None:
        return 1
    limits = [_max_concurrent_runs(instance), _pool_limit(instance, DECODE_POOL)]
    known = [n for n in limits if isinstance(n, int) and n > 0]
    return min(known, default=1)


def _max_concurrent_runs(instance: dg.DagsterInstance) -> int | None:
    try:
        return instance.get_concurrency_config().run_queue_config.max_concurrent_runs
    except Exception:  # noqa: BLE001 - an instance without a run queue
        return None


def _pool_limit(instance: dg.DagsterInstance, pool: str) -> int | None:
    """The pool's limit: set (``dagster instance concurrency set``) or the instance default."""
    try:
        return instance.event_log_storage.get_concurrency_info(pool).limit
    except Exception:  # noqa: BLE001 - a storage without pools: no limit
        return None


def batch_size(pending: int, slots: int | None = None, most: int | None = None) -> int:
    """Shards per run for ``pending`` shards: spread over the run slots, at most ``most``.
    A trickle (one new shard) runs at once, alone; a flood fills runs of ``most``."""
    slots = slots or run_slots()
    most = most or MAX_SHARDS_PER_RUN
    return max(1, min(most, math.ceil(pending / slots)))


def contiguous_ranges(keys: Iterable[str], order: Sequence[str], size: int) -> list[list[str]]:
    """``keys`` cut into runs of consecutive partitions of ``order`` (the partitions' order, which
    a range tag selects by), each at most ``size`` long. Keys missing from ``order`` are dropped."""
    position = {k: i for i, k in enumerate(order)}
    wanted = sorted(position[k] for k in set(keys) if k in position)
    out: list[list[str]] = []
    for i in wanted:
        if out and position[out[-1][-1]] == i - 1 and len(out[-1]) < size:
            out[-1].append(order[i])
        else:
            out.append([order[i]])
    return out


def range_tags(keys: Sequence[str]) -> dict[str, str]:
    """Run tags that make one run cover ``keys`` (consecutive partitions, first to last)."""
    return {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}


def run_request(chunk: Sequence[str], run_key: str, tags: dict[str, str]) -> dg.RunRequest:
    """One run over ``chunk`` (consecutive partitions): a plain partition run for one shard, a
    ranged run for several."""
    tags = {**tags, "curator/shards": str(len(chunk))}
    if len(chunk) == 1:
        return dg.RunRequest(partition_key=chunk[0], run_key=run_key, tags=tags)
    return dg.RunRequest(run_key=run_key, tags={**tags, **range_tags(chunk)})


BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_SHARDS_PER_RUN)
