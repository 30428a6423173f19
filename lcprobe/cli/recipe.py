"""``lcprobe quantize --target-bpw B --sensitivity DIR``: the recipe half of the quantize command.

Not a command of its own: :mod:`lcprobe.cli.quantize` hands over when
--target-bpw or --sensitivity is given. The work is :mod:`lcprobe.studies.recipe`.
"""

from __future__ import annotations

import argparse
from typing import Any


def run_recipe(args: argparse.Namespace, console: Any) -> int:
    import json
    from pathlib import Path

    from rich.table import Table

    from lcprobe.errors import LcprobeError
    from lcprobe.files.atomic import write_atomic
    from lcprobe.files.catalog import resolve_model
    from lcprobe.studies.quantize import base_stem, load_imatrix
    from lcprobe.studies.recipe import (DEFAULT_TYPES, llama_quantize_command, plan_recipe, read_sensitivity,
                                        tensor_bits_per_weight, write_recipe)

    if args.target_bpw is None or args.sensitivity is None:
        raise LcprobeError("a recipe needs both --target-bpw and --sensitivity")
    types = [t.strip().upper() for spec in (args.types or [",".join(DEFAULT_TYPES)]) for t in spec.split(",")
             if t.strip()]
    base = Path(resolve_model(args.model))
    sens = read_sensitivity(args.sensitivity)
    imatrix = load_imatrix(args.imatrix) if args.imatrix else None
    out_dir = Path(args.output)
    dst = out_dir / f"{base_stem(base)}-mix{args.target_bpw:g}bpw.gguf"
    if dst.exists() and not args.force:
        raise LcprobeError(f"{dst} exists; use --force to replace it")
    console.print(f"[bold]lcprobe quantize[/] recipe for {base.name} at <= {args.target_bpw:g} bpw from "
                  f"{args.sensitivity} (types {', '.join(types)})")
    recipe = plan_recipe(base, sens, args.target_bpw, types, imatrix, args.threads)
    path = write_recipe(base, recipe, dst, imatrix, args.threads)
    bpw = tensor_bits_per_weight(path)
    write_atomic(path.with_suffix(".recipe.json"),
                 json.dumps({**recipe.as_dict(), "file": str(path), "file_bits_per_weight": bpw,
                             "sensitivity": str(args.sensitivity)}, indent=1) + "\n")
    table = Table(title=f"{path.name}: {bpw:.4f} bpw (target {args.target_bpw:g}), predicted final KLD "
                        f"{recipe.predicted_kld:.5f}", title_justify="left")
    for col in ("type", "params", "share"):
        table.add_column(col, justify="left" if col == "type" else "right")
    total = sum(recipe.mix().values())
    for t, n in recipe.mix().items():
        table.add_row(t, f"{n:,}", f"{n / total:.1%}")
    console.print(table)
    console.print("llama-quantize arguments that write the same types:")
    console.print(llama_quantize_command(recipe, base, path.name, args.imatrix), markup=False, soft_wrap=True)
    return 0
