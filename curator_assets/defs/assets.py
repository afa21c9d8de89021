"""Per-shard assets. Each body resolves the shard, calls the core, and reports metadata."""


import dagster as dg

from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.index import IndexFormatError, ensure_index
from curator_assets.storage import StorageError
from curator_assets.tar_members import TarError

SHARD_GROUP = "shards"


class ShardIndexConfig(dg.Config):
    force: bool = False  # rebuild even when the existing index is up to date


def last_metadata(context: dg.AssetExecutionContext, asset_key: dg.AssetKey) -> dict[str, object]:
    """Metadata of this partition's latest materialization of ``asset_key`` (raw values)."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[context.partition_key]), limit=1
    )
    if not result.records:
        return {}
    materialization = result.records[0].asset_materialization
    if materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


@dg.asset(
    partitions_def=shards,
    group_name=SHARD_GROUP,
    kinds={"python"},
    description="The shard's DALI .idx (wds2idx v1.2 format): built, or reused when the tar is unchanged.",
)
def shard_index(context: dg.AssetExecutionContext, config: ShardIndexConfig, storage: ShardStorage) -> dg.MaterializeResult:
    previous = last_metadata(context, context.asset_key)
    try:
        result = ensure_index(storage.dataset(), context.partition_key, force=config.force, previous=previous)
    except (TarError, IndexFormatError, StorageError) as exc:
        raise dg.Failure(description=f"shard {context.partition_key}: {exc}", allow_retries=False) from exc
    context.log.info(
        f"{'reused' if result.reused else 'built'} {result.index_url}: {result.records} records in {result.seconds:.3f}s"
    )
    return dg.MaterializeResult(
        metadata={
            "records": result.records,
            "members": result.members,
            "bytes": result.bytes,
            "seconds": round(result.seconds, 4),
            "idx_path": dg.MetadataValue.path(result.index_url),
            "reused": result.reused,
            "tar_fingerprint": result.tar_fingerprint,
            "index_fingerprint": result.index_fingerprint or "",
        },
        data_version=dg.DataVersion(f"{result.tar_fingerprint}|{result.index_fingerprint}"),
    )
