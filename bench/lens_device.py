#!/usr/bin/env python
"""The lens backends side by side: numpy, ggml and device (float32 and stored head), rows per second.

In one process, on the same rows, targets and threads: ``Lens.token_log_probs``
(norm, head, log-softmax, the scored tokens) through each backend, at a few
row counts (rows = layers x positions sent through the head in one call, 4
scored tokens each, as a 4-choice item's). The device lens runs where
llama.cpp would put the output layer for ``-ngl`` (the CPU at -ngl 0; a GPU
at -ngl 99 on a GPU build); ``device-stored`` keeps the head's own quantized
type there (``DeviceHead(stored=True)``, llama.cpp's kernels and rounding).
Times are the minimum over ``--repeat`` calls after one warm-up; the agreement
of each backend with the numpy lens is printed too.

    .venv/bin/python bench/lens_device.py                          # SmolLM2, CPU
    .venv/bin/python bench/lens_device.py -m gemma3-270m --rows 16,64,256
    .venv/bin/python bench/lens_device.py -m MODEL -ngl 99         # the device lens on the GPU
    .venv/bin/python bench/lens_device.py --rpc 127.0.0.1:50052    # on an lcprobe rpc-server's device
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lcprobe.analysis.lens import Lens, Unembed  # noqa: E402
from lcprobe.files.catalog import resolve_model  # noqa: E402
from lcprobe.files.modelfile import read_model_info  # noqa: E402

from speed import cpu_name  # bench/ is on sys.path when a bench script runs

N_TARGETS = 4


def heads(info, threads: int, ngl: int, rpc: tuple[str, ...]) -> dict[str, tuple[Unembed, float]]:
    """Every backend's Unembed and the seconds it took to load."""
    from lcprobe.llama.device_head import DeviceHead

    out = {}
    for name in ("numpy", "ggml", "device"):
        t = time.perf_counter()
        out[name] = (Unembed.from_model(info, backend=name, n_threads=threads, n_gpu_layers=ngl, rpc=rpc),
                     time.perf_counter() - t)
    t = time.perf_counter()
    stored = DeviceHead.from_model(info, threads, n_gpu_layers=ngl, rpc=rpc, stored=True)
    base = out["device"][0]
    out["device-stored"] = (Unembed(norm_weight=base.norm_weight, head=None, eps=base.eps, norm=base.norm,
                                    norm_bias=base.norm_bias, softcap=base.softcap, scale=base.scale,
                                    vocab_size=base.vocab_size, device=stored), time.perf_counter() - t)
    return out


def time_call(fn, repeat: int) -> tuple[float, np.ndarray]:
    result = fn()  # warm-up: buffers allocated, pages touched
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--rows", default="16,64,256,1024", help="rows per call (layers x positions), comma-separated")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="where the device lens goes (as llama.cpp)")
    ap.add_argument("--rpc", default="", metavar="HOST:PORT[,...]",
                    help="RPC servers as for lcprobe run (the device lens then goes to the last one's device)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()

    path = resolve_model(args.model)
    info = read_model_info(path)
    load_start = os.getloadavg()
    rpc = tuple(ep for ep in args.rpc.split(",") if ep)
    ngl = args.n_gpu_layers or (999 if rpc else 0)  # as lcprobe run: with servers, every layer by default
    hs = heads(info, args.threads, ngl, rpc)
    device = hs["device"][0].device
    rng = np.random.default_rng(0)
    flop_per_row = 2.0 * info.n_vocab * info.n_embd
    results = []
    for n in [int(r) for r in args.rows.split(",")]:
        # one layer's worth of rows per call keeps the shapes the runner sends (layers stacked)
        h = rng.normal(size=(1, n, info.n_embd)).astype(np.float32)
        targets = [rng.integers(0, info.n_vocab, size=N_TARGETS) for _ in range(n)]
        row = {"rows": n, "backends": {}}
        ref = None
        for name, (un, _) in hs.items():
            lens = Lens(un, info.n_layer)
            sec, lp = time_call(lambda: lens.token_log_probs(h, [info.n_layer], targets), args.repeat)
            if ref is None:
                ref = lp
            row["backends"][name] = {"seconds": sec, "rows_per_s": n / sec, "gflops": n * flop_per_row / sec / 1e9,
                                     "max_abs_diff_vs_numpy": float(np.abs(lp - ref).max())}
        results.append(row)
    load_end = os.getloadavg()

    names = list(hs)
    print(f"{info.general_name} ({info.file_type}, head {info.head_type}, vocab {info.n_vocab}, n_embd {info.n_embd}); "
          f"{args.threads} threads; device lens on {device.device.name} ({device.device.description}: "
          f"{device.device.reason}); load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print()
    print("| rows | " + " | ".join(f"{n} rows/s" for n in names) + " | device / numpy | device / ggml |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for row in results:
        b = row["backends"]
        cells = [f"{b[n]['rows_per_s']:.0f}" for n in names]
        print(f"| {row['rows']} | " + " | ".join(cells) +
              f" | {b['device']['rows_per_s'] / b['numpy']['rows_per_s']:.2f}x"
              f" | {b['device']['rows_per_s'] / b['ggml']['rows_per_s']:.2f}x |")
    print()
    worst = {n: max(r["backends"][n]["max_abs_diff_vs_numpy"] for r in results) for n in names}
    print("max |log-prob - numpy lens|: " + ", ".join(f"{n} {v:.2g}" for n, v in worst.items()))
    print("head load s: " + ", ".join(f"{n} {sec:.2f}" for n, (_, sec) in hs.items()))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    import llama_cpp

    record = {
        "date": stamp, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "versions": {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "numpy": np.__version__},
        "model": {"name": info.general_name, "path": str(path), "file_type": info.file_type,
                  "head_type": info.head_type, "n_vocab": info.n_vocab, "n_embd": info.n_embd},
        "threads": args.threads, "n_gpu_layers": ngl, "rpc": list(rpc), "repeat": args.repeat,
        "device": {"name": device.device.name, "description": device.device.description,
                   "kind": device.device.kind, "reason": device.device.reason, **device.info},
        "head_load_seconds": {n: sec for n, (_, sec) in hs.items()},
        "results": results,
    }
    out = out_dir / f"lens-device-{stamp}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    for un, _ in hs.values():
        un.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
