import dagster as dg

from curator_assets.defs.assets import SHARD_GROUP

# Everything that runs per shard: index, then (when present) validation and decoding.
shard_pipeline = dg.define_asset_job(
    "shard_pipeline",
    selection=dg.AssetSelection.groups(SHARD_GROUP),
    description="Index (then validate and decode) one shard.",
)
