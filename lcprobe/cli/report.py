"""``lcprobe report DIR``: PNG figures and report.md from saved results (no model is run)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="figures and a Markdown summary from saved results (needs lcprobe[plot])",
        description="Draw figures (metric over layers per task, layer x task heatmaps, best vs last layer "
                    "radar, calc grids) into DIR/figures and write DIR/report.md. Reads a run directory, a "
                    "suite directory, or a directory of run directories; never runs a model.",
    )
    p.add_argument("dir", help="a directory written by lcprobe run, suite, compare or depth")


def run(args: argparse.Namespace) -> int:
    from lcprobe.report.make import make_report

    outcome = make_report(args.dir)
    models = len({r.model for r in outcome.runs})
    tasks = len({r.task for r in outcome.runs})
    print(f"report: {models} model(s), {tasks} task(s), {len(outcome.figures)} figure(s)")
    for p in outcome.figures:
        print(f"  {p}")
    for note in outcome.notes:
        print(f"  note: {note}")
    print(outcome.markdown)
    return 0
