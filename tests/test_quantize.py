"""lcprobe quantize: llama.cpp's quantizer through libllama, and the type mix each file really gets.

A synthetic LLaMA whose widths are multiples of 256 shows the K-quants really
applied; SmolLM2 (n_embd 576) shows the fall-back to legacy types being
reported. Quantizing these models takes well under a second each.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.studies.quantize import (
    QUANT_TYPES,
    QuantizeError,
    base_stem,
    coverage_warning,
    load_imatrix,
    output_path,
    parse_types,
    plan_quantize,
    quantize_all,
    type_mix,
)


@pytest.fixture(scope="module")
def synth256(tmp_path_factory):
    """A 2-layer LLaMA with n_embd 256 and n_ff 512: every row length suits the K-quants."""
    from synth import SynthSpec, write_llama_gguf

    spec = SynthSpec(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, seed=3)
    path = tmp_path_factory.mktemp("q256") / "synth256.F32.gguf"
    weights = write_llama_gguf(path, spec)
    return path, spec, weights


@pytest.fixture(scope="module")
def synth256_quants(synth256, tmp_path_factory):
    src, _, _ = synth256
    out = tmp_path_factory.mktemp("q256out")
    plan = plan_quantize(src, out, "Q8_0,Q4_K_M,Q2_K")
    results = {r.qtype: r for r in quantize_all(plan, nthread=2, log_path=out / "quantize.log")}
    return out, plan, results


def test_parse_types_is_case_insensitive_ordered_and_deduplicated():
    assert parse_types("q8_0, Q4_K_M,q8_0") == ["Q8_0", "Q4_K_M"]
    assert parse_types(["Q2_K", "f32,bf16"]) == ["Q2_K", "F32", "BF16"]


@pytest.mark.parametrize("bad", ["Q4_K_X", "Q4_K_M;rm -rf /", "q9", "int4"])
def test_unknown_type_is_a_clear_error_listing_valid_types(bad):
    with pytest.raises(QuantizeError) as exc:
        parse_types(f"Q8_0,{bad}")
    msg = str(exc.value)
    assert f"unknown quantization type '{bad}'" in msg
    assert "Q4_K_M" in msg and "Q2_K" in msg and "IQ2_XS" in msg
    assert isinstance(exc.value, LcprobeError)


def test_unknown_type_suggests_the_closest():
    with pytest.raises(QuantizeError, match="did you mean Q4_K_M"):
        parse_types("Q4_KM")


def test_empty_type_list_is_an_error():
    with pytest.raises(QuantizeError, match="no quantization type"):
        parse_types(" , ")


def test_every_type_maps_to_llama_cpp_ftype_constant():
    import llama_cpp

    for name, (value, base) in QUANT_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, const) == value, name
        assert base in gguf.GGMLQuantizationType.__members__, base


@pytest.mark.parametrize("name,stem", [
    ("llama-2-7b.F16.gguf", "llama-2-7b"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m"),
    ("model-IQ2_XS.gguf", "model"),
    ("plain.gguf", "plain"),
    ("Q8_0.gguf", "Q8_0"),
])
def test_output_names_drop_the_sources_type_tag(name, stem, tmp_path):
    assert base_stem(name) == stem
    assert output_path(tmp_path / name, tmp_path / "out", "Q4_K_M") == tmp_path / "out" / f"{stem}-Q4_K_M.gguf"


def test_k_quants_really_apply_when_rows_are_multiples_of_256(synth256_quants):
    out, plan, results = synth256_quants
    assert plan.requantize_warning is None  # an F32 source
    assert set(results) == {"Q8_0", "Q4_K_M", "Q2_K"}
    for qtype, r in results.items():
        assert r.path == out / f"synth256-{qtype}.gguf" and r.path.exists()
        assert r.info.file_type == qtype
        assert not r.reused and r.warning is None
    q4 = results["Q4_K_M"].mix
    types = {t for t, _, _ in q4.shares}
    assert q4.base_type == "Q4_K" and q4.base_fraction > 0.5
    assert types <= {"Q4_K", "Q6_K", "F32"}, types
    q2 = results["Q2_K"].mix
    assert q2.base_type == "Q2_K" and q2.base_fraction > 0.5
    assert not {t for t, _, _ in q2.shares} & {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # no fall-back
    assert results["Q8_0"].mix.base_fraction > 0.99
    bpw = {q: r.mix.bits_per_weight for q, r in results.items()}
    assert bpw["Q2_K"] < bpw["Q4_K_M"] < bpw["Q8_0"]


def test_quantized_weights_lose_precision_in_type_order(synth256, synth256_quants):
    from synth import load_weights

    _, _, weights = synth256
    _, _, results = synth256_quants
    name = "blk.0.attn_q.weight"
    errs = {}
    for qtype, r in results.items():
        w = load_weights(r.path)[name]
        errs[qtype] = float(np.linalg.norm(w - weights[name]) / np.linalg.norm(weights[name]))
    assert 0 < errs["Q8_0"] < errs["Q4_K_M"] < errs["Q2_K"] < 0.5, errs


def test_existing_outputs_are_reused_unless_forced(synth256, synth256_quants):
    src, _, _ = synth256
    out, _, results = synth256_quants
    path = results["Q8_0"].path
    mtime = path.stat().st_mtime_ns
    again = list(quantize_all(plan_quantize(src, out, "Q8_0"), nthread=2))
    assert again[0].reused and again[0].seconds == 0.0 and path.stat().st_mtime_ns == mtime
    forced = list(quantize_all(plan_quantize(src, out, "Q8_0"), force=True, nthread=2))
    assert not forced[0].reused and path.stat().st_mtime_ns != mtime
    assert forced[0].info.file_type == "Q8_0"


def test_an_existing_file_of_another_type_is_not_silently_reused(synth256, synth256_quants, tmp_path):
    src, _, _ = synth256
    _, _, results = synth256_quants
    dst = output_path(src, tmp_path, "Q4_0")
    dst.write_bytes(results["Q8_0"].path.read_bytes())
    with pytest.raises(QuantizeError, match="is Q8_0, not Q4_0; use --force"):
        list(quantize_all(plan_quantize(src, tmp_path, "Q4_0")))


def test_the_source_is_never_overwritten(synth256, tmp_path):
    import shutil

    src, _, _ = synth256
    copy = tmp_path / "model-F32.gguf"
    shutil.copy(src, copy)
    before = copy.read_bytes()
    (r,) = quantize_all(plan_quantize(copy, tmp_path, "F32"), force=True)
    assert r.reused and r.path == copy and copy.read_bytes() == before
    # an output name that is the source but of another type is refused, not written over
    plan = plan_quantize(copy, tmp_path, "F16")
    plan.outputs["F16"] = copy
    with pytest.raises(QuantizeError, match="is the source itself"):
        list(quantize_all(plan, force=True))
    assert copy.read_bytes() == before


def _weight_shapes(path) -> dict[str, int]:
    """Row length (ggml ne0) of every 2-D block weight: what an imatrix entry must match."""
    reader = gguf.GGUFReader(path)
    return {t.name: int(t.shape[0]) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def _write_gguf_imatrix(path, shapes: dict[str, int], rng, bad: str | None = None) -> dict[str, np.ndarray]:
    writer = gguf.GGUFWriter(str(path), "imatrix")
    expected = {}
    for name, n in shapes.items():
        count = 7.0
        sums = rng.uniform(0.5, 2.0, size=n if name != bad else n + 1).astype(np.float32)
        writer.add_tensor(f"{name}.in_sum2", sums)
        writer.add_tensor(f"{name}.counts", np.array([count], dtype=np.float32))
        expected[name] = sums / count
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_iq_types_require_an_imatrix(synth256, tmp_path):
    src, _, _ = synth256
    with pytest.raises(QuantizeError, match="IQ2_XXS needs an importance matrix"):
        plan_quantize(src, tmp_path, "Q8_0,IQ2_XXS")
    assert main(["quantize", "-m", str(src), "-t", "IQ3_XXS", "-o", str(tmp_path)]) == 1


def test_iq_type_with_a_gguf_imatrix(synth256, tmp_path):
    src, _, _ = synth256
    imatrix = tmp_path / "synth.imatrix.gguf"
    expected = _write_gguf_imatrix(imatrix, _weight_shapes(src), np.random.default_rng(0))
    loaded = load_imatrix(imatrix)
    assert set(loaded) == set(expected)
    for name, v in expected.items():
        np.testing.assert_allclose(loaded[name], v, rtol=1e-6)
    plan = plan_quantize(src, tmp_path, "IQ2_XXS", imatrix_path=imatrix)
    (r,) = quantize_all(plan, imatrix_path=imatrix, nthread=2, log_path=tmp_path / "quantize.log")
    assert r.info.file_type == "IQ2_XXS"
    assert r.mix.base_type == "IQ2_XXS" and r.mix.base_fraction > 0.3
    assert "have importance matrix data" in (tmp_path / "quantize.log").read_text()


def test_llama_cpp_failure_reason_is_reported(synth256, tmp_path):
    src, _, _ = synth256
    imatrix = tmp_path / "bad.imatrix.gguf"
    _write_gguf_imatrix(imatrix, _weight_shapes(src), np.random.default_rng(1), bad="blk.0.attn_q.weight")
    plan = plan_quantize(src, tmp_path, "IQ2_XXS", imatrix_path=imatrix)
    with pytest.raises(QuantizeError, match=r"imatrix size 257 is different from tensor size 256"):
        list(quantize_all(plan, imatrix_path=imatrix, nthread=2, log_path=tmp_path / "quantize.log"))
    assert not list(tmp_path.glob("*.gguf.part")) and not plan.outputs["IQ2_XXS"].exists()


def test_legacy_imatrix_values_are_divided_by_ncall(tmp_path):
    entries = {"blk.0.attn_q.weight": (4, np.arange(1, 9, dtype=np.float32)),
               "blk.0.ffn_down.weight": (0, np.full(3, 2.5, dtype=np.float32))}
    buf = struct.pack("<i", len(entries))
    for name, (ncall, vals) in entries.items():
        buf += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals)) + vals.tobytes()
    buf += struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki"  # chunk count + dataset name
    path = tmp_path / "legacy.dat"
    path.write_bytes(buf)
    got = load_imatrix(path)
    np.testing.assert_allclose(got["blk.0.attn_q.weight"], np.arange(1, 9) / 4)
    np.testing.assert_allclose(got["blk.0.ffn_down.weight"], 2.5)  # ncall 0: values as stored


def test_garbage_imatrix_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.dat"
    path.write_bytes(b"\xff\xff\xff\x7fjunk")
    with pytest.raises(QuantizeError, match="imatrix"):
        load_imatrix(path)


def test_smollm2_requantize_warns_and_reports_the_fallback(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smolq")
    plan = plan_quantize(smollm2, out, "F32")
    assert plan.requantize_warning and "already quantized (Q4_1)" in plan.requantize_warning
    (f32,) = quantize_all(plan, nthread=2, log_path=out / "quantize.log")
    assert f32.path.name == "SmolLM2-135M-Instruct-F32.gguf"
    assert f32.mix.shares[0][0] == "F32" and f32.warning is None
    plan2 = plan_quantize(f32.path, out, "Q2_K")
    assert plan2.requantize_warning is None  # the F32 copy is the reference now
    (q2,) = quantize_all(plan2, nthread=2, log_path=out / "quantize.log")
    assert q2.path.name == "SmolLM2-135M-Instruct-Q2_K.gguf" and q2.info.file_type == "Q2_K"
    assert q2.mix.base_fraction < 0.05
    assert q2.mix.shares[0][0] == "Q4_0"  # what llama.cpp fell back to for 576-long rows
    assert q2.warning and "n_embd 576 is not a multiple of 256" in q2.warning and "Q4_0" in q2.warning
    assert coverage_warning(q2.info) == q2.warning
    assert type_mix(q2.info).describe().startswith("Q4_0 ")
    assert "falling back" in (out / "quantize.log").read_text()


def test_cli_quantize_end_to_end(synth256, tmp_path, capsys):
    src, _, _ = synth256
    out = tmp_path / "cli"
    assert main(["quantize", "-m", str(src), "-t", "q8_0,Q4_K_M", "-o", str(out), "--quiet", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert (out / "synth256-Q8_0.gguf").exists() and (out / "synth256-Q4_K_M.gguf").exists()
    assert "Q4_K" in text and "bpw" in text
    assert main(["quantize", "-m", str(src), "-t", "Q8_0", "-o", str(out), "--quiet"]) == 0
    assert "reused" in capsys.readouterr().out


def test_cli_unknown_type_and_corrupt_source(synth256, tmp_path, capsys):
    src, _, _ = synth256
    assert main(["quantize", "-m", str(src), "-t", "Q4_K_Q", "-o", str(tmp_path)]) == 1
    assert "unknown quantization type 'Q4_K_Q'" in capsys.readouterr().err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    assert main(["quantize", "-m", str(bad), "-t", "Q8_0", "-o", str(tmp_path)]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
