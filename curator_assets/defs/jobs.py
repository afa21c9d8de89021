import dagster as dg

from curator_assets.defs.assets import SHARD_GROUP
from curator_assets.defs.executors import executor_from_env

# Everything that runs per shard: index, then validation, then decoding, for each shard of the
# run's partition range.
#
# The in-process executor: a run's steps form a chain (index -> validation -> decode), so a
# process per step buys no parallelism and costs a fresh interpreter, Dagster, the project and
# DALI per step (~3 s each on 2 cores, measured by benchmarks/bench_pipeline.py); in one
# process the DALI pipelines, the fsspec filesystem and the instance connection are shared by
# every step and every shard of the run. Parallelism comes from concurrent runs (dagster.yaml).
# A cluster deployment (CURATOR_EXECUTOR=celery or k8s, defs/executors.py) swaps in an executor
# that routes each step to a worker: decode to the GPU queue / GPU nodes, the rest to CPU ones.
shard_pipeline = dg.define_asset_job(
    "shard_pipeline",
    selection=dg.AssetSelection.groups(SHARD_GROUP),
    executor_def=executor_from_env(),
    description="Index, validate and decode a range of shards (each shard its own partition).",
)
