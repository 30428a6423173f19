"""``lcprobe kld``: llama-perplexity's KL-divergence block for each quantized model, and the same view
at every layer under the logit lens.

The work is :mod:`lcprobe.studies.kld`; this module parses arguments, shows progress with an ETA and
prints, per model, the block ``llama-perplexity --kl-divergence`` prints (same names, order and
formats) and a per-layer table.
"""

from __future__ import annotations

import argparse
from typing import Any

from lcprobe.cli.common import add_model_args, add_shard_arg, parse_shard

EPILOG = """\
examples:
  lcprobe quantize -m model-F16.gguf -t Q8_0,Q4_K_M -o models/q
  lcprobe kld -m models/q/model-F16.gguf -m models/q/model-Q8_0.gguf -m models/q/model-Q4_K_M.gguf \\
      --text wiki.test.raw -c 512 --chunks 100 -o results/kld
  lcprobe report results/kld
  lcprobe kld -m ... --shard 1/2 -o results/kld-1      # on one machine, 2/2 on another,
  lcprobe merge results/kld-1 results/kld-2 -o results/kld

The text is scored as llama-perplexity scores it: tokenized whole, cut into
chunks of -c tokens, each chunk's first token replaced by BOS when the model adds
one, the second half of each chunk scored. The final block uses llama.cpp's
logits of both models; the per-layer table compares base layer l with quantized
layer l under each model's logit lens (KLD, same top token, RMS Δp) and the
residual's relative L2 error and cosine after the block and after attention.
Output: DIR/kld.json. With --shard I/N, a contiguous range of the chunks is
scored and DIR/kld-values.npz keeps the per-token values; 'lcprobe merge'
recomputes from them the kld.json the unsharded run writes.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.studies.kld import DEFAULT_CTX, DEFAULT_LAYER_TOKENS

    p = sub.add_parser(
        "kld", help="llama-perplexity's KL divergence of quantized models, at the output and every layer",
        description="KL divergence of quantized models from a base model on a text, as llama-perplexity "
                    "--kl-divergence computes it, and per layer under the logit lens.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
    )
    add_model_args(p)
    p.add_argument("-m", "--model", action="append", required=True,
                   help="a .gguf path or catalog name; repeat: the first is the base, the others are compared "
                        "with it")
    p.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_CTX,
                   help=f"tokens per chunk, as llama-perplexity's -c (default {DEFAULT_CTX})")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file to score (default: the paper's data as a corpus, from $LCPROBE_DATA)")
    p.add_argument("--chunks", type=int, default=None, help="score at most N chunks (default: all)")
    p.add_argument("--layers", default=None, help="layers of the per-layer view, 1-based: e.g. 1:10,20,-1 "
                                                  "(default: all)")
    p.add_argument("--layer-tokens", type=int, default=DEFAULT_LAYER_TOKENS,
                   help=f"scored tokens the per-layer lens runs on, evenly spaced in every chunk (default "
                        f"{DEFAULT_LAYER_TOKENS}; 0 = final block only)")
    add_shard_arg(p, "text's chunks, a contiguous range each")
    p.add_argument("-o", "--output", required=True, help="output directory (kld.json)")
    p.add_argument("--quiet", action="store_true", help="no progress display and no per-layer table")


def _pm(v: float, e: float, w: int = 10, d: int = 6, ew: int | None = None) -> str:
    return f"{v:{w}.{d}f} ± {e:{ew or w}.{d}f}"


def final_block(f: dict[str, Any]) -> str:
    """llama-perplexity's final statistics, line for line as it prints them (Δp and same top in %)."""
    def g(k: str) -> float:
        v = f.get(k)
        return float("nan") if v is None else float(v)

    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {_pm(g('mean_ppl_q'), g('mean_ppl_q_err'))}",
        f"Mean PPL(base)                : {_pm(g('mean_ppl_base'), g('mean_ppl_base_err'))}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * g('cor_ln_ppl'):6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {_pm(g('mean_ln_ppl_ratio'), g('mean_ln_ppl_ratio_err'))}",
        f"Mean PPL(Q)/PPL(base)         : {_pm(g('mean_ppl_ratio'), g('mean_ppl_ratio_err'))}",
        f"Mean PPL(Q)-PPL(base)         : {_pm(g('mean_ppl_diff'), g('mean_ppl_diff_err'))}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {_pm(g('kld_mean'), g('kld_mean_err'))}",
        f"Maximum KLD: {g('kld_max'):10.6f}",
    ]
    for key, name in (("p999", "99.9%"), ("p99", "99.0%"), ("p95", "95.0%"), ("p90", "90.0%")):
        lines.append(f"{name}   KLD: {g('kld_' + key):10.6f}")
    lines.append(f"Median  KLD: {g('kld_median'):10.6f}")
    for key, name in (("p10", "10.0%"), ("p05", " 5.0%"), ("p01", " 1.0%"), ("p001", " 0.1%")):
        lines.append(f"{name}   KLD: {g('kld_' + key):10.6f}")
    lines += [f"Minimum KLD: {g('kld_min'):10.6f}", "", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * g('dp_mean'):6.3f} ± {100 * g('dp_mean_err'):5.3f} %",
              f"Maximum Δp: {100 * g('dp_max'):6.3f}%"]
    for key, name in (("p999", "99.9%"), ("p99", "99.0%"), ("p95", "95.0%"), ("p90", "90.0%"), ("p75", "75.0%")):
        lines.append(f"{name}   Δp: {100 * g('dp_' + key):6.3f}%")
    lines.append(f"Median  Δp: {100 * g('dp_median'):6.3f}%")
    for key, name in (("p25", "25.0%"), ("p10", "10.0%"), ("p05", " 5.0%"), ("p01", " 1.0%"), ("p001", " 0.1%")):
        lines.append(f"{name}   Δp: {100 * g('dp_' + key):6.3f}%")
    lines += [f"Minimum Δp: {100 * g('dp_min'):6.3f}%",
              f"RMS Δp    : {100 * g('dp_rms'):6.3f} ± {100 * g('dp_rms_err'):5.3f} %",
              f"Same top p: {100 * g('same_top'):6.3f} ± {100 * g('same_top_err'):5.3f} %"]
    return "\n".join(lines)


def layer_table(model: dict[str, Any], n_tokens: int) -> Any:
    from rich import box
    from rich.table import Table

    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    table = Table(title=f"{model['path'].rsplit('/', 1)[-1]} · per layer (logit lens, {n_tokens} tokens per layer)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="KLD(base layer l || quantized layer l) mean, median, 99%, nats; same top and RMS Δp "
                          "in %; relative L2 error and cosine of the residual after the block and after "
                          "attention (mid)", caption_justify="left")
    for name in ("layer", "KLD", "median", "99%", "top%", "RMSΔp%", "relL2", "cos", "relL2\nmid", "cos\nmid"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in model["layers"]:
        table.add_row(str(r["layer"]), f(r["kld_mean"], ".4f"), f(r["kld_median"], ".4f"), f(r["kld_p99"], ".4f"),
                      f(None if r["same_top"] is None else 100 * r["same_top"], ".1f"),
                      f(None if r["dp_rms"] is None else 100 * r["dp_rms"], ".2f"),
                      f(r["rel_l2"], ".4f"), f(r["cosine"], ".4f"), f(r["rel_l2_mid"], ".4f"),
                      f(r["cosine_mid"], ".4f"))
    return table


class KldDisplay:
    """One progress bar over every model's chunks, with an ETA and the running KLD of the current model."""

    def __init__(self, console: Any, n_models: int, enabled: bool) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("chunks"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"), console=console, disable=not enabled, refresh_per_second=4)
        self.n_models = n_models
        self.task = self.progress.add_task("kld", total=None, note="")
        self.offset = 0
        self.label = None
        self.model_i = -1

    def __enter__(self) -> "KldDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int, running: dict[str, float] | None) -> None:
        if done == 0 and label != self.label or self.model_i < 0:
            self.model_i += 1
            self.label = label
            self.offset = (self.model_i) * total
            self.progress.update(self.task, total=total * self.n_models)
        note = ""
        if running is not None:
            note = (f"PPL {running['mean_ppl_q']:.4f}  KLD {running['kld_mean']:.5f}  "
                    f"same top {100 * running['same_top']:.2f}%")
        self.progress.update(self.task, completed=self.offset + done,
                             description=f"kld {self.model_i + 1}/{self.n_models} {label}", note=note)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rich.console import Console

    from lcprobe.studies.kld import KldOptions, plan_models, read_text, run_kld

    console = Console(highlight=False)
    options = KldOptions(n_ctx=args.ctx_size, chunks=args.chunks, layers=args.layers,
                         layer_tokens=args.layer_tokens, n_batch=args.batch_size, n_threads=args.threads,
                         n_gpu_layers=args.n_gpu_layers,
                         lens_backend=args.lens_backend, memory_check=args.memory_check,
                         shard=parse_shard(args.shard))
    options.validate()
    text = read_text(args.text)
    plan = plan_models(args.model, args.layers)
    out_dir = Path(args.output)
    console.print(f"[bold]lcprobe kld[/] {len(plan.quants)} model(s) against {plan.base.path.name} "
                  f"[dim]({plan.base.arch}, {plan.base.n_layer} layers, {plan.base.quant})[/] on {text.path}, "
                  f"-c {options.n_ctx} -> {out_dir}")
    for q, ok in zip(plan.quants, plan.per_layer):
        if not ok:
            console.print(f"[yellow]note:[/] {q.path.name} is {q.n_layer} layers × {q.n_embd}, the base "
                          f"{plan.base.n_layer} × {plan.base.n_embd}: no per-layer view for it")
    t0 = time.perf_counter()
    with KldDisplay(console, len(args.model), enabled=not args.quiet) as live:
        result = run_kld(args.model, out_dir, text, options, progress=live)
    tx = result["text"]
    sh = result.get("shard")
    part = (f" (shard {sh['index']}/{sh['count']}: chunks {sh['chunks'][0] + 1}..{sh['chunks'][1]} of "
            f"{sh['n_chunk']})" if sh else "")
    console.print(f"{tx['chunks']} chunks of {tx['n_ctx']} tokens{part}, {tx['tokens_scored']} tokens scored")
    for m in result["models"]:
        console.print(f"\n[bold]{Path(m['path']).name}[/] ({m['quant']}, {m['bpw']:.2f} bpw) vs "
                      f"{Path(result['base']['path']).name}")
        console.print(final_block(m["final"]), markup=False)
        if m["layers"] and not args.quiet:
            console.print(layer_table(m, result["lens"]["tokens_per_layer"]))
    console.print(f"wrote {out_dir / 'kld.json'} in {time.perf_counter() - t0:.0f} s")
    return 0
