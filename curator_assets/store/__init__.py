"""The store: fsspec access, errors and retries, atomic writes, the dataset listing and fingerprints.

Imports nothing else of the project.
"""
