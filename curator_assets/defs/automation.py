"""The automation condition sensor that keeps the dataset-wide assets fresh after shard runs.

Dagster 1.13 evaluates automation conditions only in an automation condition sensor, and the one
it creates on its own (``default_automation_condition_sensor``) starts STOPPED. This one starts
RUNNING, like the shard sensor and the catch-up schedule; ``CURATOR_AUTOMATION=off`` pauses it.
"""

import os

import dagster as dg

from curator_assets.defs.assets import DATASET_GROUP

dataset_automation_sensor = dg.AutomationConditionSensorDefinition(
    "dataset_automation_sensor",
    target=dg.AssetSelection.groups(DATASET_GROUP),
    default_status=(dg.DefaultSensorStatus.STOPPED if os.environ.get("CURATOR_AUTOMATION") == "off"
                    else dg.DefaultSensorStatus.RUNNING),
    minimum_interval_seconds=30,
    description="Materializes the dataset summaries again after shard runs (their automation conditions).",
)
