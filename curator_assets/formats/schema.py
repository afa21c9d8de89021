"""The record schema: what the components of a WebDataset record are and mean.

Validation, decode and the manifest all ask this module, so they agree on every record.

* **Component**: a regular file whose basename does not start with a dot and has a dot; its key
  runs to the first dot of the basename, the rest is its extension (``a/b.c/000031.seg.jpg`` ->
  key ``a/b.c/000031``, extension ``seg.jpg``). Consecutive components sharing a key form one
  record. (:func:`split_key` and :func:`is_component`; the tar scanner groups records with the
  same rule inlined, on its hot path.)
* **Role**, from the whole extension compared case-insensitively, as the webdataset library
  (which lower-cases extensions) and DALI with ``case_sensitive_extensions=False`` read them:
  ``image`` (:data:`IMAGE_EXTENSIONS`, in order of preference when a record has several),
  ``caption`` (``txt``), ``metadata`` (``json``), ``other``. An image role means "decode
  this"; the format comes from the bytes (:mod:`curator_assets.formats.sniff`).
* **Content checks**, from the last suffix (``seg.jpg`` is JPEG data too): image suffixes must
  hold an image, ``json`` valid JSON, ``txt``/``text``/``caption``/``cls`` UTF-8 text.
* **Case**: two components of one record whose extensions differ only in case (``.JPG`` and
  ``.jpg``) are ``ambiguous_extension``: lower-casing readers (webdataset) refuse the record,
  case-sensitive ones (DALI's default) see two components. It is a record-level warning, and
  decode never guesses: such a record is failed with that code, with or without a report.
* **Metadata** (``.json``): parsed as the webdataset library does (``json.loads`` of the bytes),
  so a UTF-8 byte-order mark is accepted and dropped; the manifest keeps the text without it.
"""

from __future__ import annotations

import json

from curator_assets.formats.tar_members import is_component, split_key

__all__ = [
    "CAPTION", "CAPTION_EXTENSIONS", "IMAGE", "IMAGE_EXTENSIONS", "JPEG_EXTENSIONS", "METADATA",
    "METADATA_EXTENSIONS", "OTHER", "TEXT_SUFFIXES", "ambiguous_extensions", "content_kind", "is_component",
    "is_jpeg_extension", "parse_metadata", "role", "split_key",
]

IMAGE, CAPTION, METADATA, OTHER = "image", "caption", "metadata", "other"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "jp2", "j2k", "pnm", "ppm", "pgm", "pbm")
JPEG_EXTENSIONS = ("jpg", "jpeg")
CAPTION_EXTENSIONS = ("txt",)
METADATA_EXTENSIONS = ("json",)
TEXT_SUFFIXES = ("txt", "text", "caption", "cls")

# ext (lower case) -> (role, rank): decode picks the lowest rank of each role.
ROLES: dict[str, tuple[str, int]] = {
    **{ext: (IMAGE, rank) for rank, ext in enumerate(IMAGE_EXTENSIONS)},
    **{ext: (CAPTION, rank) for rank, ext in enumerate(CAPTION_EXTENSIONS)},
    **{ext: (METADATA, rank) for rank, ext in enumerate(METADATA_EXTENSIONS)},
}

_KINDS = {**dict.fromkeys(IMAGE_EXTENSIONS, "image"), "json": "json", **dict.fromkeys(TEXT_SUFFIXES, "text")}


def role(ext: str) -> str:
    """``image``, ``caption``, ``metadata`` or ``other`` for a whole extension (any case)."""
    found = ROLES.get(ext) or ROLES.get(ext.lower())
    return found[0] if found else OTHER


def content_kind(ext: str) -> str | None:
    """What the bytes of a component must be, by its last suffix (any case): ``image``,
    ``json``, ``text``, or None (not checked)."""
    return _KINDS.get(ext.rsplit(".", 1)[-1].lower())


def is_jpeg_extension(ext: str) -> bool:
    """Whether the last suffix says JPEG (such a member must hold JPEG data)."""
    return ext.rsplit(".", 1)[-1].lower() in JPEG_EXTENSIONS


def ambiguous_extensions(exts: list[str]) -> list[list[str]]:
    """Groups of a record's extensions that differ only in case (``[["JPG", "jpg"]]``); empty
    when there are none. Extensions equal to the byte are a duplicate member, not this."""
    lowered = [e.lower() for e in exts]
    if len(set(lowered)) == len(lowered):
        return []
    groups: dict[str, list[str]] = {}
    for e, low in zip(exts, lowered, strict=True):
        group = groups.setdefault(low, [])
        if e not in group:
            group.append(e)
    return [g for g in groups.values() if len(g) > 1]


def parse_metadata(data: bytes | memoryview) -> tuple[str | None, str | None]:
    """``(text, None)`` for a valid ``.json`` component (its text, a UTF-8 byte-order mark
    dropped), or ``(None, why)``. The rule of ``json.loads`` on bytes, as webdataset reads it."""
    raw = bytes(data)
    try:
        text = raw.decode(json.detect_encoding(raw))
    except UnicodeDecodeError as exc:
        return None, f"the .json is not UTF-8 (byte {exc.start} is {raw[exc.start]:#04x})"
    try:
        json.loads(text)
    except ValueError as exc:
        return None, f"the .json is not valid JSON: {exc}"
    return text, None
