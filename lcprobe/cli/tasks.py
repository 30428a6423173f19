"""``lcprobe tasks``: the built-in tasks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lcprobe.cli.common import make_console


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tasks", help="list built-in tasks")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lcprobe.tasks.task import builtin_tasks

    rows = []
    for t in builtin_tasks():
        rows.append(t if isinstance(t, dict) else {
            "name": t.name, "family": getattr(t, "family", ""), "metric": t.metric,
            "format": t.format, "source": t.source, "description": t.description,
        })
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    from rich.table import Table

    table = Table(title="built-in tasks", title_justify="left")
    cols = [k for k in ("name", "family", "items", "metric", "format", "source", "description") if any(k in r for r in rows)]
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    make_console().print(table)
    return 0


