"""The bundled demo dataset: WebDataset shards of real photos with captions and JSON metadata.

The photos are the JPEGs that ship inside scikit-image and scikit-learn; each record is a
different crop of one of them, re-encoded at a random quality, so every image is distinct.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CAPTIONS = {
    "rocket": "a rocket on the launch pad under a clear sky",
    "hubble_deep_field": "a deep field of distant galaxies",
    "retina": "a fundus photograph of a human retina",
    "china": "a temple roof and trees in China",
    "flower": "a close-up of a flower in bloom",
}


def source_photos() -> dict[str, Path]:
    """The real JPEGs shipped by scikit-image and scikit-learn, by name."""
    import skimage
    import sklearn

    found: dict[str, Path] = {}
    ski = Path(skimage.__file__).parent / "data"
    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    for folder in (ski, skl):
        for path in sorted(folder.glob("*.jpg")):
            found[path.stem] = path
    if not found:
        raise RuntimeError("no sample photos found in scikit-image / scikit-learn")
    return found


@dataclass(frozen=True)
class PhotoRecord:
    key: str
    jpg: bytes
    caption: str
    metadata: dict


def photo_records(
    count: int,
    *,
    seed: int = 0,
    size: tuple[int, int] | None = (500, 375),
    quality: tuple[int, int] = (75, 95),
    start: int = 0,
) -> Iterator[PhotoRecord]:
    """``count`` distinct real-photo JPEG records: random crops of the source photos, resized
    to ``size`` (or left at the crop size when None), encoded at a quality in ``quality``."""
    from PIL import Image

    rng = random.Random(seed)
    sources = {name: Image.open(path).convert("RGB") for name, path in source_photos().items()}
    names = sorted(sources)
    for n in range(start, start + count):
        name = names[n % len(names)]
        img = sources[name]
        w, h = img.size
        cw = rng.randint(max(64, w // 3), w)
        ch = rng.randint(max(64, h // 3), h)
        x = rng.randint(0, w - cw)
        y = rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if size is not None:
            crop = crop.resize(size, Image.BILINEAR)
        q = rng.randint(*quality)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=q)
        key = f"{n:09d}"
        yield PhotoRecord(
            key,
            buf.getvalue(),
            f"{CAPTIONS.get(name, name)} (crop {n})",
            {"key": key, "source": name, "crop": [x, y, cw, ch], "width": crop.size[0],
             "height": crop.size[1], "quality": q, "license": "see the scikit-image / scikit-learn data notices"},
        )


def write_shard(path: str | os.PathLike, records: list[PhotoRecord], *, fmt: int = tarfile.GNU_FORMAT) -> None:
    """Write records as a WebDataset shard: ``<key>.jpg``, ``<key>.txt``, ``<key>.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with tarfile.open(tmp, "w", format=fmt) as tar:
        for rec in records:
            for ext, data in (
                ("jpg", rec.jpg),
                ("txt", rec.caption.encode()),
                ("json", json.dumps(rec.metadata, sort_keys=True).encode()),
            ):
                info = tarfile.TarInfo(f"{rec.key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build_demo(
    folder: str | os.PathLike, *, shards: int = 4, records_per_shard: int = 250, seed: int = 0
) -> list[Path]:
    """Build the demo dataset in ``folder``: ``00000.tar`` .. with real photos. Returns the shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(shards):
        recs = list(photo_records(records_per_shard, seed=seed + s, start=s * records_per_shard))
        path = folder / f"{s:05d}.tar"
        write_shard(path, recs)
        out.append(path)
    return out
