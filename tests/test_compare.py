"""lcprobe compare: paired per-layer accuracy tests and representation measures against a reference.

The SmolLM2 comparison (its exact F32 copy as reference, the F32 file again,
Q8_0 and Q2_K, 3 calc items) runs once per module through the CLI (about a
minute, most of it gguf-py reading the vocabulary of each file several times:
marked slow); synthetic models cover self-comparison, the row budget,
tokenizer checks and models of different depth in seconds.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from lcprobe.analysis import metrics
from lcprobe.cli import main
from lcprobe.studies.compare import (
    check_same_tokens,
    layer_map,
    paired_test,
    plan_models,
    representation_sums,
    run_compare,
    table_bins,
    verdict_line,
)
from lcprobe.errors import LcprobeError
from lcprobe.results.compare import CSV_COLUMNS, read_compare
from lcprobe.analysis.lens import Lens, Unembed
from lcprobe.studies.quantize import plan_quantize, quantize_all
from lcprobe.results.run import read_items
from lcprobe.probing.session import ProbeOptions
from lcprobe.tasks.task import load_task

LAYER_KEYS = {"layer", "metric", "delta", "mcnemar_p", "flips_gained", "flips_lost", "kl", "cosine", "rel_l2", "top1"}


# --- pure statistics ---------------------------------------------------------------------


def test_mcnemar_on_a_hand_made_table_is_the_exact_binomial_value():
    # 10 paired items: 2 right under both, 1 lost (right -> wrong), 7 gained (wrong -> right), 0 wrong under both
    ref = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    cur = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    p, gained, lost = paired_test(ref, cur)
    assert (gained, lost) == (7, 1)
    # two-sided exact binomial: 2 * P(X <= 1), X ~ Bin(8, 1/2) = 2 * (1 + 8) / 256
    assert p == pytest.approx(2 * (math.comb(8, 0) + math.comb(8, 1)) / 2 ** 8, abs=1e-15)
    assert p == pytest.approx(0.0703125, abs=1e-15)
    assert paired_test(cur, ref)[0] == pytest.approx(p, abs=1e-15)
    assert paired_test(ref, ref) == (1.0, 0, 0)


def test_layer_map_is_identity_for_equal_depth_and_relative_otherwise():
    assert layer_map([1, 2, 3, 4], 4, [1, 2, 3, 4], 4) == [0, 1, 2, 3]
    # a 2-layer model against a 4-layer reference: depth 0.5 -> layer 2, 1.0 -> layer 4
    assert layer_map([1, 2, 3, 4], 4, [1, 2], 2) == [1, 3]
    # depth 0.75 is equally far from 0.5 and 1.0: the shallower reference layer wins the tie
    assert layer_map([1, 2], 2, [1, 2, 3, 4], 4) == [0, 0, 0, 1]


def test_same_tokens_check_names_the_item():
    ref = [{"id": "a", "n_tokens": [2, 3]}, {"id": "b", "n_tokens": [1, 1]}]
    check_same_tokens(ref, list(reversed(ref)), "ref.gguf", "q.gguf")
    with pytest.raises(LcprobeError, match="tokenizes item b differently"):
        check_same_tokens(ref, [ref[0], {"id": "b", "n_tokens": [1, 2]}], "ref.gguf", "q.gguf")
    with pytest.raises(LcprobeError, match="scored different items"):
        check_same_tokens(ref, ref[:1], "ref.gguf", "q.gguf")


def _toy_lens(rng, vocab=50, d=8):
    un = Unembed(norm_weight=np.ones(d, np.float32), head=rng.standard_normal((vocab, d)).astype(np.float32),
                 eps=1e-6)
    return Lens(un, n_layer=2)


def test_representation_sums_match_a_direct_computation():
    rng = np.random.default_rng(0)
    lens = _toy_lens(rng)
    ref = rng.standard_normal((2, 5, 8)).astype(np.float32)
    cur = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    s = representation_sums(ref, cur, lens, lens, [1, 2])
    for li, layer in enumerate([1, 2]):
        lp = lens.log_probs(ref[li].copy(), layer).astype(np.float64)
        lq = lens.log_probs(cur[li].copy(), layer).astype(np.float64)
        kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
        cos = (ref[li] * cur[li]).sum(1) / np.linalg.norm(ref[li], axis=1) / np.linalg.norm(cur[li], axis=1)
        rel = np.linalg.norm(cur[li] - ref[li], axis=1) / np.linalg.norm(ref[li], axis=1)
        top = lp.argmax(1) == lq.argmax(1)
        assert s["kl"][li] == pytest.approx(kl.sum(), rel=1e-4)
        assert s["cosine"][li] == pytest.approx(cos.sum(), rel=1e-5)
        assert s["rel_l2"][li] == pytest.approx(rel.sum(), rel=1e-5)
        assert s["top1"][li] == top.sum()
    same = representation_sums(ref, ref, lens, lens, [1, 2])
    assert np.all(same["kl"] == 0) and np.allclose(same["cosine"], 5) and np.all(same["rel_l2"] == 0)
    assert np.all(same["top1"] == 5)


# --- synthetic models: self-comparison, mismatches, sizes ----------------------------------------


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    """Two synthetic LLaMAs sharing the synthetic vocabulary: 4 layers and 2 layers."""
    from synth import SynthSpec, write_llama_gguf

    d = tmp_path_factory.mktemp("cmp_synth")
    deep, shallow = d / "synth-deep.gguf", d / "synth-shallow.gguf"
    write_llama_gguf(deep, SynthSpec(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=5))
    write_llama_gguf(shallow, SynthSpec(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=6))
    return deep, shallow


def _synth_options(limit=3):
    # one thread: a tiny model gains nothing from more, and loses much when the machine is busy
    return ProbeOptions(limit=limit, n_ctx=1024, n_batch=256, n_threads=1, n_seq_max=8)


def test_a_model_compared_with_itself_is_identical(synth_pair, tmp_path):
    deep, _ = synth_pair
    models = plan_models([deep, deep])
    assert [m.label for m in models] == ["F32", "F32#2"]
    assert [m.dir_name for m in models] == ["synth-deep", "synth-deep-2"]
    res = run_compare(models, [load_task("calc")], tmp_path, _synth_options())
    assert res["complete"]
    tr = res["tasks"]["calc"]
    assert tr["rows_compared"] > 0
    ref, twin = tr["models"]
    assert ref["reference"] and not twin["reference"]
    for row in twin["layers"]:
        assert LAYER_KEYS <= set(row)
        assert row["kl"] == 0.0 and row["rel_l2"] == 0.0 and row["top1"] == 1.0
        assert row["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert row["delta"] == 0.0 and row["flips_gained"] == row["flips_lost"] == 0 and row["mcnemar_p"] == 1.0
    assert (tmp_path / "synth-deep" / "calc" / "items.jsonl").exists()
    assert (tmp_path / "synth-deep-2" / "calc" / "summary.json").exists()
    assert not (tmp_path / ".ref_rows").exists()  # the reference rows are removed after the run


def test_max_rows_bounds_the_reference_rows(synth_pair, tmp_path):
    deep, _ = synth_pair
    models = plan_models([deep, deep])
    full = run_compare(models, [load_task("calc")], tmp_path / "all", _synth_options(limit=3))
    assert full["tasks"]["calc"]["items_with_rows"] == 3
    budget = full["tasks"]["calc"]["rows_compared"] - 1
    res = run_compare(models, [load_task("calc")], tmp_path, _synth_options(limit=3), max_rows=budget)
    tr = res["tasks"]["calc"]
    assert 0 < tr["rows_compared"] <= budget and tr["items_with_rows"] < 3
    assert tr["models"][1]["rows_compared"] == tr["rows_compared"]
    res0 = run_compare(models, [load_task("calc")], tmp_path / "none", _synth_options(limit=2), max_rows=0)
    assert res0["tasks"]["calc"]["models"][1]["layers"][-1]["kl"] is None
    assert res0["tasks"]["calc"]["models"][1]["layers"][-1]["mcnemar_p"] == 1.0


def test_models_of_different_depth_compare_on_relative_depth(synth_pair, tmp_path):
    deep, shallow = synth_pair
    models = plan_models([deep, shallow])
    assert not models[1].representation and models[0].representation
    assert [m.label for m in models] == ["synth-deep", "synth-shallow"]
    res = run_compare(models, [load_task("calc")], tmp_path, _synth_options())
    assert res["models"][1]["note"] and "relative depth" in res["models"][1]["note"]
    entry = res["tasks"]["calc"]["models"][1]
    assert [r["ref_layer"] for r in entry["layers"]] == [2, 4]
    assert [r["rel_depth"] for r in entry["layers"]] == [0.5, 1.0]
    assert all(r["kl"] is None and r["cosine"] is None for r in entry["layers"])
    ref_vals = {r["layer"]: r["metric"] for r in res["tasks"]["calc"]["models"][0]["layers"]}
    for r in entry["layers"]:
        assert r["delta"] == pytest.approx(r["metric"] - ref_vals[r["ref_layer"]], abs=1e-6)
    assert "different size" in verdict_line(entry, "acc")
    bins = {b["label"]: b for b in table_bins(res["tasks"]["calc"])}
    # reference layers at depths 0.25/0.5/0.75/1.0 fall in these tenths; empty tenths are left out
    assert list(bins) == ["30%", "50%", "80%", "100%"]
    assert bins["50%"]["models"]["synth-shallow"]["n_layers"] == 1
    assert bins["30%"]["models"]["synth-shallow"]["delta"] is None


def test_vocabulary_size_mismatch_is_refused(synth_pair, smollm2):
    deep, _ = synth_pair
    with pytest.raises(LcprobeError, match="different tokenizer"):
        plan_models([smollm2, deep])


def test_same_size_vocabulary_with_other_strings_is_refused(synth_pair, tmp_path, monkeypatch):
    import synth

    deep, _ = synth_pair
    tokens, scores, types = synth.build_vocab()
    i = tokens.index("hello")
    changed = tokens[:i] + ("jello",) + tokens[i + 1:]
    monkeypatch.setattr(synth, "build_vocab", lambda: (changed, scores, types))
    other = tmp_path / "synth-other.gguf"
    synth.write_llama_gguf(other, synth.SynthSpec(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=5))
    with pytest.raises(LcprobeError, match="different token strings"):
        plan_models([deep, other])


def test_one_model_is_not_a_comparison(synth_pair):
    with pytest.raises(LcprobeError, match="at least one more model"):
        plan_models([synth_pair[0]])


# --- SmolLM2: F32 reference, itself, Q8_0, Q2_K ---------------------------------------------------


@pytest.fixture(scope="module")
def smol_compare(smollm2, tmp_path_factory):
    """F32 copy of SmolLM2 (the reference), the same file again, Q8_0 and Q2_K; 3 calc items."""
    qdir = tmp_path_factory.mktemp("cmp_models")
    (f32,) = quantize_all(plan_quantize(smollm2, qdir, "F32"), nthread=2)
    quants = {r.qtype: r.path for r in quantize_all(plan_quantize(f32.path, qdir, "Q8_0,Q2_K"), nthread=2)}
    out = tmp_path_factory.mktemp("cmp_out")
    argv = ["compare", "-m", str(f32.path), "-m", str(f32.path), "-m", str(quants["Q8_0"]),
            "-m", str(quants["Q2_K"]), "-T", "calc", "--limit", "3", "-o", str(out), "-t", "2"]
    assert main(argv) == 0
    return out, read_compare(out)


def _by_label(res, task="calc"):
    return {m["label"]: m for m in res["tasks"][task]["models"]}


@pytest.mark.slow
def test_compare_json_layout(smol_compare):
    out, res = smol_compare
    assert res["complete"] and res["reference"].endswith("SmolLM2-135M-Instruct-F32.gguf")
    tr = res["tasks"]["calc"]
    assert tr["metric"] == "acc" and tr["paired_metric"] == "acc" and tr["n_items"] == 3
    assert [m["label"] for m in tr["models"]] == ["F32", "F32#2", "Q8_0", "Q2_K"]
    for m in tr["models"]:
        assert {"path", "quant", "layers"} <= set(m)
        assert [r["layer"] for r in m["layers"]] == list(range(1, 31))
        assert all(LAYER_KEYS <= set(r) for r in m["layers"])
        assert (out / m["path"].rsplit("/", 1)[-1].removesuffix(".gguf")).is_dir() or m["label"] == "F32#2"
    ref = tr["models"][0]
    assert all(r["delta"] == 0.0 and r["kl"] == 0.0 and r["cosine"] == 1.0 for r in ref["layers"])
    q2 = {m["label"]: m for m in res["models"]}["Q2_K"]
    assert q2["warning"] and "576" in q2["warning"] and q2["type_mix"]["base_fraction"] < 0.05


@pytest.mark.slow
def test_compare_runs_are_lcprobe_run_directories_on_the_same_tokens(smol_compare):
    out, res = smol_compare
    runs = {}
    for m in res["tasks"]["calc"]["models"]:
        run_dir = out / m["dir"].rsplit("/", 2)[-2] / "calc"
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[m["label"]] = read_items(run_dir / "items.jsonl")
        # the metric in compare.json is the run's own per-layer value
        assert [r["metric"] for r in m["layers"]] == pytest.approx([r["acc"] for r in summary["layers"]], abs=1e-6)
    ids = [r["id"] for r in runs["F32"]]
    for label, recs in runs.items():
        assert [r["id"] for r in recs] == ids
        assert [r["n_tokens"] for r in recs] == [r["n_tokens"] for r in runs["F32"]], label


@pytest.mark.slow
def test_f32_against_itself_is_exact(smol_compare):
    _, res = smol_compare
    twin = _by_label(res)["F32#2"]
    assert all(r["kl"] == 0.0 and r["top1"] == 1.0 and r["rel_l2"] == 0.0 for r in twin["layers"])
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-12) for r in twin["layers"])
    assert all(r["flips_gained"] == 0 and r["flips_lost"] == 0 and r["delta"] == 0 for r in twin["layers"])


@pytest.mark.slow
def test_q8_0_stays_close_to_the_reference(smol_compare):
    _, res = smol_compare
    q8 = _by_label(res)["Q8_0"]
    assert all(0 < r["kl"] < 0.05 for r in q8["layers"])
    assert all(r["cosine"] > 0.99 for r in q8["layers"])
    assert all(r["rel_l2"] < 0.15 for r in q8["layers"])
    assert np.mean([r["top1"] for r in q8["layers"]]) > 0.9


@pytest.mark.slow
def test_q2_k_diverges_more_than_q8_0(smol_compare):
    _, res = smol_compare
    by = _by_label(res)
    q8, q2 = by["Q8_0"]["layers"], by["Q2_K"]["layers"]
    assert q2[-1]["kl"] > q8[-1]["kl"] and q2[-1]["cosine"] < q8[-1]["cosine"]
    kl_more = sum(a["kl"] > b["kl"] for a, b in zip(q2, q8))
    cos_less = sum(a["cosine"] < b["cosine"] for a, b in zip(q2, q8))
    assert kl_more >= 27 and cos_less >= 27, (kl_more, cos_less)
    assert by["Q2_K"]["verdict"]["worst_kl"] > 10 * by["Q8_0"]["verdict"]["worst_kl"]


@pytest.mark.slow
def test_flips_and_p_values_follow_from_the_items(smol_compare):
    out, res = smol_compare
    by = _by_label(res)

    def outcomes(label):
        run_dir = out / by[label]["dir"].rsplit("/", 2)[-2] / "calc"
        recs = sorted(read_items(run_dir / "items.jsonl"), key=lambda r: r["id"])
        return np.stack([metrics.item_metrics(np.asarray(r["logprobs"]), r["correct"], r["n_tokens"],
                                              r["n_bytes"])["acc"] for r in recs])

    ref, q2 = outcomes("F32"), outcomes("Q2_K")
    for li, row in enumerate(by["Q2_K"]["layers"]):
        lost, gained = metrics.discordant_counts(ref[:, li], q2[:, li])
        assert (row["flips_gained"], row["flips_lost"]) == (gained, lost)
        assert row["mcnemar_p"] == pytest.approx(metrics.mcnemar_exact(lost, gained), rel=1e-5)
        assert row["delta"] == pytest.approx((gained - lost) / len(ref), abs=1e-6)


@pytest.mark.slow
def test_compare_csv_is_long_format(smol_compare):
    out, res = smol_compare
    with open(out / "compare.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 4 * 30
    q2_last = [r for r in rows if r["label"] == "Q2_K" and r["layer"] == "30"][0]
    assert float(q2_last["kl"]) == pytest.approx(_by_label(res)["Q2_K"]["layers"][-1]["kl"])


@pytest.mark.slow  # reading Gemma's 262k-token vocabulary takes ~13 s
def test_tokenizer_mismatch_through_the_cli(smollm2, gemma3, tmp_path, capsys):
    assert main(["compare", "-m", str(smollm2), "-m", str(gemma3), "-T", "calc", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "gemma-3-270m" in err
    assert not (tmp_path / "compare.json").exists()


def test_figures_of_a_comparison(synth_pair, tmp_path):
    pytest.importorskip("matplotlib")
    from lcprobe.report.compare_figures import draw_compare

    deep, shallow = synth_pair
    same = tmp_path / "same"
    run_compare(plan_models([deep, deep]), [load_task("calc")], same, _synth_options(limit=2))
    paths = draw_compare(same)
    names = {p.name for p in paths}
    # a self-comparison has KL 0 everywhere: nothing to draw on a log scale
    assert {"compare_cosine.png", "compare_metric.png"} <= names and "compare_kl_heatmap.png" not in names
    assert all(p.parent == same / "figures" and p.stat().st_size > 5000 for p in paths)
    mixed = tmp_path / "mixed"
    run_compare(plan_models([deep, shallow]), [load_task("calc")], mixed, _synth_options(limit=2))
    assert [p.name for p in draw_compare(mixed, out_dir=tmp_path / "figs")] == ["compare_metric.png"]
    with pytest.raises(LcprobeError, match="no compare.json"):
        draw_compare(tmp_path / "nothing")


def test_cli_compare_of_two_sizes_prints_relative_depth_tables(synth_pair, tmp_path, capsys):
    deep, shallow = synth_pair
    argv = ["compare", "-m", str(deep), "-m", str(shallow), "-T", "calc", "--limit", "2", "-o", str(tmp_path),
            "-t", "1", "-c", "1024"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert "relative depth" in out and "representation measures (KL, cosine, top-1) are skipped" in out
    assert "synth-shallow" in out and "no representation metrics (different size)" in out
    assert "100%" in out  # the last relative-depth bin
    assert json.loads((tmp_path / "compare.json").read_text())["complete"]
