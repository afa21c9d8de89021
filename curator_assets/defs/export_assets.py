"""The dataset-level export asset: the curated shards, written on demand (the UI, the CLI, a schedule
the user turns on), never on every shard change (it has no automation condition)."""

import posixpath

import dagster as dg

from curator_assets.defs.assets import (
    DATASET_GROUP,
    dataset_decode_summary,
    dataset_validation_summary,
    decoded_images,
)
from curator_assets.defs.resources import ShardStorage
from curator_assets.steps.export import DEFAULT_RECORDS_PER_SHARD, ExportError, ExportOptions, export_dataset
from curator_assets.steps.export_manifest import outcome_picture
from curator_assets.steps.summary import png_markdown
from curator_assets.store.errors import StorageError

CURATED_DIRNAME = "curated"


class CuratedShardsConfig(dg.Config):
    output_url: str | None = None  # where the shards go; default: <output>/curated
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD
    keep_duplicates: bool = False  # keep every copy of an image (default: the first, by sha256)
    include_failed: bool = False  # keep the records whose image failed to decode
    shuffle_seed: int | None = None  # spread the records over the shards in this seed's random order


@dg.asset(
    group_name=DATASET_GROUP,
    deps=[decoded_images, dataset_validation_summary, dataset_decode_summary],
    kinds={"python"},
    description="The records that passed validation and decoded, resharded as plain tars with wds2idx-identical "
    ".idx files and one manifest.parquet (one row per input record: where it went or why it was left out). "
    "Written under <output>/curated by default; incremental, atomic per shard.",
)
def curated_shards(context: dg.AssetExecutionContext, config: CuratedShardsConfig, storage: ShardStorage
                   ) -> dg.MaterializeResult:
    dataset = storage.dataset()
    dst = config.output_url or dataset.url_of(posixpath.join(dataset.output_root, CURATED_DIRNAME),
                                              dataset.output_fs)
    options = ExportOptions(records_per_shard=config.records_per_shard, keep_duplicates=config.keep_duplicates,
                            include_failed=config.include_failed, shuffle_seed=config.shuffle_seed)
    try:
        result = export_dataset(storage.dataset_url, dst, options, storage_options=storage.storage_options(),
                                log=context.log.info)
    except (ExportError, StorageError) as exc:
        raise dg.Failure(description=f"export: {exc}", allow_retries=False) from exc
    for line in result.errors[:20]:
        context.log.error(line)
    if result.errors and not result.kept:
        raise dg.Failure(description=f"export: nothing exported; {len(result.errors)} shard(s) failed",
                         allow_retries=False)
    return dg.MaterializeResult(metadata=_metadata(result))


def _metadata(result) -> dict[str, object]:
    return {
        "output": dg.MetadataValue.path(result.output),
        "records": result.records,
        "kept": result.kept,
        "left_out": sum(result.left_out.values()),
        "left_out_by_reason": dg.MetadataValue.json(result.left_out),
        "renamed_keys": result.renamed,
        "shards": result.shards,
        "shards_written": len(result.written),
        "shards_unchanged": result.unchanged,
        "input_shards": result.sources,
        "input_errors": dg.MetadataValue.json(result.errors[:100]),
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "outcome": dg.MetadataValue.md(png_markdown(outcome_picture(result.kept, result.left_out), "export")),
    }
