"""Decode once, score once, and get the same numbers as the slow way.

- The runner decodes exactly the unique tokens (shared prefix once, each
  item's trie of context + continuations once) and scores exactly the unique
  rows; both counts are recomputed here from the tokenizer alone.
- On the synthetic model with exact engine settings (float32 KV cache, flash
  attention off) batched results equal one-choice-at-a-time decoding within
  float32 accumulation error, and the same choices win at every layer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lcprobe.probing.batching import encode_item
from lcprobe.llama.engine import Engine, EngineConfig
from lcprobe.analysis.lens import Lens, Unembed
from lcprobe.files.modelfile import read_model_info
from lcprobe.probing.runner import ProbeStats, Prober
from lcprobe.tasks.task import Item, load_task
from naive import naive_scores
from paths import paper_data

SHARED_DATA = paper_data()


def unique_counts(engine: Engine, items: list[Item]) -> tuple[int, int, int]:
    """(prefix tokens, unique tokens, unique scored rows) from the tokenizer alone."""
    tok = lambda t, s: engine.tokenize(t, add_special=s)  # noqa: E731
    reqs = [encode_item(i, it, tok) for i, it in enumerate(items)]
    contexts = [r.context for r in reqs]
    # the shared prefix: common to every context, leaving each at least one token
    k = 0
    while all(k < len(c) - 1 for c in contexts) and len({c[k] for c in contexts}) == 1:
        k += 1
    tokens, rows = k, 0
    for r in reqs:
        nodes, scored = set(), set()
        for cont in r.continuations:
            path = tuple(r.context[k:]) + tuple(cont)
            nodes.update(path[:j] for j in range(1, len(path) + 1))
            n_ctx = len(r.context) - k
            # a row is scored where the next token is a continuation token
            scored.update(path[:j] for j in range(n_ctx, len(path)))
        tokens += len(nodes)
        rows += len(scored)
    return k, tokens, rows


def test_tokens_decoded_equal_unique_tokens(smollm2):
    os.environ.setdefault("LCPROBE_DATA", str(SHARED_DATA))
    items = load_task("calc").items(limit=12, seed=3)
    info = read_model_info(smollm2)
    lens = Lens(Unembed.from_model(info), info.n_layer)
    with Engine(info, EngineConfig(n_ctx=1024, n_batch=128, n_ubatch=128, n_seq_max=16, n_threads=2)) as eng:
        prefix, unique, rows = unique_counts(eng, items)
        stats = ProbeStats()
        results = [r for g in Prober(eng, lens, [info.n_layer]).run(items, stats=stats) for r in g]
        # llama.cpp was handed nothing else but the pads that align each item's KV cells
        assert eng.tokens_decoded == unique + stats.tokens_padding
        assert 0 < stats.tokens_padding < 32 * len(items)
        assert len(results) == len(items)
        assert prefix > 40  # the instruction and four demonstrations are shared
        assert stats.prefix_tokens == prefix
        assert stats.tokens_unique == unique
        # not merely <= 1.1x: every unique token exactly once
        assert stats.tokens_decoded - stats.tokens_padding == unique
        assert stats.lens_rows == rows
        # the naive way decodes every choice's whole prompt
        tok = lambda t, sp: eng.tokenize(t, add_special=sp)  # noqa: E731
        naive = sum(len(r.context) + len(c) for i, it in enumerate(items)
                    for r in [encode_item(i, it, tok)] for c in r.continuations)
    assert naive > 8 * unique


SYNTH_PREFIX = "Answer the question.\n\nQ: What is 3 plus 4?\nA: 7\n\nQ: What is the capital of France?\nA: Paris\n\n"


def _synth_items() -> list[Item]:
    qs = [("What is 12 plus 30?", ["42", "41", "4", "52"], 0),
          ("What is the capital of Italy?", ["Rome", "Paris", "Berlin", "Madrid"], 0),
          ("What color is the sky?", ["blue", "red", "green", "blue sky"], 0),
          ("What is 9 times 9?", ["81", "18", "8", "99"], 0),
          ("Who is it?", ["he", "she", "they", "we"], 1),
          ("What is 1 plus 1?", ["2", "two", "11", "1"], 0)]
    return [Item(id=str(i), context=SYNTH_PREFIX + f"Q: {q}\nA:", choices=tuple(" " + c for c in cs),
                 correct=(k,), meta={}) for i, (q, cs, k) in enumerate(qs)]


# float32 accumulation order differs between batch shapes (matmul tiles, the
# KV cells attended over): measured up to 2e-6 absolute (1e-7 relative) on
# summed log-probs of magnitude ~10; the bound leaves a 50x margin.
SYNTH_ATOL = 1e-4


# (24, 8, 3): groups of a few tokens, ubatches splitting tries, two choices per
# sequence set, so each item's context is decoded twice
@pytest.mark.parametrize("n_batch,n_ubatch,n_seq_max", [(256, 256, 32), (24, 8, 3)])
def test_batched_equals_unbatched_on_synthetic_model(synth_model, n_batch, n_ubatch, n_seq_max):
    path, spec, _ = synth_model
    info = read_model_info(path)
    layers = list(range(1, info.n_layer + 1))
    lens = Lens(Unembed.from_model(info), info.n_layer)
    items = _synth_items()
    exact = dict(n_ctx=512, n_threads=2, kv_type="f32", flash_attn="off")
    with Engine(info, EngineConfig(n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max, **exact)) as eng:
        stats = ProbeStats()
        batched = [r for g in Prober(eng, lens, layers).run(items, stats=stats) for r in g]
        _, unique, rows = unique_counts(eng, items)
    with Engine(info, EngineConfig(n_batch=512, n_ubatch=512, n_seq_max=1, **exact)) as eng:
        refs = naive_scores(eng, lens, items, layers).scores
    if n_seq_max > 4:
        assert stats.tokens_decoded - stats.tokens_padding == unique and stats.lens_rows == rows
    else:  # items split over two sets of sequences decode their context twice
        assert unique < stats.tokens_decoded - stats.tokens_padding < 2 * unique
    assert [r.id for r in batched] == [it.id for it in items]
    for res, ref in zip(batched, refs):
        assert res.scores.shape == ref.shape == (4, info.n_layer)
        np.testing.assert_allclose(res.scores, ref, atol=SYNTH_ATOL, rtol=0)
        np.testing.assert_array_equal(res.scores.argmax(0), ref.argmax(0))


@pytest.mark.slow
def test_batched_equals_unbatched_on_smollm2_dequantized(smollm2, tmp_path_factory):
    """SmolLM2 with its weights dequantized to F32 (llama.cpp's own conversion).

    With quantized weights ggml rounds activations to 8 bits before every
    matmul, so sub-ulp differences (attention over a different number of KV
    cells) flip roundings and grow over the layers: on the Q4_1 file batched
    and unbatched summed log-probs differ by up to ~2 and ~1% of item x layer
    winners change. Without that rounding the two paths agree to 4e-5.
    """
    from synth import quantize

    f32 = tmp_path_factory.mktemp("smolf32") / "smollm2-f32.gguf"
    quantize(str(smollm2), str(f32), "F32")
    os.environ.setdefault("LCPROBE_DATA", str(SHARED_DATA))
    items = load_task("calc").items(limit=4, seed=0)
    info = read_model_info(f32)
    layers = [1, 10, 20, 29, 30]
    lens = Lens(Unembed.from_model(info), info.n_layer)
    exact = dict(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, kv_type="f32", flash_attn="off")
    with Engine(info, EngineConfig(n_seq_max=32, **exact)) as eng:
        batched = [r for g in Prober(eng, lens, layers).run(items) for r in g]
    with Engine(info, EngineConfig(n_seq_max=1, **exact)) as eng:
        refs = naive_scores(eng, lens, items, layers).scores
    for res, ref in zip(batched, refs):
        np.testing.assert_allclose(res.scores, ref, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(res.scores.argmax(0), ref.argmax(0))
