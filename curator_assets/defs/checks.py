"""Asset checks over the validation reports.

``check_shard_has_no_errors`` is blocking: a shard with a shard-level error (tar structure,
index, record IDs) stops the run before anything downstream of ``shard_validation`` (the
decode) touches it. Record-level warnings never block: the decoder skips those records and
says why, so one bad image does not hold back the rest of the shard.
"""


import dagster as dg

from curator_assets.defs.assets import dataset_validation_summary, shard_validation
from curator_assets.defs.resources import ShardStorage
from curator_assets.validation import ERROR, WARNING, ShardReport, read_report, summarize_dataset

_SHOWN = 20  # problems listed in the check's metadata; the report holds all of them


def _report(context: dg.AssetCheckExecutionContext, storage: ShardStorage) -> ShardReport:
    # The report the asset wrote in this run (the check runs after it, blocking or not).
    report = read_report(storage.dataset(), context.partition_key)
    if report is None:
        raise dg.Failure(description=f"shard {context.partition_key}: no validation report found", allow_retries=False)
    return report


def _problem_metadata(report: ShardReport, severity: str) -> dict[str, object]:
    chosen = [p for p in report.problems if p.severity == severity]
    counts: dict[str, int] = {}
    for p in chosen:
        counts[p.code] = counts.get(p.code, 0) + 1
    return {
        "records": report.records,
        severity + "s": len(chosen),
        "counts": dg.MetadataValue.json(counts),
        "problems": dg.MetadataValue.json([p.to_json() for p in chosen[:_SHOWN]]),
    }


@dg.asset_check(
    asset=shard_validation,
    blocking=True,
    description="Fails (ERROR) when the shard has a shard-level problem; downstream decoding does not run.",
)
def check_shard_has_no_errors(context: dg.AssetCheckExecutionContext, storage: ShardStorage) -> dg.AssetCheckResult:
    report = _report(context, storage)
    errors = [p for p in report.problems if p.severity == ERROR]
    codes = sorted({p.code for p in errors})
    return dg.AssetCheckResult(
        passed=not errors,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{len(errors)} error(s): {', '.join(codes)}" if errors else "no shard-level errors"),
        metadata=_problem_metadata(report, ERROR),
    )


@dg.asset_check(
    asset=shard_validation,
    description="Warns when records have problems (bad image bytes, side files, no image); decoding still runs.",
)
def check_shard_records_readable(context: dg.AssetCheckExecutionContext, storage: ShardStorage) -> dg.AssetCheckResult:
    report = _report(context, storage)
    affected = report.problem_records()
    return dg.AssetCheckResult(
        passed=not affected,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{len(affected)} of {report.records} record(s) will be skipped by the decoder"
            if affected else f"all {report.records} record(s) look decodable"
        ),
        metadata={**_problem_metadata(report, WARNING), "affected_records": len(affected)},
    )


@dg.asset_check(
    asset=dataset_validation_summary,
    description="Warns when a record ID occurs in more than one shard (readers would return two samples with one ID).",
)
def check_record_ids_unique_across_shards(storage: ShardStorage) -> dg.AssetCheckResult:
    summary = summarize_dataset(storage.dataset())
    examples = dict(list(summary.cross_shard_duplicates.items())[:_SHOWN])
    return dg.AssetCheckResult(
        passed=summary.duplicate_ids == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{summary.duplicate_ids} record ID(s) in more than one shard" if summary.duplicate_ids
            else f"record IDs unique across {summary.validated} validated shard(s)"
        ),
        metadata={"duplicate_ids": summary.duplicate_ids, "examples": dg.MetadataValue.json(examples)},
    )
