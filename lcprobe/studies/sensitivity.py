"""Which weight tensors need the bits: quantize one group at a time, measure the final KLD.

A group is one weight tensor (``blk.3.attn_v``, ``token_embd``, ``output``).
The base model (float weights) is loaded once, without mmap; for each group
its weights are replaced in place by their quantize-dequantize round trip
(ggml's own quantizer), the scoring text is decoded, and the final logits are
compared with the base's. The original bytes go back afterwards. This is a
proxy for a file with that one tensor quantized: llama.cpp then multiplies
the quantized weights by activations it rounds to 8 bits, which the float
proxy does not; :func:`proxy_check` measures the gap on real files.

KLD is scored the llama-perplexity way: the text is cut into chunks of
``n_ctx`` tokens (the first token of each replaced by BOS when the model
uses one), and only the second half of each chunk is scored, so every
scored token has at least ``n_ctx / 2`` tokens of context. Per token,
KL(P_base || Q) of the softmaxes, in float64.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lcprobe.errors import LcprobeError

#: Per-layer weight tensors the issue names, in block order.
LAYER_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Tensors outside the blocks.
GLOBAL_KINDS = ("token_embd", "output")

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.weight$")

#: Base tensor types the in-place round trip can be written back into.
FLOAT_BASES = ("F32", "F16", "BF16")


class SensitivityError(LcprobeError):
    """A base model, group selection or text the sensitivity run cannot use."""


@dataclass(frozen=True)
class Group:
    name: str  # "blk.3.attn_v", "token_embd"
    tensor: str  # GGUF tensor name
    kind: str  # "attn_v", "token_embd"
    layer: int | None  # 1-based block, None outside the blocks
    n_params: int
    n_per_row: int
    base_type: str

    def as_dict(self) -> dict:
        return {"name": self.name, "tensor": self.tensor, "kind": self.kind, "layer": self.layer,
                "n_params": self.n_params, "n_per_row": self.n_per_row, "base_type": self.base_type}


def weight_groups(path: str | Path) -> list[Group]:
    """The groups a model has, block by block, then token_embd and output."""
    from lcprobe.files.modelfile import open_reader

    reader = open_reader(path)
    blocks, globals_ = [], []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        kind, layer = (m.group(2), int(m.group(1)) + 1) if m else (t.name.removesuffix(".weight"), None)
        if kind not in LAYER_KINDS and kind not in GLOBAL_KINDS:
            continue
        if len(t.shape) < 2:
            continue
        g = Group(t.name.removesuffix(".weight"), t.name, kind, layer, int(t.n_elements), int(t.shape[0]),
                  t.tensor_type.name)
        (blocks if layer is not None else globals_).append(g)
    blocks.sort(key=lambda g: (g.layer, LAYER_KINDS.index(g.kind)))
    globals_.sort(key=lambda g: GLOBAL_KINDS.index(g.kind))
    return blocks + globals_


def select_groups(groups: Sequence[Group], kinds: str | None = None, layers: str | None = None,
                  n_layer: int | None = None) -> list[Group]:
    """Groups whose kind is in ``kinds`` ("attn_v,ffn_down") and whose layer is in ``layers`` ("1:3,-1").

    ``layers`` selects blocks; token_embd and output stay unless ``kinds`` leaves them out.
    """
    out = list(groups)
    if kinds:
        want = [k.strip() for k in kinds.split(",") if k.strip()]
        known = set(LAYER_KINDS) | set(GLOBAL_KINDS)
        bad = [k for k in want if k not in known]
        if bad:
            raise SensitivityError(f"unknown group kind '{bad[0]}' (known: {', '.join(LAYER_KINDS + GLOBAL_KINDS)})")
        out = [g for g in out if g.kind in want]
    if layers:
        from lcprobe.sites import parse_layers

        n = n_layer or max((g.layer for g in groups if g.layer is not None), default=0)
        picked = set(parse_layers(layers, n))
        out = [g for g in out if g.layer is None or g.layer in picked]
    if not out:
        raise SensitivityError("no weight group matches --groups/--layers")
    return out


# --- text and KLD ---------------------------------------------------------------------


def scoring_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos: int | None,
                   skip_chunks: int = 0) -> list[list[int]]:
    """Chunks of ``n_ctx`` tokens as llama-perplexity cuts them (first token -> BOS)."""
    if n_ctx < 4:
        raise SensitivityError(f"-c/--ctx-size must be at least 4, got {n_ctx}")
    have = len(tokens) // n_ctx
    if have <= skip_chunks:
        raise SensitivityError(f"the text has {len(tokens)} tokens: {have} chunks of {n_ctx}, "
                               f"none left after skipping {skip_chunks}; give more text or a smaller -c")
    stop = have if n_chunks is None else min(have, skip_chunks + n_chunks)
    out = []
    for i in range(skip_chunks, stop):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def scored_mask(n_ctx: int) -> np.ndarray:
    """Outputs llama-perplexity scores in a chunk: positions n_ctx/2 .. n_ctx-2."""
    m = np.zeros(n_ctx, bool)
    m[n_ctx // 2:n_ctx - 1] = True
    return m


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_token(ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row in float64; ``ref_logp`` are P's log-probabilities, ``logits`` Q's logits."""
    lp = np.asarray(ref_logp, dtype=np.float64)
    lq = log_softmax64(logits)
    return np.einsum("ij,ij->i", np.exp(lp), lp - lq)


class Reference:
    """The base model's log-probabilities on the scored tokens (float32, one array per chunk)."""

    def __init__(self, chunks: list[list[int]], logps: list[np.ndarray]) -> None:
        self.chunks = chunks
        self.logps = logps

    @property
    def n_scored(self) -> int:
        return sum(len(x) for x in self.logps)


def chunk_logits(engine, chunk: Sequence[int]) -> np.ndarray:
    _, logits = engine.decode_sequence(list(chunk), outputs=scored_mask(len(chunk)), want_logits=True)
    return logits


def make_reference(engine, chunks: list[list[int]]) -> Reference:
    return Reference(chunks, [log_softmax64(chunk_logits(engine, c)).astype(np.float32) for c in chunks])


def final_kld(engine, ref: Reference) -> np.ndarray:
    """KL(base || engine's model) of every scored token (float64)."""
    return np.concatenate([kl_per_token(lp, chunk_logits(engine, c)) for c, lp in zip(ref.chunks, ref.logps)])


def kld_stats(kl: np.ndarray) -> dict:
    n = kl.size
    sem = float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"kld_mean": float(kl.mean()), "kld_sem": sem, "kld_median": float(np.median(kl)),
            "kld_p99": float(np.percentile(kl, 99)), "kld_max": float(kl.max()), "n_tokens": int(n)}


# --- the run ----------------------------------------------------------------------


@dataclass
class GroupResult:
    group: Group
    qtype: str
    kld: dict
    weight_err: float  # mean squared round-trip error of the weights (importance-weighted with an imatrix)
    weight_msq: float  # mean square of the weights (same weighting)
    seconds: float

    def as_dict(self) -> dict:
        return {**self.group.as_dict(), "type": self.qtype, **self.kld,
                "weight_err": self.weight_err, "weight_msq": self.weight_msq, "seconds": round(self.seconds, 3)}


@dataclass
class SensitivityResult:
    model: dict
    types: list[str]
    text: dict
    n_ctx: int
    results: list[GroupResult]
    timing: dict
    proxy: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    imatrix: str | None = None

    def ranked(self, qtype: str | None = None) -> list[GroupResult]:
        rs = [r for r in self.results if qtype is None or r.qtype == qtype]
        return sorted(rs, key=lambda r: -r.kld["kld_mean"])

    def as_dict(self) -> dict:
        return {"kind": "lcprobe.sensitivity", "version": 1, "model": self.model, "types": self.types,
                "imatrix": self.imatrix, "text": self.text, "n_ctx": self.n_ctx,
                "method": "each group's weights replaced in the loaded base by their quantize-dequantize round "
                          "trip (ggml_quantize_chunk); final KLD of softmaxes vs the base on the second half "
                          "of each chunk (llama-perplexity's scoring), float64",
                "groups": [r.as_dict() for r in self.results], "proxy_check": self.proxy,
                "layer_kld": self.layers, "timing": self.timing}


def weight_error(values: np.ndarray, approx: np.ndarray, importance: np.ndarray | None) -> tuple[float, float]:
    """(mean squared error, mean square) over a tensor's rows, columns weighted by ``importance``."""
    n = values.shape[-1]
    d = np.square(values - approx, dtype=np.float32).reshape(-1, n)
    w = np.square(values, dtype=np.float32).reshape(-1, n)
    if importance is None or np.asarray(importance).size != n or np.sum(importance) <= 0:
        # no importance (or per-expert importance): the plain mean is a fair stand-in
        return float(d.mean(dtype=np.float64)), float(w.mean(dtype=np.float64))
    imp = np.asarray(importance, np.float64).reshape(-1)
    imp = imp / imp.sum()
    return float(d.mean(axis=0, dtype=np.float64) @ imp), float(w.mean(axis=0, dtype=np.float64) @ imp)


def _as_base(values: np.ndarray, base_type: str) -> np.ndarray:
    """Round-tripped float32 values in the base tensor's storage type (bytes the tensor holds)."""
    from lcprobe.llama.quantizer import ggml_type, quantize

    if base_type == "F32":
        return np.ascontiguousarray(values, np.float32)
    return quantize(values, ggml_type(base_type))


def text_tokens(engine, text: str | Path | None) -> tuple[list[int], dict]:
    """Token ids of ``--text`` (or the default corpus), and a description for the JSON."""
    import hashlib

    from lcprobe.tasks.corpus import default_documents, text_documents

    docs = text_documents(text) if text is not None else default_documents()
    tokens: list[int] = []
    for d in docs:
        tokens.extend(engine.tokenize(d + "\n\n", add_special=False))
    digest = hashlib.sha256("\n\n".join(docs).encode("utf-8")).hexdigest()
    return tokens, {"source": str(text) if text is not None else "default corpus", "sha256": digest,
                    "n_tokens": len(tokens)}


@dataclass(frozen=True)
class SensitivityOptions:
    types: tuple[str, ...] = ("Q4_0",)
    n_ctx: int = 512
    n_chunks: int | None = 4
    skip_chunks: int = 0
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kinds: str | None = None
    layers: str | None = None
    proxy_check: int = 0  # real files for this many of the worst groups
    layer_groups: int = 3  # per-layer lens KLD for this many of the worst groups
    layer_tokens: int = 32  # scored tokens the per-layer KLD uses (the lens is the costly part)


def open_base(path: Path, n_ctx: int, n_threads: int | None, n_gpu_layers: int = 0, use_mmap: bool = False):
    """An Engine on ``path`` for final logits (one sequence of ``n_ctx`` per decode), opened by the
    one loader with no head (llama.cpp's logits are the reference); ``use_mmap=False`` keeps the
    weights writable for in-place swaps."""
    from lcprobe.llama.loader import LoadOptions, open_model

    options = LoadOptions(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_seq_max=1,
                          n_gpu_layers=n_gpu_layers, n_threads=n_threads, lens_backend=None, use_mmap=use_mmap,
                          layers="-1")
    return open_model(path, options).engine


def run_sensitivity(
    model: str | Path,
    options: SensitivityOptions = SensitivityOptions(),
    text: str | Path | None = None,
    imatrix_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> SensitivityResult:
    """Measure every selected group at every type of ``options.types``; see the module doc."""
    from lcprobe.files.catalog import resolve_model
    from lcprobe.files.download import file_sha256
    from lcprobe.files.modelfile import open_reader, read_model_info
    from lcprobe.llama.quantizer import can_hold, ggml_type, round_trip, tensor_values
    from lcprobe.llama.weights import Weights
    from lcprobe.studies.quantize import load_imatrix

    t_start = time.perf_counter()
    path = Path(resolve_model(str(model)))
    info = read_model_info(path)
    qtypes = [ggml_type(t) for t in options.types]
    groups = select_groups(weight_groups(path), options.kinds, options.layers, info.n_layer)
    odd = [g for g in groups if g.base_type not in FLOAT_BASES]
    if odd:
        raise SensitivityError(f"{path.name}: {odd[0].tensor} is {odd[0].base_type}; the sensitivity run needs "
                               f"float weights ({', '.join(FLOAT_BASES)}): make a float base with "
                               f"`lcprobe quantize -m MODEL -t F32`")
    for q in qtypes:
        if q.name in FLOAT_BASES:
            continue
        bad = [g for g in groups if not can_hold(q, g.n_per_row)]
        if bad:
            raise SensitivityError(f"{q.name} cannot hold {bad[0].tensor} (rows of {bad[0].n_per_row}); "
                                   f"choose a type with a block that divides it")
    imatrix = load_imatrix(imatrix_path) if imatrix_path is not None else None
    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}

    engine = open_base(path, options.n_ctx, options.n_threads, options.n_gpu_layers)
    try:
        t0 = time.perf_counter()
        weights = Weights(engine, [g.tensor for g in groups])
        seconds_find = time.perf_counter() - t0
        tokens, text_info = text_tokens(engine, text)
        bos = _bos(engine)
        chunks = scoring_chunks(tokens, options.n_ctx, options.n_chunks, bos, options.skip_chunks)
        t0 = time.perf_counter()
        ref = make_reference(engine, chunks)
        seconds_ref = time.perf_counter() - t0
        results: list[GroupResult] = []
        total = len(groups) * len(qtypes)
        done = 0
        for g in groups:
            t = tensors[g.tensor]
            original = np.asarray(t.data).view(np.uint8).reshape(-1)
            values = tensor_values(t).reshape(tuple(int(d) for d in reversed(t.shape)))
            imp = imatrix.get(g.tensor) if imatrix is not None else None
            for q in qtypes:
                if progress is not None:
                    progress(done, total, f"{g.name} {q.name}")
                t1 = time.perf_counter()
                approx = round_trip(values, q, imp, options.n_threads or os.cpu_count() or 1)
                err, msq = weight_error(values, approx, imp)
                weights.set(g.tensor, _as_base(approx, g.base_type))
                try:
                    kl = final_kld(engine, ref)
                finally:
                    weights.set(g.tensor, original)
                results.append(GroupResult(g, q.name, kld_stats(kl), err, msq, time.perf_counter() - t1))
                done += 1
        if progress is not None:
            progress(done, total, "")
        # the weights are back: the base must again agree with itself exactly
        restored = float(final_kld(engine, Reference(ref.chunks[:1], ref.logps[:1])).max())
        layer_rows = []
        if options.layer_groups > 0:
            t0 = time.perf_counter()
            worst = sorted((r for r in results if r.qtype == qtypes[0].name), key=lambda r: -r.kld["kld_mean"])
            layer_rows = layer_kld(engine, weights, tensors, worst[: options.layer_groups], chunks[0],
                                   options.layer_tokens, imatrix, options.n_threads)
            seconds_layers = time.perf_counter() - t0
    finally:
        engine.close()
    result = SensitivityResult(
        model={"path": str(path), "sha256": file_sha256(path), "arch": info.arch, "n_layer": info.n_layer,
               "file_type": info.file_type},
        types=[q.name for q in qtypes],
        text={**text_info, "n_chunks": len(chunks), "skip_chunks": options.skip_chunks,
              "n_scored": ref.n_scored},
        n_ctx=options.n_ctx, results=results, imatrix=str(imatrix_path) if imatrix_path else None,
        layers=layer_rows,
        timing={"seconds_total": 0.0, "seconds_find_weights": round(seconds_find, 3),
                "seconds_reference": round(seconds_ref, 3),
                "seconds_per_group": round(float(np.mean([r.seconds for r in results])), 3),
                "restored_max_kld": restored,
                "seconds_layer_kld": round(seconds_layers, 3) if layer_rows else None},
    )
    if options.proxy_check:
        work = Path(work_dir) if work_dir is not None else path.parent
        for r in result.ranked(result.types[0])[: options.proxy_check]:
            result.proxy.append(proxy_check(path, r, ref, work, imatrix, options))
    result.timing["seconds_total"] = round(time.perf_counter() - t_start, 3)
    return result


def layer_kld(engine, weights, tensors: dict, worst: Sequence[GroupResult], chunk: Sequence[int], n_tokens: int,
              imatrix: dict | None, threads: int | None) -> list[dict]:
    """Where each of the ``worst`` groups' damage appears: per layer, KL(base || quantized) of the
    logit lens (final norm + head) on the residual stream, mean over the last ``n_tokens`` scored
    positions of ``chunk``."""
    from lcprobe.analysis.lens import Lens, Unembed
    from lcprobe.llama.quantizer import ggml_type, round_trip, tensor_values
    from lcprobe.studies.depth import stream_sites

    info = engine.info
    lens = Lens(Unembed.from_model(info, "numpy"), info.n_layer)
    outputs = scored_mask(len(chunk))
    keep = np.flatnonzero(outputs)[-n_tokens:]
    outputs[:] = False
    outputs[keep] = True

    def stream() -> np.ndarray:
        rows, _ = engine.decode_sequence(list(chunk), outputs=outputs, want_logits=True)
        return rows  # (1 + n_layer, n, d): the layer-1 input, then every block output

    engine.set_sites(stream_sites(info))
    try:
        base = stream()
        base_logp = [lens.log_probs(base[layer], layer).astype(np.float64) for layer in range(1, info.n_layer + 1)]
        out = []
        for r in worst:
            t = tensors[r.group.tensor]
            original = np.asarray(t.data).view(np.uint8).reshape(-1)
            values = tensor_values(t).reshape(tuple(int(d) for d in reversed(t.shape)))
            imp = imatrix.get(r.group.tensor) if imatrix is not None else None
            approx = round_trip(values, ggml_type(r.qtype), imp, threads or os.cpu_count() or 1)
            weights.set(r.group.tensor, _as_base(approx, r.group.base_type))
            try:
                h = stream()
            finally:
                weights.set(r.group.tensor, original)
            per_layer = []
            for layer in range(1, info.n_layer + 1):
                lp = base_logp[layer - 1]
                lq = lens.log_probs(h[layer], layer).astype(np.float64)
                per_layer.append(float(np.mean(np.einsum("ij,ij->i", np.exp(lp), lp - lq))))
            out.append({"group": r.group.name, "type": r.qtype, "n_tokens": int(len(keep)),
                        "lens_kld": per_layer})
    finally:
        engine.set_sites([])
    return out


def _bos(engine) -> int | None:
    ids = engine.tokenize("", add_special=True)
    return ids[0] if ids else None


def proxy_check(base: Path, r: GroupResult, ref: Reference, work_dir: Path,
                imatrix: dict | None, options: SensitivityOptions) -> dict:
    """The same group really quantized in a file: its KLD next to the in-place proxy's, and the costs."""
    from lcprobe.llama.quantizer import write_gguf

    work_dir.mkdir(parents=True, exist_ok=True)
    dst = work_dir / f".lcprobe-proxy-{r.group.name}-{r.qtype}.gguf"
    try:
        t0 = time.perf_counter()
        write_gguf(base, dst, {r.group.tensor: r.qtype}, imatrix, options.n_threads)
        seconds_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = open_base(dst, options.n_ctx, options.n_threads, options.n_gpu_layers, use_mmap=True)
        seconds_load = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            real = kld_stats(final_kld(engine, ref))
            seconds_decode = time.perf_counter() - t0
        finally:
            engine.close()
    finally:
        dst.unlink(missing_ok=True)
    proxy = r.kld["kld_mean"]
    return {"group": r.group.name, "type": r.qtype, "proxy_kld": proxy, "real_kld": real["kld_mean"],
            "real_sem": real["kld_sem"], "rel_diff": (proxy - real["kld_mean"]) / real["kld_mean"]
            if real["kld_mean"] else None,
            "seconds_proxy": round(r.seconds, 3),
            "seconds_real": round(seconds_write + seconds_load + seconds_decode, 3),
            "seconds_real_write": round(seconds_write, 3), "seconds_real_load": round(seconds_load, 3)}
