"""``lcprobe depth``: how a model uses its depth (Csordás et al. 2025) on a text corpus.

    lcprobe depth -m MODEL [--text FILE] -o DIR              contributions, cosines, lens KL
    lcprobe depth -m MODEL [--text FILE] --skip all -o DIR   layer-skip effects
    lcprobe depth map -m A -m B [--text FILE] -o DIR         linear maps between two models

The analyses themselves live in :mod:`lcprobe.studies.depth`; this module parses,
loads, draws progress and tables, and writes the result files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any

from lcprobe.cli.common import add_model_args, load_options

EPILOG = """\
examples:
  lcprobe depth -m smollm2-135m -o results/depth                   # default corpus ($LCPROBE_DATA)
  lcprobe depth -m smollm2-135m --text corpus.txt --max-tokens 20000 -o results/depth
  lcprobe depth -m smollm2-135m --skip all --max-tokens 2048 -o results/skip
  lcprobe depth map -m small.gguf -m deep.gguf --max-tokens 8192 -o results/map

Without --text the corpus is the probing data's questions and true answers
(TruthfulQA, GSM8K, ReClor), found in $LCPROBE_DATA.

Outputs: DIR/depth.json + depth.csv (per layer: attn_rel, mlp_rel, layer_rel,
attn_cos, mlp_cos, lens_kl, lens_top5 with std and quantiles; the transition
layer); with --skip DIR/skip.json; for map DIR/map.json.
"""

DEFAULT_MAX_TOKENS = {"depth": 20000, "skip": 2048, "map": 8192}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "depth", help="residual-stream analyses: sublayer contributions, lens KL, layer skipping, maps",
        description="How a model uses its depth, after Csordás et al. 2025: relative contributions and "
                    "cosines of the attention and MLP sublayers, logit-lens KL and top-5 overlap per layer, "
                    "the effect of skipping layers (--skip), and linear maps between two models ('map').",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
    )
    add_model_args(p)
    # Overrides of the shared model options: 'map' takes -m twice, and -c is the window length here.
    p.add_argument("-m", "--model", action="append", default=None,
                   help="a .gguf path or a catalog name (default: smollm2-135m); give it twice for 'map'")
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="window length in tokens: the corpus is decoded in windows of this many tokens, "
                        "each from an empty cache (default 2048)")
    p.add_argument("action", nargs="?", choices=("map",), default=None,
                   help="'map': fit linear maps from every layer of the first model to every layer of the second")
    p.add_argument("--text", default=None, help="plain text file to analyse (default: the probing data's questions "
                                                "and true answers from $LCPROBE_DATA)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to decode in total (default: 20000; 2048 with --skip; 8192 for map)")
    p.add_argument("-o", "--output", default=None, help="output directory (default: results/<model>/depth|skip|map)")
    p.add_argument("--lens-tokens", type=int, default=1024,
                   help="positions (evenly spaced) that get the logit lens; 0 turns it off (default 1024)")
    p.add_argument("--skip", default=None, metavar="S|LIST|all",
                   help="skip layers (1-based; e.g. 5, 1,10:12, all) and measure the effect on later layers and "
                        "on the output; writes skip.json")
    p.add_argument("--positions", type=int, default=8,
                   help="with --skip: positions per window where one-position skips are applied (default 8)")
    p.add_argument("--horizon", type=int, default=8,
                   help="with --skip: later positions over which the future-token KL is averaged (default 8)")
    p.add_argument("--ridge", type=float, default=1e-2,
                   help="map: ridge strength relative to the mean variance of the input layer (default 1e-2)")
    p.add_argument("--layers-a", default=None, help="map: layers of the first model (e.g. 1:10,-1; default all)")
    p.add_argument("--layers-b", default=None, help="map: layers of the second model (default all)")
    p.add_argument("--exact", action="store_true",
                   help="f32 KV cache and no flash attention (slower; reproduces a float32 forward to ~1e-6)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def _load_options(args: argparse.Namespace, n_ctx: int, n_seq: int, lens_backend: str | None):
    from lcprobe.errors import LcprobeError

    # llama.cpp keeps one output row per sequence in a buffer of n_batch rows and
    # aborts when they do not fit; --skip needs all of its --positions + 1 sequences.
    need = max(1, n_seq)
    if args.batch_size < need:
        why = f" with --skip (--positions {args.positions} + 1 sequences)" if n_seq > 1 else ""
        raise LcprobeError(f"-b/--batch-size must be at least {need}{why}, got {args.batch_size}")
    n_batch = max(1, min(args.batch_size, n_ctx))
    return load_options(args, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq, lens_backend=lens_backend,
                        kv_type="f32" if args.exact else "f16", flash_attn="off" if args.exact else "auto")


def _documents(args: argparse.Namespace) -> tuple[list[str], str]:
    from lcprobe.tasks.corpus import default_documents, find_data_dir, text_documents

    if args.text:
        return text_documents(args.text), str(Path(args.text).expanduser())
    d = find_data_dir()
    return default_documents(d), f"default ({d})"


def _windows(engine, docs: list[str], window: int, max_tokens: int) -> list[list[int]]:
    from lcprobe.tasks.corpus import token_windows
    from lcprobe.errors import LcprobeError

    bos = engine.tokenize("", add_special=True)
    windows = token_windows(docs, lambda s: engine.tokenize(s, add_special=False), window, max_tokens, bos)
    if not windows:
        raise LcprobeError("the text gives no window of at least two tokens")
    return windows


def _over_windows(console, title: str, n_windows: int, enabled: bool, work):
    """``work(progress, should_stop)`` under a progress bar of windows and Ctrl-C handling; returns its result."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from lcprobe.cli.common import Interrupt

    bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                   TextColumn("{task.fields[tokens]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console, disable=not enabled)
    with Interrupt() as stop, bar:
        task = bar.add_task(title, total=n_windows, tokens="")

        def progress(done: int, total: int, tokens: int) -> None:
            bar.update(task, completed=done, tokens=f"{tokens} tokens")

        return work(progress, lambda: stop.requested)


def _check_args(args: argparse.Namespace) -> None:
    from lcprobe.errors import LcprobeError

    if args.ctx_size < 2:
        raise LcprobeError("-c/--ctx-size (the window) must be at least 2 tokens")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise LcprobeError("--max-tokens must be at least 2")
    if args.lens_tokens < 0 or args.positions < 0 or args.horizon < 0:
        raise LcprobeError("--lens-tokens, --positions and --horizon cannot be negative")
    if args.ridge <= 0:
        raise LcprobeError("--ridge must be positive")


def run(args: argparse.Namespace) -> int:
    from lcprobe.cli.common import DEFAULT_MODEL
    from lcprobe.errors import LcprobeError

    _check_args(args)
    models = args.model or [DEFAULT_MODEL]
    # The output directory is known only once the model is; _lock takes it there and holds it to the end.
    with contextlib.ExitStack() as locks:
        args.output_locks = locks
        if args.action == "map":
            if len(models) != 2:
                raise LcprobeError(f"'depth map' needs two models (-m A -m B), got {len(models)}")
            return _run_map(args, models)
        if len(models) != 1:
            raise LcprobeError("give one model (-m) here; two are for 'lcprobe depth map'")
        if args.skip is not None:
            return _run_skip(args, models[0])
        return _run_depth(args, models[0])


def _lock(args: argparse.Namespace, out_dir: Path) -> None:
    """One writer per output directory, until run() returns."""
    from lcprobe.results.lock import lock_dir

    locks = getattr(args, "output_locks", None)
    if locks is None:  # called without run(): nothing to hold the lock for
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    locks.enter_context(lock_dir(out_dir))


def _header(info, sha: str, source: str, args: argparse.Namespace, max_tokens: int, windows) -> dict[str, Any]:
    from lcprobe.probing.session import versions

    return {
        "model": str(info.path), "model_name": info.general_name, "model_label": info.name, "model_sha256": sha, "arch": info.arch,
        "quantization": info.file_type, "n_layer": info.n_layer, "n_embd": info.n_embd,
        "corpus": {"source": source, "window": args.ctx_size, "max_tokens": max_tokens,
                   "n_windows": len(windows)},
        "kv_cache": "f32" if args.exact else "f16", "versions": versions(),
    }


def _model_info(model: str):
    from lcprobe.files.catalog import resolve_model
    from lcprobe.files.modelfile import read_model_info

    return read_model_info(resolve_model(model))


def _prepare(args: argparse.Namespace, model: str, kind: str):
    """What a one-model run needs first: console, token budget, documents and their source, header, output dir."""
    from lcprobe.cli.common import make_console

    docs, source = _documents(args)
    info = _model_info(model)
    out_dir = Path(args.output or Path("results") / info.stem / kind)
    _lock(args, out_dir)
    return make_console(args.quiet), args.max_tokens or DEFAULT_MAX_TOKENS[kind], docs, source, info, out_dir


def _run_depth(args: argparse.Namespace, model: str) -> int:
    from lcprobe.analysis.lens import Lens
    from lcprobe.llama.loader import open_model
    from lcprobe.studies.depth import run_depth

    console, max_tokens, docs, source, info, out_dir = _prepare(args, model, "depth")
    with open_model(info.path, _load_options(args, args.ctx_size, 1, args.lens_backend),
                    log_path=out_dir / "llama.log") as lm:
        engine, lens = lm.engine, Lens(lm.unembed, info.n_layer, "final-norm")
        windows = _windows(engine, docs, args.ctx_size, max_tokens)
        n_tok = sum(len(w) for w in windows)
        console.print(f"[bold]lcprobe depth[/] {info.name} [dim]({info.arch}, {info.n_layer} layers, "
                      f"{info.file_type})[/]: {n_tok} tokens in {len(windows)} windows -> {out_dir}")
        result = _over_windows(
            console, "depth", len(windows), not args.quiet,
            lambda progress, stop: run_depth(engine, lens, windows, args.lens_tokens, progress, stop))
    data = {**_header(info, lm.sha256, source, args, max_tokens, windows),
            "lens": "final-norm", "lens_backend": args.lens_backend, **result.to_json()}
    _write_json(out_dir / "depth.json", data)
    _write_csv(out_dir / "depth.csv", data["layers"])
    if not args.quiet:
        console.print(depth_table(data))
    t = data["transition_layer"]
    ratio = data.get("layer_rel_after_over_before")
    print(f"depth of {info.name}: {data['n_tokens']} tokens, lens on {data['n_lens_tokens']}; transition at layer "
          f"{t}/{info.n_layer}" + (f", layer_rel after/before {ratio:.2f}" if ratio is not None else "")
          + f" -> {out_dir / 'depth.json'}")
    return 130 if result.interrupted else 0


def _run_skip(args: argparse.Namespace, model: str) -> int:
    from lcprobe.llama.loader import open_model
    from lcprobe.studies.depth import parse_skip, run_skip

    console, max_tokens, docs, source, info, out_dir = _prepare(args, model, "skip")
    layers = parse_skip(args.skip, info.n_layer)
    n_ctx = args.ctx_size + args.positions * (1 + args.horizon)
    with open_model(info.path, _load_options(args, n_ctx, args.positions + 1, None),
                    log_path=out_dir / "llama.log") as lm:
        engine = lm.engine
        windows = _windows(engine, docs, args.ctx_size, max_tokens)
        n_tok = sum(len(w) for w in windows)
        console.print(f"[bold]lcprobe depth --skip[/] {info.name} [dim]({info.n_layer} layers, {info.file_type})[/]: "
                      f"{len(layers)} layers skipped in turn over {n_tok} tokens -> {out_dir}")
        result = _over_windows(console, "skip", len(windows), not args.quiet,
                               lambda progress, stop: run_skip(engine, windows, layers, args.positions, args.horizon,
                                                               progress, stop))
    data = {**_header(info, lm.sha256, source, args, max_tokens, windows), **result.to_json()}
    _write_json(out_dir / "skip.json", data)
    if not args.quiet:
        console.print(skip_table(data))
    print(f"skip on {info.name}: {len(layers)} layers, {data['n_tokens']} tokens, "
          f"{data['n_interventions']} one-position interventions -> {out_dir / 'skip.json'}")
    return 130 if result.interrupted else 0


def _run_map(args: argparse.Namespace, models: list[str]) -> int:
    from lcprobe.files.catalog import resolve_model
    from lcprobe.cli.common import make_console
    from lcprobe.errors import LcprobeError
    from lcprobe.files.download import file_sha256
    from lcprobe.files.modelfile import read_model_info, vocab_fingerprint
    from lcprobe.llama.loader import open_model
    from lcprobe.sites import parse_layers
    from lcprobe.studies.depth import map_summary, run_map

    console = make_console(args.quiet)
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS["map"]
    paths = [resolve_model(m) for m in models]
    infos = [read_model_info(p) for p in paths]
    same = infos[0].path == infos[1].path
    if not same and vocab_fingerprint(paths[0]) != vocab_fingerprint(paths[1]):
        raise LcprobeError(f"{paths[0].name} and {paths[1].name} have different tokenizers; linear maps need "
                           "both models to read the same tokens")
    if infos[0].add_bos != infos[1].add_bos:
        raise LcprobeError(f"{paths[0].name} and {paths[1].name} disagree on adding a BOS token")
    layers_a = parse_layers(args.layers_a, infos[0].n_layer)
    layers_b = parse_layers(args.layers_b, infos[1].n_layer)
    docs, source = _documents(args)
    out_dir = Path(args.output or Path("results") / f"map-{infos[0].stem}-{infos[1].stem}")
    _lock(args, out_dir)
    options = _load_options(args, args.ctx_size, 1, None)
    if options.memory_check and not same:  # both are resident together: check B before A is loaded
        from lcprobe.llama.loader import check_memory

        check_memory(infos[1], options.engine_config(), None, None)
    t0 = time.perf_counter()
    with open_model(infos[0].path, options, log_path=out_dir / "llama.log") as lm_a:
        lm_b = None if same else open_model(infos[1].path, options, log_path=out_dir / "llama.log")
        eng_a, eng_b = lm_a.engine, (lm_b.engine if lm_b is not None else None)
        try:
            windows = _windows(eng_a, docs, args.ctx_size, max_tokens)
            n_tok = sum(len(w) for w in windows)
            console.print(f"[bold]lcprobe depth map[/] {infos[0].name} ({len(layers_a)} layers) -> {infos[1].name} "
                          f"({len(layers_b)} layers) on {n_tok} tokens -> {out_dir}")
            maps, interrupted = _over_windows(
                console, "map", len(windows), not args.quiet,
                lambda progress, stop: run_map(eng_a, eng_b, windows, layers_a, layers_b, args.ridge, progress, stop))
        finally:
            if lm_b is not None:
                lm_b.close()
    try:
        r2 = maps.r2()
    except ValueError as exc:
        raise LcprobeError(f"{exc}; raise --max-tokens") from None
    data = {
        "model_a": str(infos[0].path), "model_b": str(infos[1].path),
        "model_a_sha256": file_sha256(infos[0].path), "model_b_sha256": file_sha256(infos[1].path),
        "quantization_a": infos[0].file_type, "quantization_b": infos[1].file_type,
        "n_layer_a": infos[0].n_layer, "n_layer_b": infos[1].n_layer,
        **map_summary(r2, layers_a, layers_b, infos[0].n_layer, infos[1].n_layer),
        "n_tokens": maps.n_train + maps.n_test, "n_train": maps.n_train, "n_test": maps.n_test,
        "ridge": args.ridge, "site": "resid_post",
        "r2_definition": "1 - SSE/SST on held-out tokens (every 5th block of 32 positions), pooled over dimensions",
        "corpus": {"source": source, "window": args.ctx_size, "max_tokens": max_tokens, "n_windows": len(windows)},
        "seconds": round(time.perf_counter() - t0, 3), "interrupted": interrupted,
    }
    _write_json(out_dir / "map.json", data)
    if not args.quiet:
        console.print(map_table(data))
    # "same relative depth": within one layer of B of i's relative depth
    near = sum(1 for a, b in zip(data["rel_depth_a"], data["best_rel_depth_b"])
               if abs(a - b) <= 1.0 / infos[1].n_layer + 1e-9)
    print(f"map {infos[0].name} -> {infos[1].name}: {data['n_train']} training / {data['n_test']} held-out tokens; "
          f"best j within one layer of i's relative depth for {near}/{len(layers_a)} layers -> {out_dir / 'map.json'}")
    return 130 if interrupted else 0


# --- files and tables -----------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from lcprobe.files.atomic import write_atomic

    write_atomic(path, json.dumps(data, indent=1) + "\n")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def depth_table(data: dict[str, Any]):
    """Per-layer means; fits an 80-column terminal (the JSON/CSV have the spreads)."""
    from rich import box
    from rich.table import Table

    t = data.get("transition_layer")
    table = Table(title=f"depth · {data.get('model_label') or data['model_name']} ({data['quantization']}) · {data['n_tokens']} tokens "
                        f"(lens on {data['n_lens_tokens']})", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="attn ||a||/||h||, mlp ||m||/||mid||, layer ||a+m||/||h||; ◀ first layer of the "
                          "second half (lens KL below half its peak from here on)", caption_justify="left")
    for col in ("layer", "attn", "mlp", "layer", "cos(a,h)", "cos(m,mid)", "lens KL", "top5", ""):
        table.add_column(col, justify="right", no_wrap=True)
    for r in data["layers"]:
        table.add_row(
            str(r["layer"]), _fmt(r["attn_rel"]), _fmt(r["mlp_rel"]), _fmt(r["layer_rel"]),
            _fmt(r["attn_cos"]), _fmt(r["mlp_cos"]), _fmt(r["lens_kl"], 2), _fmt(r["lens_top5"], 2),
            "◀" if r["layer"] == t else "", style="bold yellow" if r["layer"] == t else None,
        )
    return table


def skip_table(data: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"layer skipping · {data.get('model_label') or data['model_name']} · {data['n_tokens']} tokens, "
                        f"{data['n_interventions']} one-position skips", title_justify="left")
    for col in ("skipped", "max later change", "mean later change", "KL current", "KL future"):
        table.add_column(col, justify="right")
    for k, s in enumerate(data["skipped"]):
        later_max = [v for v in data["later_change_max"][k][s:] if v is not None]
        later_mean = [v for v in data["later_change_mean"][k][s:] if v is not None]
        table.add_row(str(s), _fmt(max(later_max) if later_max else None),
                      _fmt(sum(later_mean) / len(later_mean) if later_mean else None),
                      _fmt(data["output_kl_current"][k], 4), _fmt(data["output_kl_future"][k], 4))
    table.caption = ("later change: ||Δ(a_l+m_l)||/||a_l+m_l|| for layers l > S (max over l and positions; "
                     "mean over l and positions)")
    return table


def map_table(data: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"linear maps · {Path(data['model_a']).name} -> {Path(data['model_b']).name} · "
                        f"{data['n_train']} train / {data['n_test']} held-out tokens", title_justify="left")
    for col in ("layer i (A)", "rel. depth", "best j (B)", "rel. depth", "R² best", "R² j=i"):
        table.add_column(col, justify="right")
    layers_b = data["layers_b"]
    for k, i in enumerate(data["layers_a"]):
        j = data["best"][k]
        same = data["r2"][k][layers_b.index(i)] if i in layers_b else None
        table.add_row(str(i), f"{data['rel_depth_a'][k]:.2f}", str(j), f"{data['best_rel_depth_b'][k]:.2f}",
                      _fmt(data["best_r2"][k], 4), _fmt(same, 4))
    return table
