"""What both validation passes share: ranged reads through a window, the problem collector,
and the checks of one image or side file."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Mapping
from typing import BinaryIO

from curator_assets.formats import schema
from curator_assets.formats.report import ImageInfo, Problem
from curator_assets.formats.sniff import ImageHeader, check_image
from curator_assets.formats.tar_members import (
    Member,
)

IMAGE_EXTS = frozenset(schema.IMAGE_EXTENSIONS)
JSON_EXTS = frozenset({"json"})
TEXT_EXTS = frozenset(schema.TEXT_SUFFIXES)

# Ranged reads: the marker walk reads segment by segment through a one-block cache, so large
# APP segments (EXIF, ICC) before the frame header cost a read or two, never the whole image.
_WINDOW = 16384  # one read covers an image's tail, the side files and the next image's head

BAD_NAME_CHARS = re.compile(r"[\s\x00-\x1f\x7f\udc80-\udcff]")


# ---------------------------------------------------------------------------------------------
# Ranged reads


def ranged_reader(fileobj: BinaryIO) -> Callable[[int, int], bytes]:
    """``read_at(offset, n)``: os.pread on a real file, seek + read otherwise."""
    try:
        fd = fileobj.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        def pread_at(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        pread_at.fd = fd  # type: ignore[attr-defined]
        return pread_at

    def read_at(offset: int, n: int) -> bytes:
        fileobj.seek(offset)
        chunks, remaining = [], n
        while remaining > 0:
            chunk = fileobj.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    return read_at


class Window:
    """A one-block read cache: records lie in file order, so one read usually serves an image's
    tail, its side files and the next image's head."""

    __slots__ = ("read_at", "buf", "start", "end")

    def __init__(self, read_at: Callable[[int, int], bytes]):
        self.read_at = read_at
        self.buf = b""
        self.start = self.end = 0

    def get(self, offset: int, n: int) -> bytes:
        if offset >= self.start and offset + n <= self.end:
            i = offset - self.start
            return self.buf[i : i + n]
        if n >= _WINDOW:
            return self.read_at(offset, n)
        self.buf = self.read_at(offset, _WINDOW)
        self.start, self.end = offset, offset + len(self.buf)
        return self.buf[:n]


# ---------------------------------------------------------------------------------------------
# The validation


class Collector:
    def __init__(self, severities: Mapping[str, str]):
        self.severities = severities
        self.problems: list[Problem] = []
        self.members: list[Member] = []  # what the scan found so far

    def add(self, code: str, detail: str, record_id: str | None = None, member: str | None = None) -> None:
        self.problems.append(Problem(code, self.severities[code], record_id, member, detail))


def check_side(kind: str, data: bytes, record_id: str, member: str, out: Collector) -> None:
    if kind == "json":
        _, why = schema.parse_metadata(data)
        if why is not None:
            out.add("bad_json", why, record_id, member)
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.add("bad_text", f"not UTF-8: byte {exc.start} is {data[exc.start]:#04x}", record_id, member)


def check_image_member(window: Window, record_id: str, m: Member, max_pixels: int, out: Collector, *,
                 jpeg: bool = True) -> ImageInfo | None:
    """The image rules of :func:`curator_assets.formats.sniff.check_image` on one member (ranged reads)."""
    base = m.offset
    size = m.size

    def get(pos: int, n: int) -> bytes:
        n = min(n, size - pos)
        return window.get(base + pos, n) if n > 0 else b""

    found = check_image(get, size, max_pixels=max_pixels, jpeg_expected=jpeg)
    for code, detail in found.problems:
        out.add(code, detail, record_id, m.name)
    return _image_info(record_id, m.name, found.header)


def _image_info(record_id: str, member: str, header: ImageHeader | None) -> ImageInfo | None:
    if header is None:
        return None
    return ImageInfo(record_id, member, header.width, header.height, header.mode, header.progressive, header.process)


