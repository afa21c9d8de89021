"""Per-shard assets. Each body resolves the shard, calls the core, and reports metadata."""


from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from curator_assets.decode import DecodeError, DecodeOptions, decode_shard
from curator_assets.defs.checks import (
    INDEX_CHECKS,
    INDEX_WRITTEN,
    NO_ERRORS,
    RECORDS_READABLE,
    VALIDATION_CHECKS,
    evaluation,
    validation_evaluations,
)
from curator_assets.defs.executors import STEP_TAGS
from curator_assets.defs.metadata import (
    COLUMN_SCHEMA,
    PARTITION_ROW_COUNT,
    ROW_COUNT,
    counts_table,
    manifest_column_schema,
    manifest_preview_table,
)
from curator_assets.defs.partitions import BACKFILL_POLICY, DECODE_POOL, shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.formats.idx import IndexFormatError
from curator_assets.formats.manifest import markdown_preview
from curator_assets.formats.report import write_report
from curator_assets.formats.tar_members import TarError
from curator_assets.steps.decode.options import DEFAULT_HW_DECODER_LOAD
from curator_assets.steps.decode.shared import prepare_shared_decoder, shared_decoder
from curator_assets.steps.index import ensure_index
from curator_assets.steps.summary import (
    contact_sheet,
    failures_picture,
    png_markdown,
    sample_members,
    size_picture,
    summarize_decode,
    summary_markdown,
)
from curator_assets.steps.validate import summarize_dataset, validate_shard, write_summary
from curator_assets.store.errors import StorageError

SHARD_GROUP = "shards"


class ShardIndexConfig(dg.Config):
    force: bool = False  # rebuild even when the existing index is up to date


# Every per-shard asset takes several shards per run (see partitions.py): one step loops over
# ``context.partition_keys`` and records each shard's materialization metadata and check
# results under its own partition. A shard that fails is data, not an exception, until the
# last step: raising would skip the downstream steps of every other shard of the run.
PER_SHARD = {"partitions_def": shards, "group_name": SHARD_GROUP, "backfill_policy": BACKFILL_POLICY,
             "output_required": False}


def last_metadata(context: dg.AssetExecutionContext, asset_key: dg.AssetKey, key: str) -> dict[str, object]:
    """Metadata of partition ``key``'s latest materialization of ``asset_key`` (raw values)."""
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key]), limit=1
    )
    if not result.records:
        return {}
    materialization = result.records[0].asset_materialization
    if materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def _feeds_this_run(context: dg.AssetExecutionContext, downstream: tuple[str, ...]) -> bool:
    selected = context.job_def.asset_layer.selected_asset_keys
    return any(dg.AssetKey(name) in selected for name in downstream)


def _summary_line(context: dg.AssetExecutionContext, outcomes: dict[str, tuple[dict, str | None]]) -> None:
    failed = sum(1 for _md, why in outcomes.values() if why)
    records = sum(int(md.get("records") or 0) for md, _why in outcomes.values())
    context.log.info(f"{len(outcomes)} shard(s), {records} records; {failed} failed")


def _finish(context: dg.AssetExecutionContext, outcomes: dict[str, tuple[dict, str | None]],
            downstream: tuple[str, ...]) -> Iterator[dg.Output | dg.MaterializeResult]:
    """End a multi-shard step. ``outcomes``: shard -> (metadata, why it failed or None); each
    shard's check results are logged already.

    When a later step of this run needs this asset, every shard is materialized (a failed one
    with its error as metadata and failed checks) so that the later steps run for the others;
    the last step of the run fails the shards that failed anywhere. When this is the run's last
    step, only the good shards are materialized and the failed ones fail the step."""
    _summary_line(context, outcomes)
    if _feeds_this_run(context, downstream):
        for key, (metadata, _why) in outcomes.items():
            context.add_asset_metadata(metadata, partition_key=key)
        yield dg.MaterializeResult()
    else:
        for key, (metadata, why) in outcomes.items():
            if why is None:
                context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, partition=key,
                                                          metadata=metadata))
    for check_key in context.selected_asset_check_keys:
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(check_key))
    fail_shards(context, {k: why for k, (_md, why) in outcomes.items() if why}, "failed")


def fail_shards(context: dg.AssetExecutionContext, failed: dict[str, str], verb: str) -> None:
    """Fail the step naming the shards that failed (the others are already recorded)."""
    if not failed:
        return
    shown = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:10])
    raise dg.Failure(
        description=f"{len(failed)} of {len(context.partition_keys)} shard(s) {verb}: {shown}",
        metadata={"failed_shards": dg.MetadataValue.json(failed)}, allow_retries=False,
    )


def _index_one(context: dg.AssetExecutionContext, dataset, key: str, force: bool
               ) -> tuple[dict[str, object], str | None, dg.AssetCheckEvaluation]:
    try:
        previous = last_metadata(context, context.asset_key, key)
        result = ensure_index(dataset, key, force=force, previous=previous)
    except (TarError, IndexFormatError, StorageError) as exc:
        # A damaged shard is a finding, not a crash: shard_validation still reports every
        # problem and readable record, and decoded_images refuses the shard. A store failure
        # is recorded the same way (the shard fails at decode; a rerun retries it).
        kind = "store" if isinstance(exc, StorageError) else "shard"
        context.log.error(f"shard {key}: no index: {exc}")
        return ({"indexed": False, "error": str(exc), "error_kind": kind, "records": 0},
                str(exc) if kind == "store" else None, evaluation("shard_index", INDEX_WRITTEN, key, False, str(exc)))
    verb = "reused" if result.reused else "built"
    metadata = {
        "indexed": True,
        PARTITION_ROW_COUNT: result.records,  # lines of the .idx: one per record
        "records": result.records,
        "members": result.members,
        "bytes": result.bytes,
        "seconds": round(result.seconds, 4),
        "idx_path": dg.MetadataValue.path(result.index_url),
        "reused": result.reused,
        "tar_fingerprint": result.tar_fingerprint,
        "index_fingerprint": result.index_fingerprint or "",
    }
    return metadata, None, evaluation("shard_index", INDEX_WRITTEN, key, True, f"{verb}: {result.records} records")


@dg.asset(
    **PER_SHARD,
    op_tags=STEP_TAGS["shard_index"],
    kinds={"python"},
    description="The shard's DALI .idx (wds2idx v1.2 format): built, or reused when the tar is unchanged.",
    check_specs=INDEX_CHECKS,
)
def shard_index(
    context: dg.AssetExecutionContext, config: ShardIndexConfig, storage: ShardStorage
) -> Iterator[dg.Output | dg.MaterializeResult]:
    start_decoder_early(context)
    dataset = storage.dataset()
    outcomes = {}
    for key in context.partition_keys:
        metadata, why, check = _index_one(context, dataset, key, config.force)
        outcomes[key] = (metadata, why)
        context.log_event(check)
    yield from _finish(context, outcomes, downstream=("shard_validation", "decoded_images"))


class ShardValidationConfig(dg.Config):
    max_pixels: int = 100_000_000  # larger images are reported as image_too_large (decompression bombs)
    severities: dict[str, str] = {}  # code -> "error" | "warning", overriding the defaults


def _validate_one(context: dg.AssetExecutionContext, dataset, key: str, config: ShardValidationConfig
                  ) -> tuple[dict[str, object], str | None, list[dg.AssetCheckEvaluation]]:
    try:
        report = validate_shard(dataset, key, max_pixels=config.max_pixels, severities=config.severities or None)
        report_url = write_report(dataset, report)
    except (StorageError, ValueError) as exc:
        context.log.error(f"shard {key}: not validated: {exc}")
        failed = [evaluation("shard_validation", name, key, False, f"not validated: {exc}")
                  for name in (NO_ERRORS, RECORDS_READABLE)]
        return {"validated": False, "ok": False, "error": str(exc)}, f"not validated: {exc}", failed
    if report.problems:  # one event per shard: every event is a write to the instance
        shown = [f"{p.code}: {p.record_id or ''} {p.member or ''} {p.detail}".strip() for p in report.problems[:10]]
        more = f"\n... and {len(report.problems) - 10} more" if len(report.problems) > 10 else ""
        log = context.log.error if report.errors else context.log.warning
        log(f"shard {key}: {report.errors} error(s), {report.warnings} warning(s):\n" + "\n".join(shown) + more)
    metadata = {"validated": True, **report.metadata(),
                "error_codes": sorted({p.code for p in report.problems if p.severity == "error"})}
    metadata[PARTITION_ROW_COUNT] = report.records
    metadata["problems_by_code"] = counts_table(metadata["counts"])
    metadata["counts"] = dg.MetadataValue.json(metadata["counts"])
    metadata["report_path"] = dg.MetadataValue.path(report_url)
    return metadata, None, validation_evaluations(key, report)


@dg.asset(
    **PER_SHARD,
    op_tags=STEP_TAGS["shard_validation"],
    deps=[shard_index],
    kinds={"python"},
    check_specs=VALIDATION_CHECKS,
    description="Tar / idx / record-ID / image-header consistency of the shard; writes a JSON report. "
    "A shard with a shard-level error is not decoded.",
)
def shard_validation(
    context: dg.AssetExecutionContext, config: ShardValidationConfig, storage: ShardStorage
) -> Iterator[dg.Output | dg.MaterializeResult]:
    start_decoder_early(context)  # when the run has no index step (a retry from validation)
    dataset = storage.dataset()
    outcomes = {}
    for key in context.partition_keys:
        metadata, why, checks = _validate_one(context, dataset, key, config)
        outcomes[key] = (metadata, why)
        for check in checks:
            context.log_event(check)
    yield from _finish(context, outcomes, downstream=("decoded_images",))


DATASET_GROUP = "dataset"  # outside "shards": the per-shard job must not select dataset-wide assets

# Dataset-wide assets follow the shard runs on their own: materialized again once any shard's
# upstream asset has a new materialization and no shard run is in progress (never the per-shard
# work again). Unlike AutomationCondition.eager(), a shard that is missing (failed, not yet run)
# does not hold the summary back. Evaluated by an automation condition sensor: Dagster 1.13
# creates `default_automation_condition_sensor` STOPPED, so defs/automation.py declares one that
# starts RUNNING (CURATOR_AUTOMATION=off pauses it, as it does the shard sensor and schedule).
AFTER_SHARD_RUNS = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after shard runs")


@dg.asset(
    group_name=DATASET_GROUP,
    deps=[shard_validation],
    kinds={"python"},
    automation_condition=AFTER_SHARD_RUNS,
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
            ROW_COUNT: summary.records,
            "shards": summary.shards,
            "validated": summary.validated,
            "ok_shards": summary.ok,
            "records": summary.records,
            "errors": summary.errors,
            "warnings": summary.warnings,
            "cross_shard_duplicate_ids": summary.duplicate_ids,
            "counts": dg.MetadataValue.json(summary.counts),
            "problems_by_code": counts_table(summary.counts),
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
    max_pixels: int = 100_000_000  # an image whose header declares more is failed (image_too_large), never decoded
    contain_crashes: bool = True  # DALI in supervised worker processes: a decoder crash fails one record
    worker_timeout: float = 300.0  # seconds a contained decoder may take on one batch before it counts as hung


def decode_options(config: DecodedImagesConfig) -> DecodeOptions:
    """The decoder's options from the step's config (ValueError when they make no sense)."""
    return DecodeOptions(
        device=config.device, batch_size=config.batch_size or None, num_threads=config.num_threads or None,
        hw_decoder_load=config.hw_decoder_load, fast_idct=config.fast_idct, reader=config.reader,
        pipelines=config.pipelines, max_pixels=config.max_pixels, contain_crashes=config.contain_crashes,
        worker_timeout=config.worker_timeout,
    )


# The executors that run every step of a run in its process: the job's own, and the one
# ``execute_in_process`` (``curator-assets run``, tests) puts in its place.
IN_PROCESS_EXECUTORS = frozenset({dg.in_process_executor.name, "execute_in_process_executor"})


def start_decoder_early(context: dg.AssetExecutionContext) -> None:
    """When this run decodes later in this process (the in-process executor, ``decoded_images``
    among its steps), build the decoder now in a background thread: its worker processes'
    start and DALI build (~1.5 s of wall time, ~2.5 s of CPU on 2 cores, measured in
    `benchmarks/bench_pipeline.py`) then overlap indexing and validation, which mostly wait on
    instance writes, instead of delaying the first decode."""
    if not _decodes_here_later(context):
        return
    raw = (context.run.run_config.get("ops") or {}).get("decoded_images", {}).get("config") or {}
    try:
        options = decode_options(DecodedImagesConfig(**raw))
    except Exception:  # noqa: BLE001 - a bad config is the decode step's to report, never this step's
        return
    prepare_shared_decoder(options)


def _decodes_here_later(context: dg.AssetExecutionContext) -> bool:
    job = context.job_def
    if job.executor_def.name not in IN_PROCESS_EXECUTORS:
        return False  # each step in its own process (Celery, Kubernetes): the decoder is elsewhere
    steps = context.run.step_keys_to_execute
    if steps is not None:
        return "decoded_images" in steps
    if context.run.asset_selection:
        return dg.AssetKey("decoded_images") in context.run.asset_selection
    return job.has_node_named("decoded_images")


def _blocked(context: dg.AssetExecutionContext, key: str) -> str | None:
    """Why shard ``key`` must not be decoded, from its latest validation (None: go ahead).
    A shard never validated (``decoded_images`` materialized alone) is decoded."""
    verdict = last_metadata(context, dg.AssetKey("shard_validation"), key)
    if not verdict:
        return None
    if verdict.get("validated") is False:
        return f"not validated: {verdict.get('error')}"
    if verdict.get("errors"):
        codes = ", ".join(verdict.get("error_codes") or [])
        return f"validation found {verdict['errors']} shard-level error(s) ({codes}): not decoded"
    return None


def _contact_sheet(dataset, key: str, rows) -> dict[str, object]:
    """A grid of ~16 thumbnails of the shard's decoded images (none when nothing could be drawn)."""
    try:
        png = contact_sheet(dataset, key, sample_members(rows))
    except (OSError, ValueError):  # a picture is a courtesy: the shard's outcome stands without it
        return {}
    return {"contact_sheet": dg.MetadataValue.md(png_markdown(png))} if png else {}


def _decode_metadata(result, rows, sheet: dict[str, object] | None = None) -> dict[str, object]:
    return {
        PARTITION_ROW_COUNT: len(rows),  # rows of the shard's manifest
        COLUMN_SCHEMA: manifest_column_schema(),
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
        "preview_table": manifest_preview_table(rows),
        **(sheet or {}),
    }


def _decode_one(context: dg.AssetExecutionContext, dataset, key: str, options: DecodeOptions,
                sheets: ThreadPoolExecutor) -> tuple[str | None, Callable[[], None] | None]:
    """Decode shard ``key``: (why it failed, None), or (None, what records its materialization
    once its contact sheet, drawn by ``sheets`` meanwhile, is ready)."""
    why = _blocked(context, key)
    if why:
        context.log.error(f"shard {key}: {why}")
        return why, None
    try:
        # The process's decoder: its DALI pipelines are built once for every shard of the run.
        result, rows = decode_shard(dataset, key, options, decoder=shared_decoder(options))
    except (DecodeError, TarError, IndexFormatError, StorageError) as exc:
        context.log.error(f"shard {key}: {exc}")
        return str(exc), None
    notes = list(result.problems) + [f"{record_id}: {error}" for record_id, error in result.errors[:10]]
    if notes:  # one event per shard: every event is a write to the instance
        context.log.warning(f"shard {key}: {result.failed} record(s) not decoded:\n" + "\n".join(notes))
    sheet = sheets.submit(_contact_sheet, dataset, key, rows)

    def record() -> None:
        metadata = _decode_metadata(result, rows, sheet.result())
        context.log_event(dg.AssetMaterialization(asset_key=context.asset_key, partition=key, metadata=metadata))

    return None, record


@dg.asset(
    **PER_SHARD,
    op_tags=STEP_TAGS["decoded_images"],
    deps=[shard_index, shard_validation],
    pool=DECODE_POOL,
    kinds={"dali"},
    description="Every image of the shard decoded with DALI (GPU when available, else CPU); writes a Parquet "
    "manifest with one row per record: ID, member, size, decoded or the error, caption, JSON, sha256.",
)
def decoded_images(context: dg.AssetExecutionContext, config: DecodedImagesConfig, storage: ShardStorage
                   ) -> Iterator[dg.Output]:
    try:
        options = decode_options(config)
    except ValueError as exc:
        raise dg.Failure(description=f"decoded_images config: {exc}", allow_retries=False) from exc
    dataset = storage.dataset()
    # Each decoded shard is materialized (its own partition) once its contact sheet is drawn: a
    # helper thread draws it while the next shard decodes (Pillow lets go of the GIL), instead of
    # the decoders waiting ~50 ms a shard for it. The shards that failed fail the step at the end,
    # so they alone show as failed.
    failed: dict[str, str] = {}
    pending: list[Callable[[], None]] = []  # the last decoded shard's materialization, to record
    with ThreadPoolExecutor(1, thread_name_prefix="contact-sheet") as sheets:
        try:
            for key in context.partition_keys:
                why, record = _decode_one(context, dataset, key, options, sheets)
                while pending:
                    pending.pop()()
                pending += [record] if record else []
                if why:
                    failed[key] = why
        finally:  # also when a shard raises: the shard decoded before it stays recorded
            while pending:
                pending.pop()()
    context.log.info(f"{len(context.partition_keys) - len(failed)} shard(s) decoded, {len(failed)} failed")
    fail_shards(context, failed, "not decoded")
    yield from ()  # nothing more: every shard's materialization is already recorded


@dg.asset(
    group_name=DATASET_GROUP,
    deps=[decoded_images],
    kinds={"python"},
    automation_condition=AFTER_SHARD_RUNS,
    description="Every shard's decode manifest together (only the columns it needs): records, decoded, failed "
    "by code, bytes, images/s, devices; image sizes and aspect ratios and failures by shard as pictures; "
    "exact duplicate images (same sha256) across shards.",
)
def dataset_decode_summary(context: dg.AssetExecutionContext, storage: ShardStorage) -> dg.MaterializeResult:
    dataset = storage.dataset()
    try:
        summary = summarize_decode(dataset, [s.key for s in dataset.list_shards().shards])
    except (StorageError, ValueError) as exc:
        raise dg.Failure(description=f"decode summary: {exc}", allow_retries=False) from exc
    if summary.missing:
        context.log.warning(f"{len(summary.missing)} shard(s) have no manifest yet")
    for key, why in summary.unreadable[:10]:
        context.log.error(f"shard {key}: manifest unreadable: {why}")
    if summary.duplicate_images:
        context.log.warning(f"{summary.duplicate_images} image(s) occur in more than one shard")
    md = summary.metadata()
    metadata = {k: v for k, v in md.items() if not isinstance(v, (dict, list))}
    metadata[ROW_COUNT] = summary.records  # rows of all manifests together
    metadata[COLUMN_SCHEMA] = manifest_column_schema()
    metadata["failures_table"] = counts_table(dict(md["failures_by_code"]))
    metadata.update({k: dg.MetadataValue.json(md[k]) for k in ("devices", "failures_by_code", "duplicate_examples")})
    metadata["missing_manifests_list"] = dg.MetadataValue.json(summary.missing[:100])
    metadata["summary"] = dg.MetadataValue.md(summary_markdown(summary))
    metadata["image_sizes"] = dg.MetadataValue.md(png_markdown(size_picture(summary), "image sizes"))
    metadata["failures_by_shard"] = dg.MetadataValue.md(png_markdown(failures_picture(summary), "failures by shard"))
    return dg.MaterializeResult(metadata=metadata)
