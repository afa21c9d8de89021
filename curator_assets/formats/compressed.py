"""Compressed tar shards (gzip, bzip2, xz, zstd), recognised by their first bytes, never by name
(the magic numbers live in :mod:`curator_assets.formats.sniff`).

A compressed shard cannot be indexed (an index holds byte offsets into the plain tar), so export
turns it into a plain tar: :func:`spool_plain` streams the decompressed bytes into a local file,
in bounded memory, which is then read like any other shard.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from typing import IO, BinaryIO

from curator_assets.formats.sniff import compression_of

__all__ = ["CompressedInputError", "compression_of", "open_decompressed", "spool_plain"]

SNIFF_BYTES = 6
CHUNK = 1 << 20


class CompressedInputError(ValueError):
    """A compressed shard whose stream is damaged (the message names the compression)."""


def open_decompressed(raw: BinaryIO, kind: str) -> IO[bytes]:
    """A read-only stream of the decompressed bytes of ``raw`` (streamed: nothing is read ahead
    beyond one chunk)."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    if kind == "lz4":
        raise CompressedInputError("lz4-compressed: decompress it first (lz4 -dc FILE > 00000.tar)")
    if kind == "zstd":
        import zstandard

        # read_across_frames: a file of several frames (pzstd, appended streams) reads whole, as zstd -d does.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    raise ValueError(f"unknown compression {kind!r}")


def spool_plain(raw: BinaryIO, kind: str, out: BinaryIO) -> int:
    """Decompress ``raw`` into ``out`` chunk by chunk; the bytes written. A damaged stream raises
    :class:`CompressedInputError` (what was decompressed before the damage is in ``out``)."""
    stream = open_decompressed(raw, kind)
    written = 0
    try:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return written
            out.write(chunk)
            written += len(chunk)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise CompressedInputError(f"{kind} stream damaged after {written} decompressed bytes: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError is no OSError
        if type(exc).__name__ == "ZstdError":
            raise CompressedInputError(f"{kind} stream damaged after {written} decompressed bytes: {exc}") from exc
        raise
    finally:
        stream.close()
