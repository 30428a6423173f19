"""The ``lcprobe`` command line. ``main(argv)`` is callable from tests.

Every command is a module of this package with ``add_parser(subparsers)`` and
``run(args) -> int``, a thin client of the library. User mistakes
(LcprobeError) print one line and exit 1; Ctrl-C or SIGTERM during a run
stops after the current decode group, keeps every finished item, prints how to
resume, and exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Sequence

from lcprobe import __version__
from lcprobe.errors import LcprobeError

#: Command modules in the order --help lists them.
COMMANDS = ("run", "check", "models", "tasks", "info", "suite", "report", "data", "plan", "quantize",
            "sensitivity", "compare", "depth", "sites", "merge", "dump", "kld", "steer", "patch",
            "rpc-server")


def _module(name: str) -> ModuleType:
    # command names may hold '-' (rpc-server), module names cannot
    return importlib.import_module(f"lcprobe.cli.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcprobe",
        description="Layer-wise probing of quantized GGUF models through llama.cpp: every choice of "
                    "every item scored at every layer with the logit lens.",
    )
    parser.add_argument("--version", action="version", version=f"lcprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return _module(args.command).run(args)
    except LcprobeError as exc:
        print(f"lcprobe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lcprobe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lcprobe ... | head`: the reader left; say nothing more and exit like a killed pipe writer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
