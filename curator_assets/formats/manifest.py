"""The per-shard decode manifest: one Parquet row for every record of the shard.

Written to ``<output>/manifests/<shard key>.parquet`` through :meth:`Dataset.write_output`, so the
write is atomic on every store (temp file + rename locally, one PUT on object stores). Shard-level
facts (shard URL, device, reader, counts) travel in the Parquet schema metadata under ``curator.*``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_KIND = "manifests"
MANIFEST_SUFFIX = ".parquet"
MANIFEST_VERSION = "1"
METADATA_PREFIX = "curator."


@dataclass(slots=True)  # one per record: slots keep millions of them small and quick
class ManifestRow:
    """One record of a shard and what decoding it gave."""

    position: int  # the record's place in the tar (0-based); the ID never comes from it
    record_id: str  # the WebDataset key, from the member name
    shard: str  # the shard's key (its partition key)
    member: str | None = None  # the image member, or None when the record has none
    offset: int | None = None  # the image member's data offset in the tar
    size: int | None = None  # the image member's size in bytes
    width: int | None = None
    height: int | None = None
    channels: int | None = None  # of the decoded image (always RGB: 3)
    decoded: bool = False
    error: str | None = None  # why the record has no decoded image
    caption: str | None = None  # the .txt component
    metadata: str | None = None  # the .json component, as JSON text
    sha256: str | None = None  # of the encoded image bytes
    format: str | None = None  # what the image bytes are (jpeg, png, ...), by their magic number
    source_channels: int | None = None  # components in the encoded image (1 gray, 3 YCbCr/RGB, 4 CMYK)
    extensions: list[str] = field(default_factory=list)  # every component of the record, in tar order
    metadata_error: str | None = None  # why the .json could not be kept


SCHEMA = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("member", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("decoded", pa.bool_(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("format", pa.string()),
        pa.field("source_channels", pa.int32()),
        pa.field("extensions", pa.list_(pa.string())),
        pa.field("metadata_error", pa.string()),
    ]
)

COLUMNS = [f.name for f in fields(ManifestRow)]
assert COLUMNS == SCHEMA.names, "ManifestRow and SCHEMA must list the same columns in the same order"


def manifest_table(rows: Iterable[ManifestRow], info: dict[str, object] | None = None) -> pa.Table:
    """The manifest of one shard as an Arrow table; ``info`` goes into the schema metadata."""
    columns: list[list] = [[] for _ in COLUMNS]
    for row in rows:
        for column, name in zip(columns, COLUMNS, strict=True):
            column.append(getattr(row, name))
    meta = {b"curator.manifest_version": MANIFEST_VERSION.encode()}
    for k, v in (info or {}).items():
        meta[(METADATA_PREFIX + k).encode()] = (v if isinstance(v, str) else json.dumps(v)).encode()
    arrays = [pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA, strict=True)]
    for array, f in zip(arrays, SCHEMA, strict=True):
        if not f.nullable and array.null_count:
            raise ValueError(f"manifest column {f.name!r} has {array.null_count} missing value(s)")
    return pa.Table.from_arrays(arrays, schema=SCHEMA.with_metadata(meta))


def manifest_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest(dataset, key: str, table: pa.Table) -> str:
    """Write the manifest of shard ``key`` atomically; returns its URL."""
    return dataset.write_output(MANIFEST_KIND, key, MANIFEST_SUFFIX, manifest_bytes(table))


def manifest_url(dataset, key: str) -> str:
    return dataset.url_of(dataset.output_path(MANIFEST_KIND, key, MANIFEST_SUFFIX), dataset.output_fs)


def read_manifest(dataset, key: str) -> pa.Table:
    """The manifest of shard ``key`` (raises FileNotFoundError when there is none)."""
    data = dataset.read_bytes(dataset.output_path(MANIFEST_KIND, key, MANIFEST_SUFFIX), fs=dataset.output_fs)
    return pq.read_table(io.BytesIO(data))


def manifest_info(table: pa.Table) -> dict[str, object]:
    """The ``curator.*`` schema metadata of a manifest, values decoded back from JSON where they were."""
    out: dict[str, object] = {}
    for k, v in (table.schema.metadata or {}).items():
        name = k.decode()
        if not name.startswith(METADATA_PREFIX):
            continue
        text = v.decode()
        try:
            out[name[len(METADATA_PREFIX):]] = json.loads(text)
        except ValueError:
            out[name[len(METADATA_PREFIX):]] = text
    return out


def _cell(value: object, width: int = 60) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_preview(rows: Iterable[ManifestRow], limit: int = 5, failures: int = 5) -> str:
    """A small Markdown table: the first ``limit`` records and the first ``failures`` that did not decode."""
    rows = list(rows)
    shown = rows[:limit]
    seen = {r.position for r in shown}
    shown += [r for r in rows if not r.decoded and r.position not in seen][:failures]
    lines = [
        "| # | record_id | member | width x height x channels | decoded | error | caption |",
        "|---:|---|---|---|---|---|---|",
    ]
    for r in shown:
        dims = f"{r.width}x{r.height}x{r.channels}" if r.decoded else ""
        lines.append(
            f"| {r.position} | {_cell(r.record_id, 40)} | {_cell(r.member, 40)} | {dims} | "
            f"{'yes' if r.decoded else 'no'} | {_cell(r.error, 80)} | {_cell(r.caption)} |"
        )
    if len(rows) > len(shown):
        lines.append(f"\n{len(rows) - len(shown)} more record(s) in the manifest.")
    return "\n".join(lines)
