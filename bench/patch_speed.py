#!/usr/bin/env python
"""Speed of ``lcprobe patch``: the causal-tracing sweep of issue 14 on SmolLM2 (30 layers x 9 positions).

Opens the model as ``lcprobe patch`` does (f32 KV cache, no flash attention, a
KV stream per patched run when the engine has them) and times
``run_patching`` after loading. Prints the layout, decodes, tokens decoded,
runs/s and tokens/s; the minimum over ``--repeat`` runs is the least disturbed
one on a shared machine, so the load average is printed too. ``--compare``
also times the unified-cache packing (whole copies of the corrupted prompt per
decode, the layout before streams) on the same prompts, and how far each is
from the other.

    .venv/bin/python bench/patch_speed.py                    # 2 threads, 3 repeats
    .venv/bin/python bench/patch_speed.py -t 1 --compare
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


def options(path, threads: int, streams: bool):
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.llama.loader import LoadOptions
    from lcprobe.studies.patching import sweep_options

    info = read_model_info(path)
    changes = sweep_options(info, CORRUPT, info.n_layer) if streams else dict(kv_type="f32", flash_attn="off")
    return LoadOptions(n_threads=threads, lens_backend=None, **changes)


def bench(path, threads: int, repeat: int, streams: bool):
    from lcprobe.llama.loader import open_model
    from lcprobe.studies.patching import run_patching

    with open_model(path, options(path, threads, streams)) as lm:
        best, res = None, None
        for _ in range(repeat):
            c0 = time.process_time()
            res = run_patching(lm.engine, CLEAN, CORRUPT, " Paris")
            cpu = time.process_time() - c0
            print(f"  {res.layout}: {res.seconds:6.2f} s wall, {cpu:6.2f} s CPU, load {os.getloadavg()[0]:.2f}")
            best = res.seconds if best is None else min(best, res.seconds)
    assert res is not None and best is not None
    print(f"{res.layout}: {res.n_runs} runs in {res.n_decodes} decodes, {res.n_tokens} tokens "
          f"({res.n_unchanged} runs unchanged, not decoded); best {best:.2f} s = "
          f"{res.n_runs / best:.1f} runs/s, {res.n_tokens / best:.0f} tokens/s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also time the unified-cache packing")
    args = ap.parse_args()
    from lcprobe.files.catalog import resolve_model

    path = resolve_model(args.model)
    print(f"{path.name}, {args.threads} threads, load average at start {os.getloadavg()[0]:.2f}")
    res = bench(path, args.threads, args.repeat, streams=True)
    if args.compare:
        old = bench(path, args.threads, args.repeat, streams=False)
        d = {s: float(np.abs(res.raw[s] - old.raw[s]).max()) for s in res.raw}
        print(f"max |logit difference, {res.layout} - {old.layout}|: {d}")


if __name__ == "__main__":
    main()
