"""Per-tensor sensitivity: ggml's quantizer through ctypes, GGUFs with chosen types, in-place weight swaps.

The fast tests use the synthetic 3-layer LLaMA (real llama.cpp, random
weights); the slow ones SmolLM2's F32 copy, made here with llama_model_quantize.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf

from lcprobe.cli.main import main

WORDS = ("the capital of France is Paris and the capital of Italy is Rome . what is the sum of two and "
         "three ? the sky is blue and the sun is one day . hello world , who is the answer ?").split()


def _text(tmp_path, n_words: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = tmp_path / "text.txt"
    p.write_text(" ".join(rng.choice(WORDS, n_words)), encoding="utf-8")
    return p


def _tensor_bytes(path) -> dict[str, tuple[str, bytes]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).tobytes()) for t in r.tensors}


# --- the quantizer -------------------------------------------------------------------


def test_round_trip_is_ggml_quantize_then_to_float():
    from lcprobe.llama.quantizer import dequantize, ggml_type, quantize, round_trip, row_size

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q4 = ggml_type("Q4_0")
    raw = quantize(x, q4)
    assert raw.shape == (4, row_size(q4, 64)) == (4, 36)  # 2 blocks of 18 bytes per row
    back = dequantize(raw, q4, 64)
    # Q4_0 keeps 16 levels per block of 32: close, never exact, and round_trip is the same path
    assert 0 < np.abs(back - x).max() < 0.5
    np.testing.assert_array_equal(round_trip(x, q4), back)
    # threads split rows; ggml quantizes rows independently, so the bytes do not change
    np.testing.assert_array_equal(quantize(np.tile(x, (16, 1)), q4, threads=2), np.tile(raw, (16, 1)))
    with pytest.raises(Exception, match="not a multiple"):
        quantize(rng.standard_normal((2, 48)).astype(np.float32), q4)


def test_write_gguf_copies_metadata_and_converts_only_named_tensors(synth_model, tmp_path):
    from lcprobe.llama.quantizer import write_gguf

    src, _, _ = synth_model
    dst = write_gguf(src, tmp_path / "mix.gguf", {"blk.0.attn_v.weight": "Q4_0", "blk.2.ffn_down.weight": "Q8_0"})
    before, after = _tensor_bytes(src), _tensor_bytes(dst)
    assert after["blk.0.attn_v.weight"][0] == "Q4_0" and after["blk.2.ffn_down.weight"][0] == "Q8_0"
    same = [n for n in before if n not in ("blk.0.attn_v.weight", "blk.2.ffn_down.weight")]
    assert all(before[n] == after[n] for n in same)
    r_src, r_dst = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    keys = [k for k in r_src.fields if not k.startswith("GGUF.")]
    assert keys == [k for k in r_dst.fields if not k.startswith("GGUF.")]
    for k in keys:
        if k != "general.file_type":
            assert [bytes(p) for p in r_src.fields[k].parts] == [bytes(p) for p in r_dst.fields[k].parts], k
    assert not (tmp_path / "mix.gguf.part").exists()


# --- in-place weights ----------------------------------------------------------------


def test_weights_swap_changes_logits_and_restore_undoes_it(synth_model, tmp_path):
    from lcprobe.llama.weights import Weights, WeightsError
    from lcprobe.studies.sensitivity import final_kld, make_reference, open_base, scoring_chunks, text_tokens

    src, _, _ = synth_model
    reader = gguf.GGUFReader(src)
    original = {t.name: np.asarray(t.data).copy() for t in reader.tensors}
    engine = open_base(src, 32, 1)
    try:
        w = Weights(engine, ["blk.1.ffn_down.weight", "token_embd.weight"])
        assert w.shape("blk.1.ffn_down.weight")[:2] == original["blk.1.ffn_down.weight"].shape[::-1]
        tokens, _ = text_tokens(engine, _text(tmp_path))
        ref = make_reference(engine, scoring_chunks(tokens, 32, 2, None))
        assert final_kld(engine, ref).max() < 1e-6  # the base agrees with itself
        w.set("blk.1.ffn_down.weight", np.zeros_like(original["blk.1.ffn_down.weight"]))
        assert final_kld(engine, ref).mean() > 1e-3
        w.set("blk.1.ffn_down.weight", original["blk.1.ffn_down.weight"])
        assert final_kld(engine, ref).max() < 1e-6
        with pytest.raises(WeightsError, match="bytes given"):
            w.set("blk.1.ffn_down.weight", np.zeros(3, np.float32))
    finally:
        engine.close()
    mapped = open_base(src, 32, 1, use_mmap=True)
    try:
        with pytest.raises(WeightsError, match="without mmap"):
            Weights(mapped, ["token_embd.weight"])
    finally:
        mapped.close()


# --- the command ---------------------------------------------------------------------


def test_sensitivity_command_small_run(synth_model, tmp_path, capsys):
    src, _, _ = synth_model
    out = tmp_path / "sens"
    rc = main(["sensitivity", "-m", str(src), "--type", "Q4_0,Q8_0", "--groups", "attn_v,ffn_down,token_embd",
               "--layers", "1,-1", "-c", "32", "--chunks", "2", "--text", str(_text(tmp_path)),
               "--check-proxy", "1", "-t", "1", "-o", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((out / "sensitivity.json").read_text())
    names = sorted({g["name"] for g in data["groups"]})
    assert names == ["blk.0.attn_v", "blk.0.ffn_down", "blk.2.attn_v", "blk.2.ffn_down", "token_embd"]
    assert len(data["groups"]) == 10 and data["types"] == ["Q4_0", "Q8_0"]
    by = {(g["name"], g["type"]): g for g in data["groups"]}
    for name in names:
        q4, q8 = by[(name, "Q4_0")], by[(name, "Q8_0")]
        assert q4["kld_mean"] > q8["kld_mean"] > 0
        assert q4["weight_err"] > q8["weight_err"] > 0
    assert data["text"]["n_scored"] == 2 * 15  # positions 16..30 of each 32-token chunk
    assert data["timing"]["restored_max_kld"] < 1e-6  # every swap was undone
    (proxy,) = data["proxy_check"]
    worst = max((g for g in data["groups"] if g["type"] == "Q4_0"), key=lambda g: g["kld_mean"])
    assert proxy["group"] == worst["name"] and proxy["real_kld"] > 0
    assert abs(proxy["rel_diff"]) < 0.5  # the float proxy omits only llama.cpp's 8-bit activations
    # per-layer lens KLD of the 3 worst groups: nothing changes below the quantized block
    assert len(data["layer_kld"]) == 3
    for row in data["layer_kld"]:
        kl = np.array(row["lens_kld"])
        assert kl.shape == (3,) and kl[-1] > 0
        layer = next(g["layer"] for g in data["groups"] if g["name"] == row["group"])
        if layer is not None:
            assert np.all(kl[: layer - 1] < 1e-9), (row, layer)
            assert np.all(kl[layer - 1:] > 0)
    shown = capsys.readouterr().out
    assert "groups ranked by final mean KLD" in shown and worst["name"] in shown
    assert not list(out.glob("*.gguf"))  # the proxy check's file is gone


def test_sensitivity_refuses_quantized_base_and_bad_options(synth_q8, synth_model, tmp_path, capsys):
    q8, _, _ = synth_q8
    src, _, _ = synth_model
    assert main(["sensitivity", "-m", str(q8), "-o", str(tmp_path / "a"), "--quiet"]) == 1
    assert "needs float weights" in capsys.readouterr().err
    assert main(["sensitivity", "-m", str(src), "--groups", "attn_x", "-o", str(tmp_path / "b"), "--quiet"]) == 1
    assert "unknown group kind 'attn_x'" in capsys.readouterr().err
    assert main(["sensitivity", "-m", str(src), "--chunks", "0", "-o", str(tmp_path / "c"), "--quiet"]) == 1
    assert "--chunks must be at least 1" in capsys.readouterr().err
    assert main(["sensitivity", "-m", str(src), "--type", "Q4_K", "-o", str(tmp_path / "d"), "--quiet"]) == 1
    assert "cannot hold" in capsys.readouterr().err  # rows of 64 are not K-quant blocks of 256


# --- SmolLM2 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_f32(smollm2, tmp_path_factory):
    from lcprobe.studies.quantize import quantize_model

    dst = tmp_path_factory.mktemp("smolf32") / "SmolLM2-135M-Instruct-F32.gguf"
    quantize_model(smollm2, dst, "F32")
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_file_is_byte_identical_to_llama_model_quantize(smol_f32, tmp_path, qtype):
    from lcprobe.llama.quantizer import write_gguf
    from lcprobe.studies.quantize import quantize_model

    ref = tmp_path / f"ref-{qtype}.gguf"
    quantize_model(smol_f32, ref, qtype, check_source=False)
    ref_bytes = _tensor_bytes(ref)
    types = {name: t for name, (t, _) in ref_bytes.items()}
    assert len(set(types.values())) > 1 or qtype == "Q8_0"  # Q4_0's token_embd is Q8_0: a real mix
    mine = _tensor_bytes(write_gguf(smol_f32, tmp_path / f"mine-{qtype}.gguf", types, threads=2))
    assert mine.keys() == ref_bytes.keys()
    differ = [n for n in ref_bytes if mine[n] != ref_bytes[n]]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow
def test_proxy_is_close_to_real_files_on_smollm2(smol_f32, tmp_path, paper_data_required, monkeypatch):
    monkeypatch.setenv("LCPROBE_DATA", str(paper_data_required))
    out = tmp_path / "sens"
    rc = main(["sensitivity", "-m", str(smol_f32), "--groups", "ffn_down,attn_v", "--layers", "1,-1",
               "-c", "128", "--chunks", "1", "--check-proxy", "2", "--layer-groups", "0",
               "-o", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert len(data["groups"]) == 4 and len(data["proxy_check"]) == 2
    for p in data["proxy_check"]:
        assert abs(p["rel_diff"]) < 0.1, p  # measured: within 2% on 510 tokens
