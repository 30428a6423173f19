"""``lcprobe suite``: several tasks on several models, a layer x task table per model.

The work is :func:`lcprobe.studies.suite.run_suite`; this module parses arguments,
draws one live display for the whole suite and prints the tables after.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from typing import Any, Sequence

from lcprobe.cli.common import add_model_args, add_probe_args, add_shard_arg

EPILOG = """\
examples:
  lcprobe suite -m smollm2-135m -o results/smol
  lcprobe suite -m llama-2-7b.Q4_K_M.gguf -m llama-2-13b.Q4_K_M.gguf -T calc,lama,reclor -o results/sizes
  lcprobe suite -m smollm2-135m --limit 50 -o results/quick
  lcprobe report results/smol

Default tasks (one per family of Chen et al.): {tasks}.
Output: DIR/<model>/<task>/items.jsonl + summary.json (as 'lcprobe run'),
DIR/suite.json and DIR/suite.csv (model, task, layer, relative_depth, metric, value).
Ctrl-C stops after the current batch; run the same command with --resume to finish.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.cli.common import DEFAULT_MODEL
    from lcprobe.results.suite import DEFAULT_TASKS

    p = sub.add_parser(
        "suite", help="several tasks on one or more models: a layer x task table per model",
        description="Probe every task at every layer, one model in memory at a time.",
        epilog=EPILOG.format(tasks=", ".join(DEFAULT_TASKS)),
        formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
    )
    add_model_args(p)
    # -m again, repeatable this time ("resolve" replaces the single -m added above)
    p.add_argument("-m", "--model", action="append", default=None,
                   help=f"a .gguf path or catalog name; repeat for several models (default: {DEFAULT_MODEL})")
    p.add_argument("-T", "--tasks", action="append", default=None,
                   help="comma-separated task names or YAML paths; may be repeated "
                        f"(default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("-o", "--output", required=True, help="suite directory")
    add_probe_args(p)
    p.add_argument("--resume", action="store_true", help="keep finished tasks and continue unfinished ones")
    add_shard_arg(p, "items of every task")
    p.add_argument("--quiet", action="store_true", help="no live display and no tables, only the final lines")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


# --- tables ---------------------------------------------------------------------

# A perceptually ordered ramp (dark blue -> teal -> yellow), like matplotlib's viridis.
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def shade(value: float) -> tuple[tuple[int, int, int], str]:
    """Background colour for a value in 0..1 and a text colour readable on it."""
    v = min(max(value, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(v), len(_RAMP) - 2)
    f = v - i
    rgb = tuple(round(a + (b - a) * f) for a, b in zip(_RAMP[i], _RAMP[i + 1]))
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return rgb, ("black" if luminance > 0.55 else "white")  # type: ignore[return-value]


def layer_bins(layers: Sequence[int], max_cols: int) -> list[list[int]]:
    """Indices of ``layers`` grouped into at most ``max_cols`` consecutive bins of equal width."""
    n = len(layers)
    width = max(1, math.ceil(n / max(1, max_cols)))
    return [list(range(i, min(i + width, n))) for i in range(0, n, width)]


def _bin_value(values: Sequence[float | None], idx: list[int]) -> float | None:
    vals = [values[i] for i in idx if values[i] is not None]
    return sum(vals) / len(vals) if vals else None


def model_table(record: dict[str, Any], width: int) -> Any:
    """Rows = tasks, columns = layers (bins when the model is deep or the terminal narrow)."""
    from rich.table import Table
    from rich.text import Text

    entries = list(record["tasks"].values())
    layers = entries[0]["layers"] if entries else []
    fixed = max([len(e["task"]) for e in entries] + [4]) + 6 + 10 + 6  # task, metric, best, last
    max_cols = min(32, max(6, (width - fixed) // 4))
    bins = layer_bins(layers, max_cols)
    binned = any(len(b) > 1 for b in bins)
    caption = "value x 100; underlined: best layer"
    if binned:
        caption += f"; columns: bins of {len(bins[0])} layers (mean), headed by the first"
    table = Table(title=f"{record['model']} ({record['architecture']}, {record['n_layer']} layers, "
                        f"{record['quantization']})", title_justify="left", caption=caption,
                  caption_justify="left", padding=(0, 0), pad_edge=False, box=None)
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True, style="dim")
    for b in bins:
        table.add_column(str(layers[b[0]]), justify="right", no_wrap=True, min_width=4, max_width=4)
    table.add_column(" best", justify="right", no_wrap=True)
    table.add_column(" last", justify="right", no_wrap=True)
    for e in entries:
        best_idx = e["layers"].index(e["best_layer"]) if e["best_layer"] in e["layers"] else None
        cells: list[Any] = [e["task"] + " ", e["metric"] + " "]
        for b in bins:
            v = _bin_value(e["values"], b)
            if v is None:
                cells.append(Text("   —"))
                continue
            rgb, fg = shade(v)
            style = f"{fg} on rgb({rgb[0]},{rgb[1]},{rgb[2]})"
            if best_idx is not None and best_idx in b:
                style += " bold underline"
            cells.append(Text(f"{round(v * 100):>4d}", style=style))
        cells.append(f" L{e['best_layer']} {_fmt(e['best_value'], 2)}")
        cells.append(f" {_fmt(e['last_value'], 2)}")
        table.add_row(*cells)
    return table


def comparison_table(suite: dict[str, Any]) -> Any:
    """For several models: per task, best layer / best value / penultimate / last value."""
    from rich.table import Table

    table = Table(title="models compared (best layer as layer/N)", title_justify="left")
    for col in ("task", "model", "metric", "best layer", "best", "penultimate", "last", "items"):
        table.add_column(col, justify="left" if col in ("task", "model", "metric") else "right")
    for task in suite["tasks"]:
        for m in suite["models"]:
            e = m["tasks"].get(task)
            if e is None:
                continue
            pen = e["values"][-2] if len(e["values"]) > 1 else None
            table.add_row(task, m["model"], e["metric"], f"{e['best_layer']}/{m['n_layer']}",
                          _fmt(e["best_value"]), _fmt(pen), _fmt(e["last_value"]), str(e["n_items"]))
        table.add_section()
    return table


# --- the command ------------------------------------------------------------------


def _command_line(args: argparse.Namespace, models: list[str], tasks: list[str]) -> str:
    """The command that continues this suite (what the user typed, plus --resume)."""
    parts = ["lcprobe", "suite"]
    for m in models:
        parts += ["-m", m]
    parts += ["-T", ",".join(tasks), "-o", args.output]
    flags = (("--limit", args.limit, None), ("--layers", args.layers, None), ("--lens", args.lens, "final-norm"),
             ("--site", args.site, "resid_post"), ("--seed", args.seed, 0), ("-ngl", args.n_gpu_layers, 0),
             ("-t", args.threads, None), ("-c", args.ctx_size, 2048), ("-b", args.batch_size, 512),
             ("--lens-backend", getattr(args, "lens_backend", "numpy"), "numpy"),
             ("--shard", getattr(args, "shard", None), None))
    for flag, value, default in flags:
        if value != default:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts) + " --resume"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lcprobe.cli.common import DEFAULT_MODEL, Interrupt, probe_options
    from lcprobe.cli.display import StudyDisplay
    from lcprobe.studies.suite import load_tasks, parse_task_list, plan_models, run_suite

    console = Console(quiet=args.quiet, highlight=False)
    options = probe_options(args)
    names = parse_task_list(args.tasks)
    tasks = load_tasks(names)  # before any model: a missing data file fails now
    models = plan_models(args.model or [DEFAULT_MODEL])
    planned = {t.name: len(t.items(limit=options.limit, seed=options.seed)) for t in tasks}
    console.print(f"[bold]lcprobe suite[/]: {len(models)} model(s) x {len(tasks)} task(s) "
                  f"({', '.join(t.name for t in tasks)}) -> {args.output}")
    t0 = time.perf_counter()
    title = f"suite: {len(models)} model(s) x {len(tasks)} task(s)"
    with Interrupt() as stop, StudyDisplay(console, title, len(models), len(tasks), enabled=not args.quiet) as display:
        display.plan(planned)
        outcome = run_suite(models, tasks, args.output, options, resume=args.resume, listener=display,
                            should_stop=lambda: stop.requested)
    wall = time.perf_counter() - t0
    suite = outcome.suite
    if not args.quiet:
        for record in suite["models"]:
            if record["tasks"]:
                console.print()
                console.print(model_table(record, console.width))
        if len(suite["models"]) > 1:
            console.print()
            console.print(comparison_table(suite))
    if outcome.interrupted:
        done = sum(len(m["tasks"]) for m in suite["models"])
        console.print(f"[yellow]interrupted[/] after {wall:.0f} s; finished items are saved in {args.output} "
                      f"({done} of {len(models) * len(tasks)} tasks started)")
        print(f"resume with: {_command_line(args, [m.spec for m in models], [t.name for t in tasks])}",
              file=sys.stderr)
        return 130
    skipped = [(m["model"], e["task"], e["n_skipped"]) for m in suite["models"]
               for e in m["tasks"].values() if e["n_skipped"]]
    for stem, task, n in skipped:
        console.print(f"[yellow]{stem} · {task}: {n} items skipped (prompt longer than {options.n_ctx} tokens)[/]")
    failed = [(m["model"], task, msg) for m in suite["models"] for task, msg in m.get("errors", {}).items()]
    status = f"finished with {len(failed)} failed task(s)" if failed else "done"
    print(f"suite {status} in {wall:.1f} s: {len(models)} model(s) x {len(tasks)} task(s); "
          f"wrote {args.output}/suite.json and suite.csv; figures: lcprobe report {args.output}")
    if failed:
        for stem, task, msg in failed:
            print(f"lcprobe: error: {stem} · {task} failed: {msg}", file=sys.stderr)
        return 1
    return 0
