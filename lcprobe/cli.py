"""The ``lcprobe`` command line. ``main(argv)`` is callable from tests.

User mistakes (LcprobeError) print one line and exit 1; Ctrl-C or SIGTERM
during a run stops after the current decode group, keeps every finished
item, prints how to resume, and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import LcprobeError

DEFAULT_MODEL = "smollm2-135m"

EPILOG_RUN = """\
examples:
  lcprobe run -m smollm2-135m -T calc -o results/calc
  lcprobe run -m ~/models/llama-2-7b.Q4_K_M.gguf -T my_task.yaml -ngl 99 -o results/mine
  lcprobe run -m smollm2-135m -T calc-mul-int-3-4 --layers 20:-1 --lens raw

Output: DIR/items.jsonl (per item and choice, the summed log-prob of the
continuation at every selected layer) and DIR/summary.json (per-layer acc,
mc1, mc2, mc3, acc_per_token, acc_per_byte; best layer; timing).
"""


class Interrupt:
    """First Ctrl-C/SIGTERM asks the run to stop after the current group."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker)
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _add_model_args(p: argparse.ArgumentParser, loads: bool = True) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"a .gguf path or a catalog name (default: {DEFAULT_MODEL}; see 'lcprobe models list')")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="layers to offload to the GPU (CUDA/Metal builds of llama-cpp-python; 99 = all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="KV cache cells shared by the prompt prefix and the items decoded together (default 2048)")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="tokens per llama_decode (default 512)")
    p.add_argument("--lens-backend", choices=("numpy", "ggml"), default="numpy",
                   help="numpy: float32 product with the dequantized head (default; what transformers "
                        "would compute on the dequantized GGUF); ggml: the stored (quantized) head through "
                        "ggml's CPU kernels, exactly llama.cpp's own logits")
    if not loads:  # `plan` only reads the header
        return
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="load even when 'lcprobe plan' says the model does not fit this machine's RAM/GPU "
                        "memory (by default such a run is refused before loading, with the plan's numbers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcprobe",
        description="Layer-wise probing of quantized GGUF models through llama.cpp: every choice of "
                    "every item scored at every layer with the logit lens.",
    )
    parser.add_argument("--version", action="version", version=f"lcprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="probe one task at every layer", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Score every choice of every item of a task at every layer.")
    _add_model_args(run)
    run.add_argument("-T", "--task", default="calc", help="built-in task name (see 'lcprobe tasks') or a task YAML path")
    run.add_argument("--data", default=None, help="data file for the task (overrides the YAML's data)")
    run.add_argument("--limit", type=int, default=None, help="score only the first N items")
    run.add_argument("--layers", default=None, help="layers to score, 1-based: e.g. 1:10,20,-1 (default: all)")
    run.add_argument("--lens", choices=("final-norm", "raw"), default="final-norm",
                     help="final-norm: final norm + head at every layer (logit lens, default); "
                          "raw: head only below the last layer (Chen et al.'s code)")
    run.add_argument("--site", choices=("resid_post", "resid_mid"), default="resid_post",
                     help="resid_post: block output (default); resid_mid: residual after attention")
    run.add_argument("-o", "--output", default=None, help="output directory (default: results/<model>/<task>)")
    run.add_argument("--seed", type=int, default=0, help="seed for generated tasks (default 0)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in the same directory")
    run.add_argument("--quiet", action="store_true", help="print only the final line")

    check = sub.add_parser("check", help="compare the last-layer lens with llama.cpp's own logits",
                           description="Decode a built-in text, apply the lens to the last layer and compare "
                                       "with llama.cpp's logits. Exit 1 if argmax agreement < 0.99.")
    _add_model_args(check)
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--text", default=None, help="a text file to decode instead of the built-in sample")

    models = sub.add_parser("models", help="the model catalog: list | pull NAME | path NAME")
    msub = models.add_subparsers(dest="action", metavar="ACTION")
    msub.add_parser("list", help="catalog entries and whether they are downloaded")
    mp = msub.add_parser("pull", help="download a catalog model (sha256 checked, resumable)")
    mp.add_argument("name")
    mp.add_argument("--force", action="store_true", help="download again even if present")
    mpa = msub.add_parser("path", help="print the local path of a catalog model")
    mpa.add_argument("name")

    tasks = sub.add_parser("tasks", help="list built-in tasks")
    tasks.add_argument("--json", action="store_true")

    info = sub.add_parser("info", help="what lcprobe knows about a model file (no weights loaded)")
    info.add_argument("-m", "--model", default=DEFAULT_MODEL)
    info.add_argument("--json", action="store_true")

    # Larger commands live in their own modules (lcprobe/commands/*.py), each
    # with add_parser(subparsers, add_model_args) and run(args) -> int.
    for name, mod in _command_modules().items():
        mod.add_parser(sub, _add_model_args)
    return parser


def _command_modules() -> dict[str, Any]:
    import importlib

    mods = {}
    for name in PLUGIN_COMMANDS:
        try:
            mods[name] = importlib.import_module(f"lcprobe.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lcprobe.commands.{name}":
                raise
    return mods


def _console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=False, quiet=quiet, highlight=False)


def _resolve_model(spec: str) -> Path:
    from .catalog import resolve_model

    return resolve_model(spec)


def probe_options(args: argparse.Namespace) -> "ProbeOptions":
    from .session import ProbeOptions

    return ProbeOptions(
        layers=getattr(args, "layers", None), lens=getattr(args, "lens", "final-norm"),
        site=getattr(args, "site", "resid_post"), limit=getattr(args, "limit", None),
        seed=getattr(args, "seed", 0), n_ctx=args.ctx_size, n_batch=args.batch_size,
        n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
        lens_backend=getattr(args, "lens_backend", "numpy"),
        memory_check=getattr(args, "memory_check", True),
    )


def resume_hint(args: argparse.Namespace) -> str:
    """The command that continues this run: the arguments given to main, plus --resume."""
    argv = [a for a in getattr(args, "argv", sys.argv[1:]) if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["lcprobe", *argv, "--resume"])


def cmd_run(args: argparse.Namespace) -> int:
    from .display import RunProgress, final_line, layer_table
    from .session import open_model, run_task
    from .tasks import load_task

    console = _console(args.quiet)
    options = probe_options(args)
    path = _resolve_model(args.model)
    task = load_task(args.task, data=args.data)
    from .modelfile import read_model_info

    info = read_model_info(path)
    out_dir = Path(args.output or Path("results") / info.stem / task.name)
    console.print(f"[bold]lcprobe[/] {task.name} on {info.name} "
                  f"[dim]({info.arch}, {info.n_layer} layers, {info.file_type})[/] -> {out_dir}")
    with open_model(path, options, log_path=out_dir / "llama.log") as model:
        with Interrupt() as stop, RunProgress(console, task.name, enabled=not args.quiet) as live:
            def progress(stats, best):
                if best:
                    live.set_best(best["layer"], best["value"], best["metric"])
                live.update(stats)

            outcome = run_task(model, task, out_dir, options, resume=args.resume,
                               progress=progress, should_stop=lambda: stop.requested)
    summary = outcome.summary
    if outcome.interrupted:
        console.print(f"[yellow]interrupted[/]: {summary['n_items']} of {outcome.stats.items_total} "
                      f"items saved in {out_dir}")
        print(f"resume with: {resume_hint(args)}", file=sys.stderr)
        return 130
    if outcome.stats.items_skipped:
        console.print(f"[yellow]{outcome.stats.items_skipped} items skipped: prompt longer than the "
                      f"context ({options.n_ctx} tokens)[/]")
    if not args.quiet:
        console.print(layer_table(summary, title=f"{task.name} · {info.name} ({info.file_type}) · "
                                                 f"{summary['metric']} per layer"))
    print(final_line(summary))
    return 0


SAMPLE_TEXT = (
    "The history of mathematics spans thousands of years. Early civilizations used numbers to count "
    "livestock, measure fields and track the seasons. In Mesopotamia, scribes wrote on clay tablets "
    "in a base-sixty system, which is why an hour still has sixty minutes. Greek mathematicians such as "
    "Euclid organised geometry into axioms and proofs, and Archimedes estimated the value of pi. Later, "
    "scholars in India introduced the digit zero and the decimal place-value system, ideas that reached "
    "Europe through translations of Arabic texts. Question: What is 17 + 25? Answer: 42. The capital of "
    "France is Paris, and the largest planet in the solar system is Jupiter."
)


def cmd_check(args: argparse.Namespace) -> int:
    import numpy as np

    from .capture import Site
    from .engine import Engine, EngineConfig, default_log_path, set_llama_log
    from .lens import Lens, Unembed
    from .modelfile import read_model_info
    from .session import check_memory, release_load_memory

    info = read_model_info(_resolve_model(args.model))
    text = Path(args.text).read_text(encoding="utf-8") if args.text else SAMPLE_TEXT
    log = default_log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    set_llama_log(log)
    config = EngineConfig(n_ctx=max(args.ctx_size, 512), n_batch=args.batch_size, n_ubatch=args.batch_size,
                          n_seq_max=1, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads)
    if args.memory_check:
        check_memory(info, config, 1, args.lens_backend)
    unembed = Unembed.from_model(info, backend=args.lens_backend, n_threads=args.threads)
    lens = Lens(unembed, info.n_layer, "final-norm")
    release_load_memory()
    with Engine(info, config) as engine:
        tokens = engine.tokenize(text)[: engine.n_ctx]
        engine.set_sites([Site(info.site_name("resid_post", info.n_layer), info.n_embd)])
        rows, logits = engine.decode_sequence(tokens, want_logits=True)
    ours = np.concatenate([lens.unembed.logits(lens.transform(rows[0][i:i + 256], info.n_layer))
                           for i in range(0, len(tokens), 256)])
    diff = np.abs(ours - logits)
    top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(ours, logits)])
    result = {
        "model": str(info.path), "architecture": info.arch, "quantization": info.file_type,
        "head_type": info.head_type, "lens_backend": unembed.backend, "n_tokens": len(tokens),
        "max_abs_diff": round(float(diff.max()), 6), "mean_abs_diff": round(float(diff.mean()), 6),
        "logit_scale": round(float(np.abs(logits).max()), 3),
        "argmax_agreement": round(float((ours.argmax(-1) == logits.argmax(-1)).mean()), 6),
        "top5_overlap": round(float(top5), 6),
    }
    result["ok"] = result["argmax_agreement"] >= 0.99
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        c = _console()
        verdict = "[green]OK[/]" if result["ok"] else "[red]MISMATCH[/]"
        c.print(f"{verdict} lens vs llama.cpp logits on {info.name} ({info.arch}, {info.file_type}, head {info.head_type}), "
                f"{len(tokens)} tokens")
        c.print(f"  argmax agreement {result['argmax_agreement']:.4f}, top-5 overlap {result['top5_overlap']:.4f}")
        c.print(f"  max |diff| {result['max_abs_diff']:.4f} (logits up to {result['logit_scale']}), mean |diff| {result['mean_abs_diff']:.4f}")
    return 0 if result["ok"] else 1


def cmd_models(args: argparse.Namespace) -> int:
    from . import catalog

    if args.action in (None, "list"):
        from rich.table import Table

        table = Table(title="lcprobe model catalog", title_justify="left")
        for col in ("name", "arch", "quant", "size", "downloaded", "description"):
            table.add_column(col)
        for name, e in catalog.load_catalog().items():
            path = catalog.model_path(name)
            size = f"{e.display_size / 1e6:,.0f} MB" if e.display_size else "?"
            table.add_row(name, e.arch, e.quant, size, "yes" if path.exists() else "no", e.description)
        _console().print(table)
        return 0
    if args.action == "path":
        print(catalog.model_path(args.name) if args.name in catalog.load_catalog()
              else _resolve_model(args.name))
        return 0
    if args.action == "pull":
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=_console()) as prog:
            tid = prog.add_task(args.name, total=None)

            def report(stage: str, done: int, total: int | None) -> None:
                prog.update(tid, description=f"{args.name}: {stage}", completed=done, total=total)

            path = catalog.pull(args.name, progress=report, force=args.force)
        print(path)
        return 0
    raise LcprobeError(f"unknown models action '{args.action}'")


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import builtin_tasks

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
    _console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .modelfile import read_model_info

    info = read_model_info(_resolve_model(args.model))
    data = {
        "path": str(info.path), "name": info.name, "architecture": info.arch, "n_layer": info.n_layer,
        "n_embd": info.n_embd, "n_vocab": info.n_vocab, "quantization": info.file_type,
        "head": info.head_tensor, "head_type": info.head_type, "bits_per_weight": round(info.bits_per_weight(), 3),
        "tensor_types": info.tensor_types, "norm_eps": info.norm_eps, "add_bos": info.add_bos,
    }
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        for k, v in data.items():
            print(f"{k:>16}: {v}")
    return 0


PLUGIN_COMMANDS = ("suite", "report", "data", "plan", "quantize", "compare", "depth", "sites")

COMMANDS = {"run": cmd_run, "check": cmd_check, "models": cmd_models, "tasks": cmd_tasks, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    handler = COMMANDS.get(args.command) or _command_modules()[args.command].run
    try:
        return handler(args)
    except LcprobeError as exc:
        print(f"lcprobe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lcprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
