"""lcprobe kld: llama-perplexity's KL-divergence statistics at the output and per layer.

Unit tests pin the statistics to perplexity.cpp's formulas on hand-made values;
synthetic 3-layer models run the whole study in seconds (a model against itself
gives exactly 0); the SmolLM2 test (F16 base from the Q4_1 file, Q8_0 and Q4_0
made with llama.cpp's quantizer) checks lcprobe's final block against
``llama-perplexity --kl-divergence`` built from the llama.cpp source
llama-cpp-python ships (built once into the cache, see tests/llama_tools.py;
several minutes the first time: marked slow).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lcprobe.analysis import kld as stats
from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.results.kld import read_kld
from lcprobe.studies.kld import (KldOptions, Text, make_chunks, read_text, run_kld, sample_positions)

REPO = Path(__file__).resolve().parent.parent


# --- statistics, against perplexity.cpp's formulas -----------------------------------------


def test_mean_and_uncertainty_is_the_standard_error_of_the_mean():
    x = np.arange(1.0, 21.0)  # 20 values
    m, e = stats.mean_and_uncertainty(x.sum(), (x * x).sum(), len(x))
    assert m == pytest.approx(10.5)
    assert e == pytest.approx(x.std(ddof=0) / math.sqrt(len(x) - 1), rel=1e-12)
    # at most 10 values: no uncertainty, as llama-perplexity
    assert stats.mean_and_uncertainty(x[:10].sum(), (x[:10] ** 2).sum(), 10)[1] == 0.0
    assert stats.mean_and_uncertainty(0.0, 0.0, 0) == (0.0, 0.0)


def test_covariance_of_the_means_and_its_small_sample_cut():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(50)
    b = a + rng.standard_normal(50)
    cov = stats.covariance(a.sum(), b.sum(), (a * b).sum(), 50)
    assert cov == pytest.approx(np.cov(a, b, ddof=0)[0, 1] / 49, rel=1e-12)
    assert stats.covariance(a[:9].sum(), b[:9].sum(), (a[:9] * b[:9]).sum(), 9) == 0.0


def test_percentile_interpolates_at_fraction_times_n_minus_1_and_median_averages_the_middle():
    v = np.array([0.0, 1.0, 2.0, 3.0, 10.0], np.float32)
    assert stats.percentile(v, 0.5) == 2.0
    assert stats.percentile(v, 0.9) == pytest.approx(0.4 * 3.0 + 0.6 * 10.0, rel=1e-6)  # p = 3.6
    assert stats.percentile(v, 0.0) == 0.0 and stats.percentile(v, 1.0) == 10.0
    assert stats.median(v) == 2.0
    assert stats.median(v[:4]) == 1.5


def test_final_stats_follow_llama_perplexity():
    rng = np.random.default_rng(1)
    n = 400
    nll_b = rng.gamma(2.0, 1.0, n)
    nll_q = nll_b + rng.normal(0.05, 0.1, n)
    kld = rng.gamma(0.5, 0.01, n)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    same = rng.random(n) < 0.9
    f = stats.final_stats(nll_q, nll_b, kld, dp, same)
    assert set(stats.FINAL_KEYS) <= set(f)
    assert f["mean_ppl_q"] == pytest.approx(math.exp(nll_q.mean()), rel=1e-12)
    assert f["mean_ppl_base"] == pytest.approx(math.exp(nll_b.mean()), rel=1e-12)
    assert f["cor_ln_ppl"] == pytest.approx(np.corrcoef(nll_q, nll_b)[0, 1], rel=1e-9)
    assert f["mean_ln_ppl_ratio"] == pytest.approx(nll_q.mean() - nll_b.mean(), rel=1e-12)
    assert f["mean_ppl_ratio"] == pytest.approx(f["mean_ppl_q"] / f["mean_ppl_base"], rel=1e-12)
    # the ln-ratio's uncertainty is the standard error of the paired differences
    assert f["mean_ln_ppl_ratio_err"] == pytest.approx((nll_q - nll_b).std() / math.sqrt(n - 1), rel=1e-9)
    assert f["kld_mean"] == pytest.approx(kld.mean(), rel=1e-12)
    assert f["kld_mean_err"] == pytest.approx(kld.std() / math.sqrt(n - 1), rel=1e-9)
    ks = np.sort(kld.astype(np.float32))
    assert f["kld_max"] == ks[-1] and f["kld_min"] == ks[0]
    assert f["kld_median"] == pytest.approx(0.5 * (ks[199] + ks[200]), rel=1e-6)
    assert f["kld_p99"] == pytest.approx(np.percentile(ks, 99), rel=1e-5)
    assert f["dp_p25"] == pytest.approx(np.percentile(dp, 25), rel=1e-4, abs=1e-7)
    assert f["dp_rms"] == pytest.approx(math.sqrt(np.mean(dp ** 2)), rel=1e-12)
    assert f["dp_rms_err"] == pytest.approx(0.5 / f["dp_rms"] * (dp ** 2).std() / math.sqrt(n - 1), rel=1e-9)
    p = same.mean()
    assert f["same_top"] == p and f["same_top_err"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert f["mean_ppl_q_err"] == pytest.approx(f["mean_ppl_q"] * nll_q.std() / math.sqrt(n - 1), rel=1e-9)


def test_token_stats_kl_is_the_full_vocabulary_sum():
    rng = np.random.default_rng(2)
    zb, zq = rng.standard_normal((5, 30)), rng.standard_normal((5, 30))
    lb = (zb - np.log(np.exp(zb).sum(1, keepdims=True))).astype(np.float32)
    lq = (zq - np.log(np.exp(zq).sum(1, keepdims=True))).astype(np.float32)
    t = np.array([0, 3, 7, 29, 12])
    s = stats.token_stats(lb, lq, t)
    pb = np.exp(lb.astype(np.float64))
    want = (pb * (lb.astype(np.float64) - lq)).sum(1)
    np.testing.assert_allclose(s["kld"], want, rtol=1e-6)
    np.testing.assert_allclose(s["nll_base"], -lb[np.arange(5), t], rtol=1e-7)
    np.testing.assert_allclose(s["dp"], np.exp(lq[np.arange(5), t]) - np.exp(lb[np.arange(5), t]), rtol=1e-6)
    assert (s["same_top"] == (lb.argmax(1) == lq.argmax(1))).all()
    assert stats.token_stats(lb, lb, t)["kld"].max() == 0.0


def test_residual_error_relative_l2_and_cosine():
    b = np.array([[3.0, 4.0], [1.0, 0.0]])
    q = np.array([[3.0, 4.0], [0.0, 1.0]])
    rel, cos = stats.residual_error(b, q)
    np.testing.assert_allclose(rel, [0.0, math.sqrt(2)])
    np.testing.assert_allclose(cos, [1.0, 0.0], atol=1e-12)


# --- chunks as llama-perplexity cuts them ----------------------------------------------------


def test_chunks_replace_the_first_token_by_bos_and_score_the_second_half():
    tokens = list(range(100, 135))  # 35 tokens, n_ctx 8: 4 chunks
    c = make_chunks(tokens, 8, None, bos=1)
    assert c.n_chunk == 4 and c.first == 4 and c.n_scored == 3
    assert list(c.inputs(1)) == [1, 109, 110, 111, 112, 113, 114, 115]
    # logits at positions 4, 5, 6 of chunk 1 predict its tokens 5, 6, 7
    assert list(c.targets(1)) == [113, 114, 115]
    assert make_chunks(tokens, 8, 2, bos=None).n_chunk == 2
    assert list(make_chunks(tokens, 8, 2, bos=None).inputs(0)) == tokens[:8]
    with pytest.raises(LcprobeError, match="at least 72"):
        make_chunks(tokens, 36, None, bos=1)


def test_layer_positions_are_evenly_spread_and_bounded():
    s = sample_positions(255, 10, 100)
    assert len(s) == 10 and s[0] == 0 and s[-1] == 254
    assert len(sample_positions(255, 1000, 100)) == 1  # at least one per chunk
    assert len(sample_positions(3, 2, 1000)) == 3
    assert len(sample_positions(255, 10, 0)) == 0


def test_text_is_read_like_llama_perplexity_reads_it(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"one two\n\n")
    t = read_text(p)
    assert t.text == "one two\n"  # one trailing newline dropped, as its -f does
    import hashlib

    assert t.sha256 == hashlib.sha256(b"one two\n\n").hexdigest()
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe abc")
    with pytest.raises(LcprobeError, match="not UTF-8"):
        read_text(tmp_path / "bad.txt")
    with pytest.raises(LcprobeError, match="not found"):
        read_text(tmp_path / "missing.txt")


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, synth_model):
    path = synth_model[0]
    assert main(["kld", "-m", str(path), "-o", str(tmp_path / "o"), "--text", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lcprobe: error:") and err.count("\n") == 1
    text = tmp_path / "short.txt"
    text.write_text("a b c")
    assert main(["kld", "-m", str(path), "-o", str(tmp_path / "o"), "--text", str(text)]) == 1
    assert "base model and at least one" in capsys.readouterr().err
    assert main(["kld", "-m", str(path), "-m", str(path), "-o", str(tmp_path / "o"), "--text", str(text),
                 "-c", "64"]) == 1
    err = capsys.readouterr().err
    assert "needs at least 128" in err and err.count("\n") == 1
    assert main(["kld", "-m", str(path), "-m", str(path), "-o", str(tmp_path / "o"), "--text", str(text),
                 "--chunks", "0"]) == 1
    assert "--chunks" in capsys.readouterr().err


def test_read_kld_names_a_missing_file(tmp_path):
    with pytest.raises(LcprobeError, match="no kld.json"):
        read_kld(tmp_path)
    (tmp_path / "kld.json").write_text("{")
    with pytest.raises(LcprobeError, match="not a readable"):
        read_kld(tmp_path)


# --- the whole study on synthetic models -----------------------------------------------------


def _synth_text() -> str:
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "it"]
    rng = np.random.default_rng(3)
    return " ".join(words[i] for i in rng.integers(0, len(words), 600))


def test_synthetic_self_comparison_is_exactly_zero_and_q8_is_not(tmp_path, synth_model, synth_q8):
    base = synth_model[0]
    twin = tmp_path / "twin.gguf"
    twin.write_bytes(base.read_bytes())
    text = Text(_synth_text(), "synthetic", "0")
    opts = KldOptions(n_ctx=32, chunks=6, layer_tokens=1000, n_threads=2)
    res = run_kld([base, twin, synth_q8[0]], tmp_path / "out", text, opts)
    assert not (tmp_path / "out" / ".kld_base").exists()
    assert res["text"]["chunks"] == 6 and res["text"]["tokens_scored"] == 6 * 15
    same, q8 = res["models"]
    f = same["final"]
    assert f["kld_mean"] == 0.0 and f["kld_max"] == 0.0 and f["same_top"] == 1.0 and f["dp_rms"] == 0.0
    assert f["mean_ppl_q"] == f["mean_ppl_base"]
    assert [r["layer"] for r in same["layers"]] == [1, 2, 3]
    for r in same["layers"]:
        assert r["kld_mean"] == 0.0 and r["rel_l2"] == 0.0 and r["rel_l2_mid"] == 0.0 and r["same_top"] == 1.0
    g = q8["final"]
    assert g["kld_mean"] > 0 and g["kld_max"] >= g["kld_p99"] >= g["kld_median"] >= g["kld_min"]
    assert g["mean_ppl_base"] == f["mean_ppl_base"]
    assert all(r["rel_l2"] > 0 and 0.9 < r["cosine"] <= 1.0 for r in q8["layers"])
    assert json.loads((tmp_path / "out" / "kld.json").read_text())["models"][1]["quant"] == "Q8_0"


def test_synthetic_final_numbers_are_llama_cpp_logits_of_the_chunks(tmp_path, synth_model, synth_q8):
    """PPL recomputed from lcprobe.load(...).logits() of each chunk, BOS first, second half scored."""
    import lcprobe

    text = Text(_synth_text(), "synthetic", "0")
    res = run_kld([synth_model[0], synth_q8[0]], tmp_path / "out", text,
                  KldOptions(n_ctx=32, chunks=3, layer_tokens=0, n_threads=2))
    assert res["models"][0]["layers"] == []
    nll = {}
    for name, path in (("base", synth_model[0]), ("q", synth_q8[0])):
        # flash attention as kld runs it (llama.cpp's default, llama-perplexity's)
        with lcprobe.load(path, n_ctx=32, lens_backend=None, flash_attn="auto") as m:
            toks = m.tokenize(text.text)
            bos = m.tokenize("")[0]
            vals = []
            for i in range(3):
                chunk = [bos] + toks[i * 32 + 1:(i + 1) * 32]
                lg = m.logits(chunk).astype(np.float64)
                lp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) - lg.max(1, keepdims=True)
                vals += [-lp[p, toks[i * 32 + p + 1]] for p in range(16, 31)]
            nll[name] = np.array(vals)
    f = res["models"][0]["final"]
    assert f["mean_ppl_base"] == pytest.approx(math.exp(nll["base"].mean()), rel=1e-5)
    assert f["mean_ppl_q"] == pytest.approx(math.exp(nll["q"].mean()), rel=1e-5)


# --- SmolLM2 against llama-perplexity ----------------------------------------------------------


@pytest.fixture(scope="session")
def smol_quants(smollm2, tmp_path_factory):
    """F16 SmolLM2 (an exact copy of the Q4_1 weights), and Q8_0 / Q4_0 quantized from it."""
    from lcprobe.studies.quantize import plan_quantize, quantize_all

    qdir = tmp_path_factory.mktemp("kldq")
    (f16,) = quantize_all(plan_quantize(smollm2, qdir, "F16"), nthread=2)
    quants = {r.qtype: r.path for r in quantize_all(plan_quantize(f16.path, qdir, "Q8_0,Q4_0"), nthread=2)}
    return f16.path, quants["Q8_0"], quants["Q4_0"]


def _test_text(tmp_path: Path) -> Path:
    """About 3000 tokens: the paper's data when $LCPROBE_DATA has it, else this repository's README."""
    try:
        text = read_text(None).text[:12000]
    except LcprobeError:
        text = (REPO / "README.md").read_text(encoding="utf-8")[:12000]
    p = tmp_path / "text.txt"
    p.write_text(text + "\n", encoding="utf-8")
    return p


_BLOCK = {
    "Mean PPL(Q)": "mean_ppl_q", "Mean PPL(base)": "mean_ppl_base", "Mean    KLD": "kld_mean",
    "Same top p": "same_top", "Median  KLD": "kld_median", "RMS Δp": "dp_rms",
}


def _parse_block(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        key = _BLOCK.get(name.strip()) or _BLOCK.get(name.rstrip())
        m = re.match(r"\s*(-?[0-9.]+)", rest)
        if key and m:
            out[key] = float(m.group(1))
    return out


@pytest.mark.slow
def test_smollm2_final_block_matches_llama_perplexity(tmp_path, smol_quants, capsys):
    from llama_tools import build_tool

    base, q8, q4 = smol_quants
    text = _test_text(tmp_path)
    out = tmp_path / "kld"
    rc = main(["kld", "-m", str(base), "-m", str(q8), "-m", str(q4), "--text", str(text), "-c", "256",
               "--chunks", "6", "--layers", "1,10,20,30", "--layer-tokens", "96", "-t", "2", "-o", str(out),
               "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = read_kld(out)
    assert set(res["text"]) >= {"path", "sha256", "n_ctx", "chunks", "tokens_scored"}
    assert res["text"]["n_ctx"] == 256 and res["text"]["chunks"] == 6 and res["text"]["tokens_scored"] == 6 * 127
    for m in res["models"]:
        assert set(stats.FINAL_KEYS) <= set(m["final"])
        assert [r["layer"] for r in m["layers"]] == [1, 10, 20, 30]
        assert all(set(stats.LAYER_KEYS) == set(r) for r in m["layers"])
    assert "====== KL divergence statistics ======" in printed and "Same top p:" in printed

    exe = build_tool("llama-perplexity")
    logits = tmp_path / "base.kld"
    common = ["-f", str(text), "-c", "256", "--chunks", "6", "-t", "2", "-b", "256", "--log-colors", "off"]
    done = subprocess.run([str(exe), "-m", str(base), *common, "--kl-divergence-base", str(logits)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for m, path in zip(res["models"], (q8, q4)):
        done = subprocess.run([str(exe), "-m", str(path), *common, "--kl-divergence-base", str(logits),
                               "--kl-divergence"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        theirs = _parse_block(done.stdout + done.stderr)
        assert {"mean_ppl_q", "mean_ppl_base", "kld_mean", "same_top"} <= set(theirs), done.stdout[-3000:]
        ours = m["final"]
        assert ours["kld_mean"] == pytest.approx(theirs["kld_mean"], rel=0.02), (m["quant"], theirs)
        assert 100 * ours["same_top"] == pytest.approx(theirs["same_top"], abs=0.5), (m["quant"], theirs)
        assert ours["mean_ppl_q"] == pytest.approx(theirs["mean_ppl_q"], rel=0.005), (m["quant"], theirs)
        assert ours["mean_ppl_base"] == pytest.approx(theirs["mean_ppl_base"], rel=0.005), (m["quant"], theirs)
    q8f, q4f = (m["final"] for m in res["models"])
    assert q4f["kld_mean"] > q8f["kld_mean"] > 0
    q8l, q4l = (m["layers"] for m in res["models"])
    assert q4l[-1]["kld_mean"] > q8l[-1]["kld_mean"] > 0
    assert all(0 < r["rel_l2"] < 1 and 0.5 < r["cosine"] <= 1 for r in q8l + q4l)

    from lcprobe.report.make import make_report

    figs = make_report(out).figures
    assert any(p.name == "kld-layers.png" and p.stat().st_size > 10_000 for p in figs)
