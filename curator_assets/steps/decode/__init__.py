"""Decode: options, the DALI engine, crash containment, the shard decoder."""
