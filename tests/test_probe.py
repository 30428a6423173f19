"""The batched prober (shared prefix, token tries, many sequences per decode)
against the plainest possible method: each choice's full prompt decoded on
its own, rows captured, the lens applied, log-probs summed."""

from __future__ import annotations

import numpy as np
import pytest

from lcprobe.probing.batching import build_unit, encode_item, split_context
from lcprobe.llama.engine import Engine, EngineConfig
from lcprobe.errors import LcprobeError, PromptTooLongError
from lcprobe.analysis.lens import Lens, Unembed
from lcprobe.files.modelfile import read_model_info
from lcprobe.probing.runner import Prober
from lcprobe.sites import parse_layers
from lcprobe.tasks.task import Item
from naive import naive_scores

PREFIX = "Answer with the number only.\n\nQ: What is 3 + 4?\nA: 7\n\nQ: What is 10 + 5?\nA: 15\n\n"


def _items() -> list[Item]:
    qs = [("12 + 30", ["42", "41", "52", "32"], 0), ("9 + 9", ["17", "18", "19", "81"], 1),
          ("20 + 21", ["41", "14", "40", "411"], 0), ("7 + 8", ["16", "15", "1", "115"], 1),
          ("100 + 1", ["101", "110", "1001", "11"], 0)]
    return [Item(id=str(i), context=PREFIX + f"Q: What is {q}?\nA:", choices=tuple(" " + c for c in cs),
                 correct=(k,), meta={}) for i, (q, cs, k) in enumerate(qs)]


@pytest.fixture(scope="module")
def smol_setup(smollm2):
    info = read_model_info(smollm2)
    lens = Lens(Unembed.from_model(info), info.n_layer)
    eng = Engine(info, EngineConfig(n_ctx=1024, n_batch=64, n_ubatch=32, n_seq_max=16, n_threads=2))
    yield eng, lens
    eng.close()


@pytest.mark.slow
def test_batched_equals_naive(smol_setup):
    eng, lens = smol_setup
    layers = list(range(1, eng.info.n_layer + 1))
    items = _items()
    prober = Prober(eng, lens, layers)
    batched = [r for group in prober.run(items) for r in group]
    assert [r.id for r in batched] == [it.id for it in items]
    for item, res in zip(items, batched):
        ref = naive_scores(eng, lens, [item], layers).scores[0]
        # llama.cpp is not bit-identical across batch shapes; Q4 activations
        # move log-probs by ~1e-3. Winners must agree exactly.
        np.testing.assert_allclose(res.scores, ref, atol=0.05, rtol=0)
        np.testing.assert_array_equal(res.scores.argmax(0), ref.argmax(0))


def test_split_context_moves_trailing_space():
    assert split_context("A: ", "42") == ("A:", " 42")
    assert split_context("A:", " 42") == ("A:", " 42")


def test_trie_shares_prefix_tokens():
    item = Item(id="x", context="ctx", choices=("a", "b", "c"), correct=(0,), meta={})
    from lcprobe.probing.batching import Request

    req = Request(0, item, (1, 2, 3), ((10, 11, 12), (10, 11, 13), (20,)))
    unit = build_unit(req, [0, 1, 2], prefix_len=1)
    # nodes: 2, 3 (shared context), 10, 11 (shared by a, b), 12, 13, 20
    assert unit.tokens == [2, 3, 10, 11, 12, 20, 13] or sorted(unit.tokens) == [2, 3, 10, 11, 12, 13, 20]
    assert unit.n_nodes == 7
    # outputs: last context token (predicts 10 / 20), node 10 (predicts 11), node 11 (predicts 12 / 13)
    assert len(unit.out_nodes) == 3
    assert sorted(len(t) for t in unit.out_targets) == [1, 2, 2]
    assert [len(p) for p in unit.choice_pairs] == [3, 3, 1]


def test_layer_specs():
    assert parse_layers(None, 30) == list(range(1, 31))
    assert parse_layers("1:3,20,-1", 30) == [1, 2, 3, 20, 30]
    assert parse_layers("-2:", 30) == [29, 30]
    for bad in ("0", "31", "x", "5:2", "-31"):
        with pytest.raises(LcprobeError):
            parse_layers(bad, 30)


def test_prompt_longer_than_context(smollm2):
    info = read_model_info(smollm2)
    lens = Lens(Unembed.from_model(info), info.n_layer)
    with Engine(info, EngineConfig(n_ctx=64, n_batch=64, n_ubatch=64, n_seq_max=4, n_threads=2)) as eng:
        long_item = Item(id="long", context="word " * 2000, choices=(" a", " b"), correct=(0,), meta={})
        with pytest.raises(PromptTooLongError, match="context"):
            list(Prober(eng, lens, [info.n_layer]).run([long_item]))


@pytest.mark.parametrize("context,choice", [
    ("Q: 2+2?\nA:", " 4"),          # the usual shape: space on the answer
    ("Q: 2+2?\nA: ", "4"),          # trailing space moved onto the continuation
    ("The sky is", " blue."),
    ("x =", "=y"),                 # may merge across the boundary for some BPEs
])
def test_tokenization_split(smol_setup, context, choice):
    eng, _ = smol_setup
    tok = lambda t, s: eng.tokenize(t, add_special=s)  # noqa: E731
    item = Item(id="t", context=context, choices=(choice,), correct=(0,), meta={})
    req = encode_item(0, item, tok)
    ctx, cont = split_context(context, choice)
    assert list(req.context) == tok(ctx, True)
    joint = tok(ctx + cont, True)
    if req.split_mismatches == 0:
        # context tokens + continuation tokens are exactly the joint tokenization
        assert list(req.context) + list(req.continuations[0]) == joint
    else:
        assert list(req.continuations[0]) == tok(cont, False)
    assert len(req.continuations[0]) >= 1


def test_bos_follows_the_model(smol_setup, gemma3):
    eng, _ = smol_setup
    assert eng.info.add_bos is False
    assert eng.tokenize("hi")[0] != 1  # SmolLM2 adds no BOS
    info = read_model_info(gemma3)
    assert info.add_bos is True


def test_choices_split_when_the_trie_does_not_fit():
    from lcprobe.probing.batching import Request, build_units

    item = Item(id="x", context="c", choices=("a", "b", "c"), correct=(0,), meta={})
    req = Request(0, item, (1, 2, 3, 4), ((10, 11, 12), (20, 21, 22), (30, 31, 32)))
    # prefix 2: each choice alone needs 2 + 3 = 5 cells; two need 8
    units = build_units([req], 2, max_choices=63, max_nodes=6)
    assert [u.choices for u in units] == [(0,), (1,), (2,)]
    assert all(u.n_nodes <= 6 for u in units)
    units = build_units([req], 2, max_choices=2, max_nodes=100)
    assert [u.choices for u in units] == [(0, 1), (2,)]
    assert [u.choices for u in build_units([req], 2, 63, None)] == [(0, 1, 2)]
