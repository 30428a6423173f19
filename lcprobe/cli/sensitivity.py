"""``lcprobe sensitivity``: which weight tensors need the bits.

The work is :mod:`lcprobe.studies.sensitivity`; this module parses arguments,
shows progress, writes ``DIR/sensitivity.json`` and prints the ranked table.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  lcprobe quantize -m smollm2-135m -t F32 -o models/smol        # a float base
  lcprobe sensitivity -m models/smol/SmolLM2-135M-Instruct-F32.gguf --type Q4_0 -o results/sens
  lcprobe sensitivity -m base-F16.gguf --type Q4_0,Q5_0 --groups attn_v,ffn_down --layers 1:4,-4:-1 -o out
  lcprobe quantize -m base-F16.gguf --sensitivity results/sens --target-bpw 5.0 -o models/mix

For every weight group (per layer attn_q/k/v, attn_output, ffn_gate/up/down;
token_embd, output) the group alone is quantized to --type (a quantize-
dequantize round trip written over the loaded base's weights, then restored)
and the final mean KLD against the base is measured the llama-perplexity way:
chunks of -c tokens, second half of each scored. One model load, one decode of
the text per group and type. --check-proxy N also writes real files for the N
worst groups and reports how far the proxy is from them.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.cli.common import DEFAULT_MODEL

    p = sub.add_parser(
        "sensitivity", help="final KLD when each weight tensor alone is quantized (ranked)",
        description="Per-tensor quantization sensitivity of a float GGUF model, measured through llama.cpp.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="float (F32/F16/BF16) base .gguf or catalog name")
    p.add_argument("--type", dest="types", default="Q4_0",
                   help="ggml type(s) each group is quantized to, comma-separated (default Q4_0)")
    p.add_argument("-o", "--output", required=True, help="output directory (sensitivity.json)")
    p.add_argument("--text", default=None,
                   help="UTF-8 text to score (default: the probing data corpus, as lcprobe depth)")
    p.add_argument("--imatrix", default=None, help="importance matrix from llama-imatrix (GGUF or .dat)")
    p.add_argument("-c", "--ctx-size", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--chunks", type=int, default=4, help="chunks of the text to score (default 4)")
    p.add_argument("--skip-chunks", type=int, default=0,
                   help="start after this many chunks (to keep text apart from an evaluation)")
    p.add_argument("--groups", default=None,
                   help="only these kinds, e.g. attn_v,ffn_down,token_embd (default: all)")
    p.add_argument("--layers", default=None, help="only these blocks, 1-based, e.g. 1:4,-2:-1 (default: all)")
    p.add_argument("--check-proxy", type=int, default=0, metavar="N",
                   help="write a real file for each of the N worst groups and compare its KLD with the proxy's")
    p.add_argument("--layer-groups", type=int, default=3, metavar="N",
                   help="per-layer lens KLD (where the damage appears) for the N worst groups (default 3; 0: none)")
    p.add_argument("--layer-tokens", type=int, default=32,
                   help="scored tokens of the first chunk the per-layer KLD uses (default 32)")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table (default 20)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from lcprobe.errors import LcprobeError
    from lcprobe.files.atomic import write_atomic
    from lcprobe.studies.sensitivity import SensitivityOptions, run_sensitivity

    if args.chunks < 1:
        raise LcprobeError(f"--chunks must be at least 1, got {args.chunks}")
    if args.skip_chunks < 0 or args.check_proxy < 0 or args.layer_groups < 0:
        raise LcprobeError("--skip-chunks, --check-proxy and --layer-groups cannot be negative")
    if args.layer_tokens < 1:
        raise LcprobeError(f"--layer-tokens must be at least 1, got {args.layer_tokens}")
    if args.threads is not None and args.threads < 1:
        raise LcprobeError(f"-t/--threads must be at least 1, got {args.threads}")
    types = tuple(t.strip().upper() for t in args.types.split(",") if t.strip())
    if not types:
        raise LcprobeError("--type names no type")
    options = SensitivityOptions(types=types, n_ctx=args.ctx_size, n_chunks=args.chunks,
                                 skip_chunks=args.skip_chunks, n_threads=args.threads,
                                 n_gpu_layers=args.n_gpu_layers, kinds=args.groups, layers=args.layers,
                                 proxy_check=args.check_proxy, layer_groups=args.layer_groups,
                                 layer_tokens=args.layer_tokens)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(highlight=False)
    with Progress(TextColumn("[bold]sensitivity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("[dim]{task.fields[what]}"), console=console, disable=args.quiet,
                  transient=True) as bars:
        task = bars.add_task("groups", total=None, what="reference logits")

        def progress(done: int, total: int, what: str) -> None:
            bars.update(task, completed=done, total=total, what=what)

        result = run_sensitivity(args.model, options, text=args.text, imatrix_path=args.imatrix,
                                 work_dir=out, progress=progress)
    write_atomic(out / "sensitivity.json", json.dumps(result.as_dict(), indent=1) + "\n")
    t = result.timing
    console.print(f"[bold]lcprobe sensitivity[/] {Path(result.model['path']).name}: {len(result.results)} "
                  f"measurements on {result.text['n_scored']} scored tokens ({result.text['n_chunks']} chunks "
                  f"of {result.n_ctx}); {t['seconds_total']:.0f} s in all, {t['seconds_per_group']:.1f} s per "
                  f"group -> {out / 'sensitivity.json'}")
    for qtype in result.types:
        table = Table(title=f"groups ranked by final mean KLD, each alone at {qtype}", title_justify="left")
        for col in ("rank", "group", "params", "KLD mean", "± sem", "p99", "weight rel. err"):
            table.add_column(col, justify="left" if col == "group" else "right", no_wrap=col == "group")
        ranked = result.ranked(qtype)
        for i, r in enumerate(ranked[: args.top], 1):
            rel = r.weight_err / r.weight_msq if r.weight_msq else float("nan")
            table.add_row(str(i), r.group.name, f"{r.group.n_params:,}", f"{r.kld['kld_mean']:.5f}",
                          f"{r.kld['kld_sem']:.5f}", f"{r.kld['kld_p99']:.4f}", f"{rel:.2e}")
        console.print(table)
        total = sum(r.kld["kld_mean"] for r in ranked)
        console.print(f"sum over the {len(ranked)} groups: {total:.5f}")
    for row in result.layers:
        kl = row["lens_kld"]
        first = next((i + 1 for i, v in enumerate(kl) if v > 1e-6), None)
        console.print(f"{row['group']} at {row['type']}: lens KLD per layer (logit lens, {row['n_tokens']} tokens) "
                      f"first above 1e-6 at layer {first}; " + " ".join(f"{v:.3g}" for v in kl))
    if result.proxy:
        table = Table(title="in-place proxy vs a real file with the group quantized", title_justify="left")
        for col in ("group", "type", "proxy KLD", "real KLD", "diff", "proxy s", "real file s"):
            table.add_column(col, justify="left" if col == "group" else "right")
        for p in result.proxy:
            diff = "—" if p["rel_diff"] is None else f"{p['rel_diff']:+.1%}"
            table.add_row(p["group"], p["type"], f"{p['proxy_kld']:.5f}", f"{p['real_kld']:.5f}", diff,
                          f"{p['seconds_proxy']:.1f}", f"{p['seconds_real']:.1f}")
        console.print(table)
    return 0
