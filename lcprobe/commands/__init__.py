"""Subcommands that live in their own modules; see lcprobe.cli."""
