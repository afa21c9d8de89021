"""Formats: what the bytes of a shard, its index, a report and a manifest mean.

Imports nothing else of the project.
"""
