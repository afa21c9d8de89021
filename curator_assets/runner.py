"""``curator-assets run``: the whole per-shard pipeline through Dagster, in-process.

Discovery is the same code the sensor runs (list the dataset, add partitions); then the
``shard_pipeline`` job runs once per shard. A shard that fails does not stop the others.
The instance is ``$DAGSTER_HOME`` when set (so the UI shows these runs and indexes are reused
across invocations), otherwise an ephemeral one.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ShardOutcome:
    key: str
    ok: bool
    seconds: float
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset name -> metadata
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed
    errors: list[str] = field(default_factory=list)


def _plain(value: Any) -> Any:
    value = getattr(value, "value", value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _summary(name: str, md: dict[str, Any]) -> str:
    if name == "shard_index":
        if md.get("indexed") is False:
            return f"index NOT written: {md.get('error')}"
        return f"index {'reused' if md.get('reused') else 'built'} ({md.get('records')} records)"
    if name == "shard_validation":
        counts = md.get("counts")
        detail = f" [{counts}]" if counts and counts != "{}" else ""
        return f"validation {md.get('errors', 0)} errors, {md.get('warnings', 0)} warnings{detail}"
    if name == "decoded_images":
        return f"decoded {md.get('decoded')}/{md.get('records')} on {md.get('device')}"
    shown = ", ".join(f"{k}={v}" for k, v in list(md.items())[:3])
    return f"{name} ({shown})"


@dataclass
class _Session:
    """What ``run`` and ``rerun-failed`` both set up: the storage built from the arguments, the
    dataset's listing, the instance (dead runs of a killed ``run`` recovered) and the job."""

    storage: Any
    listing: Any
    instance: Any
    job: Any
    out: Any


def _open_session(path: str, *, index_url, output_url, storage_options, out, need_home: bool) -> _Session | int:
    """The shared set-up, or the exit status when it cannot be made."""
    with _collector_paused():
        if not need_home:
            _start_decoder()
        import dagster as dg

        from curator_assets.definitions import build_definitions
        from curator_assets.defs.resources import storage_from_env
        from curator_assets.storage import StorageError

        # Built with the overrides, never copied: a copied resource keeps the environment's values.
        storage = storage_from_env(dataset_url=path, index_url=index_url, output_url=output_url,
                                   extra_options=storage_options)
        try:
            listing = storage.dataset().list_shards()
        except StorageError as exc:
            print(f"curator-assets: {exc}", file=sys.stderr)
            return 1
        job = build_definitions(storage).resolve_job_def("shard_pipeline")
        home = os.environ.get("DAGSTER_HOME")
        instance = dg.DagsterInstance.get() if home else dg.DagsterInstance.ephemeral()
    _recover_dead_runs(instance, out)
    # Dagster's per-event console logging would drown the summary; every error is in it below.
    logging.getLogger("dagster").setLevel(logging.WARNING)
    return _Session(storage, listing, instance, job, out)


def _finish(session: _Session, outcomes: list[ShardOutcome], as_json: bool, reason: str, verb: str) -> bool:
    """The dataset summaries, then the closing lines; True when the shards and summaries all passed."""
    summaries_ok = _dataset_summaries(session.instance, session.storage, as_json, session.out, reason)
    failed = [o.key for o in outcomes if not o.ok]
    if not as_json:
        print(f"{len(outcomes)} shard(s){verb}: {len(outcomes) - len(failed)} ok, {len(failed)} failed"
              + (f" ({', '.join(failed)})" if failed else ""), file=session.out)
        print(_where(session.storage.dataset()), file=session.out)
    return summaries_ok and not failed


def run_pipeline(
    path: str,
    *,
    index_url: str | None = None,
    output_url: str | None = None,
    as_json: bool = False,
    out=None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """``curator-assets run``: every shard of ``path`` through the pipeline, then both dataset summaries."""
    from curator_assets.defs.partitions import shards

    out = out or sys.stdout
    session = _open_session(path, index_url=index_url, output_url=output_url, storage_options=storage_options,
                            out=out, need_home=False)
    if isinstance(session, int):
        return session
    listing = session.listing
    for bad_path, why in listing.rejected:
        print(f"curator-assets: skipping {bad_path}: {why}", file=sys.stderr)
    if not listing.shards:
        print(f"curator-assets: {path}: no shards found", file=sys.stderr)
        return 1
    instance = session.instance
    keys = [s.key for s in listing.shards]
    existing = list(instance.get_dynamic_partitions(shards.name))
    missing = [k for k in keys if k not in set(existing)]
    if missing:
        instance.add_dynamic_partitions(shards.name, missing)
    reason = "curator-assets run"
    outcomes = run_ranges(session.job, instance, keys, existing + missing, as_json, out, reason=reason)
    ok = _finish(session, outcomes, as_json, reason, "")
    return 0 if ok and not listing.rejected else 1


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Importing Dagster and making its instance allocate ~240,000 objects that live as long as
    the process: the garbage collector has nothing to free among them but would walk them
    hundreds of times (0.3-0.5 s of the one core that runs the pipeline, measured with
    benchmarks/bench_pipeline.py's `run`). Off while they are made, then frozen out of its sight."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _start_decoder() -> None:
    """Start the decoder's worker processes now, while Dagster is imported and the instance made
    (~3 s here): the first decode no longer waits ~2 s for them. These are the options of
    decoded_images' default config, which is what ``run`` runs."""
    from curator_assets.decode import DecodeOptions, prepare_shared_decoder

    prepare_shared_decoder(DecodeOptions())


PID_TAG = "curator/owner"  # host:pid of the `run` process executing a run in-process


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_dead_runs(instance, out) -> None:
    """Runs of an earlier `run` that was killed (SIGKILL, the OOM killer) stay STARTED forever and
    keep their `gpu` pool slot, so every later decode would wait for it: mark them failed and free
    what they hold. Only runs whose process is gone from this host are touched."""
    import dagster as dg

    live = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                            dg.DagsterRunStatus.STARTING]))
    for run in live:
        owner = run.tags.get(PID_TAG)
        if owner and not _alive(owner):
            instance.report_run_failed(run, f"the process running it ({owner}) is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            print(f"curator-assets: run {run.run_id[:8]} of a killed process marked failed, its slots freed",
                  file=sys.stderr)


def _where(dataset) -> str:
    """Where the outputs went: indexes, then reports and manifests."""
    indexes = dataset.url_of(dataset.index_root, dataset.index_fs) if dataset.index_root else "beside the tars"
    output = dataset.url_of(dataset.output_root, dataset.output_fs)
    return f"indexes: {indexes}; reports: {output}/validation; manifests: {output}/manifests"


def run_ranges(job, instance, keys: list[str], order: list[str], as_json: bool, out, *, reason: str,
               desc: str = "shards") -> list[ShardOutcome]:
    """Run ``job`` over ``keys`` in ranges of consecutive partitions of ``order`` (several shards
    per run, as the sensor does: each run's steps, DALI pipelines and dataset handle serve all its
    shards; every shard keeps its own partition and outcome), printing each shard's outcome, with
    a progress bar on a terminal."""
    from curator_assets.defs.partitions import MAX_SHARDS_PER_RUN, contiguous_ranges, range_tags
    from curator_assets.progress import progress

    outcomes = []
    bar = progress(len(keys), as_json=as_json, desc=desc)
    for chunk in contiguous_ranges(keys, order, MAX_SHARDS_PER_RUN):
        start = time.perf_counter()
        where = {"partition_key": chunk[0]} if len(chunk) == 1 else {"tags": range_tags(chunk)}
        result = job.execute_in_process(
            instance=instance, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
            **{**where, "tags": {"curator/reason": reason, PID_TAG: _owner(), **where.get("tags", {})}},
        )
        seconds = (time.perf_counter() - start) / len(chunk)
        events = [e.dagster_event for e in instance.all_logs(result.run_id) if e.dagster_event]
        for outcome in _outcomes(events, chunk, seconds):
            outcomes.append(outcome)
            with bar.external():
                _print_outcome(outcome, as_json, out)
            bar.step(int(outcome.assets.get("decoded_images", {}).get("decoded") or 0))
    bar.close()
    return outcomes


def _outcomes(events, chunk: list[str], seconds: float) -> list[ShardOutcome]:
    """Each shard's outcome from the events of one run over ``chunk`` (as the instance recorded
    them: a failed step's materializations of its good shards included). A shard is ok when it was
    decoded and every check on it passed; a step failure names the shards it failed."""
    by_key = {k: ShardOutcome(k, True, seconds) for k in chunk}
    for event in events:
        if event.is_step_materialization:
            mat = event.step_materialization_data.materialization
            if mat.partition in by_key:
                by_key[mat.partition].assets[mat.asset_key.to_user_string()] = {
                    k: _plain(v) for k, v in mat.metadata.items()}
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if evaluation.partition in by_key:
                by_key[evaluation.partition].checks[evaluation.check_name] = bool(evaluation.passed)
        elif event.is_step_failure:
            _note_failure(event, by_key)
    for outcome in by_key.values():
        if "decoded_images" not in outcome.assets or not all(outcome.checks.values()):
            outcome.ok = False
    return list(by_key.values())


def _note_failure(event, by_key: dict[str, ShardOutcome]) -> None:
    err = event.step_failure_data.error
    metadata = event.step_failure_data.user_failure_data
    failed = metadata.metadata.get("failed_shards") if metadata else None
    failed = getattr(failed, "value", failed)
    if isinstance(failed, dict):
        for key, why in failed.items():
            if key in by_key:
                by_key[key].errors.append(f"{event.step_key}: {why}")
        return
    msg = (err.message if err else event.message or "step failed").strip().splitlines()[0]
    for outcome in by_key.values():  # a failure of the whole step (bad config, a crash)
        outcome.errors.append(f"{event.step_key}: {msg}")


def _dataset_summaries(instance, storage, as_json: bool, out, reason: str) -> bool:
    """Materialize both dataset-wide summaries after the shards, in one run: the validation summary
    (problems by code, record IDs in more than one shard) and the decode summary (decoded and failed
    by code, exact duplicate images by sha256, its pictures). Prints each one's headline."""
    import dagster as dg

    from curator_assets.defs.assets import dataset_decode_summary, dataset_validation_summary
    from curator_assets.defs.checks import check_record_ids_unique_across_shards

    result = dg.materialize(
        [dataset_validation_summary, check_record_ids_unique_across_shards, dataset_decode_summary],
        instance=instance, resources={"storage": storage}, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        tags={"curator/reason": reason},
    )
    found = {name: _materialized(result, name) for name in (VALIDATION_SUMMARY, DECODE_SUMMARY)}
    checks = {e.check_name: bool(e.passed) for e in result.get_asset_check_evaluations()}
    if as_json:
        print(json.dumps({"dataset": found[VALIDATION_SUMMARY], "decode": found[DECODE_SUMMARY],
                          "checks": checks, "ok": result.success}, default=str), file=out, flush=True)
    else:
        for line in summary_lines(found[VALIDATION_SUMMARY], found[DECODE_SUMMARY]):
            print(line, file=out)
    return result.success


VALIDATION_SUMMARY, DECODE_SUMMARY = "dataset_validation_summary", "dataset_decode_summary"
# Pictures and long Markdown stay in the instance (the UI shows them); the terminal gets numbers.
_NOT_PRINTED = {"summary", "image_sizes", "failures_by_shard"}


def _materialized(result, name: str) -> dict[str, Any] | None:
    mats = result.asset_materializations_for_node(name)
    if not mats:
        return None
    return {k: _plain_json(v) for k, v in mats[0].metadata.items() if k not in _NOT_PRINTED}


def _plain_json(value: Any) -> Any:
    """A metadata value as plain data: JSON metadata stays a dict or list, the rest as _plain."""
    data = getattr(value, "data", None)
    return data if isinstance(data, (dict, list)) else _plain(value)


def summary_lines(validation: dict[str, Any] | None, decode: dict[str, Any] | None) -> list[str]:
    """The headline of each dataset summary, as ``run`` prints them."""
    lines = []
    if validation is None:
        lines.append("dataset: validation summary failed")
    else:
        v = validation
        lines.append(
            f"dataset: {v.get('validated')}/{v.get('shards')} shards validated, {v.get('records')} records, "
            f"{v.get('errors')} errors, {v.get('warnings')} warnings, "
            f"{v.get('cross_shard_duplicate_ids', 0)} record IDs in more than one shard")
    if decode is None:
        lines.append("decode: summary failed")
    else:
        d = decode
        codes = d.get("failures_by_code") or {}
        by_code = ", ".join(f"{code} {n}" for code, n in codes.items()) if isinstance(codes, dict) else codes
        lines.append(
            f"decode: {d.get('decoded')}/{d.get('records')} records decoded in {d.get('manifests')} manifests, "
            f"{d.get('failed')} failed" + (f" ({by_code})" if by_code else "")
            + f", {d.get('duplicate_images')} images in more than one shard (same sha256, "
            f"{d.get('duplicate_records')} records), {d.get('images_per_s')} images/s")
    return lines


def _print_outcome(o: ShardOutcome, as_json: bool, out) -> None:
    if as_json:
        print(json.dumps({"shard": o.key, "ok": o.ok, "seconds": round(o.seconds, 3), "assets": o.assets,
                          "checks": o.checks, "errors": o.errors}, default=str), file=out, flush=True)
        return
    parts = [_summary(name, md) for name, md in o.assets.items()]
    parts += [f"check {name} {'passed' if passed else 'FAILED'}" for name, passed in o.checks.items()]
    parts += [f"ERROR {e}" for e in o.errors]
    print(f"{o.key}: {'ok' if o.ok else 'FAILED'} in {o.seconds:.1f}s | " + " | ".join(parts), file=out, flush=True)


def rerun_failed(
    path: str,
    *,
    index_url: str | None = None,
    output_url: str | None = None,
    as_json: bool = False,
    out=None,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """``curator-assets rerun-failed``: run the pipeline again on the shards of ``path`` whose
    pipeline failed or is incomplete in ``$DAGSTER_HOME`` (the catch-up schedule's selection),
    and nothing else; then both dataset summaries. Exit 0 when nothing needed it or all passed."""
    from curator_assets.defs.partitions import shards
    from curator_assets.defs.schedules import incomplete_shards

    out = out or sys.stdout
    if not os.environ.get("DAGSTER_HOME"):
        print("curator-assets: rerun-failed reads the run history in $DAGSTER_HOME: set it to the "
              "instance that `run`, the sensor or the UI used", file=sys.stderr)
        return 2
    session = _open_session(path, index_url=index_url, output_url=output_url, storage_options=storage_options,
                            out=out, need_home=True)
    if isinstance(session, int):
        return session
    listed = {s.key for s in session.listing.shards}
    order = list(session.instance.get_dynamic_partitions(shards.name))
    incomplete = incomplete_shards(session.instance)
    pending = [k for k in incomplete if k in listed]
    gone = [k for k in incomplete if k not in listed]
    if gone:
        print(f"curator-assets: {len(gone)} incomplete shard(s) are no longer in {path}: not rerun", file=sys.stderr)
    if not pending:
        print("every shard has completed the pipeline: nothing to rerun", file=sys.stderr if as_json else out)
        return 0
    if not as_json:
        print(f"rerunning {len(pending)} shard(s) that failed or did not complete", file=out, flush=True)
    reason = "curator-assets rerun-failed"
    outcomes = run_ranges(session.job, session.instance, pending, order, as_json, out, reason=reason, desc="rerun")
    return 0 if _finish(session, outcomes, as_json, reason, " rerun") else 1
