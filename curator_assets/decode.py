"""The public Python API of decoding: ``iter_batches`` and ``decode_shard`` (see docs/decoding.md).

The code lives in :mod:`curator_assets.steps.decode`; this module only names what users import.
"""
from curator_assets.steps.decode.batches import iter_batches
from curator_assets.steps.decode.options import DecodeError, DecodeOptions, StaleIndexError
from curator_assets.steps.decode.shard import DecodedBatch, ShardDecoder, decode_shard

__all__ = ["DecodeError", "DecodeOptions", "DecodedBatch", "ShardDecoder", "StaleIndexError", "decode_shard",
           "iter_batches"]
