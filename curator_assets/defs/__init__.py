"""The Dagster shell over the core: partitions, resources, assets, checks, sensors, jobs."""

import warnings

# Two Dagster features this shell relies on are marked beta/preview in 1.13 (a backfill policy
# on the assets, partitioned check specs); the warnings would repeat at every code-location load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`")
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
