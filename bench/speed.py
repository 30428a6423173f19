#!/usr/bin/env python
"""Speed benchmark: lcprobe against a naive capture, a plain decode and the paper's method.

In one process, on the same items, model and threads:

(a) lcprobe end to end (``lcprobe.probing.session.run_task``, exactly what ``lcprobe run`` does);
(b) the naive capture (``tests/naive.py``, the tests' yardstick too): every choice's whole prompt re-decoded;
(c) a plain llama.cpp decode of the very batches lcprobe decodes, without capture
    (the floor), timed interleaved with the same batches with capture on;
(d) the paper's method through transformers (the same GGUF dequantized to float32,
    ``output_hidden_states=True``, ``lm_head`` on every position of every layer, the
    whole prompt per choice), run in a subprocess by a Python that has torch and
    transformers (``--hf-python``; skipped with a note when there is none).

Prints a Markdown table and the targets of issue 5, and writes
``bench/results/speed-<date>.json``. Timings are the minimum over ``--repeat``
runs: on a shared machine the minimum is the least disturbed run.

    .venv/bin/python bench/speed.py                  # SmolLM2, calc, 30 items, 4-shot, 2 threads
    .venv/bin/python bench/speed.py --hf-python /tmp/benchvenv/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "llama_analysis"

TARGETS = {
    "vs_naive": 8.0,  # lcprobe at least this many times faster than the naive capture
    "vs_paper": 50.0,  # ... and than the paper's method
    "decoded_over_unique": 1.1,
    "capture_overhead": 0.03,
    "lens_share_of_peak": 0.70,
    "rss_slack_bytes": 300 * 2**20,  # peak RSS <= model file + float32 head + this
}


def peak_rss() -> int:
    """Peak resident set of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (llama.cpp's and BLAS's)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- (d) the paper's method, run by a Python with torch + transformers ----------------------

def hf_worker(spec_path: str, out_path: str) -> int:
    """Score items the paper's way with transformers; imports nothing from lcprobe."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model_dir, gguf_file = spec["model_dir"], spec["gguf_file"]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.eval()
    seconds_load = time.perf_counter() - t0
    norm = model.model.norm
    scores, tokens = [], 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    with torch.inference_mode():
        for item in spec["items"]:
            per_choice = []
            for choice in item["choices"]:
                ctx = item["context"].rstrip(" ")
                cont = item["context"][len(ctx):] + choice
                ctx_ids = tok(ctx, add_special_tokens=True)["input_ids"]
                ids = tok(ctx + cont, add_special_tokens=True)["input_ids"]
                if ids[: len(ctx_ids)] != ctx_ids or len(ids) == len(ctx_ids):
                    ids = ctx_ids + tok(cont, add_special_tokens=False)["input_ids"]
                n = len(ctx_ids)
                tokens += len(ids)
                out = model(torch.tensor([ids]), output_hidden_states=True)
                hs = out.hidden_states  # embeddings, then layers 1..N (the last one already normed)
                target = torch.tensor(ids[n:])
                rows = torch.arange(n - 1, len(ids) - 1)
                layer_scores = []
                for layer in range(1, len(hs)):
                    h = hs[layer][0]
                    if layer < len(hs) - 1:
                        h = norm(h)  # lcprobe's default lens (final norm at every layer)
                    # the paper's cost: the head and log-softmax on every position
                    lp = torch.log_softmax(model.lm_head(h).float(), dim=-1)
                    layer_scores.append(float(lp[rows, target].sum()))
                per_choice.append(layer_scores)
            scores.append(per_choice)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    import transformers

    Path(out_path).write_text(json.dumps({
        "seconds_load": seconds_load, "seconds_total": seconds, "cpu_total": cpu, "tokens_decoded": tokens,
        "scores": scores,
        "peak_rss": peak_rss(), "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                             "numpy": np.__version__},
    }))
    return 0


def find_hf_python(explicit: str | None) -> tuple[str | None, str]:
    """A Python that can import torch and transformers, or (None, why not)."""
    candidates = [explicit] if explicit else [
        os.environ.get("LCPROBE_BENCH_PYTHON"), sys.executable, "/tmp/benchvenv/bin/python"]
    for py in [c for c in candidates if c]:
        if not Path(py).exists():
            continue
        ok = subprocess.run([py, "-c", "import torch, transformers, gguf, accelerate"], capture_output=True).returncode == 0
        if ok:
            return py, ""
    return None, ("torch/transformers not installed: pip install torch transformers (the 'bench' extra) or "
                  "pass --hf-python PATH of a venv that has them")


def run_paper(py: str, model_path: Path, items, threads: int, timeout: int) -> dict:
    spec = {"model_dir": str(model_path.parent), "gguf_file": model_path.name, "threads": threads,
            "items": [{"context": it.context, "choices": list(it.choices)} for it in items]}
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error",
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        t0 = time.perf_counter()
        proc = subprocess.run([py, str(Path(__file__).resolve()), "--hf-worker", str(sp), str(op)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"transformers worker failed:\n{proc.stderr[-3000:]}")
        out = json.loads(op.read_text())
        out["seconds_wall"] = time.perf_counter() - t0
        return out


# -- (a)-(c) -------------------------------------------------------------------------

def decode_batches(eng, prefix: list[int], batches, sites, keep: bool = False):
    """Decode lcprobe's batches exactly as the runner does; return (seconds, cpu seconds, rows per group)."""
    import numpy as np

    t0, c0 = time.perf_counter(), cpu_seconds()
    eng.set_sites([])
    eng.clear()
    for start in range(0, len(prefix), eng.n_batch):
        chunk = prefix[start : start + eng.n_batch]
        outputs = np.zeros(len(chunk), bool)
        outputs[-1] = True
        eng.decode(chunk, range(start, start + len(chunk)), [[0]] * len(chunk), outputs)
    eng.set_sites(sites)
    kept = []
    for b in batches:
        for s in b.seqs:
            eng.seq_copy(0, s)
        rows = []
        n = len(b.tokens)
        for a in range(0, n, eng.n_batch):
            z = min(n, a + eng.n_batch)
            r, _ = eng.decode(b.tokens[a:z], b.positions[a:z], b.seq_ids[a:z], b.outputs[a:z])
            rows.append(r)
        for s in b.seqs:
            eng.seq_remove(s)
        if b.pad_seq is not None:
            eng.seq_remove(b.pad_seq)
        if keep:
            kept.append(np.concatenate(rows, axis=1))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    eng.set_sites([])
    eng.clear()
    return seconds, cpu, kept


def lens_vs_matmul(lens, layers, groups_rows, batches, repeat: int) -> dict:
    """Time the lens on lcprobe's captured rows against numpy's matmul of the same shapes."""
    import numpy as np

    head = lens.unembed.head
    if head is None:  # the ggml backend keeps the head quantized: time BLAS on a float32 one of the same shape
        V, d = lens.unembed.n_vocab, groups_rows[0].shape[-1]
        head = np.random.default_rng(0).standard_normal((V, d), dtype=np.float32)
    V, d = head.shape
    step = lens._chunk_rows()
    n_rows = sum(h.shape[0] * h.shape[1] for h in groups_rows)
    flops = 2.0 * n_rows * V * d
    stacked = [np.ascontiguousarray(h.reshape(-1, d)) for h in groups_rows]
    lens_t, mm_t = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for hs, b in zip(groups_rows, batches):
            lens.token_log_probs(hs, layers, b.row_targets)
        lens_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x in stacked:
            for r0 in range(0, len(x), step):
                _ = x[r0 : r0 + step] @ head.T
        mm_t.append(time.perf_counter() - t0)
    lens_s, mm_s = min(lens_t), min(mm_t)
    return {"rows": n_rows, "chunk_rows": step, "gflop": flops / 1e9, "seconds_lens": lens_s,
            "seconds_matmul": mm_s, "gflops_lens": flops / lens_s / 1e9, "gflops_matmul": flops / mm_s / 1e9,
            "share_of_peak": mm_s / lens_s}


def agreement(a_scores, b_scores) -> dict:
    """How far two methods' per-layer scores are apart, and whether the same choices win."""
    import numpy as np

    diffs, same, acc_a, acc_b = [], [], [], []
    for a, b in zip(a_scores, b_scores):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diffs.append(float(np.abs(a - b).max()))
        same.append(a.argmax(0) == b.argmax(0))
    same = np.array(same)
    return {"max_abs_diff": max(diffs), "winner_agreement": float(same.mean()),
            "items_layers_differing": int((~same).sum()), "n_items": len(diffs)}


def per_layer_acc(scores, correct) -> list[float]:
    import numpy as np

    return [float(x) for x in np.mean([np.isin(np.asarray(s).argmax(0), c) for s, c in zip(scores, correct)], axis=0)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("-T", "--task", default="calc")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-c", "--ctx-size", type=int, default=2048)
    p.add_argument("-b", "--batch-size", type=int, default=512)
    p.add_argument("--lens-backend", choices=("numpy", "ggml"), default="numpy",
                   help="lcprobe's lens backend for (a) and (b) (default numpy)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of (a), (c) and the lens timing (min is kept)")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--hf-python", default=None, help="a Python with torch + transformers for column (d)")
    p.add_argument("--hf-limit", type=int, default=5, help="items for (d) (it takes ~20 s per item)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--hf-worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        return hf_worker(*args.hf_worker)
    if SHARED_DATA.exists():
        os.environ.setdefault("LCPROBE_DATA", str(SHARED_DATA))

    import numpy as np

    from lcprobe.files.catalog import resolve_model
    from lcprobe.llama.engine import Engine, EngineConfig, llama_cpp_version, set_llama_log
    from lcprobe.analysis.lens import Lens
    from lcprobe.llama.loader import open_model
    from lcprobe.probing.session import ProbeOptions, run_task
    from lcprobe.probing.runner import Prober
    from lcprobe.sites import parse_layers
    from lcprobe.tasks.task import load_task

    sys.path.insert(0, str(REPO / "tests"))
    from naive import naive_scores

    load_start = os.getloadavg()
    path = resolve_model(args.model)
    task = load_task(args.task)
    items = task.items(limit=args.limit, seed=args.seed)
    n = len(items)
    options = ProbeOptions(limit=args.limit, seed=args.seed, n_ctx=args.ctx_size, n_batch=args.batch_size,
                           n_threads=args.threads, lens_backend=args.lens_backend)
    tmp = Path(tempfile.mkdtemp(prefix="lcprobe-bench-"))
    set_llama_log(tmp / "llama.log")
    rss0 = current_rss()
    print(f"bench: {task.name}, {n} items, {path.name}, {args.threads} threads, repeat {args.repeat}, "
          f"{args.lens_backend} lens", flush=True)

    # (a) lcprobe end to end
    t0 = time.perf_counter()
    model = open_model(path, options)
    seconds_load = time.perf_counter() - t0
    info, eng = model.info, model.engine
    a_times, a_cpu, outcomes = [], [], []
    for r in range(args.repeat):
        t0, c0 = time.perf_counter(), cpu_seconds()
        outcomes.append(run_task(model, task, tmp / f"run{r}", options, items=items))
        a_times.append(time.perf_counter() - t0)
        a_cpu.append(cpu_seconds() - c0)
    rss_lcprobe = peak_rss()
    outcome = outcomes[int(np.argmin(a_times))]  # the least disturbed run, as for the total
    stats = outcome.stats
    lc_scores = [np.asarray(rec["logprobs"]) for rec in outcome.records]
    correct = [rec["correct"] for rec in outcome.records]
    a_s, a_c = min(a_times), min(a_cpu)
    print(f"(a) lcprobe: {a_s / n:.3f} s/question", flush=True)

    # (c) the same batches with and without capture, interleaved
    layers = parse_layers(options.layers, info.n_layer)
    lens = Lens(model.unembed, info.n_layer, options.lens)
    prober = Prober(eng, lens, layers, options.site)
    requests, _ = prober.encode(items)
    prefix_len, units, groups = prober.layout(requests)
    prefix = list(requests[0].context[:prefix_len])
    batches = [prober.batch(g, prefix_len) for g in groups]
    tokens_unique = prefix_len + sum(u.n_nodes for u in units)
    floor_t, capture_t, floor_c, capture_c, kept = [], [], [], [], None
    full_t = []  # llama.cpp's whole graph, its head on the output rows included (what lcprobe cuts)
    for r in range(max(args.repeat, 3)):
        w, c, _ = decode_batches(eng, prefix, batches, [])
        floor_t.append(w)
        floor_c.append(c)
        w, c, rows = decode_batches(eng, prefix, batches, prober.sites, keep=kept is None)
        capture_t.append(w)
        capture_c.append(c)
        kept = kept or rows
        eng.skip_head = False
        full_t.append(decode_batches(eng, prefix, batches, [])[0])
        eng.skip_head = True
    c_s, cap_s = min(floor_t), min(capture_t)
    print(f"(c) llama.cpp's full graph (its head on the {sum(int(b.outputs.sum()) for b in batches)} output rows): "
          f"{min(full_t):.3f} s; cut after the last block: {c_s:.3f} s ({c_s / min(full_t) - 1:+.1%})", flush=True)
    overhead = (cap_s - c_s) / c_s
    overhead_cpu = (min(capture_c) - min(floor_c)) / min(floor_c)
    print(f"(c) plain decode {c_s:.3f} s, with capture {cap_s:.3f} s: overhead {overhead:+.1%} "
          f"(CPU time {overhead_cpu:+.1%})", flush=True)
    # The same comparison on one thread: no thread synchronization at the extra
    # graph splits the capture causes, so what remains is the capture's own cost.
    one = EngineConfig(n_ctx=args.ctx_size, n_batch=args.batch_size, n_ubatch=args.batch_size,
                       n_seq_max=eng.n_seq_max, n_threads=1)
    floor1, capture1, floor1_c, capture1_c = [], [], [], []
    with Engine(info, one) as eng1:
        for r in range(max(args.repeat, 3)):
            w, c, _ = decode_batches(eng1, prefix, batches, [])
            floor1.append(w)
            floor1_c.append(c)
            w, c, _ = decode_batches(eng1, prefix, batches, prober.sites)
            capture1.append(w)
            capture1_c.append(c)
    overhead1 = (min(capture1_c) - min(floor1_c)) / min(floor1_c)
    print(f"    on 1 thread: plain {min(floor1):.3f} s, with capture {min(capture1):.3f} s; CPU time "
          f"{min(floor1_c):.3f} s vs {min(capture1_c):.3f} s: {overhead1:+.1%}", flush=True)
    lens_bench = lens_vs_matmul(lens, layers, kept, batches, max(args.repeat, 3))
    print(f"lens {lens_bench['gflops_lens']:.1f} GFLOP/s, numpy matmul {lens_bench['gflops_matmul']:.1f} GFLOP/s "
          f"({lens_bench['share_of_peak']:.0%})", flush=True)
    model.close()

    # (b) naive, in its own single-sequence context (its best case)
    naive, naive_cpu = None, None
    if not args.no_naive:
        ncfg = EngineConfig(n_ctx=args.ctx_size, n_batch=args.batch_size, n_ubatch=args.batch_size, n_seq_max=1,
                            n_threads=args.threads)
        with Engine(info, ncfg) as neng:
            c0 = cpu_seconds()
            naive = naive_scores(neng, lens, items, layers, options.site)
            naive_cpu = cpu_seconds() - c0
        print(f"(b) naive: {naive.seconds_total / n:.3f} s/question", flush=True)

    # (d) the paper's method
    paper, paper_note = None, ""
    if args.no_hf:
        paper_note = "skipped (--no-hf)"
    else:
        py, paper_note = find_hf_python(args.hf_python)
        if py:
            sub = items[: args.hf_limit]
            print(f"(d) paper's method via transformers on {len(sub)} items ({py}) ...", flush=True)
            try:
                paper = run_paper(py, path, sub, args.threads, timeout=3600)
                print(f"(d) paper: {paper['seconds_total'] / len(sub):.2f} s/question", flush=True)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                paper_note = f"failed: {str(exc)[-400:]}"
                paper = None

    load_end = os.getloadavg()
    # -- report ----------------------------------------------------------------------------
    head_bytes = 4 * info.n_vocab * info.n_embd
    rss_bound = info.size_bytes + head_bytes + TARGETS["rss_slack_bytes"]
    lc_q = a_s / n
    lc_c = a_c / n
    rows = [("(a) lcprobe", lc_q, lc_c, stats.tokens_decoded, stats.lens_rows, stats.seconds_decode,
             stats.seconds_lens)]
    if naive:
        rows.append(("(b) naive capture", naive.seconds_total / n, naive_cpu / n, naive.tokens_decoded,
                     naive.lens_rows, naive.seconds_decode, naive.seconds_lens))
    rows.append(("(c) plain decode, same batches", c_s / n, min(floor_c) / n, stats.tokens_decoded, 0, c_s, 0.0))
    if paper:
        k = len(paper["scores"])
        rows.append((f"(d) paper's method ({k} items)", paper["seconds_total"] / k, paper["cpu_total"] / k,
                     round(paper["tokens_decoded"] * n / k), None, None, None))
    print()
    print(f"{task.name}, {n} items x {len(items[0].choices)} choices, {info.name} ({info.file_type}), "
          f"{args.threads} threads, {args.lens_backend} lens, {dt.date.today()}, {cpu_name()}, "
          f"load avg {load_start[0]:.1f} -> {load_end[0]:.1f}")
    print()
    print("| method | s/question | lcprobe faster by | CPU s/question | by CPU time | tokens decoded | lens rows "
          "| decode s | lens s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, sq, cq, tok, lr, ds, ls in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {name} | {sq:.3f} | {sq / lc_q:.1f}x | {cq:.3f} | {cq / lc_c:.1f}x | {tok} | {fmt(lr, 'd')} "
              f"| {fmt(ds, '.2f')} | {fmt(ls, '.2f')} |")
    if not paper:
        print(f"| (d) paper's method | - | - | - | - | - | - | - | - |  {paper_note}")
    print()
    # the pads that align items' KV cells (batch-invariant scores) are not re-decoded work
    ratio_tokens = (stats.tokens_decoded - stats.tokens_padding) / tokens_unique
    checks = []
    if naive:
        checks.append(("lcprobe vs naive", naive.seconds_total / n / lc_q, ">=", TARGETS["vs_naive"], "x"))
        checks.append(("lcprobe vs naive, CPU time", naive_cpu / n / lc_c, ">=", TARGETS["vs_naive"], "x"))
    if paper:
        k = len(paper["scores"])
        checks.append(("lcprobe vs paper", paper["seconds_total"] / k / lc_q, ">=", TARGETS["vs_paper"], "x"))
        checks.append(("lcprobe vs paper, CPU time", paper["cpu_total"] / k / lc_c, ">=", TARGETS["vs_paper"], "x"))
    checks += [
        ("tokens decoded / unique", ratio_tokens, "<=", TARGETS["decoded_over_unique"], "x"),
        ("capture overhead", overhead, "<=", TARGETS["capture_overhead"], "%"),
        ("capture overhead, CPU time", overhead_cpu, "<=", TARGETS["capture_overhead"], "%"),
        ("capture overhead, 1 thread CPU time", overhead1, "<=", TARGETS["capture_overhead"], "%"),
        ("lens / numpy matmul peak", lens_bench["share_of_peak"], ">=", TARGETS["lens_share_of_peak"], "%"),
        ("peak RSS (MB) / bound", rss_lcprobe / 1e6, "<=", rss_bound / 1e6, "MB"),
    ]
    print("| target | measured | goal | met |")
    print("|---|---:|---:|:---:|")
    verdicts = {}
    for name, val, op, goal, unit in checks:
        ok = val >= goal if op == ">=" else val <= goal
        verdicts[name] = ok
        f = {"x": lambda v: f"{v:.2f}x", "%": lambda v: f"{v:+.1%}" if "overhead" in name else f"{v:.0%}",
             "MB": lambda v: f"{v:,.0f} MB"}[unit]
        print(f"| {name} | {f(val)} | {op} {f(goal)} | {'yes' if ok else 'NO'} |")
    print()
    print(f"tokens: {stats.tokens_decoded} decoded ({stats.tokens_padding} alignment pads), {tokens_unique} "
          f"unique (prefix {prefix_len} once, "
          f"{len(units)} tries), naive {naive.tokens_decoded if naive else '-'}")
    print(f"lens: {lens_bench['gflop']:.0f} GFLOP on {lens_bench['rows']} rows x {info.n_vocab} x {info.n_embd}, "
          f"{lens_bench['gflops_lens']:.1f} GFLOP/s vs numpy matmul {lens_bench['gflops_matmul']:.1f} GFLOP/s "
          f"(chunks of {lens_bench['chunk_rows']} rows)")
    print(f"peak RSS {rss_lcprobe / 1e6:,.0f} MB after lcprobe (RSS before loading {rss0 / 1e6:,.0f} MB); bound = "
          f"model {info.size_bytes / 1e6:,.0f} MB + float32 head {head_bytes / 1e6:,.0f} MB + 300 MB")
    agree = None
    if naive:
        agree = agreement(lc_scores, naive.scores)
        acc_lc, acc_nv = per_layer_acc(lc_scores, correct), per_layer_acc(naive.scores, correct)
        agree["max_layer_acc_diff"] = max(abs(x - y) for x, y in zip(acc_lc, acc_nv))
        print(f"lcprobe vs naive scores: max |diff| {agree['max_abs_diff']:.2e}, same winner at "
              f"{agree['winner_agreement']:.1%} of item x layer ({agree['items_layers_differing']} differ), "
              f"per-layer accuracy differs by at most {agree['max_layer_acc_diff']:.3f}")
    paper_agree = None
    if paper:
        k = len(paper["scores"])
        paper_agree = agreement(lc_scores[:k], paper["scores"])
        print(f"lcprobe vs paper's method ({k} items): max |diff| {paper_agree['max_abs_diff']:.2f}, same winner at "
              f"{paper_agree['winner_agreement']:.1%} of item x layer; transformers load {paper['seconds_load']:.1f} s")
    elif paper_note:
        print(f"paper's method: {paper_note}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    result = {
        "date": stamp, "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                                   "loadavg_start": load_start, "loadavg_end": load_end},
        "versions": {"llama_cpp_python": llama_cpp_version(), "numpy": np.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "model": {"path": str(path), "name": info.name, "file_type": info.file_type, "size_bytes": info.size_bytes,
                  "n_layer": info.n_layer, "n_embd": info.n_embd, "n_vocab": info.n_vocab},
        "task": task.name, "n_items": n, "threads": args.threads, "repeat": args.repeat,
        "lens_backend": args.lens_backend,
        "seconds_load": seconds_load,
        "lcprobe": {"seconds_per_question": lc_q, "cpu_per_question": lc_c, "runs": a_times, "runs_cpu": a_cpu, "tokens_decoded": stats.tokens_decoded,
                    "tokens_unique": tokens_unique, "prefix_tokens": prefix_len, "lens_rows": stats.lens_rows,
                    "seconds_decode": stats.seconds_decode, "seconds_lens": stats.seconds_lens,
                    "peak_rss": rss_lcprobe, "rss_bound": rss_bound, "groups": len(batches)},
        "naive": None if not naive else {
            "seconds_per_question": naive.seconds_total / n, "cpu_per_question": naive_cpu / n,
            "tokens_decoded": naive.tokens_decoded,
            "lens_rows": naive.lens_rows, "seconds_decode": naive.seconds_decode, "seconds_lens": naive.seconds_lens},
        "plain_decode": {"seconds_floor": floor_t, "seconds_capture": capture_t, "overhead": overhead,
                         "seconds_full_graph": full_t,
                         "cpu_floor": floor_c, "cpu_capture": capture_c, "overhead_cpu": overhead_cpu,
                         "one_thread": {"seconds_floor": floor1, "seconds_capture": capture1, "cpu_floor": floor1_c,
                                        "cpu_capture": capture1_c, "overhead_cpu": overhead1}},
        "lens": lens_bench,
        "paper": None if not paper else {k: v for k, v in paper.items() if k != "scores"} | {
            "n_items": len(paper["scores"]), "seconds_per_question": paper["seconds_total"] / len(paper["scores"])},
        "paper_note": paper_note,
        "agreement_naive": agree, "agreement_paper": paper_agree,
        "targets": {k: bool(v) for k, v in verdicts.items()},
    }
    out = out_dir / f"speed-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
