"""A nightly catch-up: dynamic partitions cannot use build_schedule_from_partitioned_job, so the
schedule itself asks for a run of every shard whose pipeline has not completed."""

import os

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


def incomplete_shards(instance: dg.DagsterInstance) -> list[str]:
    """The shards whose pipeline has not completed: an asset never materialized, or whose latest
    attempt failed (a shard that once completed, then changed and failed, is not done). Shards
    with a run in progress are left to it."""
    keys = list(instance.get_dynamic_partitions(shards.name))
    done, running = set(keys), set()
    for name in PIPELINE_ASSETS:
        status = instance.get_status_by_partition(dg.AssetKey(name), keys, shards) or {}
        done &= {k for k, s in status.items() if s == dg.AssetPartitionStatus.MATERIALIZED}
        running |= {k for k, s in status.items() if s == dg.AssetPartitionStatus.IN_PROGRESS}
    return [k for k in keys if k not in done and k not in running]


@dg.schedule(
    job=shard_pipeline,
    cron_schedule=os.environ.get("CURATOR_CATCH_UP_CRON", "0 2 * * *"),
    default_status=(dg.DefaultScheduleStatus.STOPPED if os.environ.get("CURATOR_AUTOMATION") == "off"
                    else dg.DefaultScheduleStatus.RUNNING),
    description="Nightly: run the shard pipeline on every shard that has not completed it (new, failed, or missed).",
)
def catch_up_schedule(context: dg.ScheduleEvaluationContext):
    pending = incomplete_shards(context.instance)
    if not pending:
        return dg.SkipReason("every shard has completed the pipeline")
    # Several shards per run, as the sensor does (consecutive partitions, a range each); one run
    # key per range per tick: a retried tick does not launch twice.
    stamp = f"{context.scheduled_execution_time:%Y%m%dT%H%M}" if _has_tick_time(context) else "manual"
    order = context.instance.get_dynamic_partitions(shards.name)
    return [run_request(chunk, f"catch-up:{stamp}:{chunk[0]}..{chunk[-1]}", {"curator/reason": "catch-up"})
            for chunk in contiguous_ranges(pending, order, batch_size(len(pending), run_slots(context.instance)))]


def _has_tick_time(context: dg.ScheduleEvaluationContext) -> bool:
    try:
        return context.scheduled_execution_time is not None
    except Exception:  # noqa: BLE001 - a context built outside a tick raises a check error here
        return False
