"""Steering vectors: made from contrastive prompt pairs, evaluated scale by scale.

:func:`make_vector` follows llama.cpp's ``cvector-generator``
(tools/cvector-generator): each pair is tokenized with BOS, the shorter prompt
is padded with the token of ``" "``, the block outputs of both are captured at
every position, their differences are kept where they are not all zero, and
per layer the direction is the normalised mean of the differences (``mean``)
or their first principal component (``pca``: the top eigenvector of D^T D,
uncentred, as its power iteration computes; lcprobe takes it from an SVD and
orients it along the mean difference, where cvector-generator's sign is that of
its random start). As in cvector-generator, the direction read at block K's
input (the output of 0-based block K-1) is stored as ``direction.K``, which
llama.cpp adds to block K's output: lcprobe layer K + 1.

:func:`evaluate` runs a task once per scale with the vector added (each its
own items.jsonl/summary.json), tests each layer's accuracy against scale 0
with McNemar's exact test, measures the final-layer KL of the next-token
distribution to the unsteered model on free prompts, and writes greedy
continuations of those prompts, so what the vector does can be read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcprobe.analysis import metrics
from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic
from lcprobe.interventions.apply import intervening
from lcprobe.interventions.cvec import ControlVector
from lcprobe.interventions.plan import Interventions, resolve
from lcprobe.llama.capture import Site
from lcprobe.llama.engine import Engine
from lcprobe.llama.loader import LoadedModel

STEER_JSON = "steer.json"
METHODS = ("mean", "pca")
DEFAULT_PROMPTS = ("I think that", "Tell me about your day.", "The best way to spend a weekend is",
                   "My opinion of the new restaurant:")


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str


def read_pairs(path: str | Path) -> list[Pair]:
    """``{"positive": ..., "negative": ...}`` per line of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise LcprobeError(f"no pairs file at {p}")
    pairs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pairs.append(Pair(str(rec["positive"]), str(rec["negative"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LcprobeError(f"{p}:{i}: expected {{\"positive\": ..., \"negative\": ...}}") from None
    if not pairs:
        raise LcprobeError(f"{p} holds no pairs")
    return pairs


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (a .jsonl file: strings or {"prompt": ...})."""
    p = Path(path)
    if not p.is_file():
        raise LcprobeError(f"no prompts file at {p}")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            rec = json.loads(line)
            out.append(rec["prompt"] if isinstance(rec, dict) else str(rec))
        else:
            out.append(line)
    if not out:
        raise LcprobeError(f"{p} holds no prompts")
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise LcprobeError("the positive and negative prompts give identical activations: no direction")
    return (v / norm).astype(np.float32)


def direction(diffs: np.ndarray, method: str) -> np.ndarray:
    """One unit direction from ``(n_rows, n_embd)`` differences."""
    d = np.asarray(diffs, np.float64)
    mean = d.mean(axis=0)
    if method == "mean":
        return _unit(mean)
    if method == "pca":
        _, _, vt = np.linalg.svd(d, full_matrices=False)
        v = vt[0]
        return _unit(v if float(v @ mean) >= 0 else -v)
    raise LcprobeError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def make_vector(engine: Engine, pairs: Sequence[Pair], method: str = "mean",
                layers: Sequence[int] | None = None, model_hint: str = "") -> ControlVector:
    """One direction per receiving layer (lcprobe layers 2..N; default all) from contrastive pairs."""
    if method not in METHODS:
        raise LcprobeError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    info = engine.info
    targets = list(range(2, info.n_layer + 1)) if layers is None else sorted(set(layers))
    if not targets or targets[0] < 2:
        raise LcprobeError("llama.cpp's control vectors reach layers 2..N only (its index 0 is never applied)")
    if not pairs:
        raise LcprobeError("no prompt pairs")
    read = [L - 1 for L in targets]  # resid_post of L-1 = block L's input
    engine.set_sites([Site(info.site_name("resid_post", L), info.n_embd) for L in read])
    pad = engine.tokenize(" ", add_special=False)[-1]
    diffs: list[list[np.ndarray]] = [[] for _ in read]
    try:
        for pair in pairs:
            pt, nt = engine.tokenize(pair.positive), engine.tokenize(pair.negative)
            m = max(len(pt), len(nt))
            pt, nt = pt + [pad] * (m - len(pt)), nt + [pad] * (m - len(nt))
            hp, _ = engine.decode_sequence(pt)
            hn, _ = engine.decode_sequence(nt)
            d = hp - hn
            for i in range(len(read)):
                keep = np.abs(d[i]).max(axis=1) > 1e-6
                diffs[i].append(d[i][keep])
    finally:
        engine.set_sites([])
    out = {}
    for L, ds in zip(targets, diffs):
        rows = np.concatenate(ds)
        if not len(rows):
            raise LcprobeError("the positive and negative prompts give identical activations: no direction")
        out[L] = direction(rows, method)
    return ControlVector.from_layers(out, model_hint)


# --- evaluation ---------------------------------------------------------------------------


def parse_scales(spec: str) -> list[float]:
    try:
        vals = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise LcprobeError(f"--scales {spec!r}: expected numbers like -4,-2,0,2,4") from None
    if not vals or not all(np.isfinite(vals)):
        raise LcprobeError(f"--scales {spec!r}: expected finite numbers like -4,-2,0,2,4")
    return list(dict.fromkeys(vals))


def restrict(cvec: ControlVector, layers: Sequence[int] | None) -> ControlVector:
    """The vector on the chosen receiving layers only (lcprobe layers)."""
    if layers is None:
        return cvec
    by_layer = cvec.layers()
    missing = [L for L in layers if L not in by_layer]
    if missing:
        raise LcprobeError(f"the vector has no direction for layer {missing[0]} (it has {min(by_layer)}..{max(by_layer)})")
    return ControlVector.from_layers({L: by_layer[L] for L in layers}, cvec.model_hint)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def prompt_logits(engine: Engine, tokens: Sequence[int], iv: Interventions | None) -> np.ndarray:
    with intervening(engine, iv):
        _, lg = engine.decode_sequence(tokens, want_logits=True)
    assert lg is not None
    return lg


def greedy(engine: Engine, tokens: Sequence[int], n_new: int, iv: Interventions | None) -> list[int]:
    """Greedy continuation with the steering applied at every position, the new ones included."""
    out: list[int] = []
    if n_new <= 0:
        return out
    toks = list(tokens)
    if len(toks) + n_new > engine.n_ctx:
        raise LcprobeError(f"prompt + {n_new} tokens do not fit the context of {engine.n_ctx}")
    engine.set_sites([])
    engine.clear()
    try:
        with intervening(engine, iv):
            n = len(toks)
            lg = None
            for a in range(0, n, engine.n_batch):
                b = min(n, a + engine.n_batch)
                _, lg = engine.decode(toks[a:b], range(a, b), [[0]] * (b - a),
                                      [False] * (b - a - 1) + [True], want_logits=True)
            for i in range(n_new):
                assert lg is not None
                t = int(np.argmax(lg[-1]))
                out.append(t)
                if i + 1 == n_new:
                    break
                _, lg = engine.decode([t], [n + i], [[0]], [True], want_logits=True)
    finally:
        engine.clear()
    return out


def evaluate(
    model: LoadedModel,
    cvec: ControlVector,
    scales: Sequence[float],
    task: Any,
    out_dir: str | Path,
    options: Any,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    n_new: int = 24,
    layers: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per scale: the task's per-layer metrics (McNemar against scale 0), the KL to the unsteered
    model on ``prompts``, and greedy continuations. Writes ``out_dir/steer.json``."""
    from lcprobe.probing.session import run_task

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eng, info = model.engine, model.info
    vec = restrict(cvec, layers)
    ivs = {s: resolve(info, add=vec, scale=s) if s != 0 else None for s in scales}  # checked before decoding
    all_scales = sorted(set(scales) | {0.0})
    prompt_tokens = [eng.tokenize(p) for p in prompts]
    base_logits = [prompt_logits(eng, t, None) for t in prompt_tokens]
    runs: dict[float, Any] = {}
    rows = []
    for s in all_scales:
        iv = ivs.get(s)
        if progress:
            progress(f"scale {s:g}: task {task.name}")
        with intervening(eng, iv):
            runs[s] = run_task(model, task, out / f"scale_{s:g}", options)
        # summary.json records the intervention's digest; the readable description goes beside it
        write_atomic(out / f"scale_{s:g}" / "intervention.json",
                     json.dumps({"scale": s, **(iv.describe() if iv is not None else {"edits": []})}, indent=1))
        kls, conts = [], []
        for p, toks, base in zip(prompts, prompt_tokens, base_logits):
            lg = base if iv is None else prompt_logits(eng, toks, iv)
            lp, lq = _log_softmax(base), _log_softmax(lg)
            kls.append(float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean()))
            cont = greedy(eng, toks, n_new, iv)
            conts.append({"prompt": p, "continuation": b"".join(eng.token_piece(t) for t in cont)
                          .decode("utf-8", "replace")})
        rows.append({"scale": s, "kl": float(np.mean(kls)), "kl_per_prompt": kls, "continuations": conts})
    base_items = runs[0.0].records
    base_acc = _per_item_acc(base_items)
    for row in rows:
        recs = runs[row["scale"]].records
        acc = _per_item_acc(recs)
        summ = runs[row["scale"]].summary
        row["layers"] = [{"layer": la["layer"], **{k: la.get(k) for k in ("acc", "mc1", "mc2")}}
                         for la in summ["layers"]]
        row["metric"] = summ.get("metric")
        row["best_layer"] = summ.get("best_layer")
        tests = []
        for li in range(acc.shape[1]):
            b, c = metrics.discordant_counts(base_acc[:, li], acc[:, li])
            tests.append({"b": b, "c": c, "p": metrics.mcnemar_exact(b, c)})
        row["mcnemar_vs_0"] = tests
        row["dir"] = f"scale_{row['scale']:g}"
    doc = {
        "model": str(info.path), "model_name": info.name, "sha256": model.sha256, "n_layer": info.n_layer,
        "task": task.name, "scales": all_scales,
        "vector": {"directions": list(vec.directions), "added_to_layers": sorted(vec.layers()),
                   "norms": [float(np.linalg.norm(v)) for v in vec.directions.values()],
                   "model_hint": vec.model_hint},
        "prompts": list(prompts), "n_new": n_new, "rows": rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "definitions": {
            "kl": "mean over prompt positions of KL(unsteered || steered) of llama.cpp's next-token distribution",
            "mcnemar_vs_0": "per layer: b = items right at scale 0 and wrong here, c = the reverse; p exact two-sided",
        },
    }
    write_atomic(out / STEER_JSON, json.dumps(doc, indent=1))
    return doc


def _per_item_acc(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n_items, n_layers) 0/1 accuracy, items in id order so scales pair up."""
    recs = sorted(records, key=lambda r: str(r["id"]))
    return np.stack([metrics.item_metrics(np.asarray(r["logprobs"]), r["correct"])["acc"] for r in recs])
