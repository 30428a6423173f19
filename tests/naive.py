"""The naive llama.cpp capture: the yardstick lcprobe is measured against.

For every item and every choice: clear the KV cache, decode the whole prompt
plus the continuation as one sequence, ask llama.cpp for outputs only on the
scored rows (the last context token and every continuation token but the
last), capture those rows at every probed layer, apply the same lens, sum the
continuation's token log-probs. Nothing is shared between choices or items,
which is what the paper's method does too (minus the full-vocabulary logits
of every position).

Tokenization is lcprobe's own (``encode_item``), so both methods score the
same token sequences and their results can be compared number for number.
The tests check the batched prober against it; ``bench/speed.py`` times it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lcprobe.probing.batching import encode_item
from lcprobe.llama.capture import Site
from lcprobe.llama.engine import Engine
from lcprobe.analysis.lens import Lens
from lcprobe.tasks.task import Item


@dataclass
class NaiveResult:
    scores: list[np.ndarray] = field(default_factory=list)  # per item: (n_choices, n_layers)
    tokens_decoded: int = 0
    lens_rows: int = 0
    seconds_decode: float = 0.0
    seconds_lens: float = 0.0
    seconds_total: float = 0.0


def naive_scores(engine: Engine, lens: Lens, items: Sequence[Item], layers: Sequence[int],
                 site: str = "resid_post") -> NaiveResult:
    """Score every choice of every item by re-decoding its whole prompt."""
    t_start = time.perf_counter()
    info = engine.info
    layers = list(layers)
    engine.set_sites([Site(info.site_name(site, layer), info.n_embd) for layer in layers])
    tokenize = lambda text, special: engine.tokenize(text, add_special=special)  # noqa: E731
    res = NaiveResult()
    for i, item in enumerate(items):
        req = encode_item(i, item, tokenize)
        per_choice = []
        for cont in req.continuations:
            seq = list(req.context) + list(cont)
            outputs = np.zeros(len(seq), bool)
            outputs[len(req.context) - 1 : len(seq) - 1] = True
            t0 = time.perf_counter()
            rows, _ = engine.decode_sequence(seq, outputs)  # clears the cache before and after
            t1 = time.perf_counter()
            lp = lens.token_log_probs(rows, layers, [np.array([t], np.int64) for t in cont])
            per_choice.append(lp.sum(axis=1, dtype=np.float64))
            res.seconds_decode += t1 - t0
            res.seconds_lens += time.perf_counter() - t1
            res.tokens_decoded += len(seq)
            res.lens_rows += rows.shape[1]
        res.scores.append(np.array(per_choice))
    res.seconds_total = time.perf_counter() - t_start
    return res
