"""The plan of a shard: its records, where their components are, and what the report already failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from curator_assets.formats import schema
from curator_assets.formats.idx import IndexComponent, IndexFormatError, header_starts, index_differences
from curator_assets.formats.sniff import not_a_tar
from curator_assets.formats.tar_members import (
    group_records,
    scan_tar,
)
from curator_assets.steps.decode.options import IMAGE_EXTENSIONS, DecodeError, StaleIndexError
from curator_assets.steps.state import ShardState, load_shard_state

# ---------------------------------------------------------------------------------------------
# The plan: records and where their components are


# ``(ext, offset, size, name)`` of one member of a record: the index's own component type.
Component = IndexComponent


class PlannedRecord(NamedTuple):  # a tuple: one is made and read per record on the hot path
    position: int
    record_id: str
    components: tuple[Component, ...]
    image: Component | None
    caption: Component | None
    metadata: Component | None
    needed: tuple[Component, ...]  # the image, caption and JSON that the record has, in that order
    verdict: str | None = None  # "code: detail" when the record is failed without decoding


@dataclass
class ShardPlan:
    key: str
    shard_url: str
    shard_size: int
    records: list[PlannedRecord]
    source: str  # "index" | "scan"
    verify_headers: bool  # check each member's tar header (the plan came from an index)
    bytes_read: int = 0  # what planning read (index bytes, or tar headers)
    problems: list[str] = field(default_factory=list)  # shard-level notes (a damaged tar, ...)
    # Shard-level problems that make the result not ok: (code, detail), e.g. a truncated tar.
    errors: list[tuple[str, str]] = field(default_factory=list)
    report: str = "none"  # the validation report: "used" | "stale" | "none" | "unreadable"
    flagged: int = 0  # records failed by the report's verdict
    # Data offset -> first header offset, for members whose name or size is in a PAX or GNU
    # long-name header before their own (their ustar name field is not their name).
    header_at: dict[int, int] = field(default_factory=dict)
    # Planned from the index alone (a remote shard): the reads of the batches check every
    # needed member's headers, and the bytes after the last record, against it; a mismatch
    # raises StaleIndexError and the shard is planned again from a scan.
    checked_in_reads: bool = False
    tail: int = 0  # where the end of the archive should begin (checked_in_reads)

    def first_header(self, comp: Component) -> int:
        return self.header_at.get(comp.offset, comp.offset - 512)


_SLOTS = {schema.IMAGE: 0, schema.CAPTION: 1, schema.METADATA: 2}
_ROLES = {ext: (_SLOTS[role], rank) for ext, (role, rank) in schema.ROLES.items()}


def _planned(position: int, record_id: str, comps: tuple[Component, ...]) -> PlannedRecord:
    """The record with its image, caption and JSON picked out (by the schema's roles, any case).
    Two components of one role whose extensions differ only in case make it ambiguous."""
    picked: list = [None, None, None]
    ranks = [len(IMAGE_EXTENSIONS)] * 3
    verdict = None
    for c in comps:
        role = _ROLES.get(c[0]) or _ROLES.get(c[0].lower())
        if role is None:
            continue
        slot, rank = role
        if rank < ranks[slot]:
            ranks[slot] = rank
            picked[slot] = c
        elif rank == ranks[slot] and c[0] != picked[slot][0]:
            verdict = (f"ambiguous_extension: .{picked[slot][0]} and .{c[0]} differ only in case; rename one "
                       "(lower-casing readers refuse the record)")
    return PlannedRecord(position, record_id, comps, *picked, tuple(c for c in picked if c is not None), verdict)


def apply_report(plan: ShardPlan, report, fingerprint: str | None) -> None:
    """Fail the records that ``report`` (a :class:`~curator_assets.formats.report.ShardReport`)
    lists with record-level problems, with its code and detail; only when the report was made
    from this tar (``fingerprint``), else it is stale and ignored."""
    if report is None:
        return
    if not report.describes(fingerprint):
        plan.report = "stale"
        plan.problems.append("the validation report describes an older version of the tar: not used")
        return
    plan.report = "used"
    flagged = report.problem_records()
    if not flagged:
        return
    records = plan.records
    for n, rec in enumerate(records):
        problems = flagged.get(rec.record_id)
        if problems and rec.verdict is None:
            text = "; ".join(f"{p.code}: {p.detail}" for p in problems[:3])
            records[n] = rec._replace(verdict=f"{text} (validation report)")
            plan.flagged += 1


AUTO = "auto"  # plan_shard's report: read the shard's stored validation report, if any


def plan_shard(dataset, key: str, report: Any = AUTO, *, scan: bool = True,
               state: ShardState | None = None) -> ShardPlan:
    """The records of shard ``key``, from a scan of every header (never the data), checked
    against the shard's ``.idx`` when it has one.

    An index that does not describe the tar exactly (a record missing, duplicated, moved or
    added; another shard's index) raises :class:`StaleIndexError`: decoding from it would put
    one member's bytes under another record's ID. A damaged tar is planned from the
    recovering scan (its problems listed, and kept as shard errors), so every record it can
    find is decoded. ``report``: the shard's :class:`~curator_assets.formats.report.ShardReport`
    whose verdict fails records (see :func:`apply_report`); ``"auto"`` reads the stored one,
    None uses none. Raises :class:`DecodeError` for a file that is no tar at all, or holds
    nothing readable.

    ``scan=False``: a remote shard with a named index is planned from the index alone (see
    :func:`_plan_from_index`): the header scan would read the whole object once more before the
    batches read it again. The caller must plan again with a scan on :class:`StaleIndexError`,
    passing the same ``state`` (what :func:`load_plan_state` read), so nothing is read twice.
    """
    state = state or load_plan_state(dataset, key, report)
    shard, raw = state.info, state.index_bytes
    if state.index_error is not None:
        exc = state.index_error
        raise DecodeError(f"{shard.url}: cannot read its index: {exc}") from exc
    plan = None if scan or dataset.local or not raw else _plan_from_index(state)
    if plan is None:
        plan = _plan_from_scan(dataset, state)
    if report == AUTO:
        report = _stored_report(state, plan)
    apply_report(plan, report, shard.fingerprint)
    return plan


def load_plan_state(dataset, key: str, report: Any = AUTO) -> ShardState:
    """What planning reads of shard ``key``: its info, its index bytes, and (``report="auto"``)
    its stored validation report."""
    return load_shard_state(dataset, key, index_info=False, report=report == AUTO)


def _plan_from_index(state: ShardState) -> ShardPlan | None:
    """The records as the index lists them, with where each member's headers must begin
    (:func:`~curator_assets.formats.idx.header_starts`); None when the index cannot describe the tar
    (the scan then decides how it is wrong)."""
    shard, raw = state.info, state.index_bytes or b""
    try:
        index = state.parsed_index()
    except IndexFormatError:
        return None
    starts = header_starts(index, shard.size)
    if isinstance(starts, str) or not index.records:
        return None
    planned = [_planned(n, rec.key, rec.components) for n, rec in enumerate(index.records)]
    comps = [c for rec in index.records for c in rec.components]
    header_at = {c.offset: at for c, at in zip(comps, starts, strict=True) if at != c.offset - 512}
    last = comps[-1]
    plan = ShardPlan(shard.key, shard.url, shard.size, planned, "index", True, len(raw), header_at=header_at)
    plan.checked_in_reads, plan.tail = True, last.offset + ((last.size + 511) & -512)
    return plan


def _plan_from_scan(dataset, state: ShardState) -> ShardPlan:
    shard, raw = state.info, state.index_bytes
    scan, read = _scan_shard(dataset, shard)
    problems = [f"{p.code} at byte {p.offset}: {p.detail}" for p in scan.problems]
    records = group_records(scan.members)
    header_at = {m.offset: m.header_offset for m in scan.members if m.header_offset != m.offset - 512}
    bytes_read = (512 * len(scan.members) if read is None else read) + len(raw or b"")
    source = "scan"
    if raw:
        source = _check_index(state, scan, records, problems)
    planned = [
        _planned(n, rec.key, tuple(Component(ext, m.offset, m.size, m.name) for ext, m in rec.components))
        for n, rec in enumerate(records)
    ]
    plan = ShardPlan(shard.key, shard.url, shard.size, planned, source, source == "index", bytes_read, problems,
                     header_at=header_at)
    plan.errors += [(p.code, f"{p.detail} (at byte {p.offset})") for p in scan.problems]
    return plan


def _scan_shard(dataset, shard):
    """Every header of the shard (recovering past damage), and the bytes that took from a remote
    store (None for a local file); a file with nothing readable is refused, saying what it is
    (``not_a_tar``) or where it broke."""
    with dataset.open_shard(shard.key) as f:
        scan = scan_tar(f, recover=True, total_size=shard.size)
        if scan.problems and not scan.members:
            f.seek(0)
            why = not_a_tar(f.read(512))
            first = scan.problems[0]
            if why is not None:
                raise DecodeError(f"{shard.url}: {why}", "not_a_tar")
            raise DecodeError(f"{shard.url}: {first.detail} (at byte {first.offset}): nothing to decode", first.code)
        read = getattr(f, "bytes_read", None)
    return scan, read


def _check_index(state: ShardState, scan, records, problems: list[str]) -> str:
    """"index" when the shard's ``.idx`` describes the scanned tar exactly (and has names), else
    "scan"; raises :class:`StaleIndexError` for an index of another tar."""
    shard, idx_url = state.info, state.index_url
    try:
        index = state.parsed_index()
    except IndexFormatError as exc:
        raise DecodeError(f"{shard.url}: unreadable index: {exc}", "idx_unreadable") from exc
    if scan.problems:
        problems.append(f"{idx_url} not used: the tar is damaged, its records come from a recovering header scan")
        return "scan"
    _refuse_stale(shard.url, index, records)
    if index.has_names:
        return "index"
    problems.append(f"{idx_url} is a v1.1 index (no member names): record IDs come from a header scan")
    return "scan"


def _stored_report(state: ShardState, plan: ShardPlan):
    exc = state.report_error
    if exc is not None:
        plan.report = "unreadable"
        plan.problems.append(f"the validation report cannot be read ({exc}): not used")
    return state.report


def _refuse_stale(shard_url: str, index, records) -> None:
    diffs = index_differences(index, records, limit=3)
    if diffs:
        raise StaleIndexError(
            f"{shard_url}: its .idx does not match the tar: {'; '.join(diffs)}; "
            "rebuild the index (curator-assets index --force) (idx_stale)"
        )


