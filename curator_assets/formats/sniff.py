"""What bytes are: the image formats decode accepts with their header rules, and shard files
that are no tar archive at all.

One set of rules for every verb. Validation reads image members by ranged reads, decode has
them in memory: both hand :func:`check_image` a ``get(pos, n)`` that returns the member's bytes
at ``pos`` (fewer at its end), so the same code decides what a member is, how large it says
it is, and whether it is complete.

Image rules:

* The format comes from the magic number, never from the extension (DALI and Pillow do the
  same): JPEG, PNG, WebP, TIFF, BMP, JPEG 2000 and PNM are accepted.
* Every accepted format declares its size in its header; :func:`check_image` reads it (a few
  hundred bytes; for JPEG a marker walk up to the frame header) so that an image over the pixel
  limit is refused before any decoder allocates memory for it. A header that does not give a
  size is ``jpeg_bad_header`` / ``image_bad_header``.
* A JPEG is complete when an end-of-image marker (FFD9) ends its scan data. Zero padding after
  it is normal; other bytes after it (Motion Photos append an MP4 video, some cameras a
  maker trailer) are ``jpeg_trailing_data``, informational: the image is complete and decodes,
  and decode hands the decoder the bytes up to the marker. No marker at all is ``jpeg_truncated``.
  The common case (the member ends with FFD9) costs one read of its last bytes; only the rare
  rest is walked marker by marker from the first scan.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

Get = Callable[[int, int], bytes]

# Start-of-frame markers -> coding process. SOF4/8/12 (C4 DHT, C8 JPG, CC DAC) are not frames.
SOF_PROCESS = {
    0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "differential extended", 0xC6: "differential progressive", 0xC7: "differential lossless",
    0xC9: "extended arithmetic", 0xCA: "progressive arithmetic", 0xCB: "lossless arithmetic",
    0xCD: "differential extended arithmetic", 0xCE: "differential progressive arithmetic",
    0xCF: "differential lossless arithmetic",
}
PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # as Pillow names them

FORMATS = ("jpeg", "png", "webp", "tiff", "bmp", "jpeg2000", "pnm")  # what decode accepts

_JPEG_TAIL = 64
_HEADER_BLOCK = 4096
_WALK_CHUNK = 1 << 16
# A marker inside or after entropy-coded data: 0xFF followed by anything but a stuffed zero, a
# restart marker or another fill byte.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class ImageProblem(Exception):
    """Why an image member cannot be decoded as it is (``code`` is a validation code)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


class ImageHeader(NamedTuple):
    format: str  # one of FORMATS
    width: int
    height: int
    components: int  # channels in the encoded image (JPEG: 1 gray, 3 YCbCr/RGB, 4 CMYK)
    mode: str  # as Pillow names it: L, RGB, CMYK, RGBA, P, ...
    progressive: bool
    process: str  # JPEG coding process (baseline, progressive, ...); the format's name otherwise
    sof_at: int = 0  # JPEG: where the frame header is


class ImageCheck(NamedTuple):
    """What :func:`check_image` found: the header (None when unreadable), the problems as
    ``(code, detail)`` pairs, and how many bytes make the image (the member size, or where a
    JPEG's end-of-image marker ends when a trailer follows)."""

    header: ImageHeader | None
    problems: tuple[tuple[str, str], ...]
    end: int


# ---------------------------------------------------------------------------------------------
# Formats


def image_format(head: bytes) -> str | None:
    """The accepted format of bytes starting ``head`` (16 bytes suffice), or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM":
        return "bmp"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "jpeg2000"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and (
        head[2:3].isspace()
    ):
        return "pnm"
    return None


_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
)


def describe(head: bytes) -> str:
    """What data starting ``head`` looks like, for a problem detail."""
    fmt = image_format(head)
    if fmt is not None:
        return f"{_FORMAT_NAMES[fmt]} data"
    if head[4:8] == b"ftyp":
        return f"ISO media ({head[8:12].decode('latin-1')!r}: HEIF/AVIF/MP4) data"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what} data"
    if not head.strip(b"\0"):
        return "all zero bytes"
    if head.lstrip()[:1] in (b"<", b"{", b"["):
        return "text (markup or JSON)"
    return f"unknown data starting {head[:8].hex(' ')}"


_FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "tiff": "TIFF", "bmp": "BMP",
                 "jpeg2000": "JPEG 2000", "pnm": "PNM"}


# ---------------------------------------------------------------------------------------------
# Whole images


def check_header(get: Get, size: int, *, max_pixels: int | None = None, jpeg_expected: bool = False
                 ) -> tuple[ImageHeader | None, list[tuple[str, str]]]:
    """The format and header rules of :func:`check_image`, without the look at the image's end:
    ``(header or None, problems)``. Reads the first bytes only (for JPEG, up to the frame header)."""
    head = get(0, 16) if size else b""
    fmt = image_format(head)
    if fmt is None or (jpeg_expected and fmt != "jpeg"):
        code = "not_jpeg" if jpeg_expected else "not_image"
        if size == 0:
            detail = "zero bytes"
        elif len(head) < 3:
            detail = f"only {size} bytes"
        else:
            what = "JPEG start-of-image marker" if jpeg_expected else "image format decode accepts"
            detail = f"no {what}: {describe(head)}"
        return None, [(code, detail)]
    try:
        header = read_header(fmt, get, size)
    except ImageProblem as exc:
        return None, [(exc.code, exc.detail)]
    pixels = header.width * header.height
    if max_pixels is not None and pixels > max_pixels:
        return header, [("image_too_large", f"{header.width}x{header.height} = {pixels:,} pixels, over the "
                         f"limit of {max_pixels:,}")]
    return header, []


def check_image(get: Get, size: int, *, max_pixels: int | None = None, jpeg_expected: bool = False) -> ImageCheck:
    """The rules for one image member of ``size`` bytes.

    Problem codes: ``not_jpeg`` (``jpeg_expected``: a .jpg/.jpeg member that is not JPEG data) or
    ``not_image`` (no accepted format at all), ``jpeg_bad_header`` / ``image_bad_header``,
    ``jpeg_truncated``, ``jpeg_trailing_data`` (informational), ``image_too_large``.
    """
    header, problems = check_header(get, size, max_pixels=max_pixels, jpeg_expected=jpeg_expected)
    end = size
    if header is not None and header.format == "jpeg":
        end, problem = jpeg_end(get, size, header.sof_at)
        if problem is not None:
            problems.append((problem.code, problem.detail))
    return ImageCheck(header, tuple(problems), end)


def read_header(fmt: str, get: Get, size: int) -> ImageHeader:
    """The size and channels ``fmt`` data declares in its header; raises :class:`ImageProblem`."""
    if fmt == "jpeg":
        return jpeg_header(get, size)
    reader = _HEADER_READERS[fmt]
    found = reader(get, size)
    if found is None:
        raise ImageProblem("image_bad_header", f"the {_FORMAT_NAMES[fmt]} header gives no image size")
    width, height, components, mode = found
    if width <= 0 or height <= 0:
        raise ImageProblem("image_bad_header", f"the {_FORMAT_NAMES[fmt]} header gives a {width}x{height} image")
    return ImageHeader(fmt, width, height, components, mode, False, fmt)


# ---------------------------------------------------------------------------------------------
# JPEG


def jpeg_header(get: Get, size: int) -> ImageHeader:
    """Walk the markers of a JPEG up to its frame header; raises :class:`ImageProblem`
    (jpeg_bad_header / jpeg_truncated). Reads a block at a time (one read for most images; a
    large EXIF or ICC segment costs another), walking inside it: this runs per decoded image."""
    base, buf = 0, get(0, _HEADER_BLOCK)
    pos = 2
    while True:
        i = pos - base
        n = len(buf)
        if i + 10 > n and base + n < size:  # the next marker is past what was read: read on from it
            base, buf, i = pos, get(pos, _HEADER_BLOCK), 0
            n = len(buf)
        if i + 2 > n:
            raise ImageProblem("jpeg_truncated", f"ends at byte {size} before the frame header")
        if buf[i] != 0xFF:
            raise ImageProblem("jpeg_bad_header", f"expected a marker at byte {pos}, found {buf[i]:02x}")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            what = {0xD8: "a second start-of-image", 0xD9: "end-of-image", 0xDA: "start-of-scan"}[marker]
            raise ImageProblem("jpeg_bad_header", f"{what} marker at byte {pos} before any frame header")
        if i + 4 > n:
            raise ImageProblem("jpeg_truncated", f"ends at byte {size} inside the marker at byte {pos}")
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length < 2:
            raise ImageProblem("jpeg_bad_header", f"segment {marker:02x} at byte {pos} has length {length}")
        if marker in SOF_PROCESS:
            if i + 10 > n:
                raise ImageProblem("jpeg_truncated", f"ends at byte {size} inside the frame header")
            height = (buf[i + 5] << 8) | buf[i + 6]
            width = (buf[i + 7] << 8) | buf[i + 8]
            if width == 0 or height == 0:
                raise ImageProblem("jpeg_bad_header", f"frame header gives a {width}x{height} image")
            comps = buf[i + 9]
            mode = JPEG_MODES.get(comps) or f"{comps} components"
            return ImageHeader("jpeg", width, height, comps, mode, marker in PROGRESSIVE_SOF, SOF_PROCESS[marker], pos)
        pos += 2 + length
        if pos >= size:
            raise ImageProblem("jpeg_truncated", f"ends at byte {size} before the frame header")


def scan_start(get: Get, size: int, pos: int) -> int:
    """Where the entropy-coded data begins: the segments after the frame header at ``pos`` are
    walked up to the start-of-scan."""
    for _ in range(256):
        b = get(pos, 4)
        if len(b) < 4 or b[0] != 0xFF:
            return pos
        length = (b[2] << 8) | b[3]
        if b[1] == 0xDA:
            return pos + 2 + length
        if length < 2:
            return pos
        pos += 2 + length
    return pos


def jpeg_end(get: Get, size: int, sof_at: int) -> tuple[int, ImageProblem | None]:
    """``(end, problem)``: where the image ends (just after its end-of-image marker) and
    ``jpeg_trailing_data`` when other bytes follow it, ``jpeg_truncated`` when it has none."""
    end = size
    tail = b""
    while end > 0:  # zero padding after the marker is normal: encoders and copy tools add it
        n = min(_JPEG_TAIL, end)
        tail = get(end - n, n).rstrip(b"\0")
        if tail:
            end = end - n + len(tail)
            break
        end -= n
    if tail.endswith(b"\xff\xd9") or (len(tail) == 1 and end >= 2 and get(end - 2, 2) == b"\xff\xd9"):
        return size, None
    eoi = find_jpeg_end(get, size, scan_start(get, size, sof_at))
    if eoi is None:
        return size, ImageProblem("jpeg_truncated", "no end-of-image marker (FFD9): the image data is cut off")
    return eoi, ImageProblem("jpeg_trailing_data", f"{size - eoi} bytes after the end-of-image marker at byte "
                             f"{eoi - 2} (a trailer such as a Motion Photo's video); the image is complete")


def find_jpeg_end(get: Get, size: int, pos: int) -> int | None:
    """Walk from the first scan at ``pos`` marker by marker (segments between the scans of a
    progressive JPEG skipped by their length) to the end-of-image marker; returns the position
    just after it, or None when the data ends first. Inside scan data every 0xFF is followed by
    a zero, a restart marker or a fill byte, so the first other marker is a real one."""
    while pos < size:
        chunk = get(pos, _WALK_CHUNK)
        if len(chunk) < 2:
            return None
        m = _MARKER.search(chunk)
        if m is None:
            pos += len(chunk) - 1  # the last byte may be the 0xFF of a marker
            continue
        at = pos + m.start()
        marker = chunk[m.start() + 1]
        if marker == 0xD9:
            return at + 2
        if marker == 0x01 or marker == 0xD8:
            pos = at + 2
            continue
        b = get(at + 2, 2)
        if len(b) < 2:
            return None
        length = (b[0] << 8) | b[1]
        pos = at + 2 + max(length, 2)
    return None


# ---------------------------------------------------------------------------------------------
# The other formats: (width, height, components, mode), or None when the header is unreadable


def _be(b: bytes) -> int:
    return int.from_bytes(b, "big")


def _le(b: bytes) -> int:
    return int.from_bytes(b, "little")


_PNG_MODES = {0: (1, "L"), 2: (3, "RGB"), 3: (3, "P"), 4: (2, "LA"), 6: (4, "RGBA")}


def _png(get: Get, size: int):
    b = get(8, 18)
    if len(b) < 18 or b[4:8] != b"IHDR":  # IHDR must be the first chunk
        return None
    comps, mode = _PNG_MODES.get(b[17], (0, f"color type {b[17]}"))
    return _be(b[8:12]), _be(b[12:16]), comps, mode


def _webp(get: Get, size: int):
    b = get(12, 18)
    if len(b) < 18:
        return None
    chunk = b[:4]
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit sizes
        if b[11:14] != b"\x9d\x01\x2a":
            return None
        return _le(b[14:16]) & 0x3FFF, _le(b[16:18]) & 0x3FFF, 3, "RGB"
    if chunk == b"VP8L":  # lossless: signature byte, then 14-bit sizes minus one
        if b[8] != 0x2F:
            return None
        bits = _le(b[9:13])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4, "RGBA"
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes minus one
        alpha = bool(b[8] & 0x10)
        return _le(b[12:15]) + 1, _le(b[15:18]) + 1, 4 if alpha else 3, "RGBA" if alpha else "RGB"
    return None


def _bmp(get: Get, size: int):
    b = get(14, 16)
    if len(b) < 12:
        return None
    if _le(b[:4]) == 12:  # OS/2 core header: 16-bit sizes
        return _le(b[4:6]), _le(b[6:8]), 3, "RGB"
    if len(b) < 16:
        return None
    width = int.from_bytes(b[4:8], "little", signed=True)
    height = abs(int.from_bytes(b[8:12], "little", signed=True))  # negative: stored top-down
    bits = _le(b[14:16])
    return width, height, 4 if bits == 32 else 3, "RGBA" if bits == 32 else "RGB"


def _tiff(get: Get, size: int):
    b = get(0, 8)
    order = "little" if b[:2] == b"II" else "big"
    ifd = int.from_bytes(b[4:8], order)
    count_b = get(ifd, 2)
    if len(count_b) < 2:
        return None
    count = min(int.from_bytes(count_b, order), 512)
    entries = get(ifd + 2, 12 * count)
    found: dict[int, int] = {}
    for i in range(0, len(entries) - 11, 12):
        tag = int.from_bytes(entries[i : i + 2], order)
        if tag in (256, 257, 277):
            kind = int.from_bytes(entries[i + 2 : i + 4], order)
            value = entries[i + 8 : i + 10] if kind == 3 else entries[i + 8 : i + 12]  # SHORT or LONG
            found[tag] = int.from_bytes(value, order)
    if 256 not in found or 257 not in found:
        return None
    comps = found.get(277, 1)
    return found[256], found[257], comps, {1: "L", 3: "RGB", 4: "RGBA"}.get(comps, f"{comps} components")


def _jpeg2000(get: Get, size: int):
    b = get(0, 24)
    if b[:4] == b"\xff\x4f\xff\x51":  # a raw codestream: the SIZ segment follows SOC
        if len(b) < 24:
            return None
        return _be(b[8:12]) - _be(b[16:20]), _be(b[12:16]) - _be(b[20:24]), 3, "RGB"
    pos = 0
    for _ in range(64):  # boxes: find jp2h, then its ihdr
        box = get(pos, 8)
        if len(box) < 8:
            return None
        length, kind = _be(box[:4]), box[4:8]
        if kind == b"jp2h":
            pos += 8
            continue
        if kind == b"ihdr":
            ihdr = get(pos + 8, 10)
            if len(ihdr) < 10:
                return None
            comps = _be(ihdr[8:10])
            return _be(ihdr[4:8]), _be(ihdr[:4]), comps, {1: "L", 3: "RGB", 4: "RGBA"}.get(comps, "RGB")
        if length == 1:
            length = _be(get(pos + 8, 8))
        if length < 8:
            return None
        pos += length
    return None


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n?)*(\d+)")


def _pnm(get: Get, size: int):
    b = get(0, 1024)
    m1 = _PNM_TOKEN.match(b, 2)
    m2 = _PNM_TOKEN.match(b, m1.end()) if m1 else None
    if m2 is None:
        return None
    comps = 3 if b[1:2] in (b"3", b"6") else 1
    return int(m1.group(1)), int(m2.group(1)), comps, "RGB" if comps == 3 else "L"


_HEADER_READERS = {"png": _png, "webp": _webp, "bmp": _bmp, "tiff": _tiff, "jpeg2000": _jpeg2000, "pnm": _pnm}


# ---------------------------------------------------------------------------------------------
# Shard files that are no tar at all


# Streams a tar may be compressed with: magic -> (name, the command that decompresses one).
COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip", "gzip -dc"), (b"\x28\xb5\x2f\xfd", "zstd", "zstd -dc"), (b"BZh", "bzip2", "bzip2 -dc"),
    (b"\xfd7zXZ\x00", "xz", "xz -dc"), (b"\x04\x22\x4d\x18", "lz4", "lz4 -dc"),
)
_OTHER_ARCHIVES = ((b"PK\x03\x04", "a zip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"))


def compression_of(head: bytes) -> str | None:
    """The compression a file starting with ``head`` is in, by its magic (``gzip``, ``zstd``,
    ``bzip2``, ``xz``, ``lz4``), or None: decided by the bytes, whatever the file is named."""
    for magic, name, _ in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name
    return None


def compressed_reason(head: bytes) -> str | None:
    """Why a compressed stream is no shard, with the command that makes one of it, or None."""
    for magic, name, command in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return (f"it is {name}-compressed; shards must be plain tar files (an index holds offsets into "
                    f"the plain tar): decompress it (`{command} FILE > 00000.tar`), or let `curator-assets "
                    f"export` write plain shards with indexes from it")
    return None


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def not_a_tar(head: bytes) -> str | None:
    """Why a file starting with ``head`` (its first block or all of it, when shorter) is no tar
    archive at all, or None when it may be one (a tar header, zeros, or too little to tell).

    A tar cut short inside its first header still starts like one (a name, then octal mode
    digits at byte 100), so it is a truncated tar, not this.
    """
    if not head or not head.strip(b"\0"):
        return None
    if head.startswith(_LFS_POINTER):
        return "not a tar archive: a Git LFS pointer file, not the shard itself (run `git lfs pull`)"
    compressed = compressed_reason(head)
    if compressed:
        return f"not a tar archive: {compressed}"
    for magic, what in _OTHER_ARCHIVES:
        if head.startswith(magic):
            return f"not a tar archive: it is {what}; shards must be plain tar files"
    if len(head) >= 263 and head[257:262] == b"ustar":
        return None
    name_ends = head.find(b"\0", 0, 101) >= 0
    mode = head[100:108]
    if name_ends and mode.strip(b"01234567 \0") == b"":
        return None  # a name, then octal mode digits (or the end): a tar header, or the start of one
    if not name_ends and len(head) <= 100 and b"\n" not in head and head.isascii():
        return None  # too little to tell: a tar cut short inside its first name
    what = "text" if image_format(head[:16]) is None and _is_text(head) else describe(head[:16])
    return f"not a tar archive: {what}"


def _is_text(head: bytes) -> bool:
    for cut in range(4):  # the block may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    return all(c.isprintable() or c in "\t\n\r" for c in text)
