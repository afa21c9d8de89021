"""The code location: ``dagster dev`` (workspace.yaml) and ``curator-assets run`` load these."""

from __future__ import annotations

import dagster as dg

from curator_assets.defs import assets, automation, checks, export_assets, jobs, schedules, sensors
from curator_assets.defs.resources import ShardStorage, storage_from_env


def build_definitions(storage: ShardStorage | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules([assets, export_assets]),
        asset_checks=dg.load_asset_checks_from_modules([checks]),
        jobs=[jobs.shard_pipeline],
        sensors=[sensors.shard_sensor, automation.dataset_automation_sensor],
        schedules=[schedules.catch_up_schedule],
        resources={"storage": storage or storage_from_env()},
        # The executor of jobs that set none: the runs that materialize the dataset summaries
        # (the automation sensor's, the UI's). Dagster's default (multiprocess) starts a fresh
        # interpreter per step, seconds of imports for a step of well under a second; in process
        # the steps run in the run worker, which the warm launcher has already warmed.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
