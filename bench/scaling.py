#!/usr/bin/env python
"""How lcprobe's cost grows with width, depth and vocabulary: synthetic LLaMA models.

Writes random-weight LLaMA GGUFs of real models' shapes (SmolLM2-135M, the same
with twice the depth, twice the width, a Llama-3 vocabulary; Llama-3.2-1B- and
3B-like), quantizes them with llama.cpp's own quantizer (Q4_0 / Q8_0), probes
the same calc items with lcprobe on each and measures, per item: time, decode
time, lens time, the capture overhead (the same batches decoded with and
without capture, interleaved) and the effective FLOP rates. From those rates it
extrapolates to Llama-2-7B and 70B:

    seconds/item = T * 2 * P_blocks / R_decode  +  S * L * 2 * V * d / R_lens

T = unique tokens decoded per item, S = unique scored rows per item (both from
the task and tokenizer, measured here; the synthetic models are fed SmolLM2's
token ids, which every shape's vocabulary covers, so T and S are those of a
real BPE tokenizer that splits numbers into digits, as Llama-2's does), P_blocks = parameters in the blocks
(matmul FLOPs per token ~ 2 * P_blocks; attention over ~100-token prompts adds
a few percent), L = layers probed, V x d = the head; R_decode / R_lens = FLOP
rates measured on the largest model run (per quantization type).

The source files are written in F16 (streamed tensor by tensor, so a 3B model
never sits in RAM), quantized, then deleted; quantized files are cached in
--cache and reused. Weights are random (scaled 1/sqrt(fan_in)): speed does not
depend on their values.

    .venv/bin/python bench/scaling.py                        # all shapes, Q4_0 (+ Q8_0 for some)
    .venv/bin/python bench/scaling.py --shapes 135m,1b --types Q8_0 --limit 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int

    @property
    def block_params(self) -> int:
        hd = self.n_embd // self.n_head
        attn = 2 * self.n_embd * self.n_head * hd + 2 * self.n_embd * self.n_head_kv * hd
        return self.n_layer * (attn + 3 * self.n_embd * self.n_ff + 2 * self.n_embd)

    @property
    def params(self) -> int:
        return self.block_params + 2 * self.n_vocab * self.n_embd + self.n_embd


SHAPES = {
    "135m": Shape("135m", 30, 576, 9, 3, 1536, 49152),  # SmolLM2-135M
    "135m-2xL": Shape("135m-2xL", 60, 576, 9, 3, 1536, 49152),  # twice as deep
    "135m-2xd": Shape("135m-2xd", 30, 1152, 18, 6, 3072, 49152),  # twice as wide
    "135m-V128k": Shape("135m-V128k", 30, 576, 9, 3, 1536, 128256),  # Llama-3 vocabulary
    "1b": Shape("1b", 16, 2048, 32, 8, 8192, 128256),  # Llama-3.2-1B
    "3b": Shape("3b", 28, 3072, 24, 8, 8192, 128256),  # Llama-3.2-3B
}
TARGETS = {
    "Llama-2-7B": Shape("7b", 32, 4096, 32, 32, 11008, 32000),
    "Llama-2-70B": Shape("70b", 80, 8192, 64, 8, 28672, 32000),
}
DEFAULT_RUNS = "135m:Q4_0,135m:Q8_0,135m-2xL:Q4_0,135m-2xd:Q4_0,135m-V128k:Q4_0,1b:Q4_0,1b:Q8_0,3b:Q4_0"


def write_random_llama(path: Path, s: Shape, seed: int = 0) -> None:
    """A random-weight F16 LLaMA GGUF with ``s``'s shape and a vocabulary padded to n_vocab.

    The tokenizer is the synthetic SentencePiece vocabulary of tests/synth.py
    (words, numbers, bytes) followed by filler tokens no text produces.
    """
    import gguf
    from synth import SynthSpec, llama_metadata, llama_tensor_shapes, padded_vocab

    from lcprobe.files.gguf_writer import TensorOut, write_gguf

    spec = SynthSpec(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, n_head_kv=s.n_head_kv, n_ff=s.n_ff,
                     ctx=4096, eps=1e-5, rope_base=10000.0)
    metadata = llama_metadata(spec, f"lcprobe-scaling-{s.name}", gguf.LlamaFileType.MOSTLY_F16,
                              padded_vocab(s.n_vocab))
    gains = {"token_embd.weight": 0.5, "output.weight": 4.0}
    plan = [(name, shape, -1.0 if len(shape) == 1 else gains.get(name, 1.0))  # -1: a norm weight
            for name, shape in llama_tensor_shapes(spec, s.n_vocab)]
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...], gain: float) -> np.ndarray:
        # called as each tensor is written, in order, so the random stream is the same as ever
        if gain < 0:  # a norm weight
            return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
        scale = gain if name == "token_embd.weight" else gain / np.sqrt(shape[1])
        arr = np.empty(shape, np.float16)
        for r0 in range(0, shape[0], 4096):  # bounded temporaries for 128k x 3072 heads
            chunk = rng.standard_normal((min(4096, shape[0] - r0), shape[1]), np.float32)
            chunk *= np.float32(scale)
            arr[r0 : r0 + len(chunk)] = chunk
        return arr

    tensors = []
    for name, shape, gain in plan:
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)  # norms stay F32 as in real models
        tensors.append(TensorOut(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                                 lambda name=name, shape=shape, gain=gain: make(name, shape, gain)))
    write_gguf(path, "llama", metadata, tensors)


def model_file(cache: Path, s: Shape, qtype: str, log=print) -> Path:
    from synth import quantize

    dst = cache / f"scaling-{s.name}-{qtype}.gguf"
    if dst.exists():
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"scaling-{s.name}-F16.gguf"
    if not src.exists():
        t0 = time.perf_counter()
        write_random_llama(src, s)
        log(f"  wrote {src.name} ({src.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    tmp = dst.with_suffix(".part")
    quantize(str(src), str(tmp), qtype, nthread=os.cpu_count() or 2)
    tmp.replace(dst)
    log(f"  quantized to {qtype} ({dst.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return dst


def measure(path: Path, s: Shape, items, task, threads: int, repeat: int, tmp: Path, tokenize=None) -> dict:
    from speed import decode_batches, lens_vs_matmul

    from lcprobe.probing.batching import build_units, common_prefix_length, group_units, layout_group
    from lcprobe.analysis.lens import Lens
    from lcprobe.probing.runner import Prober
    from lcprobe.sites import parse_layers
    from lcprobe.llama.loader import open_model
    from lcprobe.probing.session import ProbeOptions, run_task

    options = ProbeOptions(n_threads=threads, n_ctx=2048, n_batch=512)
    t0 = time.perf_counter()
    model = open_model(path, options)
    seconds_load = time.perf_counter() - t0
    try:
        eng, info = model.engine, model.info
        if tokenize is not None:
            eng.tokenize = tokenize  # a real tokenizer's ids (all below every shape's n_vocab)
        times, stats = [], []
        for r in range(repeat):
            t0 = time.perf_counter()
            stats.append(run_task(model, task, tmp / f"{path.stem}-{r}", options, items=items).stats)
            times.append(time.perf_counter() - t0)
        st = stats[int(np.argmin(times))]  # the least disturbed run, as for the total
        layers = parse_layers(None, info.n_layer)
        lens = Lens(model.unembed, info.n_layer)
        prober = Prober(eng, lens, layers)
        reqs, _ = prober.encode(items)
        k = common_prefix_length(reqs)
        units = build_units(reqs, k, eng.n_seq_max - 1)
        groups = group_units(units, k, eng.n_ctx, eng.n_batch, eng.n_seq_max - 1, prober.max_rows)
        batches = [layout_group(g, k) for g in groups]
        prefix = list(reqs[0].context[:k])
        floor, cap, floor_c, cap_c, kept = [], [], [], [], None
        for _ in range(repeat):
            sec, cpu, _ = decode_batches(eng, prefix, batches, [])
            floor.append(sec)
            floor_c.append(cpu)
            sec, cpu, rows = decode_batches(eng, prefix, batches, prober.sites, keep=kept is None)
            cap.append(sec)
            cap_c.append(cpu)
            kept = kept or rows
        lb = lens_vs_matmul(lens, layers, kept, batches, repeat)
    finally:
        model.close()
    n = len(items)
    item_tokens = (st.tokens_decoded - st.prefix_tokens) / n
    floor_s = min(floor)
    return {
        "shape": asdict(s), "params": s.params, "block_params": s.block_params,
        "file_bytes": path.stat().st_size, "seconds_load": seconds_load,
        "seconds_per_item": min(times) / n, "runs": times,
        "decode_per_item": st.seconds_decode / n, "lens_per_item": st.seconds_lens / n,
        "lens_share": st.seconds_lens / min(times),
        "tokens_per_item": item_tokens, "prefix_tokens": st.prefix_tokens, "rows_per_item": st.lens_rows / n,
        "floor_seconds": floor, "capture_seconds": cap, "capture_overhead": (min(cap) - floor_s) / floor_s,
        "floor_cpu": floor_c, "capture_cpu": cap_c,
        "capture_overhead_cpu": (min(cap_c) - min(floor_c)) / min(floor_c),
        # block matmuls of every decoded token (prefix included) over the plain decode's time
        "decode_gflops": 2 * s.block_params * st.tokens_decoded / floor_s / 1e9,
        "lens_gflops": lb["gflops_lens"], "matmul_gflops": lb["gflops_matmul"],
        "lens_share_of_peak": lb["share_of_peak"],
    }


def extrapolate(results: list[dict]) -> list[dict]:
    """Seconds per item for the target shapes from the largest run's rates, per type."""
    out = []
    by_type: dict[str, dict] = {}
    for r in results:
        if r["qtype"] not in by_type or r["params"] > by_type[r["qtype"]]["params"]:
            by_type[r["qtype"]] = r
    for qtype, ref in sorted(by_type.items()):
        for name, s in TARGETS.items():
            dec = ref["tokens_per_item"] * 2 * s.block_params / (ref["decode_gflops"] * 1e9)
            lens = ref["rows_per_item"] * s.n_layer * 2 * s.n_vocab * s.n_embd / (ref["lens_gflops"] * 1e9)
            out.append({"model": name, "qtype": qtype, "from": ref["shape"]["name"],
                        "decode_per_item": dec, "lens_per_item": lens, "seconds_per_item": dec + lens,
                        "lens_share": lens / (dec + lens)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=DEFAULT_RUNS,
                   help=f"shape:type pairs (shapes: {', '.join(SHAPES)}; default {DEFAULT_RUNS})")
    p.add_argument("-T", "--task", default="calc")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "lcprobe-scaling"),
                   help="where the quantized models are kept between runs")
    p.add_argument("--tokenizer", default="smollm2-135m",
                   help="model whose tokenizer turns the items into token ids (default smollm2-135m)")
    p.add_argument("--synthetic-tokenizer", action="store_true",
                   help="use the synthetic models' own word-level vocabulary instead")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    shared = REPO.parent / "shared" / "data" / "llama_analysis"
    if shared.exists():
        os.environ.setdefault("LCPROBE_DATA", str(shared))

    from lcprobe.llama.engine import set_llama_log
    from lcprobe.tasks.task import load_task

    task = load_task(args.task)
    items = task.items(limit=args.limit)
    cache = Path(args.cache)
    tmp = Path(tempfile.mkdtemp(prefix="lcprobe-scaling-"))
    set_llama_log(tmp / "llama.log")
    runs = [r.split(":") for r in args.runs.split(",")]
    tokenize, tok_engine = None, None
    if not args.synthetic_tokenizer:
        from lcprobe.files.catalog import resolve_model
        from lcprobe.llama.engine import Engine, EngineConfig
        from lcprobe.files.modelfile import read_model_info

        tok_info = read_model_info(resolve_model(args.tokenizer))
        if min(SHAPES[name].n_vocab for name, _ in runs) < tok_info.n_vocab:
            raise SystemExit(f"{args.tokenizer}'s vocabulary ({tok_info.n_vocab}) is larger than a shape's")
        tok_engine = Engine(tok_info, EngineConfig(n_ctx=64, n_batch=8, n_ubatch=8, n_seq_max=1, n_threads=1))
        tokenize = tok_engine.tokenize
    results = []
    load0 = os.getloadavg()
    for shape_name, qtype in runs:
        s = SHAPES[shape_name]
        print(f"{shape_name} {qtype}: {s.params / 1e6:,.0f}M parameters", flush=True)
        path = model_file(cache, s, qtype, log=lambda m: print(m, flush=True))
        r = measure(path, s, items, task, args.threads, args.repeat, tmp, tokenize)
        r["qtype"] = qtype
        results.append(r)
        print(f"  {r['seconds_per_item']:.3f} s/item, lens {r['lens_share']:.0%}, "
              f"capture overhead {r['capture_overhead']:+.1%}", flush=True)
    if tok_engine is not None:
        tok_engine.close()
    for f in cache.glob("scaling-*-F16.gguf"):
        f.unlink()  # the F16 sources are only needed to quantize
    load1 = os.getloadavg()

    print()
    print(f"{task.name}, {len(items)} items, {args.threads} threads, "
          f"tokens of {'the synthetic vocabulary' if tokenize is None else args.tokenizer}, {dt.date.today()}, "
          f"load avg {load0[0]:.1f} -> {load1[0]:.1f}")
    print()
    print("| shape | type | params | L | d | V | file | tokens/item | rows/item | s/item | decode s/item | "
          "lens s/item | lens share | capture overhead (CPU time) | decode GFLOP/s | lens GFLOP/s (numpy peak) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["shape"]
        print(f"| {s['name']} | {r['qtype']} | {r['params'] / 1e6:,.0f}M | {s['n_layer']} | {s['n_embd']} | "
              f"{s['n_vocab']} | {r['file_bytes'] / 1e9:.2f} GB | {r['tokens_per_item']:.1f} | "
              f"{r['rows_per_item']:.1f} | {r['seconds_per_item']:.3f} | {r['decode_per_item']:.3f} | "
              f"{r['lens_per_item']:.3f} | {r['lens_share']:.0%} | {r['capture_overhead']:+.1%} "
              f"({r['capture_overhead_cpu']:+.1%}) | "
              f"{r['decode_gflops']:.1f} | {r['lens_gflops']:.1f} ({r['matmul_gflops']:.1f}) |")
    ext = extrapolate(results)
    print()
    print("extrapolated (seconds/item = T * 2 * P_blocks / R_decode + S * L * 2 * V * d / R_lens, rates of the "
          "largest run of each type):")
    print()
    print("| model | type | from | decode s/item | lens s/item | s/item | lens share |")
    print("|---|---|---|---:|---:|---:|---:|")
    for e in ext:
        print(f"| {e['model']} | {e['qtype']} | {e['from']} | {e['decode_per_item']:.2f} | {e['lens_per_item']:.2f} | "
              f"{e['seconds_per_item']:.2f} | {e['lens_share']:.0%} |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = out_dir / f"scaling-{stamp}.json"
    out.write_text(json.dumps({"date": stamp, "task": task.name, "n_items": len(items), "threads": args.threads,
                               "loadavg": [load0, load1], "results": results, "extrapolated": ext}, indent=1))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
