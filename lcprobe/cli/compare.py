"""``lcprobe compare``: models against a reference, layer by layer (paired accuracy tests, KL, cosine, top-1).

The work is :mod:`lcprobe.studies.compare`; this module parses arguments, draws the
live display and prints, per task, a layer x model table and a verdict per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lcprobe.cli.common import add_model_args, add_probe_args, add_shard_arg

EPILOG = """\
examples:
  lcprobe quantize -m llama-2-7b.F16.gguf -t Q8_0,Q4_K_M,Q2_K -o models/l7
  lcprobe compare -m models/l7/llama-2-7b-F16.gguf -m models/l7/llama-2-7b-Q4_K_M.gguf \\
      -m models/l7/llama-2-7b-Q2_K.gguf -T calc,lama -o results/q
  lcprobe compare -m llama-2-7b.Q8_0.gguf -m llama-2-13b.Q8_0.gguf -T calc -o results/sizes
  lcprobe report results/q

The first -m is the reference; all models must share its tokenizer and run the
same items. Per task, model and layer: the task metric, its difference from the
reference with McNemar's exact test (paired items), and on the scored rows
KL(reference lens || model lens), cosine similarity and relative L2 error of the
hidden states and top-1 agreement of the lenses. Models of another depth/width
are matched on relative depth, without the representation measures.
Output: DIR/<model>/<task>/ (as 'lcprobe run'), DIR/compare.json, DIR/compare.csv.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.results.compare import DEFAULT_KL_THRESHOLD, DEFAULT_MAX_ROWS

    p = sub.add_parser(
        "compare", help="compare models (e.g. quantizations) with a reference at every layer",
        description="Paired layer-by-layer comparison of models against the first one.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
    )
    add_model_args(p)
    p.add_argument("-m", "--model", action="append", required=True,
                   help="a .gguf path or catalog name; repeat: the first is the reference")
    p.add_argument("-T", "--tasks", action="append", default=None,
                   help="comma-separated task names or YAML paths; may be repeated (default: calc)")
    p.add_argument("-o", "--output", required=True, help="comparison directory")
    add_probe_args(p)
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"reference hidden rows kept on disk per task for KL/cosine/top-1 (float16; default "
                        f"{DEFAULT_MAX_ROWS}; 0 = task metrics only)")
    p.add_argument("--kl-threshold", type=float, default=DEFAULT_KL_THRESHOLD,
                   help=f"KL (nats) the verdict calls a divergence (default {DEFAULT_KL_THRESHOLD:g})")
    p.add_argument("--quiet", action="store_true", help="no live display and no tables, only the verdicts")
    add_shard_arg(p, "items of every task (each shard compares up to --max-rows rows of its own items)")


def _describe(entry: dict[str, Any], task: Any) -> str:
    from lcprobe.cli.display import best_note

    note = best_note(entry, task.metric)
    return note if entry["reference"] else f"{note}, final KL {_fmt(entry['layers'][-1]['kl'])}"


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _kl_text(v: float | None, threshold: float) -> Any:
    from rich.text import Text

    if v is None:
        return Text("—", style="dim")
    style = "dim" if v < threshold / 10 else ("yellow" if v <= threshold else "bold red")
    text = "0" if v == 0 else f"{v:.2f}" if v >= 1 else f"{v:.3f}" if v >= 0.01 else f"{v:.4f}"
    return Text(text, style=style)


def models_table(result: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title="models (first = reference)", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="base: share of the weights in the file type's main ggml type", caption_justify="left")
    table.add_column("label", no_wrap=True)
    table.add_column("bpw", justify="right", no_wrap=True)
    table.add_column("base", justify="right", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    table.add_column("real type mix", overflow="fold")
    for m in result["models"]:
        mix = m["type_mix"]
        shares = sorted(mix["types"].items(), key=lambda kv: -kv[1]["params"])
        desc = " ".join(f"{t}:{v['fraction']:.0%}" for t, v in shares[:4] if v["fraction"] >= 0.005)
        base = "—" if mix["base_fraction"] is None else f"{mix['base_fraction']:.0%}"
        table.add_row(m["label"], f"{m['bits_per_weight']:.2f}", base, f"{m['n_layer']}×{m['n_embd']}", desc,
                      style="yellow" if m["warning"] else None)
    return table


def task_table(task: str, tr: dict[str, Any], threshold: float) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from lcprobe.studies.compare import table_bins

    models = tr["models"]
    ref = models[0]
    rows = table_bins(tr)
    binned = any(r["label"].find("-") > 0 or r["label"].endswith("%") for r in rows)
    metric = tr["metric"]
    with_kl = [m["representation"] for m in models]
    caption = (f"Δ: {metric} minus the reference's; * p<0.05 (McNemar exact on {tr['paired_metric']}, "
               f"{tr['n_items']} paired items)")
    if any(with_kl[1:]):
        caption += (f"; KL(ref || model) of the lens, nats, mean over {tr['rows_compared']} rows of "
                    f"{tr['items_with_rows']} items")
    if binned:
        caption += "; binned rows show means (relative depth when the models differ in depth)"
    table = Table(title=f"{task} · {metric} vs reference {ref['label']}", title_justify="left",
                  caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    # with up to 100 items a difference is a multiple of 0.01: two decimals say it exactly
    digits = 2 if (tr["n_items"] or 0) <= 100 else 3
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column(f"{ref['label']}\n{metric}", justify="right", no_wrap=True, min_width=5)
    for m in models[1:]:
        table.add_column(f"{m['label']}\nΔ", justify="right", no_wrap=True, min_width=digits + 4)
        if m["representation"]:
            table.add_column("\nKL", justify="right", no_wrap=True, min_width=6)
    for r in rows:
        cells: list[Any] = [r["label"], _fmt(r["ref_metric"])]
        for m in models[1:]:
            c = r["models"][m["label"]]
            if c["delta"] is None:
                cells.append(Text("—", style="dim"))
            else:
                mark = "*" if c["significant"] else " "
                style = ("bold red" if c["delta"] < 0 else "bold green") if c["significant"] else ""
                cells.append(Text(f"{c['delta']:+.{digits}f}{mark}", style=style))
            if m["representation"]:
                cells.append(_kl_text(c["kl"], threshold))
        table.add_row(*cells)
    return table


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from lcprobe.files.catalog import resolve_model
    from lcprobe.cli.common import Interrupt, probe_options
    from lcprobe.cli.display import StudyDisplay
    from lcprobe.studies.compare import plan_models, run_compare, verdict_line
    from lcprobe.studies.suite import load_tasks, parse_task_list

    console = Console(highlight=False)
    if args.max_rows < 0:
        from lcprobe.errors import LcprobeError

        raise LcprobeError("--max-rows must be >= 0")
    tasks = load_tasks(parse_task_list(args.tasks or ["calc"]))
    models = plan_models([resolve_model(m) for m in args.model])
    options = probe_options(args)
    out_dir = Path(args.output)
    ref = models[0]
    console.print(f"[bold]lcprobe compare[/] {len(models) - 1} model(s) against {ref.path.name} "
                  f"[dim]({ref.info.arch}, {ref.info.n_layer} layers, {ref.quant})[/] on "
                  f"{', '.join(t.name for t in tasks)} -> {out_dir}")
    for m in models:
        if m.warning:
            console.print(f"[yellow]warning:[/] {m.warning}")
        if not m.representation:
            console.print(f"[yellow]note:[/] {m.path.name} is {m.info.n_layer} layers × {m.info.n_embd}, the "
                          f"reference {ref.info.n_layer} × {ref.info.n_embd}: layers are matched on relative "
                          "depth and the representation measures (KL, cosine, top-1) are skipped for it")
    planned = {t.name: len(t.items(limit=options.limit, seed=options.seed)) for t in tasks}
    t0 = time.perf_counter()
    with Interrupt() as stop, StudyDisplay(console, f"compare: {len(models)} models", len(models), len(tasks),
                                           enabled=not args.quiet, describe=_describe) as live:
        live.plan(planned)
        result = run_compare(models, tasks, out_dir, options, max_rows=args.max_rows,
                             kl_threshold=args.kl_threshold, listener=live, should_stop=lambda: stop.requested)
    wall = time.perf_counter() - t0
    if not args.quiet:
        console.print(models_table(result))
    for name, tr in result["tasks"].items():
        if len(tr["models"]) < 2:
            continue
        if not args.quiet:
            console.print(task_table(name, tr, args.kl_threshold))
        console.print(f"[bold]{name}[/] ({tr['metric']}, reference {tr['models'][0]['label']}: best layer "
                      f"{tr['models'][0]['best_layer']}, final {_fmt(tr['models'][0]['layers'][-1]['metric'])})")
        for m in tr["models"][1:]:
            console.print("  " + verdict_line(m, tr["metric"], tr["paired_metric"]))
    console.print(f"wrote {out_dir / 'compare.json'} and compare.csv in {wall:.0f} s")
    if not result["complete"]:
        console.print("[yellow]interrupted[/]: the comparison is incomplete (compare cannot resume; "
                      "finished models are in compare.json)")
        print("run the same command again to redo it", file=sys.stderr)
        return 130
    return 0
