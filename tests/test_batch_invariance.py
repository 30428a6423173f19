"""Scores do not depend on -b: the batch-invariant KV layout (issue #12 part 4).

Without it Gemma 3's per-layer log-probs moved by a median 1.6 nats per item
between -b 64 and -b 512: llama.cpp's CPU attention sums over KV cells in SIMD
lanes keyed by cell index (and its flash attention picks a kernel by ubatch
size), so where a batch put an item's cells changed its numbers. The prober now
decodes without flash attention and pads each item's cells to the same offsets
modulo lcprobe.llama.engine.KV_CELL_ALIGN.
"""

from __future__ import annotations

import numpy as np
import pytest

from lcprobe import load_task
from lcprobe.analysis.lens import Lens, Unembed
from lcprobe.files.modelfile import read_model_info
from lcprobe.llama.engine import Engine, EngineConfig
from lcprobe.probing.batching import Request, build_unit, group_units, layout_group
from lcprobe.probing.runner import Prober
from lcprobe.tasks.task import Item


def _unit(idx: int, context: tuple[int, ...], conts: tuple[tuple[int, ...], ...], prefix_len: int):
    item = Item(id=str(idx), context="", choices=tuple("x" * (i + 1) for i in range(len(conts))), correct=(0,),
                meta={})
    return build_unit(Request(idx, item, context, conts), range(len(conts)), prefix_len)


def test_layout_pads_each_unit_to_the_prefix_residue():
    prefix_len, align, pad_seq = 7, 8, 15
    ctx = (1, 2, 3, 4, 5, 6, 7)
    units = [_unit(i, ctx + tuple(range(10, 10 + 3 + i)), ((40,), (41, 42), (43,)), prefix_len) for i in range(4)]
    groups = group_units(units, prefix_len, n_ctx=512, n_batch=64, max_seqs=13, max_rows=10**6, align=align)
    for group in groups:
        batch = layout_group(group, prefix_len, align, pad_seq, room=64)
        assert len(batch.tokens) <= 64
        is_pad = np.array([s == [pad_seq] for s in batch.seq_ids])
        assert batch.n_pad == is_pad.sum() and not batch.outputs[is_pad].any()
        # the pad sequence's positions run 0, 1, 2, ... as llama.cpp requires of one sequence
        assert batch.positions[is_pad].tolist() == list(range(batch.n_pad))
        # every unit's first token lands on a cell congruent to its position
        firsts = [i for i in range(len(batch.tokens)) if not is_pad[i] and batch.positions[i] == prefix_len
                  and (i == 0 or is_pad[i - 1] or batch.positions[i - 1] != prefix_len)]
        assert len(firsts) == len(group)
        for i in firsts:
            assert (prefix_len + i) % align == prefix_len % align
    # without a pad sequence nothing moves
    plain = layout_group(groups[0], prefix_len)
    assert plain.n_pad == 0 and plain.pad_seq is None


def test_group_budget_counts_the_pads():
    prefix_len = 5
    units = [_unit(i, tuple(range(1, 9)), ((40,), (41,)), prefix_len) for i in range(6)]
    plain = group_units(units, prefix_len, n_ctx=4096, n_batch=32, max_seqs=63, max_rows=10**6)
    padded = group_units(units, prefix_len, n_ctx=4096, n_batch=32, max_seqs=63, max_rows=10**6, align=16)
    assert len(padded) > len(plain)
    for group in padded:
        assert len(layout_group(group, prefix_len, 16, 63, room=32).tokens) <= 32


def _scores(engine_config: dict, info, lens: Lens, items) -> dict[str, np.ndarray]:
    layers = list(range(1, info.n_layer + 1))
    with Engine(info, EngineConfig(n_ctx=1024, n_threads=2, **engine_config)) as eng:
        return {r.id: r.scores for group in Prober(eng, lens, layers).run(items) for r in group}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma3", "smollm2"])
def test_scores_do_not_depend_on_the_batch_size(model, request):
    info = read_model_info(request.getfixturevalue(model))
    lens = Lens(Unembed.from_model(info), info.n_layer)  # one head for every engine: loading it dominates
    items = load_task("calc").items(limit=8)
    ref = _scores(dict(n_batch=512, n_ubatch=512), info, lens, items)
    others = {"-b 64": dict(n_batch=64, n_ubatch=64), "-b 128": dict(n_batch=128, n_ubatch=128),
              # one item per decode: its 4 choices, the prefix's and the pads' sequences
              "one item at a time": dict(n_batch=512, n_ubatch=512, n_seq_max=6)}
    for name, cfg in others.items():
        got = _scores(cfg, info, lens, items)
        assert got.keys() == ref.keys()
        per_item = [float(np.abs(got[k] - ref[k]).max()) for k in ref]
        print(f"{info.name} {name} vs -b 512: median per-item max|diff| {np.median(per_item):.4f}, "
              f"max {max(per_item):.4f}")
        assert np.median(per_item) <= 0.05, (name, per_item)
        # winners (the best choice at each layer) agree almost everywhere
        flips = np.mean([np.mean(got[k].argmax(0) != ref[k].argmax(0)) for k in ref])
        assert flips <= 0.02, (name, flips)
