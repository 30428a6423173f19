"""Activation patching (causal tracing) inside llama.cpp's forward pass.

For every (site, layer, position) the clean prompt's activation replaces the
corrupted prompt's at that one place, and the logit difference ``answer -
wrong`` at the last position is read from llama.cpp's own logits. The
restored fraction is ``(patched - corrupt) / (clean - corrupt)``: 0 where the
patch does nothing, 1 where it brings back the clean run's difference.

Every patched run gives bit for bit what that run alone gives (``capture(corrupt,
patch=..., positions=[p], logits=True)``), on an engine with one KV stream
per sequence (``kv_unified=False``, see :func:`stream_layout`):

* Without flash attention ggml sums a query's attention over KV cells in SIMD
  lanes keyed by the cell index, so a run's numbers depend on where its cells
  sit. In a unified cache, runs packed one after another start at different
  cells, which moved the logit difference by up to 0.18 on SmolLM2. In a
  stream of its own every run's cells are 0..n-1, as in a run alone.
* The tokens before the patched position are the corrupted run's, so each
  stream keeps them: the corrupted prompt is decoded once and copied into
  every stream, and the runs go in rounds from the last position to the
  first, each decoding only from its position on (``seq_rm`` then decode).
  A round's runs have equal lengths, which llama.cpp's per-stream ubatch
  split needs to keep the batch's token order.
* A run whose clean row is bit-identical to the corrupted one (a shared
  prefix of the prompts) computes the corrupted run exactly; it is not decoded.
  Nor is a run twice when two sites name one node (resid_pre L+1 is resid_post L).

On a unified cache (a model opened for other work) the runs are whole copies
of the corrupted prompt packed into each decode, each off its run alone by up
to about 0.2 in the logit difference (the first point above).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.interventions.apply import intervening
from lcprobe.llama.capture import Edit, Site
from lcprobe.sites import check_site

if TYPE_CHECKING:
    from lcprobe.files.modelfile import ModelInfo
    from lcprobe.llama.engine import Engine

PATCH_JSON = "patch.json"

#: f32 KV cache the per-sequence streams may take together; past it, fewer runs share a decode.
STREAM_KV_BUDGET = 1 << 30
#: llama.cpp pads each stream's cells to a multiple of this (llama_context: n_ctx_seq)
STREAM_PAD = 256
MAX_STREAMS = 64

Job = tuple[str, int]  # (graph node, position): one patched run


@dataclass
class PatchResult:
    tokens: list[str]
    token_ids: list[int]
    answer: str
    wrong: str
    answer_id: int
    wrong_id: int
    clean_diff: float
    corrupt_diff: float
    layers: list[int]
    sites: dict[str, np.ndarray]  # site -> (n_layers, n_positions) restored fraction
    raw: dict[str, np.ndarray]  # site -> (n_layers, n_positions) patched logit difference
    unpatched_batched_diff: float  # the corrupted run decoded among the patched ones, no edit
    n_runs: int = 0
    n_decodes: int = 0
    seconds: float = 0.0
    n_tokens: int = 0  # tokens the sweep decoded
    n_unchanged: int = 0  # runs whose clean row equals the corrupted one: not decoded
    layout: str = "streams"  # "streams" (exact) or "packed" (a unified cache)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": {s: v.tolist() for s, v in self.sites.items()},
            "logit_diff": {s: v.tolist() for s, v in self.raw.items()},
            "clean_diff": self.clean_diff,
            "corrupt_diff": self.corrupt_diff,
            "unpatched_batched_diff": self.unpatched_batched_diff,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "layers": self.layers,
            "answer": self.answer, "answer_id": self.answer_id,
            "wrong": self.wrong, "wrong_id": self.wrong_id,
            "n_runs": self.n_runs, "n_decodes": self.n_decodes, "seconds": round(self.seconds, 3),
            "n_tokens_decoded": self.n_tokens, "n_unchanged": self.n_unchanged, "layout": self.layout,
            **self.meta,
            "definition": "sites[site][l][p] = (d - corrupt_diff) / (clean_diff - corrupt_diff), d the logit "
                          "difference answer - wrong at the last position of the corrupted prompt with the "
                          "clean run's activation at (site, layers[l], position p) patched in",
        }


def stream_layout(info: "ModelInfo", max_tokens: int, runs_per_round: int) -> tuple[int, int]:
    """``(n_ctx, n_seq_max)`` for a sweep engine with one KV stream per sequence.

    Sequence 0 holds the corrupted run; a round needs one stream per run
    (``runs_per_round`` = sites x layers), as many as fit :data:`STREAM_KV_BUDGET`.
    """
    from lcprobe.files.plan import read_shape

    per_seq = -(-max(1, max_tokens) // STREAM_PAD) * STREAM_PAD
    cell_bytes = 4 * sum(read_shape(info).kv_widths)  # f32 K and V
    fit = STREAM_KV_BUDGET // max(1, per_seq * cell_bytes)
    n_seq = max(2, min(MAX_STREAMS, runs_per_round + 1, fit))
    return per_seq * n_seq, n_seq


def sweep_options(info: "ModelInfo", prompt: str, runs_per_round: int) -> dict[str, Any]:
    """The load options (:class:`~lcprobe.llama.loader.LoadOptions` fields) under which the sweep is
    exact: an f32 KV cache, no flash attention, a KV stream per run (sized for ``prompt``, which has
    no more tokens than bytes plus specials) and no CPU weight repacking, whose kernels round a
    batch's rows by their place in it."""
    n_ctx, n_seq = stream_layout(info, len(prompt.encode("utf-8")) + 8, runs_per_round)
    return dict(kv_type="f32", flash_attn="off", n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=False, repack=False)


def has_streams(engine: "Engine") -> bool:
    """Whether the engine's KV cache has a stream per sequence (the exact sweep)."""
    return not engine.kv_unified and engine.n_seq_max >= 2


def _show(engine: "Engine", tokens: Sequence[int]) -> str:
    return "[" + ", ".join(repr(engine.token_piece(t).decode("utf-8", "replace")) for t in tokens) + "]"


def first_token(engine: "Engine", text: str, what: str) -> int:
    toks = engine.tokenize(text, add_special=False)
    if not toks:
        raise LcprobeError(f"{what} {text!r} has no tokens")
    return toks[0]


def run_patching(
    engine: "Engine",
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str | None = None,
    sites: Sequence[str] = ("resid_post",),
    layers: Sequence[int] | None = None,
) -> PatchResult:
    """The causal-tracing sweep. ``answer``/``wrong`` are scored by their first token; without
    ``wrong`` it is the corrupted run's most likely next token other than the answer."""
    t0 = time.perf_counter()
    info = engine.info
    ct, xt = engine.tokenize(clean), engine.tokenize(corrupt)
    if len(ct) != len(xt):
        raise LcprobeError(f"the prompts tokenize to different lengths: clean {len(ct)} {_show(engine, ct)}, "
                           f"corrupt {len(xt)} {_show(engine, xt)}")
    n = len(xt)
    if n > engine.n_batch:
        raise LcprobeError(f"the prompts have {n} tokens, more than one batch of {engine.n_batch}")
    sites = [check_site(s) for s in sites]
    layers = list(range(1, info.n_layer + 1)) if layers is None else list(layers)
    try:
        nodes = {(s, L): info.site_name(s, L) for s in sites for L in layers}
    except ValueError as exc:
        raise LcprobeError(str(exc)) from None
    a_id = first_token(engine, answer, "answer")
    # Both runs alone, every patched node's rows and the logits.
    uniq = list(dict.fromkeys(nodes.values()))
    engine.set_sites([Site(name, info.n_embd) for name in uniq])
    try:
        rows, clean_logits = engine.decode_sequence(ct, want_logits=True)
        xrows, corrupt_logits = engine.decode_sequence(xt, want_logits=True)
    finally:
        engine.set_sites([])
    clean_rows = {name: np.ascontiguousarray(rows[i]) for i, name in enumerate(uniq)}
    assert clean_logits is not None and corrupt_logits is not None
    cl, xl = clean_logits[-1], corrupt_logits[-1]
    if wrong is None:
        order = np.argsort(-xl, kind="stable")
        w_id = int(order[0] if order[0] != a_id else order[1])
    else:
        w_id = first_token(engine, wrong, "wrong answer")
    if w_id == a_id:
        raise LcprobeError("the answer and the wrong answer start with the same token")
    clean_diff = float(cl[a_id] - cl[w_id])
    corrupt_diff = float(xl[a_id] - xl[w_id])

    runs = [(s, li, p) for s in sites for li in range(len(layers)) for p in range(n)]
    # A clean row bit-identical to the corrupted one (the prompts' shared prefix) patches nothing.
    same = {name: (rows[i].view(np.uint32) == xrows[i].view(np.uint32)).all(axis=1) for i, name in enumerate(uniq)}
    todo = list(dict.fromkeys((nodes[s, layers[li]], p) for s, li, p in runs if not same[nodes[s, layers[li]]][p]))
    sweep = _sweep_streams if has_streams(engine) else _sweep_packed
    base, got, n_decodes, n_tokens = sweep(engine, xt, todo, clean_rows, a_id, w_id)
    done = dict(zip(todo, got))
    denom = clean_diff - corrupt_diff
    raw = {s: np.full((len(layers), n), base) for s in sites}
    for s, li, p in runs:
        raw[s][li, p] = done.get((nodes[s, layers[li]], p), base)
    frac = {s: (v - corrupt_diff) / denom if denom != 0 else np.full_like(v, np.nan) for s, v in raw.items()}
    piece = lambda t: engine.token_piece(t).decode("utf-8", "replace")  # noqa: E731
    return PatchResult(
        tokens=[piece(t) for t in xt], token_ids=list(xt),
        answer=answer, wrong=piece(w_id) if wrong is None else wrong,
        answer_id=a_id, wrong_id=w_id, clean_diff=clean_diff, corrupt_diff=corrupt_diff, layers=layers,
        sites=frac, raw=raw, unpatched_batched_diff=base, n_runs=len(runs), n_decodes=n_decodes,
        seconds=time.perf_counter() - t0, n_tokens=n_tokens,
        n_unchanged=sum(bool(same[nodes[s, layers[li]]][p]) for s, li, p in runs),
        layout="streams" if sweep is _sweep_streams else "packed",
        meta={"clean": clean, "corrupt": corrupt, "clean_tokens": [piece(t) for t in ct]},
    )


def _edits(jobs: Sequence[Job], offsets: Sequence[int], n_tokens: int,
           clean_rows: dict[str, np.ndarray]) -> list[Edit]:
    """One "set" edit per node: job j's clean row at batch token ``offsets[j]``."""
    by_node: dict[str, np.ndarray] = {}
    for (node, p), at in zip(jobs, offsets):
        by_node.setdefault(node, np.full(n_tokens, -1, np.int32))[at] = p
    return [Edit(node, "set", clean_rows[node], r) for node, r in by_node.items()]


def _decode(engine: "Engine", tokens, positions, seq_ids, outputs, edits: list[Edit]) -> np.ndarray:
    with intervening(engine, hook=(lambda _pos, _seq: edits) if edits else None):
        _, lg = engine.decode(tokens, positions, seq_ids, outputs, want_logits=True)
    assert lg is not None
    return lg


def _sweep_streams(engine: "Engine", xt: list[int], jobs: list[Job], clean_rows: dict[str, np.ndarray],
                   a_id: int, w_id: int) -> tuple[float, np.ndarray, int, int]:
    """The unpatched and every job's logit difference, one KV stream per sequence, in rounds by position.

    Returns ``(unpatched, per job, decodes, tokens)``.
    """
    n = len(xt)
    n_streams = engine.n_seq_max - 1
    # one ubatch per decode: llama.cpp's per-stream split reorders a batch that needs more
    cap = min(engine.n_batch, engine.n_ubatch)
    out = np.empty(len(jobs))
    by_pos: dict[int, list[int]] = {}
    for i, (_, p) in enumerate(jobs):
        by_pos.setdefault(p, []).append(i)
    try:
        engine.clear()
        lg = _decode(engine, xt, range(n), [[0]] * n, [False] * (n - 1) + [True], [])
        base = float(lg[-1, a_id] - lg[-1, w_id])
        n_decodes, n_tokens = 1, n
        copied = 0  # streams 1..copied hold the corrupted run (stream 0 never changes)
        for p in sorted(by_pos, reverse=True):
            # Two tokens at least: ggml multiplies one query row with other kernels than a batch.
            start = max(0, min(p, n - 2))
            m = n - start
            per = max(1, min(n_streams, cap // m))
            idx = by_pos[p]
            for c in range(0, len(idx), per):
                chunk = idx[c:c + per]
                k = len(chunk)
                for s in range(copied + 1, k + 1):
                    engine.seq_copy(0, s)  # a whole-stream copy, made by llama.cpp before the next decode
                copied = max(copied, k)
                for s in range(1, k + 1):
                    engine.seq_remove(s, start, -1)  # keeps the corrupted run's cells before `start`
                outputs = np.zeros(k * m, bool)
                outputs[m - 1::m] = True
                edits = _edits([jobs[i] for i in chunk], [j * m + p - start for j in range(k)], k * m, clean_rows)
                lg = _decode(engine, np.tile(np.asarray(xt[start:], np.int32), k),
                             np.tile(np.arange(start, n, dtype=np.int32), k),
                             [[s] for s in range(1, k + 1) for _ in range(m)], outputs, edits)
                out[chunk] = lg[:, a_id] - lg[:, w_id]
                n_decodes += 1
                n_tokens += k * m
    finally:
        engine.clear()
    return base, out, n_decodes, n_tokens


def _sweep_packed(engine: "Engine", xt: list[int], jobs: list[Job], clean_rows: dict[str, np.ndarray],
                  a_id: int, w_id: int) -> tuple[float, np.ndarray, int, int]:
    """The unified-cache fallback: whole copies of the corrupted prompt, many per decode.

    Job 0 of the list is the unpatched run. A run's cells start wherever its
    slot falls, so its numbers differ from a run alone by rounding (see the
    module docstring).
    """
    n = len(xt)
    todo: list[Job | None] = [None, *jobs]
    per_decode = max(1, min(engine.n_batch // n, engine.n_seq_max, engine.n_ctx // n))
    diffs = np.empty(len(todo))
    n_decodes = 0
    try:
        for start in range(0, len(todo), per_decode):
            chunk = todo[start:start + per_decode]
            k = len(chunk)
            outputs = np.zeros(k * n, bool)
            outputs[n - 1::n] = True
            real = [(j, job) for j, job in enumerate(chunk) if job is not None]
            edits = _edits([job for _, job in real], [j * n + job[1] for j, job in real], k * n, clean_rows)
            engine.clear()
            lg = _decode(engine, np.tile(np.asarray(xt, np.int32), k), np.tile(np.arange(n, dtype=np.int32), k),
                         [[j] for j in range(k) for _ in range(n)], outputs, edits)
            n_decodes += 1
            diffs[start:start + k] = lg[:, a_id] - lg[:, w_id]
    finally:
        engine.clear()
    return float(diffs[0]), diffs[1:], n_decodes, len(todo) * n
