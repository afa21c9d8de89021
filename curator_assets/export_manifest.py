"""``manifest.parquet`` of an export: one row per input record, in input order.

Columns: ``output_shard`` and ``output_key`` (null when the record was left out), ``source_shard``,
``source_key``, ``source_position`` (the record's place in its tar), ``sha256`` of the image,
``width``, ``height``, ``decoded``, ``reason`` (null when kept: ``validation:<code>``,
``decode:<code>`` or ``duplicate_of:<source shard>/<source key>``) and ``detail`` (the report's or
the decoder's words for the reason, or for a failed decode kept by ``--include-failed``).
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    pa.field("output_shard", pa.string()),
    pa.field("output_key", pa.string()),
    pa.field("source_shard", pa.string(), nullable=False),
    pa.field("source_key", pa.string(), nullable=False),
    pa.field("source_position", pa.int64(), nullable=False),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("decoded", pa.bool_(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])


def manifest_table(plans, planned, out_shard: dict) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for p, plan in enumerate(plans):
        for r, rec in enumerate(plan.records):
            cols["output_shard"].append(out_shard.get((p, r)))
            cols["output_key"].append(planned.out_keys[p][r])
            cols["source_shard"].append(plan.key)
            cols["source_key"].append(_text(rec.key))
            cols["source_position"].append(rec.position)
            cols["sha256"].append(rec.sha256)
            cols["width"].append(rec.width)
            cols["height"].append(rec.height)
            cols["decoded"].append(rec.decoded)
            cols["reason"].append(planned.reasons[p][r])
            cols["detail"].append(_text(rec.detail))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _text(value: str | None) -> str | None:
    """A name or detail as Parquet can hold it: bytes that were not UTF-8 become U+FFFD."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def manifest_bytes(plans, planned, out_shard: dict) -> bytes:
    """The Parquet bytes: the same rows give the same bytes (no clock in them)."""
    buf = io.BytesIO()
    pq.write_table(manifest_table(plans, planned, out_shard), buf, compression="zstd")
    return buf.getvalue()


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
