"""A nightly catch-up: dynamic partitions cannot use build_schedule_from_partitioned_job, so the
schedule itself asks for a run of every shard whose pipeline has not completed."""

import os

import dagster as dg

from curator_assets.defs.jobs import shard_pipeline
from curator_assets.defs.partitions import batch_size, contiguous_ranges, run_request, run_slots, shards

# The per-shard assets, in pipeline order; a shard is done when the last one is materialized.
PIPELINE_ASSETS = ("shard_index", "shard_validation", "decoded_images")


def incomplete_shards(instance: dg.DagsterInstance) -> list[str]:
    keys = instance.get_dynamic_partitions(shards.name)
    done = set(keys)
    for name in PIPELINE_ASSETS:
        done &= instance.get_materialized_partitions(dg.AssetKey(name))
    return [k for k in keys if k not in done]


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
