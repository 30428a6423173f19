"""``lcprobe run``: one task, every layer, items.jsonl + summary.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lcprobe.cli.common import (Interrupt, add_model_args, add_probe_args, add_shard_arg, make_console, probe_options,
                                resolve_model, resume_hint)

EPILOG_RUN = """\
examples:
  lcprobe run -m smollm2-135m -T calc -o results/calc
  lcprobe run -m ~/models/llama-2-7b.Q4_K_M.gguf -T my_task.yaml -ngl 99 -o results/mine
  lcprobe run -m smollm2-135m -T calc-mul-int-3-4 --layers 20:-1 --lens raw

Output: DIR/items.jsonl (per item and choice, the summed log-prob of the
continuation at every selected layer) and DIR/summary.json (per-layer acc,
mc1, mc2, mc3, acc_per_token, acc_per_byte; best layer; timing).
"""



def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="probe one task at every layer", epilog=EPILOG_RUN,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every choice of every item of a task at every layer.")
    add_model_args(p)
    p.add_argument("-T", "--task", default="calc", help="built-in task name (see 'lcprobe tasks') or a task YAML path")
    p.add_argument("--data", default=None, help="data file for the task (overrides the YAML's data)")
    add_probe_args(p)
    p.add_argument("-o", "--output", default=None, help="output directory (default: results/<model>/<task>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the same directory")
    add_shard_arg(p)
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def run(args: argparse.Namespace) -> int:
    from lcprobe.cli.display import RunProgress, final_line, layer_table
    from lcprobe.llama.loader import open_model
    from lcprobe.probing.session import run_task
    from lcprobe.results.lock import lock_dir
    from lcprobe.tasks.task import load_task

    console = make_console(args.quiet)
    options = probe_options(args)
    path = resolve_model(args.model)
    task = load_task(args.task, data=args.data)
    from lcprobe.files.modelfile import read_model_info

    info = read_model_info(path)
    out_dir = Path(args.output or Path("results") / info.stem / task.name)
    console.print(f"[bold]lcprobe[/] {task.name} on {info.name} "
                  f"[dim]({info.arch}, {info.n_layer} layers, {info.file_type})[/] -> {out_dir}")
    # Locked before loading, so a second writer is refused in a second, not after the load.
    try:
        with lock_dir(out_dir), open_model(path, options, log_path=out_dir / "llama.log") as model:
            with Interrupt() as stop, RunProgress(console, task.name, enabled=not args.quiet) as live:
                def progress(stats, best):
                    if best:
                        live.set_best(best["layer"], best["value"], best["metric"])
                    live.update(stats)

                outcome = run_task(model, task, out_dir, options, resume=args.resume,
                                   progress=progress, should_stop=lambda: stop.requested)
    except KeyboardInterrupt:
        # Second Ctrl-C: stopped mid-group; every fsynced item is kept.
        print(f"lcprobe: interrupted; finished items are kept in {out_dir}", file=sys.stderr)
        print(f"resume with: {resume_hint(args)}", file=sys.stderr)
        return 130
    summary = outcome.summary
    if outcome.interrupted:
        console.print(f"[yellow]interrupted[/]: {summary['n_items']} of {outcome.stats.items_total} "
                      f"items saved in {out_dir}")
        print(f"resume with: {resume_hint(args)}", file=sys.stderr)
        return 130
    if outcome.stats.items_skipped:
        console.print(f"[yellow]{outcome.stats.items_skipped} items skipped: prompt longer than the "
                      f"context ({options.n_ctx} tokens); -c {outcome.stats.ctx_needed} fits them all[/]")
    if not args.quiet:
        console.print(layer_table(summary, title=f"{task.name} · {info.name} ({info.file_type}) · "
                                                 f"{summary['metric']} per layer"))
    print(final_line(summary))
    return 0


