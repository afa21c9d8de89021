"""One decoder per process, shared by every shard decoded in it."""

from __future__ import annotations

import dataclasses
import threading

from curator_assets.steps.decode.options import DecodeOptions
from curator_assets.steps.decode.shard import ShardDecoder

# ---------------------------------------------------------------------------------------------
# One decoder per process: building DALI pipelines costs ~0.3-1 s (more on a GPU), so every
# shard decoded in a process (a Dagster run's steps, `curator-assets run`) shares them.

_SHARED: dict[tuple, ShardDecoder] = {}
_SHARED_LOCK = threading.Lock()
_PREPARING: set[tuple] = set()  # options whose decoder a background thread is building
_PREPARING_LOCK = threading.Lock()


def shared_decoder(options: DecodeOptions | None = None) -> ShardDecoder:
    """The process's :class:`ShardDecoder` for these options, built on first use."""
    options = options or DecodeOptions()
    key = dataclasses.astuple(options)
    with _SHARED_LOCK:
        decoder = _SHARED.get(key)
        if decoder is None:
            decoder = _SHARED[key] = ShardDecoder(options)
        return decoder


def prepare_shared_decoder(options: DecodeOptions | None = None) -> None:
    """Build the process's shared decoder for these options in a background thread, so that it
    is ready when the first shard is decoded; a later :func:`shared_decoder` call waits for it.
    A build that fails here is left to that call, which raises it."""
    options = options or DecodeOptions()
    key = dataclasses.astuple(options)
    with _PREPARING_LOCK:  # not _SHARED_LOCK: a build holds that one for seconds
        if key in _SHARED or key in _PREPARING:
            return
        _PREPARING.add(key)

    def build() -> None:
        try:
            shared_decoder(options)
        except Exception:  # noqa: BLE001 - raised again, with its context, where it is needed
            pass
        finally:
            with _PREPARING_LOCK:
                _PREPARING.discard(key)

    threading.Thread(target=build, name="curator-decoder-build", daemon=True).start()


def shared_decoder_wanted(options: DecodeOptions) -> bool:
    """Whether this process has the shared decoder for these options, or is building it."""
    key = dataclasses.astuple(options)
    with _PREPARING_LOCK:
        return key in _SHARED or key in _PREPARING


def shared_decoders_built() -> int:
    """How many shared decoders this process has built (one per distinct set of options)."""
    return len(_SHARED)
