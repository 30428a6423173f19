"""``lcprobe data``: the paper's data files (pull | list | path)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from lcprobe.files.datafiles import BASE_URL, COMMIT, REPOSITORY

    p = sub.add_parser("data", help="the paper's data files: pull | list | path",
                       description=f"The probing data of Chen et al. from github.com/{REPOSITORY} at commit "
                                   f"{COMMIT[:12]}, sha256-checked, into $LCPROBE_DATA or ~/.cache/lcprobe/data.")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    pull = dsub.add_parser("pull", help="download missing files (resumable; present files are only checked)")
    pull.add_argument("--dir", default=None, help="target directory (default: $LCPROBE_DATA or ~/.cache/lcprobe/data)")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    pull.add_argument("--base-url", default=BASE_URL,
                      help="a mirror of the repository's data/ folder (default: the pinned GitHub commit)")
    lst = dsub.add_parser("list", help="each file: tasks that use it, size and whether it is present and verified")
    lst.add_argument("--dir", default=None)
    pth = dsub.add_parser("path", help="print the data directory")
    pth.add_argument("--dir", default=None)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lcprobe.files import datafiles as data
    from lcprobe.errors import LcprobeError

    console = Console(highlight=False)
    action = args.action or "list"
    directory = getattr(args, "dir", None)
    if action == "path":
        print(directory or data.default_dir())
        return 0
    if action == "list":
        from rich.table import Table

        states = data.status(directory)
        table = Table(title=f"data in {states[0].path.parent}", title_justify="left")
        for col in ("file", "tasks", "size", "state"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for s in states:
            colour = "green" if s.state == "ok" else "yellow"
            table.add_row(s.file.name, ", ".join(s.file.tasks), f"{s.file.size:,}", f"[{colour}]{s.state}[/]")
        console.print(table)
        missing = sum(s.state != "ok" for s in states)
        if missing:
            console.print(f"{missing} file(s) not ready; run: lcprobe data pull"
                          + (f" --dir {directory}" if directory else ""))
        return 0
    if action == "pull":
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as prog:
            ids: dict[str, Any] = {}

            def report(name: str, done: int, total: int) -> None:
                if name not in ids:
                    ids[name] = prog.add_task(name, total=total)
                prog.update(ids[name], completed=done)

            outcome = data.pull(directory, base_url=args.base_url, progress=report, force=args.force)
        if outcome.fetched:
            print(f"fetched {len(outcome.fetched)} file(s) into {outcome.directory}: {', '.join(outcome.fetched)}")
        if outcome.present:
            print(f"{len(outcome.present)} file(s) already present and verified in {outcome.directory}")
        return 0
    raise LcprobeError(f"unknown data action {action!r}")
