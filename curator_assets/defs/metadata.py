"""Dagster's standard metadata for the shard assets: row counts, the manifest's column schema,
and table previews the UI renders as tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dagster as dg
import pyarrow as pa

from curator_assets.formats.manifest import SCHEMA, ManifestRow

ROW_COUNT = "dagster/row_count"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
COLUMN_SCHEMA = "dagster/column_schema"

# Columns of the manifest preview table (the manifest has them all, and more).
PREVIEW_COLUMNS = ("position", "record_id", "member", "width", "height", "channels", "decoded", "error", "caption")


def _type_name(arrow_type: pa.DataType) -> str:
    return str(arrow_type)


def manifest_column_schema() -> dg.TableSchema:
    """The Parquet manifest's columns, as ``dagster/column_schema``."""
    return dg.TableSchema(columns=[
        dg.TableColumn(name=f.name, type=_type_name(f.type),
                       constraints=dg.TableColumnConstraints(nullable=f.nullable))
        for f in SCHEMA
    ])


# Preview columns that are never empty keep their type; the others are shown as text, "" when
# the record has no value (a table record holds the same fields in every row, and no nulls).
_TYPED = {f.name: _type_name(f.type) for f in SCHEMA if not f.nullable}


def _preview_schema() -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=n, type=_TYPED.get(n, "string")) for n in PREVIEW_COLUMNS])


def _cell(name: str, value: object, width: int = 80) -> object:
    if name in _TYPED:
        return value
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def manifest_preview_table(rows: Iterable[ManifestRow], limit: int = 5, failures: int = 5) -> dg.MetadataValue:
    """The first ``limit`` records and the first ``failures`` that did not decode, as a table."""
    rows = list(rows)
    shown = rows[:limit]
    seen = {r.position for r in shown}
    shown += [r for r in rows if not r.decoded and r.position not in seen][:failures]
    records = [dg.TableRecord({n: _cell(n, getattr(r, n)) for n in PREVIEW_COLUMNS}) for r in shown]
    return dg.MetadataValue.table(records=records, schema=_preview_schema())


def counts_table(counts: dict[str, int], key_name: str = "code", value_name: str = "count",
                 limit: int = 50) -> dg.MetadataValue:
    """``counts`` (e.g. problems by code) as a two-column table, largest first."""
    items: Sequence[tuple[str, int]] = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    schema = dg.TableSchema(columns=[dg.TableColumn(key_name, "string"), dg.TableColumn(value_name, "int")])
    return dg.MetadataValue.table(records=[dg.TableRecord({key_name: k, value_name: int(v)}) for k, v in items],
                                  schema=schema)
