"""Per-shard assets. Each body resolves the shard, calls the core, and reports metadata."""


import dagster as dg

from curator_assets.decode import DEFAULT_HW_DECODER_LOAD, DecodeError, DecodeOptions, decode_shard
from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.index import IndexFormatError, ensure_index
from curator_assets.manifest import markdown_preview
from curator_assets.storage import StorageError
from curator_assets.tar_members import TarError
from curator_assets.validation import summarize_dataset, validate_shard, write_report, write_summary

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
    check_specs=[
        dg.AssetCheckSpec(
            "index_written", asset="shard_index",
            description="The shard is a readable tar and its .idx was written (or is up to date).",
        )
    ],
)
def shard_index(
    context: dg.AssetExecutionContext, config: ShardIndexConfig, storage: ShardStorage
) -> dg.MaterializeResult:
    previous = last_metadata(context, context.asset_key)
    try:
        result = ensure_index(storage.dataset(), context.partition_key, force=config.force, previous=previous)
    except (TarError, IndexFormatError) as exc:
        # A damaged shard is a finding, not a crash: the run goes on so that shard_validation
        # reports every problem and readable record, and its blocking check stops decoding.
        context.log.error(f"shard {context.partition_key}: no index: {exc}")
        return dg.MaterializeResult(
            metadata={"indexed": False, "error": str(exc), "records": 0},
            check_results=[dg.AssetCheckResult(
                check_name="index_written", passed=False, severity=dg.AssetCheckSeverity.ERROR,
                description=str(exc),
            )],
        )
    except StorageError as exc:  # the store itself failed: a real failure, worth a retry
        raise dg.Failure(description=f"shard {context.partition_key}: {exc}") from exc
    verb = "reused" if result.reused else "built"
    context.log.info(f"{verb} {result.index_url}: {result.records} records in {result.seconds:.3f}s")
    return dg.MaterializeResult(
        metadata={
            "indexed": True,
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
        check_results=[dg.AssetCheckResult(check_name="index_written", passed=True,
                                           description=f"{verb}: {result.records} records")],
    )


class ShardValidationConfig(dg.Config):
    max_pixels: int = 100_000_000  # larger images are reported as image_too_large (decompression bombs)
    severities: dict[str, str] = {}  # code -> "error" | "warning", overriding the defaults


@dg.asset(
    partitions_def=shards,
    group_name=SHARD_GROUP,
    deps=[shard_index],
    kinds={"python"},
    description="Tar / idx / record-ID / image-header consistency of the shard; writes a JSON report. "
    "Shard-level errors block decoding through a blocking check.",
)
def shard_validation(
    context: dg.AssetExecutionContext, config: ShardValidationConfig, storage: ShardStorage
) -> dg.MaterializeResult:
    dataset = storage.dataset()
    key = context.partition_key
    try:
        report = validate_shard(dataset, key, max_pixels=config.max_pixels, severities=config.severities or None)
        report_url = write_report(dataset, report)
    except (StorageError, ValueError) as exc:
        raise dg.Failure(description=f"shard {key}: {exc}", allow_retries=False) from exc
    for problem in report.problems[:20]:
        log = context.log.error if problem.severity == "error" else context.log.warning
        log(f"{problem.code}: {problem.record_id or ''} {problem.member or ''} {problem.detail}".strip())
    metadata = report.metadata()
    metadata["counts"] = dg.MetadataValue.json(metadata["counts"])
    metadata["report_path"] = dg.MetadataValue.path(report_url)
    return dg.MaterializeResult(metadata=metadata)


DATASET_GROUP = "dataset"  # outside "shards": the per-shard job must not select dataset-wide assets


@dg.asset(
    group_name=DATASET_GROUP,
    deps=[shard_validation],
    kinds={"python"},
    description="All shard validation reports together: problems by code, and record IDs found in more than one shard.",
)
def dataset_validation_summary(context: dg.AssetExecutionContext, storage: ShardStorage) -> dg.MaterializeResult:
    dataset = storage.dataset()
    try:
        summary = summarize_dataset(dataset)
        summary_url = write_summary(dataset, summary)
    except (StorageError, ValueError) as exc:
        raise dg.Failure(description=f"dataset summary: {exc}", allow_retries=False) from exc
    if summary.not_validated:
        context.log.warning(f"{len(summary.not_validated)} shard(s) have no validation report yet")
    if summary.duplicate_ids:
        context.log.warning(f"{summary.duplicate_ids} record ID(s) occur in more than one shard")
    return dg.MaterializeResult(
        metadata={
            "shards": summary.shards,
            "validated": summary.validated,
            "ok_shards": summary.ok,
            "records": summary.records,
            "errors": summary.errors,
            "warnings": summary.warnings,
            "cross_shard_duplicate_ids": summary.duplicate_ids,
            "counts": dg.MetadataValue.json(summary.counts),
            "failed_shards": dg.MetadataValue.json(summary.failed_shards[:100]),
            "summary_path": dg.MetadataValue.path(summary_url),
        }
    )


class DecodedImagesConfig(dg.Config):
    device: str = "auto"  # auto | cpu | gpu: auto takes the GPU when a CUDA device is usable
    batch_size: int = 0  # images per DALI batch; 0: 64 on the CPU, 256 on a GPU
    num_threads: int = 0  # DALI worker threads in all, shared by the pipelines; 0: one per core
    pipelines: int = 2  # DALI pipelines decoding batches side by side
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD  # share of JPEGs for the hardware decoder (A100/H100)
    fast_idct: bool = False  # libjpeg-turbo's fast IDCT on the CPU path: faster, pixels off by a few levels
    reader: str = "auto"  # auto | stream | dali (DALI's own webdataset reader; local shards)


@dg.asset(
    partitions_def=shards,
    group_name=SHARD_GROUP,
    deps=[shard_index, shard_validation],
    pool="gpu",
    kinds={"dali"},
    description="Every image of the shard decoded with DALI (GPU when available, else CPU); writes a Parquet "
    "manifest with one row per record: ID, member, size, decoded or the error, caption, JSON, sha256.",
)
def decoded_images(
    context: dg.AssetExecutionContext, config: DecodedImagesConfig, storage: ShardStorage
) -> dg.MaterializeResult:
    key = context.partition_key
    try:
        options = DecodeOptions(
            device=config.device, batch_size=config.batch_size or None, num_threads=config.num_threads or None,
            hw_decoder_load=config.hw_decoder_load, fast_idct=config.fast_idct, reader=config.reader,
            pipelines=config.pipelines,
        )
    except ValueError as exc:
        raise dg.Failure(description=f"decoded_images config: {exc}", allow_retries=False) from exc
    try:
        result, rows = decode_shard(storage.dataset(), key, options)
    except (DecodeError, TarError, IndexFormatError, StorageError) as exc:
        raise dg.Failure(description=f"shard {key}: {exc}", allow_retries=False) from exc
    context.log.info(
        f"{result.decoded}/{result.records} decoded on {result.device} ({result.device_reason}), "
        f"{result.images_per_second:.0f} images/s -> {result.manifest_url}"
    )
    for note in result.problems:
        context.log.warning(note)
    for record_id, error in result.errors[:10]:
        context.log.warning(f"{record_id}: {error}")
    return dg.MaterializeResult(
        metadata={
            "records": result.records,
            "decoded": result.decoded,
            "failed": result.failed,
            "no_image": result.no_image,
            "device": result.device,
            "device_reason": result.device_reason,
            "reader": result.reader,
            "images_per_s": round(result.images_per_second, 1),
            "bytes_read": result.bytes_read,
            "seconds": round(result.seconds, 4),
            "manifest_path": dg.MetadataValue.path(result.manifest_url or ""),
            "preview": dg.MetadataValue.md(markdown_preview(rows)),
        }
    )
