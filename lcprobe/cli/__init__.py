"""The command line: one module per command, each a thin client of the library."""

from lcprobe.cli.main import main

__all__ = ["main"]
