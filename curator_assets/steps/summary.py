"""The dataset-level decode summary, and the pictures that show it.

Reads every shard's Parquet manifest with column projection (only :data:`SUMMARY_COLUMNS`, never
the captions or JSON) and its ``curator.*`` info; counts records, decoded, failed by code, bytes
and devices; finds exact duplicate images across shards (same ``sha256``); draws the image-size /
aspect-ratio distribution and the failures by shard with matplotlib (Agg, no display), and a
per-shard contact sheet of thumbnails with Pillow, decoded straight from the tar by offset/size.

Memory stays small at many shards: per record only its width, height (int32 each) and a 64-bit
prefix of its sha256 with its shard number are kept; the duplicate candidates are confirmed on
their full hash by reading those few shards' ``sha256``/``member`` columns again.
"""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from curator_assets.formats.manifest import MANIFEST_KIND, MANIFEST_SUFFIX, METADATA_PREFIX

SUMMARY_COLUMNS = ["record_id", "member", "size", "width", "height", "decoded", "error", "sha256"]
MAX_PICTURE_BYTES = 100_000  # a picture embedded in Markdown metadata stays under this
DUPLICATE_EXAMPLES = 20
NOT_DECODED = "not_decoded"  # the code of an error text that names none

_CODE = re.compile(r"^([a-z][a-z0-9_]{2,}):")  # "image_too_large: ..." -> image_too_large
_KNOWN = (  # error texts written without a leading code (see decode.py)
    ("DALI could not decode", "decode_failed"),
    ("no image member", "no_image"),
    ("runs past the end of the shard", "tar_truncated"),
)


def error_code(text: str | None) -> str:
    """A short, stable code for a manifest's error text."""
    if not text:
        return NOT_DECODED
    match = _CODE.match(text)
    if match:
        return match.group(1)
    for needle, code in _KNOWN:
        if needle in text:
            return code
    return NOT_DECODED


@dataclass
class DecodeSummary:
    """What the manifests of a dataset say, together."""

    shards: int = 0  # shards asked about
    manifests: int = 0  # shards with a readable manifest
    missing: list[str] = field(default_factory=list)  # shards without a manifest (not decoded yet)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (shard, why)
    records: int = 0
    decoded: int = 0
    failed: int = 0  # records with an image that did not decode
    no_image: int = 0
    bytes: int = 0  # encoded image bytes of the records
    seconds: float = 0.0  # decode time, summed over the manifests that store it
    devices: Counter = field(default_factory=Counter)  # device -> shards
    failures_by_code: Counter = field(default_factory=Counter)
    failures_by_shard: dict[str, Counter] = field(default_factory=dict)  # shard -> code -> records
    duplicate_images: int = 0  # distinct sha256 values found in more than one shard
    duplicate_records: int = 0  # records carrying one of them
    duplicate_examples: list[dict] = field(default_factory=list)  # {"sha256", "places": [[shard, member]]}
    widths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    heights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    created: tuple[str, str] | None = None  # earliest and latest manifest time

    @property
    def images_per_second(self) -> float:
        return self.decoded / self.seconds if self.seconds > 0 else 0.0

    def metadata(self) -> dict[str, object]:
        """Plain values for a materialization or ``--json``."""
        return {
            "shards": self.shards, "manifests": self.manifests, "missing_manifests": len(self.missing),
            "unreadable_manifests": len(self.unreadable), "records": self.records, "decoded": self.decoded,
            "failed": self.failed, "no_image": self.no_image, "bytes": self.bytes,
            "images_per_s": round(self.images_per_second, 1), "devices": dict(self.devices),
            "failures_by_code": dict(self.failures_by_code.most_common()),
            "duplicate_images": self.duplicate_images, "duplicate_records": self.duplicate_records,
            "duplicate_examples": self.duplicate_examples,
        }


def manifest_path(dataset, key: str) -> str:
    return dataset.output_path(MANIFEST_KIND, key, MANIFEST_SUFFIX)


def read_columns(dataset, key: str, columns: list[str]):
    """(table of ``columns`` only, manifest info) of shard ``key``; raises FileNotFoundError."""
    with dataset.open(manifest_path(dataset, key), fs=dataset.output_fs) as f:
        pf = pq.ParquetFile(f)
        info = _info(pf.schema_arrow.metadata or {})
        return pf.read(columns=columns, use_threads=False), info  # small files: a thread pool per read costs more


def _info(meta: dict[bytes, bytes]) -> dict[str, str]:
    wanted = {"device", "created", "seconds"}
    out = {}
    for k, v in meta.items():
        name = k.decode(errors="replace")
        if name.startswith(METADATA_PREFIX) and name[len(METADATA_PREFIX):] in wanted:
            out[name[len(METADATA_PREFIX):]] = v.decode(errors="replace").strip('"')
    return out


def _sha_prefix(values: list[str | None]) -> np.ndarray:
    """The first 64 bits of each hex sha256 (0 for none: never a candidate)."""
    return np.array([int(v[:16], 16) if v and len(v) >= 16 else 0 for v in values], dtype=np.uint64)


class _Collector:
    def __init__(self) -> None:
        self.s = DecodeSummary()
        self.dims: list[tuple[np.ndarray, np.ndarray]] = []
        self.hashes: list[np.ndarray] = []
        self.owners: list[np.ndarray] = []
        self.keys: list[str] = []
        self.times: list[str] = []

    def add(self, key: str, table, info: dict[str, str]) -> None:
        s = self.s
        decoded = np.asarray(table.column("decoded").to_numpy(zero_copy_only=False), dtype=bool)
        members = table.column("member").is_null().to_numpy(zero_copy_only=False)
        s.manifests += 1
        s.records += table.num_rows
        s.decoded += int(decoded.sum())
        s.no_image += int(members.sum())
        s.failed += int((~decoded & ~members).sum())
        size = table.column("size").fill_null(0).to_numpy(zero_copy_only=False)
        s.bytes += int(size.sum())
        if not decoded.all():
            errors = table.column("error").to_pylist()
            codes = Counter(error_code(e) for e, d in zip(errors, decoded, strict=True) if not d)
            s.failures_by_code.update(codes)
            s.failures_by_shard[key] = codes
        width = table.column("width").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
        height = table.column("height").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
        self.dims.append((width[decoded], height[decoded]))
        self.hashes.append(_sha_prefix(table.column("sha256").to_pylist()))
        self.owners.append(np.full(table.num_rows, len(self.keys), dtype=np.int32))
        self.keys.append(key)
        s.devices[info.get("device") or "unknown"] += 1
        try:
            s.seconds += float(info["seconds"])
        except (KeyError, ValueError):
            pass
        if info.get("created"):
            self.times.append(info["created"])


def _read_or_why(dataset, key: str):
    """(table, info) of shard ``key``'s manifest, or (None, why): None when there is none."""
    try:
        return read_columns(dataset, key, SUMMARY_COLUMNS)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except Exception as exc:  # noqa: BLE001 - a damaged manifest is reported, never a crash
        return None, f"{type(exc).__name__}: {exc}"


def _read_all(dataset, keys: Iterable[str], threads: int, window: int = 64):
    """(key, table, info-or-why) in order, read by ``threads`` threads (Parquet decoding and file
    reads release the GIL), at most ``window`` manifests ahead of the caller."""
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    it = iter(keys)
    if threads <= 1:  # in this thread (what it reads is counted by storage.counting_reads)
        for key in it:
            yield key, *_read_or_why(dataset, key)
        return
    with ThreadPoolExecutor(threads) as pool:
        while chunk := list(islice(it, window)):
            for key, (table, info) in zip(chunk, pool.map(lambda k: _read_or_why(dataset, k), chunk), strict=True):
                yield key, table, info


def summarize_decode(dataset, keys: Iterable[str], *, threads: int = 4) -> DecodeSummary:
    """The decode summary of shards ``keys``: their manifests, read column by column."""
    c = _Collector()
    for key, table, info in _read_all(dataset, keys, threads):
        c.s.shards += 1
        if table is None and info:
            c.s.unreadable.append((key, info))
        elif table is None:
            c.s.missing.append(key)
        else:
            c.add(key, table, info)
    s = c.s
    if c.dims:
        s.widths = np.concatenate([w for w, _ in c.dims])
        s.heights = np.concatenate([h for _, h in c.dims])
    if c.times:
        s.created = (min(c.times), max(c.times))
    if c.hashes:
        _duplicates(dataset, s, np.concatenate(c.hashes), np.concatenate(c.owners), c.keys)
    return s


def _duplicates(dataset, s: DecodeSummary, prefix: np.ndarray, owner: np.ndarray, keys: list[str]) -> None:
    """Count sha256 values held by more than one shard; examples confirmed on the full hash."""
    keep = prefix != 0
    prefix, owner = prefix[keep], owner[keep]
    order = np.lexsort((owner, prefix))
    prefix, owner = prefix[order], owner[order]
    starts = np.flatnonzero(np.r_[True, prefix[1:] != prefix[:-1]])
    counts = np.diff(np.r_[starts, len(prefix)])
    first_owner, last_owner = owner[starts], owner[starts + counts - 1]
    across = first_owner != last_owner  # sorted by owner within a group: spans shards
    s.duplicate_images = int(across.sum())
    s.duplicate_records = int(counts[across].sum())
    shown = [(prefix[i], sorted(set(owner[i:i + n].tolist()))) for i, n in zip(starts[across], counts[across],
                                                                                strict=True)][:DUPLICATE_EXAMPLES]
    _examples(dataset, s, shown, keys)


def _examples(dataset, s: DecodeSummary, shown: list, keys: list[str]) -> None:
    wanted = {int(p) for p, _ in shown}
    places: dict[str, list[list[str]]] = {}
    for shard in sorted({o for _, owners in shown for o in owners[:10]}):
        table, _ = read_columns(dataset, keys[shard], ["sha256", "member"])
        for sha, member in zip(table.column("sha256").to_pylist(), table.column("member").to_pylist(), strict=True):
            if sha and len(sha) >= 16 and int(sha[:16], 16) in wanted:
                places.setdefault(sha, []).append([keys[shard], member])
    for sha, where in places.items():
        if len({shard for shard, _ in where}) > 1:
            s.duplicate_examples.append({"sha256": sha, "places": where[:10]})
    s.duplicate_examples = s.duplicate_examples[:DUPLICATE_EXAMPLES]


# --- pictures ------------------------------------------------------------------------------

def png_markdown(png: bytes, alt: str = "sheet") -> str:
    """Markdown that embeds ``png`` the way Dagster's UI renders a picture in metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _figure_png(fig, dpi: int = 72) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: the pictures go into metadata
    import matplotlib.pyplot as plt

    return plt


def size_picture(summary: DecodeSummary) -> bytes:
    """PNG: width x height of the decoded images (2-D histogram) and their aspect ratios."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    w, h = summary.widths, summary.heights
    ok = (w > 0) & (h > 0)
    w, h = w[ok], h[ok]
    if len(w):
        a.hist2d(w, h, bins=40, cmap="viridis", cmin=1)
        ratio = w / h
        b.hist(np.log2(ratio), bins=40, color="#4a7ab7")
        ticks = [0.25, 0.5, 1, 2, 4]
        b.set_xticks(np.log2(ticks), [str(t) for t in ticks])
    else:
        for ax in (a, b):
            ax.text(0.5, 0.5, "no decoded images", ha="center", va="center", transform=ax.transAxes)
    a.set(title=f"image size ({len(w)} images)", xlabel="width (px)", ylabel="height (px)")
    b.set(title="aspect ratio (width / height)", xlabel="ratio (log scale)", ylabel="images")
    return _figure_png(fig)


def failures_picture(summary: DecodeSummary, limit: int = 30) -> bytes:
    """PNG: records not decoded per shard (the ``limit`` shards with most), stacked by code."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    top = sorted(summary.failures_by_shard.items(), key=lambda kv: -sum(kv[1].values()))[:limit]
    if top:
        codes = [c for c, _ in summary.failures_by_code.most_common(8)]
        bottom = np.zeros(len(top))
        for code in codes + ["other"]:
            values = np.array([sum(n for c, n in counts.items() if c not in codes) if code == "other"
                               else counts.get(code, 0) for _, counts in top], dtype=float)
            if values.any():
                ax.bar(range(len(top)), values, bottom=bottom, label=code)
                bottom += values
        ax.set_xticks(range(len(top)), [k for k, _ in top], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no failed records", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=f"records not decoded, by shard ({len(summary.failures_by_shard)} shard(s) with failures)",
           ylabel="records")
    return _figure_png(fig)


def sample_members(rows: Iterable, n: int = 16, max_pixels: int = 40_000_000) -> list[tuple[int, int]]:
    """(offset, size) of up to ``n`` decoded images spread evenly over the shard's records; images
    of more than ``max_pixels`` are never drawn (only JPEGs decode at a reduced scale)."""
    good = [(r.offset, r.size) for r in rows if r.decoded and r.offset is not None and r.size
            and (r.width or 0) * (r.height or 0) <= max_pixels]
    if len(good) <= n:
        return good
    step = len(good) / n
    return [good[int(i * step)] for i in range(n)]


def contact_sheet(dataset, key: str, samples: list[tuple[int, int]], *, thumb: int = 96,
                  max_bytes: int = MAX_PICTURE_BYTES, max_member: int = 64 << 20) -> bytes | None:
    """A PNG grid of thumbnails of ``samples`` ((offset, size) in shard ``key``'s tar), under
    ``max_bytes`` (thumbnails shrink until it fits); None when no sample could be drawn."""
    from PIL import Image

    thumbs = []
    with dataset.open_shard(key) as f:
        for offset, size in samples:
            if size > max_member:
                continue
            try:
                f.seek(offset)
                img = Image.open(io.BytesIO(f.read(size)))
                img.draft("RGB", (thumb * 2, thumb * 2))  # JPEG: decode at a reduced scale
                img = img.convert("RGB")
                img.thumbnail((thumb, thumb))
                thumbs.append(img)
            except Exception:  # noqa: BLE001 - a picture that will not draw is left out
                continue
    if not thumbs:
        return None
    while True:
        png = _grid_png(thumbs, thumb)
        if len(png) <= max_bytes or thumb <= 24:
            return png if len(png) <= max_bytes else None
        thumb = int(thumb * 0.8)
        thumbs = [t.copy() for t in thumbs]
        for t in thumbs:
            t.thumbnail((thumb, thumb))


def _grid_png(thumbs: list, thumb: int) -> bytes:
    from PIL import Image

    cols = min(4, len(thumbs))
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (thumb + 2), rows * (thumb + 2)), "white")
    for i, t in enumerate(thumbs):
        x, y = (i % cols) * (thumb + 2), (i // cols) * (thumb + 2)
        sheet.paste(t, (x + (thumb - t.width) // 2, y + (thumb - t.height) // 2))
    buf = io.BytesIO()
    # A palette (a photo sheet then fits the size limit); the fast octree quantizer and no extra
    # zlib passes: median cut and optimize=True cost ~0.4 s a sheet, as much as decoding a shard.
    sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG")
    return buf.getvalue()


def summary_markdown(summary: DecodeSummary) -> str:
    """A short Markdown table of the figures, then the duplicate examples."""
    s = summary
    lines = ["| records | decoded | failed | no image | bytes | images/s | devices |",
             "|---:|---:|---:|---:|---:|---:|---|",
             f"| {s.records} | {s.decoded} | {s.failed} | {s.no_image} | {s.bytes} | "
             f"{s.images_per_second:.1f} | {', '.join(f'{d}: {n}' for d, n in s.devices.items())} |"]
    if s.failures_by_code:
        lines += ["", "| failure code | records |", "|---|---:|"]
        lines += [f"| {c} | {n} |" for c, n in s.failures_by_code.most_common()]
    lines += ["", f"{s.duplicate_images} image(s) found in more than one shard ({s.duplicate_records} records)."]
    if s.duplicate_examples:
        lines += ["", "| sha256 | shard: member |", "|---|---|"]
        for ex in s.duplicate_examples:
            where = "; ".join(f"{k}: {m}" for k, m in ex["places"])
            lines.append(f"| {ex['sha256'][:16]}… | {where.replace('|', '/')} |")
    return "\n".join(lines)
