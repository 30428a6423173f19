#!/usr/bin/env python
"""Throughput of ``lcprobe dump`` against a plain llama.cpp decode of the same windows plus the disk writes.

In one process, on the same model, threads and windows, interleaved per repeat:

(a) plain decode: every window decoded from an empty cache by the Engine with no capture site and
    llama.cpp's full graph, logits for the window's last token only (what a plain llama.cpp
    prompt decode does);
(b) ``lcprobe.studies.dump.run_dump``, what ``lcprobe dump`` does after loading (all layers,
    resid_post, float16): the same windows with every row captured, converted and written as
    safetensors shards, index.json after each;
(c) the disk writes alone: the shards (b) wrote, read back into memory (not timed) and written again
    by the same ``write_shard`` (safetensors + fsync + rename).

The target (issue 11): (b) <= 1.15 x ((a) + (c)). Timings are the minimum over ``--repeat`` runs.
Writes ``bench/results/dump-<date>.json``.

    .venv/bin/python bench/dump.py                       # SmolLM2, 8192 tokens of the default corpus, 2 threads
    .venv/bin/python bench/dump.py --text corpus.txt -m gemma3-270m
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from speed import cpu_name, cpu_seconds  # bench/ is on sys.path when a bench script runs

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "llama_analysis"
TARGET = 1.15


def default_text(path: Path) -> Path:
    """The probing data's questions and answers (``lcprobe depth``'s default corpus) as one text file."""
    from lcprobe.tasks.corpus import default_documents, find_data_dir

    if "LCPROBE_DATA" not in os.environ and SHARED_DATA.is_dir():
        os.environ["LCPROBE_DATA"] = str(SHARED_DATA)
    path.write_text("\n\n".join(default_documents(find_data_dir())) + "\n", encoding="utf-8")
    return path


def plain_decode(engine, windows: list[list[int]], n_batch: int) -> tuple[float, float]:
    """Decode every window with no capture site and llama.cpp's whole graph; (seconds, CPU seconds)."""
    import numpy as np

    engine.set_sites([])
    engine.skip_head = False
    t0, c0 = time.perf_counter(), cpu_seconds()
    try:
        for win in windows:
            engine.clear()
            n = len(win)
            for start in range(0, n, n_batch):
                stop = min(start + n_batch, n)
                outputs = np.zeros(stop - start, bool)
                last = stop == n
                outputs[-1] = last
                engine.decode(win[start:stop], range(start, stop), [[0]] * (stop - start), outputs,
                              want_logits=last)
        engine.clear()
    finally:
        engine.skip_head = True
    return time.perf_counter() - t0, cpu_seconds() - c0


def rewrite(src: Path, dst: Path) -> tuple[float, float, int]:
    """Write the shards of the dump in ``src`` again into ``dst``; (seconds, CPU seconds, bytes)."""
    from safetensors import safe_open

    from lcprobe.results.dump import read_index, write_shard

    shards = []
    for entry in read_index(src)["shards"]:
        with safe_open(str(src / entry["file"]), framework="numpy") as f:
            shards.append((entry["file"], {k: f.get_tensor(k) for k in f.keys()}))
    dst.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    size = sum(write_shard(dst / name, arrays) for name, arrays in shards)
    return time.perf_counter() - t0, cpu_seconds() - c0, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--text", default=None, help="text file (default: the probing data's questions and answers)")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("-c", "--window", type=int, default=1024)
    ap.add_argument("--shard-tokens", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the dumps are written (default: a temporary directory)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)

    import numpy as np

    from lcprobe.llama.engine import llama_cpp_version
    from lcprobe.llama.loader import LoadOptions, open_model
    from lcprobe.studies.dump import DumpOptions, check_text, iter_paragraphs, iter_windows, run_dump

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lcprobe-bench-dump-"))
    work.mkdir(parents=True, exist_ok=True)
    text = check_text(args.text or default_text(work / "corpus.txt"))
    options = DumpOptions(sites=("resid_post",), layers=None, dtype="float16", window=args.window,
                          shard_tokens=args.shard_tokens, max_tokens=args.max_tokens)
    n_batch = min(512, args.window)
    load = LoadOptions(n_ctx=args.window, n_batch=n_batch, n_seq_max=1, n_threads=args.threads,
                       n_gpu_layers=args.n_gpu_layers, lens_backend=None)
    load_start = os.getloadavg()
    with open_model(args.model, load, log_path=work / "llama.log") as lm:
        info, engine = lm.info, lm.engine
        bos = engine.tokenize("", add_special=True)
        windows = [w for w, _ in iter_windows(iter_paragraphs(text.path),
                                              lambda s: engine.tokenize(s, add_special=False),
                                              args.window, bos, args.max_tokens)]
        n_tok = sum(len(w) for w in windows)
        print(f"{info.name} ({info.file_type}, {info.n_layer} layers x {info.n_embd}), {n_tok} tokens in "
              f"{len(windows)} windows of {args.window}, {args.threads} threads, {args.repeat} repeats", flush=True)
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "dump": [], "write": []}
        size = 0
        for r in range(args.repeat):
            runs["plain"].append(plain_decode(engine, windows, n_batch))
            out = work / f"dump-{r}"
            c0 = cpu_seconds()
            outcome = run_dump(lm, text, out, options)
            runs["dump"].append((outcome.seconds, cpu_seconds() - c0))
            assert outcome.n_tokens == n_tok, (outcome.n_tokens, n_tok)
            s, c, size = rewrite(out, work / f"write-{r}")
            runs["write"].append((s, c))
            shutil.rmtree(out)
            shutil.rmtree(work / f"write-{r}")
            print(f"  repeat {r + 1}: plain {runs['plain'][-1][0]:.2f} s, dump {runs['dump'][-1][0]:.2f} s, "
                  f"writes {s:.2f} s", flush=True)
    load_end = os.getloadavg()
    best = {k: min(v[0] for v in vs) for k, vs in runs.items()}
    best_cpu = {k: min(v[1] for v in vs) for k, vs in runs.items()}
    ratio = best["dump"] / (best["plain"] + best["write"])
    ratio_cpu = best_cpu["dump"] / (best_cpu["plain"] + best_cpu["write"])
    print(f"\n{info.name}, {n_tok} tokens, {info.n_layer} layers resid_post float16 ({size / 1e6:.0f} MB), "
          f"{args.threads} threads, {cpu_name()}, load avg {load_start[0]:.1f} -> {load_end[0]:.1f}\n")
    print("| run | seconds | tokens/s | CPU s |")
    print("|---|---:|---:|---:|")
    for key, label in (("plain", "(a) plain llama.cpp decode, same windows"),
                       ("dump", "(b) lcprobe dump (capture, float16, shards, index)"),
                       ("write", "(c) the same shards' disk writes alone")):
        print(f"| {label} | {best[key]:.2f} | {n_tok / best[key]:.0f} | {best_cpu[key]:.2f} |")
    print(f"\n(b) / ((a) + (c)) = {ratio:.3f} (CPU time {ratio_cpu:.3f}); target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'NOT met'}")
    if not args.dir:
        shutil.rmtree(work)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result = {
        "date": stamp, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "versions": {"llama_cpp_python": llama_cpp_version(), "numpy": np.__version__,
                     "python": platform.python_version()},
        "model": {"path": str(info.path), "name": info.name, "file_type": info.file_type,
                  "n_layer": info.n_layer, "n_embd": info.n_embd},
        "tokens": n_tok, "windows": len(windows), "window": args.window, "shard_tokens": args.shard_tokens,
        "threads": args.threads, "n_gpu_layers": args.n_gpu_layers, "repeat": args.repeat, "bytes_written": size,
        "runs": {k: [{"seconds": s, "cpu": c} for s, c in v] for k, v in runs.items()},
        "best_seconds": best, "best_cpu": best_cpu, "ratio": ratio, "ratio_cpu": ratio_cpu, "target": TARGET,
        "met": ratio <= TARGET,
    }
    path = out_dir / f"dump-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
