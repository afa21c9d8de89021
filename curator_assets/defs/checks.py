"""Asset checks.

The per-shard checks are evaluated inside their asset's step (``check_specs``), once per shard
of the run, and recorded per partition: a separate check step would cost a step (and, with a
multi-process executor, a process) per check for a few milliseconds of work on a report the
asset has just built in memory.

``check_shard_has_no_errors`` is not a Dagster *blocking* check: a run covers several shards,
and a failed blocking check stops the downstream step for all of them. Instead
``decoded_images`` reads each shard's verdict and refuses to decode a shard with a shard-level
error (that shard fails, alone; the run's other shards are decoded). Record-level warnings
never stop a shard: the decoder marks those records failed with the reason.
"""

from __future__ import annotations

import dagster as dg

from curator_assets.defs.partitions import shards
from curator_assets.defs.resources import ShardStorage
from curator_assets.formats.report import ERROR, WARNING, ShardReport
from curator_assets.steps.validate import summarize_dataset

_SHOWN = 20  # problems listed in the check's metadata; the report holds all of them

INDEX_WRITTEN = "index_written"
NO_ERRORS = "check_shard_has_no_errors"
RECORDS_READABLE = "check_shard_records_readable"


def shard_check_spec(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description, partitions_def=shards)


INDEX_CHECKS = [shard_check_spec(
    INDEX_WRITTEN, "shard_index", "The shard is a readable tar and its .idx was written (or is up to date).")]
VALIDATION_CHECKS = [
    shard_check_spec(NO_ERRORS, "shard_validation",
                     "Fails (ERROR) when the shard has a shard-level problem; the shard is then not decoded."),
    shard_check_spec(RECORDS_READABLE, "shard_validation",
                     "Warns when records have problems (bad image bytes, side files, no image); decoding still runs."),
]


def evaluation(asset: str, name: str, key: str, passed: bool, description: str, *,
               warn: bool = False, metadata: dict | None = None) -> dg.AssetCheckEvaluation:
    """One check's result for one shard (partition)."""
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(asset), check_name=name, passed=passed, partition=key,
        severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
        description=description, metadata=metadata or {},
    )


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


def validation_evaluations(key: str, report: ShardReport) -> list[dg.AssetCheckEvaluation]:
    errors = [p for p in report.problems if p.severity == ERROR]
    codes = sorted({p.code for p in errors})
    affected = report.problem_records()
    return [
        evaluation(
            "shard_validation", NO_ERRORS, key, not errors,
            f"{len(errors)} error(s): {', '.join(codes)}" if errors else "no shard-level errors",
            metadata=_problem_metadata(report, ERROR),
        ),
        evaluation(
            "shard_validation", RECORDS_READABLE, key, not affected,
            f"{len(affected)} of {report.records} record(s) will be skipped by the decoder"
            if affected else f"all {report.records} record(s) look decodable",
            warn=True, metadata={**_problem_metadata(report, WARNING), "affected_records": len(affected)},
        ),
    ]


@dg.asset_check(
    asset="dataset_validation_summary",
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
