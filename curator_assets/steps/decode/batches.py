"""Shards to a stream of image batches (the Python API's iter_batches)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from curator_assets.steps.decode.options import DEFAULT_HW_DECODER_LOAD, DEFAULT_MAX_PIXELS, DecodeOptions
from curator_assets.steps.decode.shard import DecodedBatch, ShardDecoder

ShardRef = Any  # a str/PathLike (a .tar or a folder of them, local or URL) or a (Dataset, key) pair


def resolve_shards(shards: Iterable[ShardRef], storage_options: dict | None = None) -> Iterator[tuple[Any, str]]:
    """``(dataset, key)`` for each shard reference: a ``(Dataset, key)`` pair as it is; a path or
    URL of a ``.tar`` as that shard; a folder (or prefix) as every shard under it, in key order."""
    from curator_assets.store.dataset import Dataset

    if isinstance(shards, (str, os.PathLike)) or (isinstance(shards, tuple) and len(shards) == 2
                                                   and isinstance(shards[1], str) and not isinstance(shards[0], str)):
        shards = [shards]
    for ref in shards:
        if isinstance(ref, tuple):
            yield ref[0], ref[1]
            continue
        dataset = Dataset(os.fspath(ref), storage_options)
        for shard in dataset.list_shards().shards:
            yield dataset, shard.key


def iter_batches(
    shards: ShardRef | Iterable[ShardRef],
    *,
    batch_size: int | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
    fast_idct: bool = False,
    reader: str = "auto",
    storage_options: dict | None = None,
    device_id: int = 0,
    pipelines: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    contain_crashes: bool = False,
) -> Iterator[DecodedBatch]:
    """Decoded images of one or more shards, batch by batch, in tar order.

    ``shards``: paths or URLs of ``.tar`` files (or of folders of them), or ``(Dataset, key)``
    pairs; ``storage_options`` are fsspec options for the paths and URLs; ``device_id`` picks the
    GPU on a machine with several. Each batch covers at
    most ``batch_size`` consecutive records of one shard: ``batch.record_ids`` and
    ``batch.image_list`` hold the decoded ones (IDs from the member names), ``batch.rows`` every
    record of the stretch with its manifest row (caption, JSON, error). Images are HWC ``uint8``
    RGB: numpy arrays on the CPU; on the GPU, DALI ``TensorGPU`` objects that any DLPack consumer
    takes (``torch.from_dlpack(t)``, ``cupy.from_dlpack(t)``). Both are DALI's own output
    buffers, not copies: they stay valid for as long as they are referenced, and a kept image
    keeps its batch's buffer alive (copy the few you keep out of many). Only a few batches are in
    memory at any time, whatever the shard size.

    ``contain_crashes``: decode in supervised worker processes, so that a decoder crash on a
    corrupt image fails that record instead of killing this process (see
    :mod:`curator_assets.steps.decode.worker`). Images then come back as numpy arrays on the host
    (mapped from shared memory), even when decoded on a GPU. Off by default here, so that GPU
    images stay on the device; turn it on for untrusted data.
    """
    options = DecodeOptions(device=device, batch_size=batch_size, num_threads=num_threads,
                            hw_decoder_load=hw_decoder_load, fast_idct=fast_idct, reader=reader,
                            device_id=device_id, pipelines=pipelines, max_pixels=max_pixels,
                            contain_crashes=contain_crashes)
    decoder = ShardDecoder(options)
    try:
        for dataset, key in resolve_shards(shards, storage_options):
            yield from decoder.batches(dataset, key, keep_images=True)
    finally:
        decoder.close()


