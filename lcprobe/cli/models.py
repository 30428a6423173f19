"""``lcprobe models``: the model catalog (list, pull, path)."""

from __future__ import annotations

import argparse
from typing import Any

from lcprobe.cli.common import make_console, resolve_model
from lcprobe.errors import LcprobeError


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="the model catalog: list | pull NAME | path NAME")
    msub = models.add_subparsers(dest="action", metavar="ACTION")
    msub.add_parser("list", help="catalog entries and whether they are downloaded")
    mp = msub.add_parser("pull", help="download a catalog model (sha256 checked, resumable)")
    mp.add_argument("name")
    mp.add_argument("--force", action="store_true", help="download again even if present")
    mpa = msub.add_parser("path", help="print the local path of a catalog model")
    mpa.add_argument("name")


def run(args: argparse.Namespace) -> int:
    from lcprobe.files import catalog

    if args.action in (None, "list"):
        from rich.table import Table

        table = Table(title="lcprobe model catalog", title_justify="left")
        for col in ("name", "arch", "quant", "size", "downloaded", "description"):
            table.add_column(col)
        for name, e in catalog.load_catalog().items():
            path = catalog.model_path(name)
            size = f"{e.display_size / 1e6:,.0f} MB" if e.display_size else "?"
            table.add_row(name, e.arch, e.quant, size, "yes" if path.exists() else "no", e.description)
        make_console().print(table)
        return 0
    if args.action == "path":
        print(catalog.model_path(args.name) if args.name in catalog.load_catalog()
              else resolve_model(args.name))
        return 0
    if args.action == "pull":
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=make_console()) as prog:
            tid = prog.add_task(args.name, total=None)

            def report(stage: str, done: int, total: int | None) -> None:
                prog.update(tid, description=f"{args.name}: {stage}", completed=done, total=total)

            path = catalog.pull(args.name, progress=report, force=args.force)
        print(path)
        return 0
    raise LcprobeError(f"unknown models action '{args.action}'")


