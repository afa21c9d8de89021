"""``manifest.parquet`` of an export: one row per input record, in input order.

Columns: ``output_shard`` and ``output_key`` (null when the record was left out), ``source_shard``,
``source_key``, ``source_position`` (the record's place in its tar), ``sha256`` of the image,
``width``, ``height``, ``decoded``, ``reason`` (null when kept: ``validation:<code>``,
``decode:<code>`` or ``duplicate_of:<source shard>/<source key>``) and ``detail`` (the report's or
the decoder's words for the reason, or for a failed decode kept by ``--include-failed``).
"""

from __future__ import annotations

import io
import json

# (column, Arrow type, nullable); pyarrow is imported only when the Parquet file is built.
COLUMN_TYPES = (
    ("output_shard", "string", True),
    ("output_key", "string", True),
    ("source_shard", "string", False),
    ("source_key", "string", False),
    ("source_position", "int64", False),
    ("sha256", "string", True),
    ("width", "int32", True),
    ("height", "int32", True),
    ("decoded", "bool_", False),
    ("reason", "string", True),
    ("detail", "string", True),
)
COLUMNS = [name for name, _type, _nullable in COLUMN_TYPES]


def schema():
    """The manifest's Arrow schema."""
    import pyarrow as pa

    return pa.schema([pa.field(name, getattr(pa, kind)(), nullable=nullable) for name, kind, nullable in COLUMN_TYPES])


def manifest_rows(plans, planned, out_shard: dict) -> bytes:
    """The rows as JSON lines, in input order: what the Parquet file is made from, and what a
    rerun compares (by digest) to tell that the manifest has not changed, without building it."""
    dumps = json.JSONEncoder(ensure_ascii=False).encode  # one encoder (dumps with options builds one a call)
    lines = []
    for p, plan in enumerate(plans):
        shard = _text(plan.key)
        for r, rec in enumerate(plan.records):
            values = (out_shard.get((p, r)), planned.out_keys[p][r], shard, _text(rec.key), rec.position, rec.sha256,
                      rec.width, rec.height, rec.decoded, planned.reasons[p][r], _text(rec.detail))
            lines.append(dumps(dict(zip(COLUMNS, values, strict=True))))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def manifest_bytes(rows: bytes) -> bytes:
    """The Parquet bytes of :func:`manifest_rows`: the same rows give the same bytes (no clock in
    them). Read by Arrow's JSON reader, not built from Python lists: those make pyarrow import
    pandas, most of a small export's time."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    arrow_schema = schema()
    if rows:
        options = pj.ParseOptions(explicit_schema=arrow_schema, unexpected_field_behavior="error")
        read = pj.ReadOptions(block_size=max(1 << 20, len(rows)))
        table = pj.read_json(io.BytesIO(rows), read_options=read, parse_options=options).cast(arrow_schema)
    else:
        table = arrow_schema.empty_table()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _text(value: str | None) -> str | None:
    """A name or detail as Parquet can hold it: bytes that were not UTF-8 become U+FFFD."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def outcome_picture(kept: int, left_out: dict[str, int]) -> bytes:
    """PNG: records kept and left out, by reason (a horizontal bar each), for the asset's metadata."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the picture goes into metadata
    import matplotlib.pyplot as plt

    labels = ["kept", *left_out]
    values = [kept, *left_out.values()]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(labels)))
    bars = ax.barh(labels[::-1], values[::-1], color=["#c0504d"] * len(left_out) + ["#4f81bd"])
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("records")
    ax.set_title("export: records kept and left out")
    ax.margins(x=0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
