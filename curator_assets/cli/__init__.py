"""The command line and the in-process runner, on top of everything else."""
from curator_assets.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
