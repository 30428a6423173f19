"""``lcprobe quantize``: quantized copies of a model, and the type mix each one really got.

The work is :mod:`lcprobe.quantize`; this module parses arguments, shows one
progress bar per file (tensors done) and a table of sizes, bits per weight and
real tensor types at the end.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  lcprobe quantize -m llama-2-7b.F16.gguf -t Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K -o models/l7
  lcprobe quantize -m smollm2-135m -t F32 -o models/smol          # the exact float reference
  lcprobe quantize -m models/smol/SmolLM2-135M-Instruct-F32.gguf -t Q8_0,Q4_K_M,Q2_K -o models/smol
  lcprobe quantize -m model-F16.gguf -t IQ2_XS --imatrix model.imatrix -o models/iq

Writes DIR/<stem>-<TYPE>.gguf per type (<stem>: the source's name without a
trailing type tag). Existing outputs of the same type are reused unless --force.
K-quants and IQ types need rows whose length is a multiple of 256; elsewhere
llama.cpp falls back to other types, and the table shows the mix each file got.
llama.cpp's log: DIR/quantize.log.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.cli.common import DEFAULT_MODEL
    from lcprobe.studies.quantize import QUANT_TYPES

    p = sub.add_parser(
        "quantize", help="quantized copies of a model with llama.cpp's quantizer (type mix reported)",
        description="Quantize a GGUF model to several types with the llama.cpp library lcprobe already uses.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # no add_model_args: -t means types here, as in the examples
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="source .gguf path or catalog name")
    p.add_argument("-t", "--types", action="append", default=None,
                   help=f"comma-separated types, may be repeated ({', '.join(QUANT_TYPES)}); with --target-bpw: "
                        "the ggml types a recipe may choose from (default Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,F16)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--imatrix", default=None,
                   help="importance matrix from llama-imatrix (GGUF or legacy .dat); required for IQ types")
    p.add_argument("--force", action="store_true", help="quantize again even when an output exists")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the table")
    p.add_argument("--target-bpw", type=float, default=None, metavar="B",
                   help="write one file whose type per tensor group minimises the KLD predicted by --sensitivity "
                        "at <= B bits per weight (all tensor data / all weights), and print the llama-quantize "
                        "--tensor-type arguments that reproduce it")
    p.add_argument("--sensitivity", default=None, metavar="DIR",
                   help="an 'lcprobe sensitivity' output directory (with --target-bpw)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from lcprobe.files.catalog import resolve_model
    from lcprobe.cli.common import Interrupt
    from lcprobe.studies.quantize import plan_quantize, quantize_all

    console = Console(highlight=False)
    out_dir = Path(args.output)
    if args.target_bpw is not None or args.sensitivity is not None:
        from lcprobe.cli.recipe import run_recipe

        return run_recipe(args, console)
    if not args.types:
        from lcprobe.errors import LcprobeError

        raise LcprobeError("-t/--types is required (or --target-bpw with --sensitivity for a recipe)")
    plan = plan_quantize(resolve_model(args.model), out_dir, args.types, args.imatrix)
    src = plan.source
    console.print(f"[bold]lcprobe quantize[/] {src.path.name} [dim]({src.arch}, {src.n_layer} layers, "
                  f"n_embd {src.n_embd}, {src.file_type}, {src.bits_per_weight():.2f} bpw)[/] -> {out_dir}")
    if plan.requantize_warning:
        console.print(f"[yellow]warning:[/] {plan.requantize_warning}")
    results = []
    with Interrupt() as stop, Progress(
        TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
        TimeElapsedColumn(), TextColumn("[dim]{task.fields[tensor]}"),
        console=console, disable=args.quiet, transient=True,
    ) as bars:
        current: dict[str, int] = {}

        def progress(qtype: str, state: Any) -> None:
            if qtype not in current:
                current[qtype] = bars.add_task(qtype, total=None, tensor="")
            bars.update(current[qtype], completed=state.tensors_done, total=state.tensors_total or None,
                        tensor=state.tensor)

        for r in quantize_all(plan, imatrix_path=args.imatrix, force=args.force, nthread=args.threads,
                              log_path=out_dir / "quantize.log", progress=progress,
                              should_stop=lambda: stop.requested):
            results.append(r)
            if r.qtype in current:
                bars.remove_task(current[r.qtype])
            how = "reused" if r.reused else f"{r.seconds:.1f} s"
            console.print(f"{r.qtype:>8} -> {r.path}  {_mb(r.info.size_bytes)}, {r.mix.bits_per_weight:.2f} bpw "
                          f"[dim]({how}; {r.mix.describe()})[/]")
            if r.warning:
                console.print(f"[yellow]warning:[/] {r.warning}")
    table = Table(title=f"{src.path.name} quantized", title_justify="left",
                  caption="base: share of the weights in the type's main ggml type; mix: real tensor types",
                  caption_justify="left")
    for col, just in (("type", "left"), ("size", "right"), ("bpw", "right"), ("base", "right"),
                      ("mix", "left"), ("time", "right"), ("file", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        base = "—" if r.mix.base_fraction is None else f"{r.mix.base_fraction:.0%}"
        style = "yellow" if r.warning else None
        table.add_row(r.qtype, _mb(r.info.size_bytes), f"{r.mix.bits_per_weight:.2f}", base, r.mix.describe(),
                      "reused" if r.reused else f"{r.seconds:.1f} s", r.path.name, style=style)
    console.print(table)
    if len(results) < len(plan.types):
        console.print(f"[yellow]interrupted[/]: {len(results)} of {len(plan.types)} files written; "
                      "run the same command again to finish (finished files are reused)")
        return 130
    return 0
