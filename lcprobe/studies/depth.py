"""How a model uses its depth (Csordás et al. 2025): sublayer contributions, the logit lens
per layer, layer skipping inside llama.cpp's forward pass, and linear maps between two models' layers.

The definitions, the conventions and why the transition marker is defined as it is: docs/depth.md.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcprobe.llama.capture import Site
from lcprobe.llama.engine import Engine
from lcprobe.analysis.lens import Lens, kl_rows, log_softmax
from lcprobe.files.modelfile import ModelInfo

SUBLAYER_METRICS = ("attn_rel", "mlp_rel", "layer_rel", "attn_cos", "mlp_cos")
LENS_METRICS = ("lens_kl", "lens_top5")
METRICS = SUBLAYER_METRICS + LENS_METRICS

#: Extra per-layer keys in depth.json, one per metric.
SPREAD_KEYS = ("std", "p10", "median", "p90")

TOP_K = 5

# Bytes of one vocabulary-wide float32 block in the lens; three such blocks
# are alive at once.
LENS_BLOCK_BYTES = 128 << 20

Progress = Callable[[int, int, int], None]  # (windows done, windows total, tokens done)


# --- capture ------------------------------------------------------------------


def stream_sites(info: ModelInfo) -> list[Site]:
    """The layer-1 input and every block output: rows[l] is h_{l+1}, l = 0..N."""
    return [Site(info.spec.embed, info.n_embd)] + [
        Site(info.site_name("resid_post", layer), info.n_embd) for layer in range(1, info.n_layer + 1)
    ]


def residual_sites(info: ModelInfo) -> list[Site]:
    """:func:`stream_sites` then the residual after attention of layers 1..N."""
    return stream_sites(info) + [
        Site(info.site_name("resid_mid", layer), info.n_embd) for layer in range(1, info.n_layer + 1)
    ]


@dataclass
class Stream:
    """One window's residual stream. ``h[0]`` is the layer-1 input, ``h[l]``
    the output of layer l (1-based); ``mid[l-1]`` the residual after layer
    l's attention."""

    h: np.ndarray  # (N+1, n, d)
    mid: np.ndarray | None = None  # (N, n, d)

    @classmethod
    def from_rows(cls, rows: np.ndarray, n_layer: int) -> "Stream":
        """Split rows captured with :func:`residual_sites` (or :func:`stream_sites`)."""
        mid = rows[n_layer + 1:] if rows.shape[0] == 2 * n_layer + 1 else None
        return cls(rows[: n_layer + 1], mid)

    @property
    def n_layer(self) -> int:
        return self.h.shape[0] - 1

    def attn(self, layer: int) -> np.ndarray:
        """a_l for 1-based ``layer``."""
        return self.mid[layer - 1] - self.h[layer - 1]

    def mlp(self, layer: int) -> np.ndarray:
        """m_l for 1-based ``layer``."""
        return self.h[layer] - self.mid[layer - 1]


def decode_window(engine: Engine, tokens: Sequence[int], seq: int = 0) -> np.ndarray:
    """Decode ``tokens`` at positions 0.. in ``seq``, all positions outputs.

    Unlike ``Engine.decode_sequence`` the cache is neither cleared before nor
    after, so later decodes can build on it.
    """
    rows = []
    for start in range(0, len(tokens), engine.n_batch):
        stop = min(start + engine.n_batch, len(tokens))
        r, _ = engine.decode(tokens[start:stop], range(start, stop), [[seq]] * (stop - start),
                             np.ones(stop - start, bool))
        rows.append(r)
    return np.concatenate(rows, axis=1)


# --- per-token metrics ----------------------------------------------------------


def _norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def sublayer_metrics(stream: Stream) -> dict[str, np.ndarray]:
    """The five per-token contribution metrics, each ``(N, n)`` float32."""
    if stream.mid is None:
        raise ValueError("sublayer metrics need the residual after attention (resid_mid)")
    n_layer, n = stream.n_layer, stream.h.shape[1]
    out = {k: np.empty((n_layer, n), np.float32) for k in SUBLAYER_METRICS}
    for li in range(n_layer):
        h, mid, post = stream.h[li], stream.mid[li], stream.h[li + 1]
        a, m, c = mid - h, post - mid, post - h
        nh, nmid, na, nm = _norm(h), _norm(mid), _norm(a), _norm(m)
        out["attn_rel"][li] = _ratio(na, nh)
        out["mlp_rel"][li] = _ratio(nm, nmid)
        out["layer_rel"][li] = _ratio(_norm(c), nh)
        out["attn_cos"][li] = _ratio(np.einsum("nd,nd->n", a, h, dtype=np.float64), na * nh)
        out["mlp_cos"][li] = _ratio(np.einsum("nd,nd->n", m, mid, dtype=np.float64), nm * nmid)
    return out


def top_k(z: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of each row's k largest values, ``(n, k)``; ``z`` is left as it was.

    k passes of argmax beat argpartition over a 262144-wide vocabulary by an
    order of magnitude.
    """
    rows = np.arange(z.shape[0])
    idx = np.empty((z.shape[0], k), np.int64)
    saved = np.empty((z.shape[0], k), z.dtype)
    for j in range(k):
        idx[:, j] = z.argmax(axis=1)
        saved[:, j] = z[rows, idx[:, j]]
        z[rows, idx[:, j]] = -np.inf
    for j in range(k):
        z[rows, idx[:, j]] = saved[:, j]
    return idx


def lens_metrics(lens: Lens, h: np.ndarray, block_bytes: int = LENS_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """KL(final || layer) and top-5 overlap for rows of every layer.

    ``h`` is ``(N+1, n, d)`` as in :class:`Stream` (``h[0]`` is unused).
    Returns two ``(N, n)`` float32 arrays; the final layer's probabilities
    are computed once per block of rows and reused for every layer's KL.
    """
    n_layer = h.shape[0] - 1
    n = h.shape[1]
    unembed = lens.unembed
    kl = np.zeros((n_layer, n), np.float32)
    overlap = np.ones((n_layer, n), np.float32)
    step = max(1, block_bytes // (4 * unembed.n_vocab))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        logp = unembed.logits(lens.transform(h[n_layer, r0:r1], n_layer))
        log_softmax(logp, out=logp)
        p = np.exp(logp)
        final_top = top_k(logp)
        for layer in range(1, n_layer):
            z = unembed.logits(lens.transform(h[layer, r0:r1], layer))
            top = top_k(z)
            kl[layer - 1, r0:r1] = kl_rows(logp, log_softmax(z, out=z), p=p)
            del z
            overlap[layer - 1, r0:r1] = (top[:, :, None] == final_top[:, None, :]).any(-1).sum(-1) / TOP_K
    return kl, overlap


# --- aggregation ------------------------------------------------------------------


def _stat(values: np.ndarray, what: str) -> float | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    if what == "mean":
        return float(v.mean(dtype=np.float64))
    if what == "std":
        return float(v.std(dtype=np.float64))
    q = {"p10": 10, "median": 50, "p90": 90}[what]
    return float(np.percentile(v, q))


class DepthAccumulator:
    """Per-token metric values over windows; summaries per layer at the end."""

    def __init__(self, n_layer: int) -> None:
        self.n_layer = n_layer
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}

    def add(self, metrics: dict[str, np.ndarray]) -> None:
        for k, v in metrics.items():
            if v.shape[0] != self.n_layer:
                raise ValueError(f"{k}: {v.shape[0]} layers, expected {self.n_layer}")
            self._parts[k].append(np.asarray(v, np.float32))

    def values(self, metric: str) -> np.ndarray:
        """``(N, n_tokens)`` values of one metric (n_tokens may differ per metric)."""
        parts = self._parts[metric]
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.n_layer, 0), np.float32)

    def n_tokens(self, metric: str) -> int:
        return sum(p.shape[1] for p in self._parts[metric])

    def layer_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [{"layer": layer} for layer in range(1, self.n_layer + 1)]
        for metric in METRICS:
            vals = self.values(metric)
            for li, row in enumerate(rows):
                row[metric] = _stat(vals[li], "mean")
                for what in SPREAD_KEYS:
                    row[f"{metric}_{what}"] = _stat(vals[li], what)
        return rows


def transition_layer(lens_kl: Sequence[float | None], fraction: float = 0.5) -> int | None:
    """First layer of the second half (the rule and why: docs/depth.md), or None.

    ``lens_kl`` holds the per-layer means for layers 1..N: the result is the
    smallest L >= 2 with lens_kl <= ``fraction`` x its peak over layers 2..N
    at L and every later layer.
    """
    vals = np.array([np.nan if v is None else v for v in lens_kl], np.float64)
    if len(vals) < 3 or not np.all(np.isfinite(vals[1:])):
        return None
    limit = fraction * vals[1:].max()
    above = np.nonzero(vals[1:] > limit)[0]
    return 2 if len(above) == 0 else int(above[-1]) + 3


def contribution_contrast(layer_rel: Sequence[float | None], first_second: int | None) -> dict[str, float | None]:
    """Typical layer_rel before and after the transition L, and after/before.

    "Before" is the median over layers 2..L-1 of the per-layer means, "after"
    over layers L..N; medians, so one spiking layer does not decide it.
    """
    vals = np.array([np.nan if v is None else v for v in layer_rel], np.float64)
    if first_second is None or first_second < 3:
        return {"layer_rel_before": None, "layer_rel_after": None, "layer_rel_after_over_before": None}
    before = float(np.nanmedian(vals[1:first_second - 1]))
    after = float(np.nanmedian(vals[first_second - 1:]))
    return {"layer_rel_before": before, "layer_rel_after": after,
            "layer_rel_after_over_before": after / before if before > 0 else None}


# --- the depth statistics over a corpus ----------------------------------------------


@dataclass
class DepthResult:
    layers: list[dict[str, Any]]
    n_tokens: int
    n_lens_tokens: int
    n_windows: int
    tokens_decoded: int
    transition_layer: int | None
    seconds_decode: float
    seconds_lens: float
    seconds_metrics: float
    interrupted: bool = False
    accumulator: DepthAccumulator | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        n_layer = len(self.layers)
        return {
            "layers": self.layers,
            "n_layer": n_layer,
            "n_tokens": self.n_tokens,
            "n_lens_tokens": self.n_lens_tokens,
            "n_windows": self.n_windows,
            "tokens_decoded": self.tokens_decoded,
            "transition_layer": self.transition_layer,
            "transition_rel_depth": (round(self.transition_layer / n_layer, 4)
                                     if self.transition_layer else None),
            "transition_rule": "first layer L with mean lens_kl <= 0.5 x its peak over layers 2..N "
                               "at L and every later layer",
            **contribution_contrast([r["layer_rel"] for r in self.layers], self.transition_layer),
            "excluded_positions": "position 0 of each window",
            "timing": {"decode": round(self.seconds_decode, 3), "lens": round(self.seconds_lens, 3),
                       "metrics": round(self.seconds_metrics, 3)},
            "interrupted": self.interrupted,
        }


def lens_positions(windows: Sequence[Sequence[int]], lens_tokens: int) -> list[np.ndarray]:
    """Per window, the positions (>= 1) that get the lens: every k-th counted position overall."""
    total = sum(max(len(w) - 1, 0) for w in windows)
    stride = max(1, math.ceil(total / max(lens_tokens, 1))) if lens_tokens > 0 else 0
    out, g = [], 0
    for w in windows:
        n = max(len(w) - 1, 0)
        if stride == 0:
            out.append(np.zeros(0, np.int64))
        else:
            first = (-g) % stride  # first counted index in this window on the grid
            out.append(np.arange(first, n, stride, dtype=np.int64) + 1)
        g += n
    return out


def run_depth(
    engine: Engine,
    lens: Lens,
    windows: Sequence[Sequence[int]],
    lens_tokens: int = 1024,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> DepthResult:
    """Contribution and lens statistics over ``windows``, one window at a time."""
    info = engine.info
    engine.set_sites(residual_sites(info))
    acc = DepthAccumulator(info.n_layer)
    picks = lens_positions(windows, lens_tokens)
    t_dec = t_lens = t_met = 0.0
    tokens = decoded = n_done = 0
    interrupted = False
    for wi, window in enumerate(windows):
        if should_stop():
            interrupted = True
            break
        t0 = time.perf_counter()
        engine.clear()
        rows = decode_window(engine, window)
        engine.clear()
        t1 = time.perf_counter()
        stream = Stream.from_rows(rows[:, 1:], info.n_layer)
        acc.add(sublayer_metrics(stream))
        t2 = time.perf_counter()
        if len(picks[wi]):
            kl, top5 = lens_metrics(lens, rows[: info.n_layer + 1, picks[wi]])
            acc.add({"lens_kl": kl, "lens_top5": top5})
        t3 = time.perf_counter()
        t_dec += t1 - t0
        t_met += t2 - t1
        t_lens += t3 - t2
        tokens += len(window) - 1
        decoded += len(window)
        n_done += 1
        if progress:
            progress(wi + 1, len(windows), tokens)
    layers = acc.layer_rows()
    return DepthResult(
        layers=layers, n_tokens=tokens, n_lens_tokens=acc.n_tokens("lens_kl"), n_windows=n_done,
        tokens_decoded=decoded, transition_layer=transition_layer([r["lens_kl"] for r in layers]),
        seconds_decode=t_dec, seconds_lens=t_lens, seconds_metrics=t_met, interrupted=interrupted,
        accumulator=acc,
    )


# --- layer skipping -------------------------------------------------------------------


def skip_patch(info: ModelInfo, layer: int) -> tuple[str, str]:
    """The capture patch that skips 1-based ``layer``: its output := its input."""
    return info.site_name("resid_post", layer), info.site_name("resid_pre", layer)


def parse_skip(spec: str, n_layer: int) -> list[int]:
    """``all``, one layer or a list/range like ``1,5:8,-1`` (1-based)."""
    from lcprobe.sites import parse_layers

    return parse_layers(spec, n_layer)


def later_change(h: np.ndarray, h_skip: np.ndarray, layer: int) -> np.ndarray:
    """||Δ(a_l + m_l)|| / ||a_l + m_l|| per layer l = 1..N and position, ``(N, n)``.

    ``h_skip`` is the stream captured with ``layer`` skipped; its row
    ``layer`` holds what the block computed before the patch replaced it, so
    it is set to the block's input here. Row ``layer - 1`` of the result is
    NaN (that layer's contribution is removed, not changed).
    """
    n_layer = h.shape[0] - 1
    skipped = list(h_skip)
    skipped[layer] = h_skip[layer - 1]
    out = np.full((n_layer, h.shape[1]), np.nan)
    for li in range(n_layer):
        if li + 1 != layer:
            c = h[li + 1] - h[li]
            out[li] = _ratio(_norm(skipped[li + 1] - skipped[li] - c), _norm(c))
    return out


def position_log_probs(
    engine: Engine, tokens: Sequence[int], positions: Sequence[int], horizon: int,
    patch: tuple[str, str] | None,
) -> np.ndarray:
    """Next-token log-probabilities at t..t+horizon for each t in ``positions``.

    Sequence 0 must hold the normal KV cache of ``tokens``. Sequence k+1 gets
    positions < t_k from it, then token t_k decoded alone with ``patch``
    applied (all t_k in one batch), then the following ``horizon`` tokens
    decoded normally. Returns ``(K, 1 + horizon, vocab)`` float32.
    """
    k = len(positions)
    if k + 1 > engine.n_seq_max:
        raise ValueError(f"{k} intervention positions need n_seq_max >= {k + 1}")
    for i, t in enumerate(positions):
        engine.seq_remove(i + 1)
        engine.seq_copy(0, i + 1)
        engine.seq_remove(i + 1, int(t), -1)
    out = np.empty((k, 1 + horizon, engine.n_vocab), np.float32)
    engine.capture.set_patches([patch] if patch else [])
    try:
        _, logits = engine.decode([tokens[t] for t in positions], list(positions),
                                  [[i + 1] for i in range(k)], np.ones(k, bool), want_logits=True)
    finally:
        engine.capture.set_patches([])
    out[:, 0] = logits
    if horizon:
        toks, pos, seqs, where = [], [], [], []
        for i, t in enumerate(positions):
            for f in range(1, horizon + 1):
                toks.append(tokens[t + f])
                pos.append(t + f)
                seqs.append([i + 1])
                where.append((i, f))
        for s in range(0, len(toks), engine.n_batch):
            e = min(len(toks), s + engine.n_batch)
            _, logits = engine.decode(toks[s:e], pos[s:e], seqs[s:e], np.ones(e - s, bool), want_logits=True)
            for (i, f), row in zip(where[s:e], logits):
                out[i, f] = row
    for i in range(k):
        engine.seq_remove(i + 1)
    for row in out.reshape(-1, out.shape[-1]):  # row by row: no second array of this size
        log_softmax(row, out=row)
    return out


def intervention_positions(n: int, count: int, horizon: int) -> np.ndarray:
    """Up to ``count`` evenly spaced positions t in 1..n-1-horizon."""
    last = n - 1 - horizon
    if last < 1 or count < 1:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(1, last, count).round().astype(np.int64))


@dataclass
class SkipResult:
    skipped: list[int]
    n_layer: int
    later_change_max: np.ndarray  # (n_skip, N), NaN at l = S
    later_change_mean: np.ndarray
    output_kl_current: np.ndarray  # (n_skip,)
    output_kl_future: np.ndarray
    output_kl_future_by_offset: np.ndarray  # (n_skip, horizon)
    n_tokens: int
    n_interventions: int
    horizon: int
    seconds: float
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        def cells(a: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        def flat(a: np.ndarray) -> list:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "skipped": self.skipped,
            "layers": list(range(1, self.n_layer + 1)),
            "later_change_max": cells(self.later_change_max),
            "later_change_mean": cells(self.later_change_mean),
            "output_kl_current": flat(self.output_kl_current),
            "output_kl_future": flat(self.output_kl_future),
            "output_kl_future_by_offset": cells(self.output_kl_future_by_offset),
            "n_tokens": self.n_tokens,
            "n_interventions": self.n_interventions,
            "horizon": self.horizon,
            "definitions": {
                "later_change": "||Δ(a_l+m_l)|| / ||a_l+m_l|| per position with layer S skipped at every "
                                "position; max and mean over positions >= 1 of every window",
                "output_kl_current": "KL(normal || layer S skipped at position t only) of the next-token "
                                     "distribution at t, mean over intervention positions t",
                "output_kl_future": "the same KL at positions t+1..t+horizon (no skip there; they see it "
                                    "through attention to t), mean over t and offsets",
            },
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }


def run_skip(
    engine: Engine,
    windows: Sequence[Sequence[int]],
    layers: Sequence[int],
    positions: int = 8,
    horizon: int = 8,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> SkipResult:
    """Skip each of ``layers`` in turn over ``windows`` (the measures: docs/depth.md).

    The engine needs ``n_ctx >= window + positions * (1 + horizon)`` and
    ``n_seq_max >= positions + 1``.
    """
    t_start = time.perf_counter()
    info = engine.info
    n_layer = info.n_layer
    layers = list(layers)
    n_s = len(layers)
    cmax = np.zeros((n_s, n_layer))
    csum = np.zeros((n_s, n_layer))
    kl_cur = np.zeros(n_s)
    kl_fut = np.zeros((n_s, horizon))
    n_pos = n_int = 0
    interrupted = False
    sites = stream_sites(info)
    patches = [skip_patch(info, s) for s in layers]
    for wi, window in enumerate(windows):
        if should_stop():
            interrupted = True
            break
        engine.set_sites(sites)
        engine.clear()
        h = decode_window(engine, window)
        ts = intervention_positions(len(window), positions, horizon)
        if len(ts):
            engine.set_sites([])
            base = position_log_probs(engine, window, ts, horizon, None)
            for si, patch in enumerate(patches):
                kl = kl_rows(base, position_log_probs(engine, window, ts, horizon, patch))
                kl_cur[si] += kl[:, 0].sum()
                kl_fut[si] += kl[:, 1:].sum(axis=0)
            n_int += len(ts)
            engine.set_sites(sites)
        for si, (layer, patch) in enumerate(zip(layers, patches)):
            engine.clear()
            engine.capture.set_patches([patch])
            try:
                h_skip = decode_window(engine, window)
            finally:
                engine.capture.set_patches([])
            ratio = later_change(h[:, 1:], h_skip[:, 1:], layer)
            with np.errstate(invalid="ignore"):
                cmax[si] = np.fmax(cmax[si], np.nanmax(np.where(np.isfinite(ratio), ratio, -np.inf), axis=1))
            csum[si] += np.where(np.isfinite(ratio), ratio, 0.0).sum(axis=1)
        engine.clear()
        n_pos += len(window) - 1
        if progress:
            progress(wi + 1, len(windows), n_pos)
    for si, layer in enumerate(layers):
        cmax[si, layer - 1] = np.nan
        csum[si, layer - 1] = np.nan
    denom = max(n_int, 1)
    return SkipResult(
        skipped=layers, n_layer=n_layer, later_change_max=cmax, later_change_mean=csum / max(n_pos, 1),
        output_kl_current=kl_cur / denom if n_int else np.full(n_s, np.nan),
        output_kl_future=(kl_fut.mean(axis=1) / denom if n_int and horizon else np.full(n_s, np.nan)),
        output_kl_future_by_offset=kl_fut / denom if n_int else np.full((n_s, horizon), np.nan),
        n_tokens=n_pos, n_interventions=n_int, horizon=horizon,
        seconds=time.perf_counter() - t_start, interrupted=interrupted,
    )


# --- a model with one block removed (the reference for skipping) --------------------------


def remove_block(src: str | Path, dst: str | Path, layer: int) -> None:
    """Write a copy of GGUF ``src`` without block ``layer`` (1-based).

    Later blocks are renumbered, ``<arch>.block_count`` is reduced and
    per-layer metadata arrays lose that layer's entry. Only meaningful for
    architectures whose blocks do not depend on their index (e.g. llama;
    not Gemma 3, whose sliding-window pattern does).
    """
    from lcprobe.files.gguf_writer import TensorOut, copy_fields, write_gguf
    from lcprobe.files.modelfile import open_reader

    reader = open_reader(src)
    arch = reader.fields["general.architecture"].contents()
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    if not 1 <= layer <= n_layer:
        raise ValueError(f"layer {layer} outside 1..{n_layer}")
    gone = layer - 1

    def edit(key: str, value: Any) -> Any:
        if key == f"{arch}.block_count":
            return n_layer - 1
        if key.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_layer:
            return value[:gone] + value[gone + 1:]  # a per-layer array
        return value

    kept = []
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.(.+)", t.name)
        name = t.name
        if m:
            i = int(m.group(1))
            if i == gone:
                continue
            if i > gone:
                name = f"blk.{i - 1}.{m.group(2)}"
        kept.append(TensorOut.from_reader(t, name))
    write_gguf(dst, arch, lambda w: copy_fields(w, reader, edit), kept,
               endianess=reader.endianess, data_endianess=reader.endianess)


# --- linear maps between two models -----------------------------------------------------


def heldout_mask(n: int, offset: int, block: int = 32, every: int = 5) -> np.ndarray:
    """Held-out positions: every ``every``-th block of ``block`` consecutive counted positions.

    ``offset`` is the global index of this window's first counted position,
    so the split is the same however the corpus is cut into windows.
    Contiguous blocks keep neighbouring (strongly correlated) tokens on the
    same side of the split.
    """
    g = np.arange(offset, offset + n)
    return (g // block) % every == every - 1


class LinearMaps:
    """Ridge least-squares maps from every layer of A to every layer of B.

    Training sums are accumulated in float32 on data shifted by the first
    window's per-layer means (the residual stream has dimensions with large
    means, which would cost precision in X^T X otherwise); centring and the
    solve are done in float64.
    """

    def __init__(self, n_a: int, d_a: int, n_b: int, d_b: int, ridge: float = 1e-2) -> None:
        self.n_a, self.d_a, self.n_b, self.d_b = n_a, d_a, n_b, d_b
        self.ridge = ridge
        self.n_train = 0
        self._shift_a: np.ndarray | None = None
        self._shift_b: np.ndarray | None = None
        self._sx = np.zeros((n_a, d_a))
        self._sy = np.zeros(n_b * d_b)
        self._sxx = np.zeros((n_a, d_a, d_a))
        self._sxy = np.zeros((n_a, d_a, n_b * d_b), np.float32)
        self._test_a: list[np.ndarray] = []
        self._test_b: list[np.ndarray] = []

    def add(self, xa: np.ndarray, yb: np.ndarray, test: np.ndarray) -> None:
        """``xa`` (N_A, n, d_A) and ``yb`` (N_B, n, d_B) on the same tokens; ``test`` (n,) bool."""
        if self._shift_a is None:
            self._shift_a = xa.mean(axis=1, dtype=np.float64).astype(np.float32)
            self._shift_b = yb.mean(axis=1, dtype=np.float64).astype(np.float32)
        train = ~test
        if test.any():
            self._test_a.append(np.ascontiguousarray(xa[:, test]))
            self._test_b.append(np.ascontiguousarray(yb[:, test]))
        nt = int(train.sum())
        if nt == 0:
            return
        x = xa[:, train] - self._shift_a[:, None]
        y = (yb[:, train] - self._shift_b[:, None]).transpose(1, 0, 2).reshape(nt, -1)
        self._sy += y.sum(axis=0, dtype=np.float64)
        for i in range(self.n_a):
            self._sx[i] += x[i].sum(axis=0, dtype=np.float64)
            self._sxx[i] += x[i].T @ x[i]
            self._sxy[i] += x[i].T @ y
        self.n_train += nt

    @property
    def n_test(self) -> int:
        return sum(t.shape[1] for t in self._test_a)

    def r2(self) -> np.ndarray:
        """Held-out R^2 for every (i, j), ``(N_A, N_B)``."""
        if self.n_train <= 1 or self.n_test == 0:
            raise ValueError("linear maps need training and held-out tokens")
        n = self.n_train
        xt = np.concatenate(self._test_a, axis=1)  # (N_A, n_test, d_A)
        yt = np.concatenate(self._test_b, axis=1).transpose(1, 0, 2)  # (n_test, N_B, d_B)
        sst = ((yt - yt.mean(axis=0, dtype=np.float64)) ** 2).sum(axis=(0, 2))
        my = self._sy / n
        y_shift = self._shift_b.reshape(-1)
        out = np.empty((self.n_a, self.n_b))
        for i in range(self.n_a):
            mx = self._sx[i] / n
            cxx = self._sxx[i] / n - np.outer(mx, mx)
            cxy = self._sxy[i].astype(np.float64) / n - np.outer(mx, my)
            # eigh once, then W = V diag(1/(e + lam)) V^T Cxy: two matmuls instead of a
            # solve with n_b * d_b right-hand sides
            evals, evecs = np.linalg.eigh(cxx)
            lam = self.ridge * max(float(evals.sum()) / self.d_a, 1e-30)
            w = (evecs / (np.maximum(evals, 0.0) + lam)) @ (evecs.T @ cxy)
            w = w.astype(np.float32)
            x = xt[i] - self._shift_a[i] - mx.astype(np.float32)
            err = x @ w + (my + y_shift).astype(np.float32) - yt.reshape(len(yt), -1)
            sse = (err.astype(np.float64) ** 2).reshape(len(yt), self.n_b, self.d_b).sum(axis=(0, 2))
            out[i] = 1.0 - sse / np.where(sst > 0, sst, np.nan)
        return out


def map_summary(r2: np.ndarray, layers_a: Sequence[int], layers_b: Sequence[int], n_layer_a: int,
                n_layer_b: int) -> dict[str, Any]:
    """map.json's content from the R^2 matrix."""
    best_idx = np.nanargmax(np.where(np.isfinite(r2), r2, -np.inf), axis=1)
    best = [int(layers_b[k]) for k in best_idx]
    return {
        "r2": [[None if not np.isfinite(v) else float(v) for v in row] for row in r2],
        "best": best,
        "best_j": best,
        "best_r2": [float(r2[i, k]) for i, k in enumerate(best_idx)],
        "layers_a": [int(x) for x in layers_a],
        "layers_b": [int(x) for x in layers_b],
        "rel_depth_a": [round(i / n_layer_a, 4) for i in layers_a],
        "best_rel_depth_b": [round(j / n_layer_b, 4) for j in best],
    }


def run_map(
    engine_a: Engine,
    engine_b: Engine | None,
    windows: Sequence[Sequence[int]],
    layers_a: Sequence[int],
    layers_b: Sequence[int],
    ridge: float = 1e-2,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[LinearMaps, bool]:
    """Decode every window with both models and accumulate the maps.

    ``engine_b`` None maps A onto itself (one decode per window). Returns the
    fitted :class:`LinearMaps` and whether the run was interrupted.
    """
    ia = engine_a.info
    ib = (engine_b or engine_a).info
    # mapping A onto itself: one decode captures the union of both layer lists
    captured_a = list(layers_a) if engine_b is not None else sorted(set(layers_a) | set(layers_b))
    engine_a.set_sites([Site(ia.site_name("resid_post", i), ia.n_embd) for i in captured_a])
    if engine_b is not None:
        engine_b.set_sites([Site(ib.site_name("resid_post", j), ib.n_embd) for j in layers_b])
    maps = LinearMaps(len(layers_a), ia.n_embd, len(layers_b), ib.n_embd, ridge)
    offset = 0
    interrupted = False
    for wi, window in enumerate(windows):
        if should_stop():
            interrupted = True
            break
        engine_a.clear()
        rows = decode_window(engine_a, window)[:, 1:]
        engine_a.clear()
        index = {layer: k for k, layer in enumerate(captured_a)}
        xa = rows[[index[i] for i in layers_a]]
        if engine_b is None:
            yb = rows[[index[j] for j in layers_b]]
        else:
            engine_b.clear()
            yb = decode_window(engine_b, window)[:, 1:]
            engine_b.clear()
        maps.add(xa, yb, heldout_mask(xa.shape[1], offset))
        offset += xa.shape[1]
        if progress:
            progress(wi + 1, len(windows), offset)
    return maps, interrupted
