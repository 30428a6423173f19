"""Interventions through the public API: control vectors against llama.cpp's own cvec path,
the activation-patching invariants, refusals before decoding, and a clean model afterwards."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import lcprobe
from lcprobe.errors import LcprobeError
from lcprobe.interventions.cvec import ControlVector

TEXT = "The quick brown fox jumps over the lazy dog because"
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"


@pytest.fixture(scope="module")
def smol(smollm2):
    with lcprobe.load(str(smollm2), n_threads=2, lens_backend=None) as m:
        yield m


def _llama_cvec_logits(model, cvec: ControlVector, lo: int, hi: int, text: str) -> np.ndarray:
    """llama.cpp's own control-vector path: llama_set_adapter_cvec, then its logits; cleared after."""
    import llama_cpp

    eng = model.loaded.engine
    data = cvec.data(model.info.n_layer)
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(eng._ctx, ptr, data.size, model.info.n_embd, lo, hi) == 0
    try:
        return model.logits(text)
    finally:
        llama_cpp.llama_set_adapter_cvec(eng._ctx, None, 0, model.info.n_embd, -1, -1)


# --- the file format -----------------------------------------------------------------------


def test_control_vector_file_roundtrip(tmp_path):
    import gguf

    rng = np.random.default_rng(1)
    cv = ControlVector({k: rng.standard_normal(16) for k in (1, 2, 5)}, model_hint="llama")
    path = cv.save(tmp_path / "v.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.layer_count"].contents() == 3
    assert [t.name for t in r.tensors] == ["direction.1", "direction.2", "direction.5"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in r.tensors)
    back = ControlVector.load(path)
    assert back.model_hint == "llama" and list(back.directions) == [1, 2, 5]
    for k in (1, 2, 5):
        assert np.array_equal(back.directions[k], cv.directions[k])
    # lcprobe layer L receives direction.(L-1): where llama.cpp adds it
    assert sorted(back.layers()) == [2, 3, 6]
    assert list(ControlVector.from_layers({3: np.ones(4)}).directions) == [2]


def test_control_vector_bad_files(tmp_path):
    import gguf

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(LcprobeError, match="not a GGUF"):
        ControlVector.load(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(tmp_path / "zero.gguf", "controlvector")
    w.add_tensor("direction.0", np.ones(8, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(LcprobeError, match="direction.K, K >= 1"):
        ControlVector.load(tmp_path / "zero.gguf")
    with pytest.raises(LcprobeError, match="no control vector"):
        ControlVector.load(tmp_path / "missing.gguf")
    with pytest.raises(LcprobeError, match="layer 1"):
        ControlVector.from_layers({1: np.ones(4)})


# --- the same logits as llama.cpp's control vectors ----------------------------------------


def _check_cvec_equality(model) -> list[float]:
    n, e = model.info.n_layer, model.info.n_embd
    rng = np.random.default_rng(0)
    dirs = {k: 2 * rng.standard_normal(e).astype(np.float32) for k in range(1, n)}
    full = ControlVector(dirs)
    base = model.logits(TEXT)
    diffs = []
    for lo, hi in ((1, n - 1), (1, 3), (n // 2, n // 2), (n // 2, n - 1)):
        ref = _llama_cvec_logits(model, full, lo, hi, TEXT)
        got = model.capture(TEXT, layers=[-1], logits=True,
                            add=ControlVector({k: v for k, v in dirs.items() if lo <= k <= hi})).logits
        assert np.abs(ref - base).max() > 1.0, "the control vector should change the logits"
        diffs.append(float(np.abs(got - ref).max()))
        assert diffs[-1] <= 1e-5, (lo, hi, diffs[-1])
    # add={layer: v} is the same as llama.cpp's index layer-1, scaled
    v = dirs[n // 2]
    ref = _llama_cvec_logits(model, ControlVector({n // 2: 3 * v}), 1, n - 1, TEXT)
    got = model.capture(TEXT, layers=[-1], logits=True, add={n // 2 + 1: v}, scale=3.0).logits
    assert np.abs(got - ref).max() <= 1e-5
    # nothing stays behind: a plain run afterwards is bit-identical to one before
    assert np.array_equal(model.logits(TEXT), base)
    return diffs


@pytest.mark.slow
def test_add_equals_llama_cpp_control_vector_smollm2(smol):
    _check_cvec_equality(smol)


@pytest.mark.slow
def test_add_equals_llama_cpp_control_vector_gemma3(gemma3):
    with lcprobe.load(str(gemma3), n_threads=2, lens_backend=None) as m:
        _check_cvec_equality(m)


# --- patching invariants -------------------------------------------------------------------


@pytest.mark.slow
def test_patching_invariants(smol):
    base = smol.logits(CORRUPT)
    clean = smol.capture(CLEAN, sites=("resid_post", "resid_mid"), logits=True)
    corrupt = smol.capture(CORRUPT, sites=("resid_post", "resid_mid"), logits=True)
    assert clean.n_tokens == corrupt.n_tokens
    for layer in (1, 12, 30):
        b = smol.capture(CORRUPT, layers=[layer, -1], patch={("resid_post", layer): clean}, logits=True)
        assert np.array_equal(b.logits, clean.logits), layer  # every position patched: the clean run
        assert np.array_equal(b["resid_post", layer], clean["resid_post", layer])
    b = smol.capture(CORRUPT, layers=[-1], patch={("resid_mid", 20): clean}, logits=True)
    assert np.array_equal(b.logits[-1], clean.logits[-1])
    # patching no position, or the corrupted run's own rows, changes nothing
    b = smol.capture(CORRUPT, layers=[-1], patch={("resid_post", 8): clean}, positions=[], logits=True)
    assert np.array_equal(b.logits, corrupt.logits)
    b = smol.capture(CORRUPT, layers=[-1], patch={("resid_post", 8): corrupt}, logits=True)
    assert np.array_equal(b.logits, corrupt.logits)
    # one position only: earlier positions cannot see it (causal), later ones do
    b = smol.capture(CORRUPT, layers=[-1], patch={("resid_post", 8): clean}, positions=[2], logits=True)
    assert np.array_equal(b.logits[:2], corrupt.logits[:2])
    assert np.abs(b.logits[2:] - corrupt.logits[2:]).max() > 0.1
    # and the model is unchanged afterwards
    assert np.array_equal(smol.logits(CORRUPT), base)


def test_refused_before_decoding(smol):
    eng = smol.loaded.engine
    before = eng.tokens_decoded
    e, n = smol.info.n_embd, smol.info.n_layer
    v = np.ones(e, np.float32)
    cases = [
        (dict(add={5: np.ones(e + 1)}), "expected"),
        (dict(add={n + 1: v}), "out of range"),
        (dict(add={0: v}), "out of range"),
        (dict(add={5: np.ones((3, e))}), "rows for a prompt"),
        (dict(add={5: v}, positions=[99]), "outside the prompt"),
        (dict(add={5: v}, scale=float("nan")), "finite"),
        (dict(add={5: np.full(e, np.inf)}), "NaN or infinity"),
        (dict(add=ControlVector({n: v})), "past this model"),
        (dict(add=ControlVector({3: np.ones(8)})), "n_embd"),
        (dict(patch={("resid_post", 3): np.ones((2, e))}), "rows for a prompt"),
        (dict(patch={("resid_nowhere", 3): np.ones((2, e))}), "unknown site"),
        (dict(patch={"resid_post": np.ones((2, e))}), "pairs"),
        (dict(positions=[1]), "nothing is added"),
        (dict(skip=[n + 3]), "out of range"),
    ]
    for kw, msg in cases:
        with pytest.raises(LcprobeError, match=msg):
            smol.capture(TEXT, **kw)
    with pytest.raises(LcprobeError, match="expected"):
        smol.score("2 + 2 =", [" 4", " 5"], add={3: np.ones(e - 1)})
    with pytest.raises(LcprobeError, match="out of range"):
        smol.run_task("calc", limit=2, add={n + 1: v})
    assert eng.tokens_decoded == before
    assert eng.edit_hook is None and not eng.capture.edits


@pytest.mark.slow
def test_skip_and_add_compose(smol):
    e = smol.info.n_embd
    v = np.random.default_rng(3).standard_normal(e).astype(np.float32)
    plain = smol.capture(TEXT, layers=[9], logits=True)
    # skipping block 10 is patching its output with its input, the plain run's layer 9
    as_patch = {("resid_post", 10): plain["resid_post", 9]}
    skipped = smol.capture(TEXT, layers=[-1], skip=[10], logits=True)
    assert np.array_equal(skipped.logits, smol.capture(TEXT, layers=[-1], patch=as_patch, logits=True).logits)
    assert np.abs(skipped.logits - plain.logits).max() > 0.1
    both = smol.capture(TEXT, layers=[-1], skip=[10], add={11: v}, scale=2.0, logits=True)
    ref = smol.capture(TEXT, layers=[-1], patch=as_patch, add={11: v}, scale=2.0, logits=True)
    assert np.array_equal(both.logits, ref.logits)
    assert np.abs(both.logits - skipped.logits).max() > 0.1
    with pytest.raises(LcprobeError, match="skipped layer"):
        smol.capture(TEXT, skip=[10], add={10: v})


@pytest.mark.slow
def test_score_and_run_task_take_the_keywords(smol, tmp_path):
    e, n = smol.info.n_embd, smol.info.n_layer
    rng = np.random.default_rng(5)
    cv = ControlVector({k: rng.standard_normal(e).astype(np.float32) for k in range(1, n)})
    with lcprobe.load(smol.info.path, n_threads=2) as m:
        ctx, choices = "Q: What is the capital of France?\nA:", [" Paris", " Rome", " Berlin"]
        plain = m.score(ctx, choices, layers="-3:-1")
        assert np.array_equal(m.score(ctx, choices, layers="-3:-1", add=cv, scale=0.0), plain)
        steered = m.score(ctx, choices, layers="-3:-1", add=cv, scale=2.0)
        assert np.abs(steered - plain).max() > 0.1
        # the shared few-shot prefix is decoded once; the addition reaches it too, so a task run
        # scores each item as score() does for it alone
        res = m.run_task("capitals", limit=2, layers="-2:-1", add=cv, scale=2.0)
        from lcprobe.tasks.task import load_task

        items = {it.id: it for it in load_task("capitals").items(limit=2, seed=0)}
        assert sorted(items) == sorted(r["id"] for r in res.items)
        for rec in res.items:
            item = items[rec["id"]]
            alone = m.score(item.context, list(item.choices), layers="-2:-1", add=cv, scale=2.0)
            assert np.abs(alone - np.array(rec["logprobs"])).max() <= 1e-3, rec["id"]
        unsteered = m.run_task("capitals", limit=2, layers="-2:-1")
        assert max(np.abs(np.array(a["logprobs"]) - np.array(b["logprobs"])).max()
                   for a, b in zip(res.items, unsteered.items)) > 0.1
        assert np.array_equal(m.score(ctx, choices, layers="-3:-1"), plain)


@pytest.mark.slow
def test_steered_run_is_recorded_and_resumes_only_itself(smol, tmp_path):
    import json

    from lcprobe.interventions.plan import resolve

    e, n = smol.info.n_embd, smol.info.n_layer
    rng = np.random.default_rng(7)
    cv = ControlVector({k: rng.standard_normal(e).astype(np.float32) for k in (n // 2, n - 2)})
    other = ControlVector({n // 2: cv.directions[n // 2]})
    out = tmp_path / "steered"
    with lcprobe.load(smol.info.path, n_threads=2) as m:
        rec = m.run_task("calc", limit=2, layers="-1", out=out, add=cv, scale=2.0).summary["intervention"]
        assert rec["add_layers"] == [n // 2 + 1, n - 1] and rec["scale"] == 2.0
        assert rec["skip"] == [] and rec["patch"] is False and len(rec["sha256"]) == 64
        assert json.loads((out / "summary.json").read_text())["intervention"] == rec
        # the same steering resumes; another scale, another vector or none is refused, in one line
        m.run_task("calc", limit=2, layers="-1", out=out, add=cv, scale=2.0, resume=True)
        for kw in (dict(add=cv, scale=3.0), dict(add=other, scale=2.0), {}):
            with pytest.raises(LcprobeError, match=r"^\S+ holds a run with a different intervention; use another"):
                m.run_task("calc", limit=2, layers="-1", out=out, resume=True, **kw)
        # a plain run's files are as they were: no intervention anywhere
        m.run_task("calc", limit=2, layers="-1", out=tmp_path / "plain")
        for name in ("summary.json", "run.json"):
            assert "intervention" not in json.loads((tmp_path / "plain" / name).read_text())
    # skips and patches are told apart too
    r = resolve(smol.info, skip=[3], patch={("resid_post", 5): np.ones((4, e), np.float32)}).record()
    assert r["skip"] == [3] and r["patch"] is True and r["patch_layers"] == [5] and r["add_layers"] == []
    assert resolve(smol.info, add=cv, scale=2.0).record() == rec
    assert resolve(smol.info, add=cv, scale=-2.0).record()["sha256"] == rec["sha256"]  # the vectors, unscaled


def test_add_on_synthetic_model_matches_reference(synth_model):
    """The added vector at the last layer, through llama.cpp's final norm and head, against numpy."""
    from synth import _rms_norm, reference_forward

    path, spec, weights = synth_model
    toks = [5, 17, 42, 99, 7, 63, 150]
    v = np.random.default_rng(2).standard_normal(spec.n_embd).astype(np.float32)
    ref = reference_forward(weights, spec, toks)
    h = np.asarray(ref["l_out"][-1]) + 1.5 * v.astype(np.float64)
    head = weights.get("output.weight", weights["token_embd.weight"]).astype(np.float64)
    ref_logits = _rms_norm(h, weights["output_norm.weight"].astype(np.float64), spec.eps) @ head.T
    with lcprobe.load(str(path), n_threads=2, kv_type="f32", flash_attn="off", lens_backend=None) as m:
        a = m.capture(toks, layers=[-1], add={-1: v}, scale=1.5, logits=True)
        assert np.abs(a["resid_post", -1] - h).max() / np.abs(h).max() < 1e-4
        rel = np.linalg.norm(a.logits - ref_logits, axis=1) / np.linalg.norm(ref_logits, axis=1)
        assert rel.max() < 1e-4
        plain = m.capture(toks, layers=[-1], logits=True)
        assert np.abs(plain.logits - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-4
