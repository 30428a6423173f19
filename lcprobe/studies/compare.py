"""Paired, layer-by-layer comparison of models against a reference (e.g. quantized copies of one model).

The measures (McNemar's exact test on paired items; KL, cosine, relative L2 and top-1 on the
scored rows), the output directory and the layout of compare.json: docs/compare.md. Quiet like
:mod:`lcprobe.probing.session`: the terminal display is a :class:`~lcprobe.probing.progress.StudyListener`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcprobe.analysis import metrics
from lcprobe.errors import LcprobeError
from lcprobe.analysis.lens import Lens, Unembed, kl_rows, log_softmax
from lcprobe.files.modelfile import ModelInfo, read_model_info, vocab_fingerprint
from lcprobe.studies.quantize import TypeMix, coverage_warning, type_mix
from lcprobe.results.compare import (ALPHA, COMPARE_SUMS, DEFAULT_KL_THRESHOLD, DEFAULT_MAX_ROWS, sums_key,
                                     write_compare, write_sums)
from lcprobe.results.run import layer_metrics
from lcprobe.probing.progress import StudyListener
from lcprobe.probing.runner import ItemResult
from lcprobe.sites import parse_layers
from lcprobe.llama.loader import LoadedModel, open_model
from lcprobe.results.lock import locks_output
from lcprobe.probing.session import ProbeOptions, run_task
from lcprobe.tasks.task import Item, Task

COMPARE_VERSION = 1
BINARY_METRICS = ("acc", "mc1", "acc_per_token", "acc_per_byte")
ROWS_DIR = ".ref_rows"

# Lens logits are computed this many bytes at a time (about four such float32 chunks live at once).
LENS_CHUNK_BYTES = 32 << 20


# --- planning ---------------------------------------------------------------------


@dataclass
class CompareModel:
    path: Path
    info: ModelInfo
    label: str  # column heading: the quantization, or the stem when that is ambiguous
    dir_name: str  # DIR/<dir_name>/<task>/
    representation: bool  # same depth and width as the reference: hidden states comparable
    mix: TypeMix
    warning: str | None = None  # the requested type covers little of the model

    @property
    def quant(self) -> str:
        return self.info.file_type


def check_tokenizers(infos: Sequence[ModelInfo]) -> None:
    """Raise unless every model shares the reference's vocabulary (same tokens, same ids)."""
    ref = infos[0]
    ref_fp: str | None = None
    for info in infos[1:]:
        if info.n_vocab != ref.n_vocab:
            raise LcprobeError(
                f"{info.path.name} has a different tokenizer from the reference {ref.path.name} "
                f"({info.n_vocab} vs {ref.n_vocab} tokens): compare needs models that read the same token "
                "streams (e.g. quantizations of one model, or sizes of one family)")
        if info.path == ref.path:
            continue
        ref_fp = ref_fp or vocab_fingerprint(ref.path)
        if vocab_fingerprint(info.path) != ref_fp:
            raise LcprobeError(
                f"{info.path.name} has a different tokenizer from the reference {ref.path.name} "
                f"(same size, {ref.n_vocab} tokens, but different token strings): compare needs models that "
                "read the same token streams")


def plan_models(paths: Sequence[str | Path]) -> list[CompareModel]:
    """Read and check every model file (no weights loaded); the first is the reference."""
    if len(paths) < 2:
        raise LcprobeError("compare needs a reference and at least one more model: -m REF -m MODEL [...]")
    infos = [read_model_info(p) for p in paths]
    check_tokenizers(infos)
    ref = infos[0]
    same_shape = [i.n_layer == ref.n_layer and i.n_embd == ref.n_embd for i in infos]
    # the quantization names a column well among copies of one model; across sizes the stem does
    labels = _unique([i.file_type for i in infos] if all(same_shape) else [i.stem for i in infos], sep="#")
    dirs = _unique([i.stem for i in infos], sep="-")
    out = []
    for info, label, d, same in zip(infos, labels, dirs, same_shape):
        out.append(CompareModel(info.path, info, label, d, same, type_mix(info), coverage_warning(info)))
    return out


def _unique(names: list[str], sep: str) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}{sep}{seen[n]}")
    return out


# --- the reference's rows on disk -------------------------------------------------


class RowStore:
    """The reference's scored rows, float16 on disk, at most ``max_rows`` of them.

    Layout ``(max_rows, n_layers, n_embd)`` so one item's rows are one
    contiguous block. Items are added in order until one does not fit.
    """

    def __init__(self, path: Path, n_layers: int, n_embd: int, max_rows: int) -> None:
        self.path = path
        self.max_rows = max_rows
        self.index: dict[str, tuple[int, int]] = {}
        self.n_rows = 0
        self.full = max_rows <= 0
        self._mm = None
        if max_rows > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                 shape=(max_rows, n_layers, n_embd))

    def add(self, item_id: str, rows: np.ndarray) -> bool:
        """Store ``rows`` (n_layers, n, n_embd); False when the budget is spent."""
        n = rows.shape[1]
        if self.full or self.n_rows + n > self.max_rows:
            self.full = True
            return False
        self._mm[self.n_rows:self.n_rows + n] = np.asarray(rows).transpose(1, 0, 2)
        self.index[item_id] = (self.n_rows, n)
        self.n_rows += n
        return True

    def get(self, item_id: str) -> np.ndarray | None:
        """``(n_layers, n, n_embd)`` float32, or None for an item beyond the budget."""
        if item_id not in self.index:
            return None
        start, n = self.index[item_id]
        return np.asarray(self._mm[start:start + n], dtype=np.float32).transpose(1, 0, 2)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.flush()
            del self._mm
            self._mm = None
        self.path.unlink(missing_ok=True)


# --- representation measures --------------------------------------------------------


REP_MEASURES = ("kl", "cosine", "rel_l2", "top1")


class RepStats:
    """Per-layer sums of KL, cosine, relative L2 and top-1 agreement over compared rows.

    With ``keep_items`` each item's sums are kept as well (``items``: id, rows,
    ``(4, n_layers)`` in :data:`REP_MEASURES` order), so that ``lcprobe merge``
    can re-add a shard's items in the unsharded run's order: float sums depend on it.
    """

    def __init__(self, n_layers: int, keep_items: bool = False) -> None:
        self.kl = np.zeros(n_layers)
        self.cosine = np.zeros(n_layers)
        self.rel_l2 = np.zeros(n_layers)
        self.top1 = np.zeros(n_layers)
        self.n_rows = 0
        self.n_items = 0
        self.seconds = 0.0
        self.items: list[tuple[str, int, np.ndarray]] | None = [] if keep_items else None

    def add(self, ref_rows: np.ndarray, rows: np.ndarray, ref_lens: Lens, lens: Lens, layers: Sequence[int],
            item_id: str | None = None) -> None:
        t0 = time.perf_counter()
        sums = representation_sums(ref_rows, rows, ref_lens, lens, layers)
        self.add_sums(sums, ref_rows.shape[1], item_id)
        self.seconds += time.perf_counter() - t0

    def add_sums(self, sums: dict[str, np.ndarray], n_rows: int, item_id: str | None = None) -> None:
        """Add one item's per-layer sums over its ``n_rows`` rows (what a merge re-adds)."""
        self.kl += sums["kl"]
        self.cosine += sums["cosine"]
        self.rel_l2 += sums["rel_l2"]
        self.top1 += sums["top1"]
        self.n_rows += n_rows
        self.n_items += 1
        if self.items is not None and item_id is not None:
            self.items.append((item_id, n_rows, np.stack([np.asarray(sums[k], np.float64) for k in REP_MEASURES])))

    def item_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The kept per-item sums as compare-sums.npz arrays named ``<prefix>.ids|rows|sums``."""
        items = self.items or []
        n_layers = len(self.kl)
        return {
            f"{prefix}.ids": np.asarray([i for i, _, _ in items], dtype=str),
            f"{prefix}.rows": np.asarray([n for _, n, _ in items], dtype=np.int64),
            f"{prefix}.sums": (np.stack([a for _, _, a in items]) if items
                               else np.zeros((0, len(REP_MEASURES), n_layers))),
        }

    def means(self) -> dict[str, np.ndarray]:
        if self.n_rows == 0:
            nan = np.full(self.kl.shape, np.nan)
            return {"kl": nan, "cosine": nan.copy(), "rel_l2": nan.copy(), "top1": nan.copy()}
        return {
            # float rounding can leave a tiny negative KL between near-identical distributions
            "kl": np.maximum(self.kl / self.n_rows, 0.0),
            "cosine": self.cosine / self.n_rows,
            "rel_l2": self.rel_l2 / self.n_rows,
            "top1": self.top1 / self.n_rows,
        }


def representation_sums(ref_rows: np.ndarray, rows: np.ndarray, ref_lens: Lens, lens: Lens,
                        layers: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-layer sums over rows of KL(ref || model), cosine, relative L2 error and top-1 agreement.

    ``ref_rows`` and ``rows`` are ``(n_layers, n, n_embd)`` hidden states of the
    same token positions; each side goes through its own lens.
    """
    if ref_rows.shape != rows.shape:
        raise LcprobeError(f"hidden rows differ in shape: reference {ref_rows.shape}, model {rows.shape}; "
                           "the models did not read the same token streams")
    n_layers, n, _ = ref_rows.shape
    r = ref_rows.astype(np.float64)
    m = rows.astype(np.float64)
    nr = np.linalg.norm(r, axis=-1)
    nm = np.linalg.norm(m, axis=-1)
    dots = np.einsum("lnd,lnd->ln", r, m)
    tiny = np.finfo(np.float64).tiny
    cos = np.where((nr > 0) & (nm > 0), dots / np.maximum(nr * nm, tiny), np.where(nr == nm, 1.0, 0.0))
    rel = np.linalg.norm(m - r, axis=-1) / np.maximum(nr, tiny)

    if ref_lens.unembed.n_vocab != lens.unembed.n_vocab:
        raise LcprobeError("the two lenses have different vocabularies")
    xr = np.concatenate([ref_lens.transform(ref_rows[i], layer) for i, layer in enumerate(layers)])
    xm = np.concatenate([lens.transform(rows[i], layer) for i, layer in enumerate(layers)])
    kl = np.empty(len(xr))
    top_rows = np.empty(len(xr))
    step = max(1, LENS_CHUNK_BYTES // (4 * ref_lens.unembed.n_vocab))
    for a in range(0, len(xr), step):
        b = min(len(xr), a + step)
        zr = ref_lens.unembed.logits(xr[a:b])
        zm = lens.unembed.logits(xm[a:b])
        top_rows[a:b] = zr.argmax(axis=1) == zm.argmax(axis=1)
        kl[a:b] = kl_rows(log_softmax(zr, out=zr), log_softmax(zm, out=zm))
        del zr, zm
    return {
        "kl": kl.reshape(n_layers, n).sum(axis=1),
        "cosine": cos.sum(axis=1),
        "rel_l2": rel.sum(axis=1),
        "top1": top_rows.reshape(n_layers, n).sum(axis=1),
    }


# --- paired task metrics -------------------------------------------------------------


def paired_metric(metric: str) -> str:
    """The binary per-item metric McNemar's test runs on for a task scored with ``metric``."""
    return metric if metric in BINARY_METRICS else "mc1"


def item_outcomes(records: Sequence[dict[str, Any]], metric: str) -> dict[str, np.ndarray]:
    """Item id -> per-layer value of ``metric`` for items.jsonl records."""
    out = {}
    for rec in records:
        m = metrics.item_metrics(np.asarray(rec["logprobs"], dtype=np.float64), rec["correct"],
                                 rec["n_tokens"], rec["n_bytes"])
        out[rec["id"]] = m[metric]
    return out


def paired_test(ref_outcomes: np.ndarray, outcomes: np.ndarray) -> tuple[float, int, int]:
    """McNemar's exact p, items gained (wrong -> right) and lost (right -> wrong) vs the reference."""
    lost, gained = metrics.discordant_counts(ref_outcomes, outcomes)
    return metrics.mcnemar_exact(lost, gained), gained, lost


def layer_map(ref_layers: Sequence[int], ref_n_layer: int, layers: Sequence[int], n_layer: int) -> list[int]:
    """For each of a model's layers, the index into ``ref_layers`` at the nearest relative depth."""
    if n_layer == ref_n_layer and list(layers) == list(ref_layers):
        return list(range(len(layers)))
    ref_depth = np.asarray(ref_layers, dtype=np.float64) / ref_n_layer
    return [int(np.argmin(np.abs(ref_depth - layer / n_layer))) for layer in layers]


def check_same_tokens(ref_records: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                      ref_name: str, name: str) -> None:
    """Raise unless both runs scored the same items with the same continuation token counts."""
    ref = {r["id"]: r["n_tokens"] for r in ref_records}
    cur = {r["id"]: r["n_tokens"] for r in records}
    if set(ref) != set(cur):
        odd = sorted(set(ref) ^ set(cur))
        raise LcprobeError(f"{name} and the reference {ref_name} scored different items "
                           f"(e.g. {odd[0]}): the token streams differ")
    for item_id, n in ref.items():
        if cur[item_id] != n:
            raise LcprobeError(f"{name} tokenizes item {item_id} differently from the reference {ref_name} "
                               f"(continuation tokens {cur[item_id]} vs {n})")


def _num(v: float | None, digits: int = 6) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(f"{v:.{digits}g}")


def model_task_entry(cm: CompareModel, ref: CompareModel, task: Task, run_dir: Path,
                     layers: list[int], records: list[dict[str, Any]],
                     ref_layers: list[int], ref_records: list[dict[str, Any]],
                     rep: RepStats | None, is_reference: bool) -> dict[str, Any]:
    """One model's per-layer comparison for one task (the keys: docs/compare.md)."""
    metric = task.metric
    pmetric = paired_metric(metric)
    values = layer_metrics(records, len(layers)).values[metric]
    ref_values = layer_metrics(ref_records, len(ref_layers)).values[metric]
    mapping = layer_map(ref_layers, ref.info.n_layer, layers, cm.info.n_layer)
    cur = item_outcomes(records, pmetric)
    base = item_outcomes(ref_records, pmetric)
    ids = sorted(base)
    cur_m = np.stack([cur[i] for i in ids]) if ids else np.zeros((0, len(layers)))
    ref_m = np.stack([base[i] for i in ids]) if ids else np.zeros((0, len(ref_layers)))
    rep_means = rep.means() if rep is not None else None
    rows = []
    for li, layer in enumerate(layers):
        ri = mapping[li]
        if is_reference:
            p, gained, lost = 1.0, 0, 0
        else:
            p, gained, lost = paired_test(ref_m[:, ri], cur_m[:, li])
        row: dict[str, Any] = {
            "layer": layer, "rel_depth": round(layer / cm.info.n_layer, 6), "ref_layer": ref_layers[ri],
            "metric": _num(float(values[li])), "ref_metric": _num(float(ref_values[ri])),
            "delta": 0.0 if is_reference else _num(float(values[li] - ref_values[ri])),
            "mcnemar_p": _num(p), "flips_gained": gained, "flips_lost": lost,
            "kl": None, "cosine": None, "rel_l2": None, "top1": None,
        }
        if is_reference and rep is not None and rep.n_rows:
            row.update(kl=0.0, cosine=1.0, rel_l2=0.0, top1=1.0)
        elif rep_means is not None and rep is not None and rep.n_rows:
            row.update({k: _num(float(rep_means[k][li])) for k in ("kl", "cosine", "rel_l2", "top1")})
        rows.append(row)
    best = layers[metrics.best_layer(values)] if records else None
    return {
        "path": str(cm.path), "quant": cm.quant, "label": cm.label, "reference": is_reference,
        "representation": cm.representation, "dir": str(run_dir), "n_layer": cm.info.n_layer,
        "bits_per_weight": round(cm.mix.bits_per_weight, 4),
        "rows_compared": rep.n_rows if rep is not None else 0,
        "seconds_representation": round(rep.seconds, 3) if rep is not None else 0.0,
        "best_layer": best, "best_value": _num(float(values[layers.index(best)])) if best is not None else None,
        "layers": rows,
    }


def verdict(entry: dict[str, Any], ref_entry: dict[str, Any], kl_threshold: float) -> dict[str, Any]:
    """Where a model starts to diverge and what that does to the task, in a few numbers."""
    layers = entry["layers"]
    kls = [(r["layer"], r["kl"]) for r in layers if r["kl"] is not None]
    first = next((layer for layer, kl in kls if kl > kl_threshold), None)
    worst = max(kls, key=lambda t: t[1]) if kls else (None, None)
    last = layers[-1]
    significant = [r["layer"] for r in layers if r["mcnemar_p"] is not None and r["mcnemar_p"] < ALPHA]
    return {
        "kl_threshold": kl_threshold,
        "first_kl_layer": first,
        "worst_kl": worst[1], "worst_kl_layer": worst[0],
        "final_kl": last["kl"],
        "best_layer": entry["best_layer"], "ref_best_layer": ref_entry["best_layer"],
        "n_layer": entry["n_layer"], "ref_n_layer": ref_entry["n_layer"],
        "final_delta": last["delta"], "final_p": last["mcnemar_p"],
        "final_flips_gained": last["flips_gained"], "final_flips_lost": last["flips_lost"],
        "significant_layers": significant,
    }


def verdict_line(entry: dict[str, Any], metric: str, paired: str | None = None) -> str:
    """``Q2_K: KL > 0.1 from layer 3 (worst 0.84 at 30, final 0.84); best layer 12 -> 14; ...``"""
    v = entry["verdict"]
    parts = []
    if v["worst_kl"] is None:
        parts.append("no representation metrics (different size)" if not entry["representation"]
                     else "no rows compared")
    else:
        when = (f"KL > {v['kl_threshold']:g} from layer {v['first_kl_layer']}" if v["first_kl_layer"] is not None
                else f"KL <= {v['kl_threshold']:g} at every layer")
        parts.append(f"{when} (worst {v['worst_kl']:.3g} at layer {v['worst_kl_layer']}, "
                     f"final {v['final_kl']:.3g})")
    if v.get("n_layer") != v.get("ref_n_layer"):
        parts.append(f"best layer {v['best_layer']}/{v['n_layer']} (reference {v['ref_best_layer']}/"
                     f"{v['ref_n_layer']})")
    elif v["best_layer"] == v["ref_best_layer"]:
        parts.append(f"best layer {v['best_layer']} (as the reference)")
    else:
        parts.append(f"best layer {v['ref_best_layer']} -> {v['best_layer']}")
    p = v["final_p"]
    sig = " *" if p is not None and p < ALPHA else ""
    on = f" on {paired}" if paired and paired != metric else ""
    parts.append(f"final layer Δ{metric} {v['final_delta']:+.3f} (p={p:.2g}{sig}{on}, "
                 f"+{v['final_flips_gained']}/-{v['final_flips_lost']} items)")
    if v["significant_layers"]:
        parts.append(f"p<{ALPHA:g} at layers {_ranges(v['significant_layers'])}")
    return f"{entry['label']} ({entry['bits_per_weight']:.2f} bpw): " + "; ".join(parts)


def _ranges(layers: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for x in list(layers) + [None]:
        if start is None:
            start = prev = x
        elif x is not None and x == prev + 1:
            prev = x
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = x
    return ",".join(out)


# --- running ---------------------------------------------------------------------------


@dataclass
class _RefTask:
    layers: list[int]
    records: list[dict[str, Any]]
    rows: RowStore | None
    entry: dict[str, Any]
    items: list[Item] = field(default_factory=list)


@locks_output("out_dir")
def run_compare(
    models: Sequence[CompareModel],
    tasks: Sequence[Task],
    out_dir: str | Path,
    options: ProbeOptions,
    max_rows: int = DEFAULT_MAX_ROWS,
    kl_threshold: float = DEFAULT_KL_THRESHOLD,
    listener: StudyListener | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run every task on every model (reference first) and compare; writes and returns compare.json.

    An interrupted comparison keeps the finished models and is marked
    ``"complete": false``; it cannot be resumed (the representation measures
    need the reference's rows, which live only for the duration of a run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lis = listener or StudyListener()
    ref = models[0]
    items = {t.name: t.items(limit=options.limit, seed=options.seed) for t in tasks}
    for t in tasks:
        if not items[t.name]:
            raise LcprobeError(f"task {t.name} has no items")
    result: dict[str, Any] = {
        "version": COMPARE_VERSION, "reference": str(ref.path), "complete": False,
        "options": {"limit": options.limit, "seed": options.seed, "layers": options.layers, "lens": options.lens,
                    "site": options.site, "max_rows": max_rows, "kl_threshold": kl_threshold, "alpha": ALPHA},
        "models": [_model_record(m) for m in models],
        "tasks": {t.name: {"metric": t.metric, "paired_metric": paired_metric(t.metric),
                           "n_items": None, "rows_compared": 0, "items_with_rows": 0, "models": []}
                  for t in tasks},
        "timing": {},
    }
    refs: dict[str, _RefTask] = {}
    ref_unembed: Unembed | None = None
    # a shard keeps its per-item sums for 'lcprobe merge' (compare-sums.npz)
    item_sums: dict[str, np.ndarray] | None = {} if options.shard else None
    task_index = {t.name: i for i, t in enumerate(tasks)}
    t_all = time.perf_counter()
    try:
        for index, cm in enumerate(models):
            if should_stop():
                break
            lis.model_start(cm, index)
            t_model = time.perf_counter()
            with open_model(cm.path, options, log_path=out / cm.dir_name / "llama.log") as lm:
                lis.model_loaded(cm, lm.seconds_load)
                if index == 0:
                    ref_unembed = lm.unembed  # kept after the engine closes: KL needs the reference's head
                stopped = False
                for task in tasks:
                    run_dir = out / cm.dir_name / task.name
                    lis.task_start(cm, task, len(items[task.name]))
                    if index == 0:
                        entry, stopped = _run_reference(lm, cm, task, items[task.name], run_dir, options,
                                                        max_rows, out / ROWS_DIR, refs, lis, should_stop)
                    else:
                        assert ref_unembed is not None
                        entry, stopped, rep = _run_model(lm, cm, ref, task, items[task.name], run_dir, options,
                                                         refs[task.name], ref_unembed, lis, should_stop,
                                                         keep_items=item_sums is not None)
                        if not stopped and rep is not None and item_sums is not None:
                            item_sums.update(rep.item_arrays(sums_key(task_index[task.name], index)))
                    if stopped:
                        break
                    tr = result["tasks"][task.name]
                    tr["models"].append(entry)
                    if index == 0:
                        tr["n_items"] = len(refs[task.name].records)
                        store = refs[task.name].rows
                        tr["rows_compared"] = store.n_rows if store else 0
                        tr["items_with_rows"] = len(store.index) if store else 0
                    else:
                        entry["verdict"] = verdict(entry, tr["models"][0], kl_threshold)
                    lis.task_done(cm, task, entry)
            result["timing"][cm.label] = round(time.perf_counter() - t_model, 3)
            if stopped:
                break
        else:
            result["complete"] = True
    finally:
        for r in refs.values():
            if r.rows is not None:
                r.rows.close()
        shutil.rmtree(out / ROWS_DIR, ignore_errors=True)
    result["timing"]["total"] = round(time.perf_counter() - t_all, 3)
    if item_sums is not None:
        write_sums(out, item_sums)  # before compare.json, whose "complete" vouches for both
    else:
        (out / COMPARE_SUMS).unlink(missing_ok=True)  # a shard's, left in this directory before
    write_compare(out, result)
    return result


def _model_record(m: CompareModel) -> dict[str, Any]:
    return {
        "path": str(m.path), "label": m.label, "quant": m.quant, "dir": m.dir_name, "arch": m.info.arch,
        "n_layer": m.info.n_layer, "n_embd": m.info.n_embd, "size_bytes": m.info.size_bytes,
        "bits_per_weight": round(m.mix.bits_per_weight, 4), "type_mix": m.mix.as_dict(),
        "representation": m.representation, "warning": m.warning,
        "note": None if m.representation else
        "different depth/width from the reference: layers matched on relative depth, representation metrics skipped",
    }


def _run_reference(lm: LoadedModel, cm: CompareModel, task: Task, items: list[Item], run_dir: Path,
                   options: ProbeOptions, max_rows: int, rows_dir: Path, refs: dict[str, _RefTask],
                   lis: StudyListener, should_stop: Callable[[], bool]) -> tuple[dict[str, Any], bool]:
    layers = parse_layers(options.layers, lm.info.n_layer)
    store = RowStore(rows_dir / f"{task.name}.npy", len(layers), lm.info.n_embd, max_rows)

    def keep(results: list[ItemResult], rows: np.ndarray) -> None:
        for r in results:
            store.add(r.id, rows)

    outcome = run_task(lm, task, run_dir, options, items=items, progress=lis.task_progress,
                       should_stop=should_stop, on_rows=keep)
    refs[task.name] = _RefTask(layers, outcome.records, store, {}, items)
    if outcome.interrupted:
        return {}, True
    rep = RepStats(len(layers))
    rep.n_rows = store.n_rows
    entry = model_task_entry(cm, cm, task, run_dir, layers, outcome.records, layers, outcome.records,
                             rep, is_reference=True)
    refs[task.name].entry = entry
    return entry, False


def _run_model(lm: LoadedModel, cm: CompareModel, ref: CompareModel, task: Task, items: list[Item],
               run_dir: Path, options: ProbeOptions, ref_task: _RefTask, ref_unembed: Unembed,
               lis: StudyListener, should_stop: Callable[[], bool],
               keep_items: bool = False) -> tuple[dict[str, Any], bool, RepStats | None]:
    layers = parse_layers(options.layers, lm.info.n_layer)
    rep: RepStats | None = None
    on_rows = None
    if cm.representation and ref_task.rows is not None and ref_task.rows.n_rows:
        rep = RepStats(len(layers), keep_items=keep_items)
        ref_lens = Lens(ref_unembed, ref.info.n_layer, options.lens)
        lens = Lens(lm.unembed, lm.info.n_layer, options.lens)
        store = ref_task.rows

        def on_rows(results: list[ItemResult], rows: np.ndarray) -> None:
            for r in results:
                ref_rows = store.get(r.id)
                if ref_rows is None:
                    continue
                if ref_rows.shape[1] != rows.shape[1]:
                    raise LcprobeError(
                        f"{cm.path.name} scored {rows.shape[1]} rows for item {r.id}, the reference "
                        f"{ref_rows.shape[1]}: the models did not read the same token streams")
                # both sides float16, so identical models compare exactly equal
                cur = rows.astype(np.float16).astype(np.float32)
                rep.add(ref_rows, cur, ref_lens, lens, layers, item_id=r.id)

    outcome = run_task(lm, task, run_dir, options, items=items, progress=lis.task_progress,
                       should_stop=should_stop, on_rows=on_rows)
    if outcome.interrupted:
        return {}, True, rep
    check_same_tokens(ref_task.records, outcome.records, ref.path.name, cm.path.name)
    entry = model_task_entry(cm, ref, task, run_dir, layers, outcome.records, ref_task.layers,
                             ref_task.records, rep, is_reference=False)
    return entry, False, rep


# --- output ------------------------------------------------------------------------------


# --- table rows for displays -----------------------------------------------------------------


def table_bins(task_result: dict[str, Any], max_rows: int = 32) -> list[dict[str, Any]]:
    """Rows of a layer x model table: single layers, or bins when deep or of mixed depth.

    Models of the reference's depth: one row per reference layer (bins of
    equal width beyond ``max_rows`` layers). Mixed depths: ten bins of
    relative depth. Each row: ``label``, ``ref_metric`` (mean) and per model
    label ``delta`` (mean), ``significant`` (any layer with p < 0.05), ``kl`` (mean).
    """
    models = task_result["models"]
    ref = models[0]
    same = all(len(m["layers"]) == len(ref["layers"]) and m["n_layer"] == ref["n_layer"] for m in models)
    if same:
        n = len(ref["layers"])
        width = max(1, math.ceil(n / max_rows))
        groups = [list(range(i, min(n, i + width))) for i in range(0, n, width)]
        bins = []
        for g in groups:
            first, last = ref["layers"][g[0]]["layer"], ref["layers"][g[-1]]["layer"]
            bins.append((str(first) if first == last else f"{first}-{last}", {m["label"]: g for m in models}))
    else:
        bins = []
        for b in range(10):
            lo, hi = b / 10, (b + 1) / 10
            sel = {m["label"]: [i for i, r in enumerate(m["layers"]) if lo < r["rel_depth"] <= hi + 1e-9]
                   for m in models}
            bins.append((f"{round(hi * 100)}%", sel))
    rows = []
    for label, sel in bins:
        if not any(sel.values()):
            continue  # a relative-depth bin none of the models has a layer in
        ref_idx = sel[ref["label"]]
        row: dict[str, Any] = {"label": label,
                               "ref_metric": _mean([ref["layers"][i]["metric"] for i in ref_idx]),
                               "models": {}}
        for m in models:
            idx = sel[m["label"]]
            ps = [m["layers"][i]["mcnemar_p"] for i in idx if m["layers"][i]["mcnemar_p"] is not None]
            row["models"][m["label"]] = {
                "delta": _mean([m["layers"][i]["delta"] for i in idx]),
                "significant": any(p < ALPHA for p in ps),
                "kl": _mean([m["layers"][i]["kl"] for i in idx]),
                "n_layers": len(idx),
            }
        rows.append(row)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
