"""``lcprobe steer make|eval``: steering vectors in llama.cpp's control-vector format, and what they do."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from lcprobe.cli.common import add_model_args

EPILOG = """\
examples:
  lcprobe steer make -m smollm2-135m --pairs pairs.jsonl --method mean -o vec.gguf
  lcprobe steer eval -m smollm2-135m --vector vec.gguf --scales -4,-2,0,2,4 -T calc --limit 40 -o results/steer
  llama-cli -m model.gguf --control-vector vec.gguf      # llama.cpp applies the same file

pairs.jsonl holds {"positive": ..., "negative": ...} per line. Layers are lcprobe's 1-based
block outputs; llama.cpp's direction.K is added to layer K+1, so vectors reach layers 2..N.
eval writes DIR/steer.json (per scale: per-layer metrics with McNemar's test against scale 0,
KL to the unsteered model, greedy continuations) and one run directory per scale.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("steer", help="make steering vectors (llama.cpp control vectors) and measure them",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Steering vectors from contrastive prompt pairs, in the GGUF format "
                                   "llama.cpp's --control-vector loads, and their effect layer by layer.")
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    m = acts.add_parser("make", help="one direction per layer from contrastive pairs")
    add_model_args(m)
    m.add_argument("--pairs", required=True, help='JSONL file: {"positive": ..., "negative": ...} per line')
    m.add_argument("--method", choices=("mean", "pca"), default="mean",
                   help="mean: normalised mean difference; pca: first principal component of the "
                        "differences (both as llama.cpp's cvector-generator)")
    m.add_argument("--layers", default=None, help="layers that receive the vector, 2..N (default: all of them)")
    m.add_argument("-o", "--output", required=True, help="the control-vector .gguf to write")
    e = acts.add_parser("eval", help="a task, KL and greedy text per scale of a vector")
    add_model_args(e)
    e.add_argument("--vector", required=True, help="a control-vector .gguf (lcprobe's or cvector-generator's)")
    e.add_argument("--scales", default="-4,-2,0,2,4", help="comma-separated multipliers (default -4,-2,0,2,4)")
    # argparse takes "-4,-2,0" for an option unless it looks like a negative number to it
    e._negative_number_matcher = re.compile(r"^-\d[\d.,eE+-]*$")
    e.add_argument("--layers", default=None, help="apply the vector only at these layers (default: all it has)")
    e.add_argument("-T", "--task", default="calc", help="built-in task or task YAML")
    e.add_argument("--data", default=None, help="data file for the task")
    e.add_argument("--limit", type=int, default=None, help="score N items")
    e.add_argument("--seed", type=int, default=0, help="seed for generated tasks and --limit subsets")
    e.add_argument("--prompts", default=None, help="free prompts for the KL and continuations (one per line)")
    e.add_argument("-n", "--n-tokens", type=int, default=24, help="greedy tokens per prompt (default 24)")
    e.add_argument("-o", "--output", required=True, help="output directory")
    for q in (m, e):
        q.add_argument("--quiet", action="store_true", help="print only the final line")


def run(args: argparse.Namespace) -> int:
    from lcprobe.errors import LcprobeError

    if args.action == "make":
        return _make(args)
    if args.action == "eval":
        return _eval(args)
    raise LcprobeError("choose 'lcprobe steer make' or 'lcprobe steer eval' (see lcprobe steer --help)")


def _layers(spec: str | None, n_layer: int) -> list[int] | None:
    from lcprobe.sites import parse_layers

    return None if spec is None else parse_layers(spec, n_layer)


def _make(args: argparse.Namespace) -> int:
    from lcprobe.cli.common import load_options, make_console, resolve_model
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.llama.loader import open_model
    from lcprobe.studies.steer import make_vector, read_pairs

    console = make_console(args.quiet)
    pairs = read_pairs(args.pairs)
    info = read_model_info(resolve_model(args.model))
    layers = _layers(args.layers, info.n_layer)
    out = Path(args.output)
    with open_model(info.path, load_options(args, lens_backend=None)) as lm:
        cvec = make_vector(lm.engine, pairs, args.method, layers, model_hint=info.arch)
    cvec.save(out)
    ls = sorted(cvec.layers())
    console.print(f"{args.method} vector from {len(pairs)} pairs: direction.{min(cvec.directions)}.."
                  f"{max(cvec.directions)} (added to layers {ls[0]}..{ls[-1]}) -> {out}", soft_wrap=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lcprobe.cli.common import load_options, make_console, probe_options, resolve_model
    from lcprobe.errors import LcprobeError
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.interventions.cvec import ControlVector
    from lcprobe.llama.loader import open_model
    from lcprobe.studies.steer import DEFAULT_PROMPTS, evaluate, parse_scales, read_prompts
    from lcprobe.tasks.task import load_task

    console = make_console(args.quiet)
    scales = parse_scales(args.scales)
    if args.n_tokens < 0:
        raise LcprobeError("-n/--n-tokens must be >= 0")
    cvec = ControlVector.load(args.vector)
    info = read_model_info(resolve_model(args.model))
    if cvec.n_embd != info.n_embd:
        raise LcprobeError(f"{args.vector} has {cvec.n_embd} values per layer; {info.name} has n_embd {info.n_embd}")
    layers = _layers(args.layers, info.n_layer)
    task = load_task(args.task, data=args.data)
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    options = probe_options(argparse.Namespace(**{**vars(args), "layers": None}))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open_model(info.path, load_options(args), log_path=out / "llama.log") as lm:
        doc = evaluate(lm, cvec, scales, task, out, options, prompts, args.n_tokens, layers,
                       progress=None if args.quiet else (lambda msg: console.print(f"[dim]{msg}[/]")))
    for row in doc["rows"]:
        best = row["best_layer"]
        acc = next((la[row["metric"]] for la in row["layers"] if la["layer"] == best), None) if best else None
        sig = sum(1 for t in row["mcnemar_vs_0"] if t["p"] < 0.05)
        first = row["continuations"][0] if row["continuations"] else None
        console.print(f"scale {row['scale']:>5g}: KL {row['kl']:.4f}, best layer {best} "
                      f"{row['metric']} {acc if acc is None else round(acc, 3)}, {sig} layers p<0.05"
                      + (f" | {first['prompt']!r} -> {first['continuation']!r}" if first else ""),
                      soft_wrap=True)
    console.print(f"-> {out / 'steer.json'}")
    return 0
