"""Activation patching (causal tracing) inside llama.cpp's forward pass.

For every (site, layer, position) the clean prompt's activation replaces the
corrupted prompt's at that one place, and the logit difference ``answer -
wrong`` at the last position is read from llama.cpp's own logits. The
restored fraction is ``(patched - corrupt) / (clean - corrupt)``: 0 where the
patch does nothing, 1 where it brings back the clean run's difference.

Many patched runs share one ``llama_decode``: each is its own sequence (a
copy of the corrupted prompt) and its edit rows point only at its own (node,
position), so a 30-layer x 12-position sweep is a handful of decodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.interventions.apply import intervening
from lcprobe.llama.capture import Edit, Site
from lcprobe.llama.engine import Engine
from lcprobe.sites import check_site

PATCH_JSON = "patch.json"


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
            **self.meta,
            "definition": "sites[site][l][p] = (d - corrupt_diff) / (clean_diff - corrupt_diff), d the logit "
                          "difference answer - wrong at the last position of the corrupted prompt with the "
                          "clean run's activation at (site, layers[l], position p) patched in",
        }


def _show(engine: Engine, tokens: Sequence[int]) -> str:
    return "[" + ", ".join(repr(engine.token_piece(t).decode("utf-8", "replace")) for t in tokens) + "]"


def first_token(engine: Engine, text: str, what: str) -> int:
    toks = engine.tokenize(text, add_special=False)
    if not toks:
        raise LcprobeError(f"{what} {text!r} has no tokens")
    return toks[0]


def run_patching(
    engine: Engine,
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
    # The clean run: every patched node's rows, and the logits.
    uniq = list(dict.fromkeys(nodes.values()))
    engine.set_sites([Site(name, info.n_embd) for name in uniq])
    rows, clean_logits = engine.decode_sequence(ct, want_logits=True)
    clean_rows = {name: np.ascontiguousarray(rows[i]) for i, name in enumerate(uniq)}
    engine.set_sites([])
    _, corrupt_logits = engine.decode_sequence(xt, outputs=[False] * (n - 1) + [True], want_logits=True)
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
    # Job 0 is the corrupted prompt without any edit: it shows what batching alone changes.
    jobs: list[tuple[str, int, int] | None] = [None] + runs
    diffs, n_decodes = _sweep(engine, xt, jobs, nodes, layers, clean_rows, a_id, w_id)
    denom = clean_diff - corrupt_diff
    raw = {s: np.empty((len(layers), n)) for s in sites}
    for (s, li, p), d in zip(runs, diffs[1:]):
        raw[s][li, p] = d
    frac = {s: (v - corrupt_diff) / denom if denom != 0 else np.full_like(v, np.nan) for s, v in raw.items()}
    return PatchResult(
        tokens=[engine.token_piece(t).decode("utf-8", "replace") for t in xt], token_ids=list(xt),
        answer=answer, wrong=engine.token_piece(w_id).decode("utf-8", "replace") if wrong is None else wrong,
        answer_id=a_id, wrong_id=w_id, clean_diff=clean_diff, corrupt_diff=corrupt_diff, layers=layers,
        sites=frac, raw=raw, unpatched_batched_diff=float(diffs[0]), n_runs=len(runs), n_decodes=n_decodes,
        seconds=time.perf_counter() - t0,
        meta={"clean": clean, "corrupt": corrupt, "clean_tokens": [engine.token_piece(t).decode("utf-8", "replace")
                                                                    for t in ct]},
    )


def _sweep(engine: Engine, xt: list[int], jobs: list, nodes: dict, layers: list[int],
           clean_rows: dict[str, np.ndarray], a_id: int, w_id: int) -> tuple[np.ndarray, int]:
    """The logit difference of every job, many whole copies of the corrupted prompt per decode.

    Each job decodes the whole prompt, although the tokens before its patched
    position are the unpatched run's: sharing those KV cells (seq_cp) changed
    the results of sequences of different lengths decoded together by up to
    0.1 in the logit difference, so exactness wins over the ~2x saving.
    """
    n = len(xt)
    per_decode = max(1, min(engine.n_batch // n, engine.n_seq_max, engine.n_ctx // n))
    diffs = np.empty(len(jobs))
    n_decodes = 0
    try:
        for start in range(0, len(jobs), per_decode):
            chunk = jobs[start:start + per_decode]
            k = len(chunk)
            tokens = np.tile(np.asarray(xt, np.int32), k)
            positions = np.tile(np.arange(n, dtype=np.int32), k)
            seq_ids = [[j] for j in range(k) for _ in range(n)]
            outputs = np.zeros(k * n, bool)
            outputs[n - 1::n] = True
            by_node: dict[str, np.ndarray] = {}
            for j, job in enumerate(chunk):
                if job is not None:
                    s, li, p = job
                    by_node.setdefault(nodes[s, layers[li]], np.full(k * n, -1, np.int32))[j * n + p] = p
            edits = [Edit(node, "set", clean_rows[node], r) for node, r in by_node.items()]
            engine.clear()
            with intervening(engine, hook=lambda _pos, _seq, e=edits: e):
                _, lg = engine.decode(tokens, positions, seq_ids, outputs, want_logits=True)
            n_decodes += 1
            assert lg is not None
            diffs[start:start + k] = lg[:, a_id] - lg[:, w_id]
    finally:
        engine.clear()
    return diffs, n_decodes
