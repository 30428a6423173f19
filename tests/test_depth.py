"""Residual-stream analyses (lcprobe.studies.depth, lcprobe.tasks.corpus, ``lcprobe depth``).

Ground truth: the synthetic LLaMA's numpy reference forward (sublayer
outputs), a copy of the GGUF with a block removed (layer skipping), a fresh
decode of the intervened sequence (one-position skips), and linear maps with
known answers.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lcprobe.studies import depth
from lcprobe.cli import main
from lcprobe.tasks.corpus import default_documents, find_data_dir, interleave, text_documents, token_windows
from lcprobe.llama.engine import Engine, EngineConfig
from lcprobe.errors import LcprobeError
from lcprobe.analysis.lens import Lens, Unembed
from lcprobe.files.modelfile import read_model_info

from synth import reference_forward
from paths import paper_data

DATA = str(paper_data())

TEXT = (
    "What is the capital of France? The capital of France is Paris.\n\n"
    "one two three four five six seven eight nine ten. the sun is red and the sky is blue.\n\n"
    "Who was in Berlin? He was in Berlin, she was in Rome, and they were in Madrid.\n\n"
) * 6


# One thread everywhere: on a busy 2-core machine two OpenMP threads wait on
# each other at every graph split (this capture asks for 2N+1 of them) and
# ran these tests 2-3x slower than one thread.
def _exact(path, **kw) -> Engine:
    cfg = dict(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=1, n_threads=1, kv_type="f32", flash_attn="off")
    cfg.update(kw)
    return Engine(read_model_info(path), EngineConfig(**cfg))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def _tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, size=n)]


# --- capture and per-token metrics -------------------------------------------------------


def test_sublayers_match_reference(synth_model):
    path, spec, weights = synth_model
    toks = _tokens(40)
    ref = reference_forward(weights, spec, toks)
    with _exact(path, n_batch=16, n_ubatch=16) as eng:  # several ubatches
        eng.set_sites(depth.residual_sites(eng.info))
        rows, _ = eng.decode_sequence(toks)
    stream = depth.Stream.from_rows(rows, spec.n_layer)
    np.testing.assert_array_equal(stream.h[0], np.asarray(ref["embed"], np.float32))
    for layer in range(1, spec.n_layer + 1):
        assert _rel(stream.attn(layer), np.asarray(ref["attn_out"][layer - 1])) < 1e-4, layer
        assert _rel(stream.mlp(layer), np.asarray(ref["ffn_out"][layer - 1])) < 1e-4, layer
    # the last layer is complete: every position is an output
    assert stream.h.shape == (spec.n_layer + 1, len(toks), spec.n_embd)


def test_sublayer_metrics_follow_their_definitions(synth_model):
    _, spec, weights = synth_model
    ref = reference_forward(weights, spec, _tokens(9, 1))
    h = np.stack([ref["embed"]] + list(ref["l_out"])).astype(np.float32)
    mid = np.stack(ref["ffn_inp"]).astype(np.float32)
    m = depth.sublayer_metrics(depth.Stream(h, mid))
    for li in range(spec.n_layer):
        a, f = np.asarray(ref["attn_out"][li]), np.asarray(ref["ffn_out"][li])
        x, y = h[li].astype(np.float64), mid[li].astype(np.float64)
        norm = lambda v: np.linalg.norm(v, axis=-1)  # noqa: E731
        np.testing.assert_allclose(m["attn_rel"][li], norm(a) / norm(x), rtol=1e-4)
        np.testing.assert_allclose(m["mlp_rel"][li], norm(f) / norm(y), rtol=1e-4)
        np.testing.assert_allclose(m["layer_rel"][li], norm(a + f) / norm(x), rtol=1e-4)
        np.testing.assert_allclose(m["attn_cos"][li], (a * x).sum(-1) / norm(a) / norm(x), atol=1e-4)
        np.testing.assert_allclose(m["mlp_cos"][li], (f * y).sum(-1) / norm(f) / norm(y), atol=1e-4)


def test_lens_metrics_against_full_log_probs(synth_model):
    path, spec, weights = synth_model
    info = read_model_info(path)
    lens = Lens(Unembed.from_model(info), info.n_layer)
    ref = reference_forward(weights, spec, _tokens(23, 2))
    h = np.stack([ref["embed"]] + list(ref["l_out"])).astype(np.float32)
    # a tiny block size forces several chunks
    kl, top5 = depth.lens_metrics(lens, h, block_bytes=4 * info.n_vocab * 5)
    final = lens.log_probs(h[-1], info.n_layer).astype(np.float64)
    p = np.exp(final)
    top_final = np.argsort(-final, axis=1)[:, :5]
    for layer in range(1, info.n_layer + 1):
        q = lens.log_probs(h[layer], layer).astype(np.float64)
        want = (p * (final - q)).sum(-1)
        np.testing.assert_allclose(kl[layer - 1], want, atol=2e-4, rtol=1e-3)
        top = np.argsort(-q, axis=1)[:, :5]
        overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top, top_final)]
        np.testing.assert_allclose(top5[layer - 1], overlap)
    assert np.all(kl[-1] == 0) and np.all(top5[-1] == 1)
    assert kl[0].mean() > 0.01  # the lens is not trivially final at layer 1


def test_top_k_leaves_input_unchanged():
    z = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    before = z.copy()
    idx = depth.top_k(z, 5)
    np.testing.assert_array_equal(z, before)
    np.testing.assert_array_equal(idx, np.argsort(-z, axis=1)[:, :5])


def test_transition_layer_rule():
    # lens KL peaks at layer 2 (layer 1 excluded), halves for good from layer 5
    assert depth.transition_layer([90, 10, 9, 6, 4, 3, 1, 0]) == 5
    # a bump back above half the peak moves the transition after it
    assert depth.transition_layer([1, 10, 4, 6, 4, 3, 1, 0]) == 5
    assert depth.transition_layer([None, None, None]) is None
    c = depth.contribution_contrast([9, 2, 2, 50, 1, 1, 1], 5)  # medians: the spike at layer 4 does not count
    assert c["layer_rel_before"] == 2 and c["layer_rel_after"] == 1 and c["layer_rel_after_over_before"] == 0.5


def test_lens_positions_are_evenly_spaced():
    wins = [[0] * 11, [0] * 6, [0] * 11]  # 10 + 5 + 10 counted positions
    picks = depth.lens_positions(wins, 5)  # every 5th counted position
    flat = np.concatenate([p - 1 + off for p, off in zip(picks, (0, 10, 15))])
    np.testing.assert_array_equal(flat, [0, 5, 10, 15, 20])
    assert all(p.min() >= 1 for p in picks if len(p))
    assert sum(len(p) for p in depth.lens_positions(wins, 1000)) == 25
    assert sum(len(p) for p in depth.lens_positions(wins, 0)) == 0


# --- corpus ------------------------------------------------------------------------------


def test_token_windows():
    tok = lambda s: [ord(c) for c in s]  # noqa: E731
    docs = ["abcdef", "ghij"]  # 8 + 6 tokens with the "\n\n"
    wins = token_windows(docs, tok, window=5, prefix=[1])
    assert [len(w) for w in wins] == [5, 5, 5, 3]
    assert all(w[0] == 1 for w in wins)
    assert sum(len(w) - 1 for w in wins) == 14
    capped = token_windows(docs, tok, window=5, max_tokens=8, prefix=[1])
    assert sum(len(w) for w in capped) == 8 and [len(w) for w in capped] == [5, 3]
    # no prefix; a 1-token tail is dropped (position 0 is never analysed)
    assert [len(w) for w in token_windows(["abcd"], tok, window=5)] == [5, 1][:1]
    with pytest.raises(LcprobeError):
        token_windows(docs, tok, window=1, prefix=[1])


def test_text_documents(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first para\nline two\n\n\n  second  \n\n")
    assert text_documents(f) == ["first para\nline two", "second"]
    with pytest.raises(LcprobeError, match="not found"):
        text_documents(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LcprobeError, match="no text"):
        text_documents(tmp_path / "empty.txt")


def test_default_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LCPROBE_DATA", DATA)
    docs = default_documents()
    assert docs[0].startswith("Q: What happens to you if you eat watermelon seeds?\nA: ")
    assert docs[1].startswith("Alexis is applying for a new job") and "<<" not in docs[1]
    assert "\n" in docs[2] and len(docs) == 817 + 712 + 500
    assert interleave([["a", "b", "c"], ["x"]]) == ["a", "x", "b", "c"]
    monkeypatch.setenv("LCPROBE_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(LcprobeError, match="LCPROBE_DATA"):
        find_data_dir()


# --- layer skipping ----------------------------------------------------------------------


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_skip_equals_model_without_the_block(synth_model, tmp_path, skip):
    path, spec, _ = synth_model
    cut = tmp_path / "cut.gguf"
    depth.remove_block(path, cut, skip)
    cut_info = read_model_info(cut)
    assert cut_info.n_layer == spec.n_layer - 1
    toks = _tokens(50, 3)
    cfg = dict(kv_type="f16", flash_attn="auto", n_batch=32, n_ubatch=32)  # llama.cpp's defaults, 2 ubatches
    with _exact(path, **cfg) as eng:
        eng.set_sites(depth.stream_sites(eng.info))
        h, logits = eng.decode_sequence(toks, want_logits=True)
        eng.capture.set_patches([depth.skip_patch(eng.info, skip)])
        hs, logits_s = eng.decode_sequence(toks, want_logits=True)
    with _exact(cut, **cfg) as eng:
        eng.set_sites(depth.stream_sites(eng.info))
        hc, logits_c = eng.decode_sequence(toks, want_logits=True)
    np.testing.assert_array_equal(logits_s, logits_c)  # bit-identical
    assert not np.array_equal(logits_s, logits)
    for layer in range(skip):  # everything before the skipped block is untouched
        np.testing.assert_array_equal(hs[layer], h[layer])
    for layer in range(skip + 1, spec.n_layer + 1):
        np.testing.assert_array_equal(hs[layer], hc[layer - 1])


def test_skip_patch_names(synth_model):
    info = read_model_info(synth_model[0])
    assert depth.skip_patch(info, 1) == ("l_out-0", info.spec.embed)
    assert depth.skip_patch(info, 3) == ("l_out-2", "l_out-1")


def test_one_position_skip_matches_a_fresh_decode(synth_model):
    """position_log_probs (shared KV prefix, many sequences) vs decoding the intervened sequence alone."""
    path, spec, _ = synth_model
    toks = _tokens(30, 4)
    ts, horizon, skip = [3, 11, 20], 4, 2
    with _exact(path, n_seq_max=4) as eng:
        patch = depth.skip_patch(eng.info, skip)
        eng.set_sites([])
        eng.clear()
        depth.decode_window(eng, toks)
        got = depth.position_log_probs(eng, toks, ts, horizon, patch)
        plain = depth.position_log_probs(eng, toks, ts, horizon, None)
        for k, t in enumerate(ts):
            eng.clear()
            eng.decode(toks[:t], range(t), [[0]] * t, np.zeros(t, bool))
            eng.capture.set_patches([patch])
            _, first = eng.decode([toks[t]], [t], [[0]], [True], want_logits=True)
            eng.capture.set_patches([])
            _, rest = eng.decode(toks[t + 1:t + 1 + horizon], range(t + 1, t + 1 + horizon), [[0]] * horizon,
                                 np.ones(horizon, bool), want_logits=True)
            want = np.concatenate([first, rest]).astype(np.float64)
            want -= want.max(-1, keepdims=True)
            want -= np.log(np.exp(want).sum(-1, keepdims=True))
            np.testing.assert_allclose(got[k], want, atol=1e-4)
        _, normal = eng.decode_sequence(toks, want_logits=True)
    for k, t in enumerate(ts):
        lp = normal[t:t + 1 + horizon].astype(np.float64)
        lp -= lp.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        np.testing.assert_allclose(plain[k], lp, atol=1e-4)
    assert depth.kl_rows(plain, got)[:, 0].min() > 1e-4  # the skip changes the current prediction


def test_run_skip_structure(synth_model):
    path, spec, _ = synth_model
    windows = [[1] + _tokens(40, 5), [1] + _tokens(25, 6)]
    with _exact(path, n_seq_max=4, n_ctx=64 + 3 * 5) as eng:
        res = depth.run_skip(eng, windows, [1, 2, 3], positions=3, horizon=4)
    data = json.loads(json.dumps(res.to_json()))  # JSON round trip: NaN must have become null
    assert data["skipped"] == [1, 2, 3] and data["n_tokens"] == 40 + 25
    for k, s in enumerate(data["skipped"]):
        for key in ("later_change_max", "later_change_mean"):
            row = data[key][k]
            assert len(row) == spec.n_layer
            assert row[:s - 1] == [0.0] * (s - 1)  # exactly unchanged before S
            assert row[s - 1] is None
            assert all(v > 0 for v in row[s:])
        assert data["later_change_max"][k][s:] >= data["later_change_mean"][k][s:]
        assert data["output_kl_current"][k] > 0
    # the last block's output never reaches later positions: no future effect at all
    assert data["output_kl_future"][2] == 0.0
    assert data["output_kl_future"][0] > 0
    assert data["n_interventions"] == 6 and len(data["output_kl_future_by_offset"][0]) == 4


def test_remove_block_renumbers(synth_model, tmp_path):
    import gguf

    path, spec, weights = synth_model
    cut = tmp_path / "cut.gguf"
    depth.remove_block(path, cut, 2)
    r = gguf.GGUFReader(str(cut))
    names = {t.name for t in r.tensors}
    assert "blk.2.attn_q.weight" not in names and "blk.1.attn_q.weight" in names
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    np.testing.assert_array_equal(np.asarray(t.data), weights["blk.2.ffn_down.weight"])
    assert int(r.fields["llama.block_count"].contents()) == spec.n_layer - 1
    with pytest.raises(ValueError):
        depth.remove_block(path, tmp_path / "x.gguf", 4)


# --- linear maps ---------------------------------------------------------------------------


def test_linear_maps_known_answers():
    rng = np.random.default_rng(0)
    n, d = 3000, 16
    x = rng.standard_normal((n, d)).astype(np.float32) * np.linspace(0.5, 3, d).astype(np.float32) + 5.0
    a = rng.standard_normal((d, d)).astype(np.float32)
    noise = rng.standard_normal((n, d)).astype(np.float32)
    y_lin = x @ a + 2.0
    # B's "layers": an exact linear image of x, a noisy one (R^2 = var(signal)/var(total)), pure noise
    yb = np.stack([y_lin, y_lin + noise * np.float32(np.sqrt((y_lin.var(0)).mean())), noise])
    xa = np.stack([x, noise])
    maps = depth.LinearMaps(2, d, 3, d, ridge=1e-6)
    for s in range(0, n, 500):  # streamed in windows
        maps.add(xa[:, s:s + 500], yb[:, s:s + 500], depth.heldout_mask(min(500, n - s), s))
    r2 = maps.r2()
    n_test = int(depth.heldout_mask(n, 0).sum())
    assert maps.n_test == n_test and maps.n_train == n - n_test and 0.15 < n_test / n < 0.25
    assert r2[0, 0] > 0.9999
    assert 0.45 < r2[0, 1] < 0.55
    assert abs(r2[0, 2]) < 0.05 and r2[1, 2] > 0.9999
    summary = depth.map_summary(r2, [1, 2], [1, 2, 3], 2, 3)
    assert summary["best"] == [1, 3] and summary["best_j"] == summary["best"]


def test_map_self_is_diagonal(synth_model):
    path, spec, _ = synth_model
    windows = [[1] + _tokens(120, s) for s in range(4)]
    layers = list(range(1, spec.n_layer + 1))
    with _exact(path) as eng:
        maps, stopped = depth.run_map(eng, None, windows, layers, layers)
    r2 = maps.r2()
    assert not stopped
    assert list(np.argmax(r2, axis=1) + 1) == layers
    assert np.diag(r2).min() > 0.999


# --- the command ------------------------------------------------------------------------------


@pytest.fixture()
def text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return f


def test_cli_depth(synth_model, text_file, tmp_path, capsys):
    out = tmp_path / "depth"
    rc = main(["depth", "-m", str(synth_model[0]), "--text", str(text_file), "-o", str(out), "-c", "64",
               "--max-tokens", "300", "--lens-tokens", "50", "--exact", "-t", "1"])
    assert rc == 0
    data = json.loads((out / "depth.json").read_text())
    assert data["n_layer"] == 3 and len(data["layers"]) == 3
    row = data["layers"][0]
    for key in depth.METRICS:
        assert isinstance(row[key], float), key
        assert f"{key}_std" in row and f"{key}_p90" in row
    assert data["tokens_decoded"] == 300 and data["n_tokens"] == 300 - data["corpus"]["n_windows"]
    assert 40 <= data["n_lens_tokens"] <= 50
    assert data["layers"][-1]["lens_kl"] == 0.0 and data["layers"][-1]["lens_top5"] == 1.0
    assert "transition_layer" in data and data["model"] == str(synth_model[0])
    csv_lines = (out / "depth.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("layer,attn_rel,")
    assert "transition at layer" in capsys.readouterr().out


def test_cli_skip_and_map(synth_model, text_file, tmp_path):
    path = str(synth_model[0])
    out = tmp_path / "skip"
    assert main(["depth", "-m", path, "--text", str(text_file), "--skip", "all", "-o", str(out), "-c", "48",
                 "--max-tokens", "96", "--positions", "2", "--horizon", "3", "--quiet", "-t", "1"]) == 0
    skip = json.loads((out / "skip.json").read_text())
    assert skip["skipped"] == [1, 2, 3] and len(skip["later_change_max"]) == 3
    assert len(skip["output_kl_current"]) == 3 and skip["n_interventions"] == 4
    out = tmp_path / "map"
    assert main(["depth", "map", "-m", path, "-m", path, "--text", str(text_file), "-o", str(out), "-c", "64",
                 "--max-tokens", "400", "--quiet", "-t", "1"]) == 0
    m = json.loads((out / "map.json").read_text())
    assert m["best_j"] == [1, 2, 3] and len(m["r2"]) == 3 and len(m["r2"][0]) == 3
    assert m["n_tokens"] == m["n_train"] + m["n_test"] and m["n_test"] > 0


def test_cli_errors(synth_model, text_file, tmp_path, capsys, monkeypatch):
    path = str(synth_model[0])
    assert main(["depth", "map", "-m", path, "--text", str(text_file), "-o", str(tmp_path / "m")]) == 1
    assert "two models" in capsys.readouterr().err
    assert main(["depth", "-m", path, "-m", path, "--text", str(text_file), "-o", str(tmp_path / "d")]) == 1
    assert main(["depth", "-m", path, "--skip", "7", "--text", str(text_file), "-o", str(tmp_path / "s")]) == 1
    assert "out of range" in capsys.readouterr().err
    monkeypatch.setenv("LCPROBE_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["depth", "-m", path, "-o", str(tmp_path / "d")]) == 1
    assert "--text" in capsys.readouterr().err


# --- SmolLM2 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_skip_equals_removed_block_smollm2(smollm2, tmp_path):
    # skipping layer 1 is covered on the synthetic model; a middle layer here
    skip = 17
    cut = tmp_path / "cut.gguf"
    depth.remove_block(smollm2, cut, skip)
    cfg = EngineConfig(n_ctx=128, n_batch=64, n_ubatch=64, n_seq_max=1, n_threads=1)
    with Engine(read_model_info(smollm2), cfg) as eng:
        toks = eng.tokenize(TEXT)[:70]
        eng.set_sites(depth.stream_sites(eng.info))
        h, _ = eng.decode_sequence(toks)
        eng.capture.set_patches([depth.skip_patch(eng.info, skip)])
        hs, logits_s = eng.decode_sequence(toks, want_logits=True)
        info = eng.info
    # Reading a GGUF's metadata costs seconds (its 49k-token vocabulary); the
    # engine needs only the path, and the copy's metadata is checked on the
    # synthetic model (test_remove_block_renumbers).
    with Engine(dataclasses.replace(info, path=cut, n_layer=info.n_layer - 1), cfg) as eng:
        _, logits_c = eng.decode_sequence(toks, want_logits=True)
    np.testing.assert_array_equal(logits_s, logits_c)
    for layer in range(skip):
        np.testing.assert_array_equal(hs[layer], h[layer])


@pytest.mark.slow
def test_map_smollm2_vs_q2k(smollm2, tmp_path):
    """Q4_1 -> its Q2_K copy: the same layer still maps best, but explains less than the identity."""
    from synth import quantize

    q2 = tmp_path / "smollm2-q2_k.gguf"
    quantize(smollm2, q2, "Q2_K")
    layers = [3, 8, 13, 18, 23, 28]
    cfg = EngineConfig(n_ctx=256, n_batch=256, n_ubatch=256, n_seq_max=1, n_threads=1)
    self_map = depth.LinearMaps(6, 576, 6, 576)
    cross_map = depth.LinearMaps(6, 576, 6, 576)
    info = read_model_info(smollm2)
    with Engine(info, cfg) as a, Engine(dataclasses.replace(info, path=q2), cfg) as b:
        windows = token_windows(default_documents(DATA)[:60], lambda s: a.tokenize(s, add_special=False), 256, 512)
        offset = 0
        for w in windows:
            rows = []
            for eng in (a, b):
                eng.set_sites([depth.Site(eng.info.site_name("resid_post", i), 576) for i in layers])
                eng.clear()
                rows.append(depth.decode_window(eng, w)[:, 1:])
            test = depth.heldout_mask(rows[0].shape[1], offset)
            self_map.add(rows[0], rows[0], test)
            cross_map.add(rows[0], rows[1], test)
            offset += rows[0].shape[1]
    r2_self, r2_cross = self_map.r2(), cross_map.r2()
    diagonal = list(range(len(layers)))
    # 512 tokens for 577 inputs: the ridge keeps the fits sane, not perfect
    assert list(np.argmax(r2_self, axis=1)) == diagonal and np.diag(r2_self).min() > 0.85
    assert list(np.argmax(r2_cross, axis=1)) == diagonal
    assert np.all(np.diag(r2_cross) < np.diag(r2_self) - 0.01)
    assert np.diag(r2_cross).min() > 0.3


@pytest.mark.slow
def test_map_needs_the_same_tokenizer(smollm2, synth_model, text_file, tmp_path, capsys):
    rc = main(["depth", "map", "-m", str(smollm2), "-m", str(synth_model[0]), "--text", str(text_file),
               "-o", str(tmp_path / "m")])
    assert rc == 1 and "different tokenizers" in capsys.readouterr().err
