"""The lens against independent numpy maths on the synthetic model's own weights."""

from __future__ import annotations

import numpy as np
import pytest

from lcprobe.analysis.lens import Lens, Unembed, kl_rows, log_softmax, logsumexp
from lcprobe.files.modelfile import read_model_info

from synth import reference_forward


def _ref_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_log_softmax_and_kl_rows_match_float64_maths():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((5, 1000)) * 8).astype(np.float32)
    z[0] -= 2000.0  # far from 0: the max shift must keep exp from underflowing
    want = _ref_log_softmax(z.astype(np.float64))
    np.testing.assert_allclose(log_softmax(z), want, atol=1e-4)
    np.testing.assert_allclose(logsumexp(z.copy(), scratch=True), logsumexp(z), rtol=0, atol=0)
    inplace = z.copy()
    assert log_softmax(inplace, out=inplace) is inplace
    q = _ref_log_softmax((z + rng.standard_normal(z.shape)).astype(np.float64))
    want_kl = (np.exp(want) * (want - q)).sum(-1)
    lp, lq = log_softmax(z), q.astype(np.float32)
    np.testing.assert_allclose(kl_rows(lp, lq), want_kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(kl_rows(lp, lq, p=np.exp(lp)), kl_rows(lp, lq))
    assert np.all(kl_rows(lp, lp) == 0.0)  # identical distributions: exactly 0


def test_final_norm_lens_matches_reference(synth_model):
    path, spec, w = synth_model
    info = read_model_info(path)
    lens = Lens(Unembed.from_model(info), info.n_layer, "final-norm")
    toks = [5, 17, 40, 3, 99, 120]
    ref = reference_forward(w, spec, toks)
    # last layer: the lens must give the reference model's own output distribution
    got = lens.log_probs(np.asarray(ref["l_out"][-1], np.float32), info.n_layer)
    np.testing.assert_allclose(got, _ref_log_softmax(np.asarray(ref["logits"])), atol=2e-4)
    # a lower layer: RMSNorm with the output norm weight, then the head
    h = np.asarray(ref["l_out"][0])
    normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + spec.eps) * w["output_norm.weight"]
    want = _ref_log_softmax(normed @ w["output.weight"].T)
    np.testing.assert_allclose(lens.log_probs(h.astype(np.float32), 1), want, atol=2e-4)


def test_raw_lens_skips_the_norm_below_the_last_layer(synth_model):
    path, spec, w = synth_model
    info = read_model_info(path)
    lens = Lens(Unembed.from_model(info), info.n_layer, "raw")
    h = np.random.default_rng(0).normal(size=(4, spec.n_embd)).astype(np.float32)
    np.testing.assert_allclose(lens.log_probs(h, 1), _ref_log_softmax(h @ w["output.weight"].T), atol=2e-4)
    normed = Lens(Unembed.from_model(info), info.n_layer, "final-norm").log_probs(h, info.n_layer)
    np.testing.assert_allclose(lens.log_probs(h, info.n_layer), normed, atol=1e-6)


def test_token_log_probs_chunking(synth_model):
    path, spec, _ = synth_model
    info = read_model_info(path)
    un = Unembed.from_model(info)
    rng = np.random.default_rng(1)
    hs = rng.normal(size=(3, 9, spec.n_embd)).astype(np.float32)
    targets = [rng.integers(0, info.n_vocab, size=k) for k in (1, 3, 2, 1, 1, 4, 2, 1, 1)]
    big = Lens(un, info.n_layer).token_log_probs(hs, [1, 2, 3], targets)
    tiny = Lens(un, info.n_layer, budget_bytes=4 * info.n_vocab * 2).token_log_probs(hs, [1, 2, 3], targets)
    # BLAS blocks differently for other row counts: equal to float32 rounding
    np.testing.assert_allclose(big, tiny, atol=2e-5)
    for li in range(3):
        full = Lens(un, info.n_layer).log_probs(hs[li], li + 1)
        want = np.concatenate([full[r, t] for r, t in enumerate(targets)])
        np.testing.assert_allclose(big[li], want, atol=1e-5)


@pytest.mark.parametrize("fixture", ["synth_model", "synth_q8"])
def test_ggml_head_matches_numpy(fixture, request):
    path = request.getfixturevalue(fixture)[0]
    info = read_model_info(path)
    x = np.random.default_rng(2).normal(size=(7, info.n_embd)).astype(np.float32)
    num = Unembed.from_model(info).logits(x)
    gg = Unembed.from_model(info, backend="ggml", n_threads=2).logits(x)
    assert gg.shape == num.shape
    # F32 head: same product; Q8_0 head: ggml quantizes x to Q8_0 first
    tol = 1e-4 if info.head_type == "F32" else 0.05 * np.abs(num).max()
    np.testing.assert_allclose(gg, num, atol=tol)
