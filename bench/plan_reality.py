#!/usr/bin/env python
"""`lcprobe plan` against reality at Llama-2-7B and 13B shapes (random weights, Q4_0).

70B cannot run on this project's machine, so the memory plan is checked where it
can be: this script writes Llama-2-7B- and 13B-shaped Q4_0 GGUFs (Llama-2's
dimensions and 32000-token vocabulary, the synthetic SentencePiece tokenizer of
tests/synth.py padded to that size; every 2-D weight Q4_0, norms F32) straight
from random bytes: random nibbles and sane f16 scales (0.3/sqrt(fan_in), so the
weights have a standard deviation near 1.4/sqrt(fan_in)), not by quantizing
floats, which would take an hour. Files go to ~/.cache/lcprobe/synthetic and
are reused.

For each shape it runs `lcprobe plan --json` (the predicted peak RSS) and
`lcprobe run -T calc --limit N` under `/usr/bin/time -v` (the measured peak
RSS of the whole process, weights mapped from the file included, as the plan
counts them), and compares the run's seconds per item with bench/scaling.py's
extrapolation (its formula, its measured FLOP rates from the newest
bench/results/scaling-*.json, this task's measured tokens and rows per item).

    .venv/bin/python bench/plan_reality.py                     # 7b and 13b, 8 items, 2 threads
    .venv/bin/python bench/plan_reality.py --shapes 7b --limit 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import Shape  # noqa: E402

SHAPES = {
    "7b": Shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    "13b": Shape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
}
QK4_0, Q4_0_BYTES = 32, 18  # values per block, bytes per block (f16 scale + 16 bytes of nibbles)
CACHE = Path(os.environ.get("LCPROBE_SYNTHETIC", Path.home() / ".cache" / "lcprobe" / "synthetic"))


def q4_0_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """``rows`` rows of random Q4_0 blocks as stored: (rows, cols / 32 * 18) bytes."""
    nb = cols // QK4_0
    out = np.empty((rows, nb, Q4_0_BYTES), np.uint8)
    out[:, :, 2:] = np.frombuffer(rng.bytes(rows * nb * 16), np.uint8).reshape(rows, nb, 16)
    # scale jittered +-20% around 0.3/sqrt(fan_in); nibble - 8 spans -8..7, std ~4.6
    d = (0.3 / np.sqrt(cols)) * (0.8 + 0.4 * rng.random((rows, nb), dtype=np.float32))
    out[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out.reshape(rows, nb * Q4_0_BYTES)


def write_q4_0_llama(path: Path, s: Shape, seed: int = 0) -> None:
    import gguf
    from synth import SynthSpec, build_vocab, llama_metadata

    from lcprobe.files.gguf_writer import TensorOut, write_gguf

    tokens, scores, types = (list(x) for x in build_vocab())
    extra = s.n_vocab - len(tokens)
    tokens += [f"<filler{i}>" for i in range(extra)]
    scores += [-1e9] * extra
    types += [1] * extra
    hd = s.n_embd // s.n_head
    spec = SynthSpec(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_head_kv=s.n_head_kv, n_ff=s.n_ff,
                     ctx=4096, eps=1e-5, rope_base=10000.0)
    metadata = llama_metadata(spec, f"lcprobe-synthetic-{s.name}", gguf.LlamaFileType.MOSTLY_Q4_0,
                              (tokens, scores, types))
    plan: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.n_vocab, s.n_embd))]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (s.n_embd,)), (p + "attn_q.weight", (s.n_head * hd, s.n_embd)),
                 (p + "attn_k.weight", (s.n_head_kv * hd, s.n_embd)),
                 (p + "attn_v.weight", (s.n_head_kv * hd, s.n_embd)),
                 (p + "attn_output.weight", (s.n_embd, s.n_head * hd)), (p + "ffn_norm.weight", (s.n_embd,)),
                 (p + "ffn_gate.weight", (s.n_ff, s.n_embd)), (p + "ffn_up.weight", (s.n_ff, s.n_embd)),
                 (p + "ffn_down.weight", (s.n_embd, s.n_ff))]
    plan += [("output_norm.weight", (s.n_embd,)), ("output.weight", (s.n_vocab, s.n_embd))]
    rng = np.random.default_rng(seed)

    def make(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        return q4_0_rows(rng, *shape)

    tensors = []
    for name, shape in plan:
        if len(shape) == 1:
            tensors.append(TensorOut(name, shape, np.dtype(np.float32), 4 * shape[0], lambda shape=shape: make(shape)))
        else:
            raw = (shape[0], shape[1] // QK4_0 * Q4_0_BYTES)
            tensors.append(TensorOut(name, raw, np.dtype(np.uint8), raw[0] * raw[1], lambda shape=shape: make(shape),
                                     gguf.GGMLQuantizationType.Q4_0))
    write_gguf(path, "llama", metadata, tensors)


def model_file(s: Shape, log=print) -> Path:
    path = CACHE / f"{s.name}-synthetic-Q4_0.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = path.with_suffix(".part")
        write_q4_0_llama(tmp, s)
        tmp.replace(path)
        log(f"  wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return path


def lcprobe(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("lcprobe")
    return [str(exe) if exe.exists() else "lcprobe", *args]


def predicted(path: Path, threads: int) -> dict:
    proc = subprocess.run(lcprobe("plan", "-m", str(path), "--json"), capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)


def measured(path: Path, limit: int, threads: int, out: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", *lcprobe("run", "-m", str(path), "-T", "calc", "--limit", str(limit),
                                           "-t", str(threads), "--quiet", "-o", str(out))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lcprobe run failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    summary = json.loads((out / "summary.json").read_text())
    return {"peak_rss": rss_kb * 1024, "wall": wall, "timing": summary["timing"], "n_items": summary["n_items"]}


def extrapolated(s: Shape, tokens_per_item: float, rows_per_item: float) -> dict:
    """bench/scaling.py's formula with its newest measured Q4_0 rates (from its largest shape)."""
    files = sorted(glob.glob(str(REPO / "bench" / "results" / "scaling-*.json")))
    if not files:
        return {}
    runs = [r for r in json.loads(Path(files[-1]).read_text())["results"] if r["qtype"] == "Q4_0"]
    ref = max(runs, key=lambda r: r["params"])
    dec = tokens_per_item * 2 * s.block_params / (ref["decode_gflops"] * 1e9)
    lens = rows_per_item * s.n_layer * 2 * s.n_vocab * s.n_embd / (ref["lens_gflops"] * 1e9)
    # the same formula with scaling.py's own tokens and rows per item (its calc items, SmolLM2's tokenizer)
    dec0 = ref["tokens_per_item"] * 2 * s.block_params / (ref["decode_gflops"] * 1e9)
    lens0 = ref["rows_per_item"] * s.n_layer * 2 * s.n_vocab * s.n_embd / (ref["lens_gflops"] * 1e9)
    return {"from": f"{Path(files[-1]).name} ({ref['shape']['name']})", "decode_gflops": ref["decode_gflops"],
            "lens_gflops": ref["lens_gflops"], "seconds_per_item": dec + lens, "decode": dec, "lens": lens,
            "seconds_per_item_scaling_tokens": dec0 + lens0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="7b,13b", help="comma-separated: 7b, 13b")
    p.add_argument("--limit", type=int, default=8, help="calc items per run (default 8)")
    p.add_argument("-t", "--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    load0 = os.getloadavg()
    for key in args.shapes.split(","):
        s = SHAPES[key.strip()]
        print(f"{s.name}: {s.n_layer} layers, n_embd {s.n_embd}, n_ff {s.n_ff}, vocab {s.n_vocab}", flush=True)
        path = model_file(s)
        plan = predicted(path, args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            m = measured(path, args.limit, args.threads, Path(tmp) / "run")
        t = m["timing"]
        n = m["n_items"]
        tokens = (t["tokens_decoded"]) / n
        ex = extrapolated(s, tokens, t["lens_rows"] / n)
        row = {"shape": s.name, "file_bytes": path.stat().st_size, "plan_ram_need": plan["ram_need"],
               "plan_peak_rss": plan["peak_rss"], "plan_capture": plan["capture"],
               "peak_rss": m["peak_rss"], "rss_over_plan": m["peak_rss"] / plan["peak_rss"],
               "seconds_per_item": t["seconds_per_item"], "seconds_load": t["seconds_load"],
               "tokens_per_item": tokens, "rows_per_item": t["lens_rows"] / n, "n_items": n,
               "extrapolation": ex, "plan": plan, "timing": t}
        rows.append(row)
        print(f"  plan: peak RSS {plan['peak_rss'] / 1e9:.2f} GB (needs {plan['ram_need'] / 1e9:.2f} GB, capture "
              f"budget {plan['capture'] / 1e9:.2f} GB); measured peak RSS {m['peak_rss'] / 1e9:.2f} GB "
              f"({row['rss_over_plan'] - 1:+.1%}); {t['seconds_per_item']:.2f} s/item measured, "
              f"{ex.get('seconds_per_item', float('nan')):.2f} extrapolated", flush=True)
    out = REPO / "bench" / "results" / f"plan-reality-{dt.datetime.now():%Y-%m-%d-%H%M%S}.json"
    out.write_text(json.dumps({"date": dt.datetime.now().isoformat(), "threads": args.threads, "limit": args.limit,
                               "loadavg": [load0, os.getloadavg()], "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
