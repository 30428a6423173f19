"""``lcprobe plan``: memory plans from GGUF headers, checked against llama.cpp.

The 70B model is a real GGUF header (tensor infos with Llama-2-70B's shapes
and llama.cpp's Q4_K_M type choices) followed by a sparse hole of the right
length, so the file reports 41.4 GB and takes a few kilobytes of disk. The
compute-buffer and KV-cache formulas are checked against the sizes llama.cpp
itself logs for a small synthetic model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from lcprobe.cli import main
from lcprobe.errors import LcprobeError
from lcprobe.files.plan import check_fits, make_plan, read_shape

Q = gguf.GGMLQuantizationType
GB = 10**9

# Llama-2-70B
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 80, 8192, 28672, 64, 8, 32000
HEAD_DIM = N_EMBD // N_HEAD


def _nbytes(qtype: Q, n_elements: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert n_elements % block == 0
    return n_elements // block * size


def _more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp's use_more_bits: Q4_K_M spends Q6_K on these layers' attn_v / ffn_down
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama2_70b_q4_k_m() -> dict[str, tuple[tuple[int, ...], Q]]:
    """Tensor name -> (numpy shape (rows, cols), type), as llama.cpp's Q4_K_M writes them."""
    t: dict[str, tuple[tuple[int, ...], Q]] = {"token_embd.weight": ((N_VOCAB, N_EMBD), Q.Q4_K)}
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        more = _more_bits(i, N_LAYER)
        t[p + "attn_norm.weight"] = ((N_EMBD,), Q.F32)
        t[p + "attn_q.weight"] = ((N_EMBD, N_EMBD), Q.Q4_K)
        t[p + "attn_k.weight"] = ((kv, N_EMBD), Q.Q4_K)
        # 70B: attn_v is bumped from Q4_K to Q5_K (8 heads share it)
        t[p + "attn_v.weight"] = ((kv, N_EMBD), Q.Q6_K if more else Q.Q5_K)
        t[p + "attn_output.weight"] = ((N_EMBD, N_EMBD), Q.Q4_K)
        t[p + "ffn_norm.weight"] = ((N_EMBD,), Q.F32)
        t[p + "ffn_gate.weight"] = ((N_FF, N_EMBD), Q.Q4_K)
        t[p + "ffn_up.weight"] = ((N_FF, N_EMBD), Q.Q4_K)
        t[p + "ffn_down.weight"] = ((N_EMBD, N_FF), Q.Q6_K if more else Q.Q4_K)
    t["output_norm.weight"] = ((N_EMBD,), Q.F32)
    t["output.weight"] = ((N_VOCAB, N_EMBD), Q.Q6_K)
    return t


def write_header_gguf(path: Path, tensors: dict[str, tuple[tuple[int, ...], Q]], n_ctx_train: int = 4096) -> int:
    """A LLaMA GGUF whose tensor data is a sparse hole: real header, real file length.

    Returns the file size. gguf-py's reader maps the file and reads only the
    header, so plan code sees exactly what it would see for the real model.
    """
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Llama-2-70B header")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_block_count(N_LAYER)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(N_VOCAB)
    for name, (shape, qtype) in tensors.items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(qtype, int(np.prod(shape))), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    header = w.fout[0].tell()
    w.close()
    align = w.data_alignment
    pad = lambda n: -(-n // align) * align  # noqa: E731
    size = pad(header) + sum(pad(_nbytes(q, int(np.prod(s)))) for s, q in tensors.values())
    with open(path, "r+b") as fh:
        fh.truncate(size)  # a hole: no disk blocks
    return size


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hdr") / "llama-2-70b.Q4_K_M.gguf"
    write_header_gguf(path, llama2_70b_q4_k_m())
    return path


def _tensor_bytes(prefix: str = "") -> int:
    return sum(_nbytes(q, int(np.prod(s))) for n, (s, q) in llama2_70b_q4_k_m().items() if n.startswith(prefix))


def test_header_file_is_faithful_and_sparse(llama70b):
    st = os.stat(llama70b)
    # TheBloke's llama-2-70b.Q4_K_M.gguf: 41.42 GB
    assert 41.4 * GB < st.st_size < 41.5 * GB
    assert st.st_blocks * 512 < 10 << 20
    shape = read_shape(llama70b)
    assert (shape.n_layer, shape.n_embd, shape.n_vocab, shape.n_ff, shape.n_head) == (80, 8192, 32000, 28672, 64)
    assert shape.kv_widths == (8 * (128 + 128),) * 80
    assert sum(shape.layer_bytes) == _tensor_bytes("blk.")
    assert shape.layer_bytes[0] > shape.layer_bytes[11]  # Q6_K ffn_down in the first eighth
    assert shape.input_bytes == _tensor_bytes("token_embd")
    assert shape.output_bytes == _tensor_bytes("output")
    assert shape.head_copy_bytes == 0


def test_cpu_only_plan(llama70b):
    plan = make_plan(llama70b, n_gpu_layers=0, n_ctx=4096, n_batch=512, ram_bytes=64 * GB, vram_bytes=0)
    assert plan.weights_gpu == plan.kv_gpu == plan.compute_gpu == 0
    assert plan.weights_cpu == _tensor_bytes()
    # n_ctx x n_layer x (n_head_kv x head_dim) x 2 (K and V) x 2 bytes (f16)
    assert plan.kv_cpu == 4096 * 80 * (8 * 128) * 2 * 2 == 1_342_177_280
    assert plan.lens_head == 32000 * 8192 * 4
    # capture: rows per group bounded by the runner's 256 MiB budget, four copies
    row = 4 * 8192 * 80
    assert plan.capture == 4 * max(64, (256 << 20) // row) * row
    assert plan.fits and plan.max_gpu_layers == 0
    assert 43 * GB < plan.ram_need < 47 * GB


def test_offload_follows_llama_cpp(llama70b):
    kw = dict(n_ctx=2048, n_batch=512, ram_bytes=64 * GB, vram_bytes=80 * GB, unified=False)
    full = make_plan(llama70b, 99, **kw)
    assert full.output_on_gpu and full.gpu_layers == 80
    assert full.weights_cpu == _tensor_bytes("token_embd")  # the input layer never moves
    assert full.weights_gpu == _tensor_bytes() - _tensor_bytes("token_embd")
    assert full.kv_cpu == 0 and full.kv_gpu == 2048 * 80 * 1024 * 4
    # -ngl 1 moves the output layer only; -ngl 41 the output layer and the last 40 blocks
    one = make_plan(llama70b, 1, **kw)
    assert one.gpu_layers == 0 and one.weights_gpu == _tensor_bytes("output")
    part = make_plan(llama70b, 41, **kw)
    last40 = sum(_tensor_bytes(f"blk.{i}.") for i in range(40, 80))
    assert part.gpu_layers == 40 and part.weights_gpu == last40 + _tensor_bytes("output")
    assert part.kv_gpu == part.kv_cpu == 2048 * 40 * 1024 * 4
    assert part.weights_cpu + part.weights_gpu == _tensor_bytes()


def test_largest_ngl_for_a_24gb_gpu(llama70b):
    plan = make_plan(llama70b, 99, n_ctx=2048, n_batch=512, ram_bytes=64 * GB, vram_bytes=24 * GB, unified=False)
    assert not plan.fits
    assert any("GPU memory" in r and "24.00 GB available" in r for r in plan.reasons)
    k = plan.max_gpu_layers
    assert k is not None and 30 < k < 60
    at = make_plan(llama70b, k, n_ctx=2048, n_batch=512, ram_bytes=64 * GB, vram_bytes=24 * GB, unified=False)
    above = make_plan(llama70b, k + 1, n_ctx=2048, n_batch=512, ram_bytes=64 * GB, vram_bytes=24 * GB, unified=False)
    assert at.fits and at.vram_need <= 24 * GB < above.vram_need
    assert f"-ngl {k} fits" in plan.refusal()


def test_unified_memory_counts_gpu_bytes_once_against_ram(llama70b):
    mac = make_plan(llama70b, 99, n_ctx=2048, n_batch=512, ram_bytes=64 * GB, vram_bytes=48 * GB, unified=True)
    assert mac.fits and mac.max_gpu_layers == 81
    assert mac.ram_need >= mac.vram_need + mac.weights_cpu + mac.lens_head
    small = make_plan(llama70b, 99, n_ctx=2048, n_batch=512, ram_bytes=32 * GB, vram_bytes=24 * GB, unified=True)
    assert not small.fits


def test_budget_that_cannot_fit_is_refused(llama70b):
    plan = make_plan(llama70b, 0, n_ctx=2048, n_batch=512, ram_bytes=16 * GB, vram_bytes=0)
    assert not plan.fits and plan.max_gpu_layers is None
    assert re.search(r"needs 4\d\.\d\d GB of RAM, 16\.00 GB available", plan.reasons[0])
    with pytest.raises(LcprobeError, match=r"does not fit: needs .* GB of RAM"):
        check_fits(plan)
    assert not any("lens-backend ggml" in n for n in plan.notes)  # 1.05 GB is under 10% of 16 GB
    tiny = make_plan(llama70b, 0, n_ctx=2048, n_batch=512, ram_bytes=8 * GB, vram_bytes=0)
    assert any("lens-backend ggml" in n for n in tiny.notes)
    # the ggml lens keeps a copy of the head as stored (Q6_K here), not a float32 one
    ggml = make_plan(llama70b, 0, n_ctx=2048, n_batch=512, ram_bytes=8 * GB, vram_bytes=0, lens_backend="ggml")
    q6_head = _nbytes(Q.Q6_K, N_VOCAB * N_EMBD)
    assert ggml.lens_head == q6_head and ggml.ram_need == tiny.ram_need - tiny.lens_head + q6_head
    assert not any("lens-backend ggml" in n for n in ggml.notes)


def test_run_refuses_a_model_that_does_not_fit_before_loading(smollm2, tmp_path, monkeypatch, capsys):
    """`lcprobe run` checks the plan first: a refusal names the numbers and loads nothing."""
    import lcprobe.llama.engine
    import lcprobe.files.plan

    monkeypatch.setattr(lcprobe.files.plan, "machine_ram", lambda: (200 * 2**20, 100 * 2**20))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although the plan does not fit")

    monkeypatch.setattr(lcprobe.llama.engine.Engine, "__init__", no_load)
    out = tmp_path / "run"
    assert main(["run", "-m", str(smollm2), "-T", "calc", "--limit", "2", "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"does not fit: needs \d+ MB of RAM, 105 MB available", err), err
    assert "lcprobe plan" in err
    # every command that loads a model checks the same plan first
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten " * 20)
    for argv in (["check"], ["sites"], ["depth", "--text", str(text), "-o", str(tmp_path / "d")],
                 ["depth", "--text", str(text), "--skip", "1", "-o", str(tmp_path / "s")]):
        assert main([*argv, "-m", str(smollm2)]) == 1, argv
        assert "does not fit" in capsys.readouterr().err, argv


def test_memory_check_can_be_skipped(smollm2, monkeypatch):
    import lcprobe.files.plan
    from lcprobe.llama.loader import memory_plan, open_model
    from lcprobe.probing.session import ProbeOptions
    from lcprobe.files.modelfile import read_model_info

    info = read_model_info(smollm2)
    plan = memory_plan(info, ProbeOptions().engine_config(), info.n_layer)
    # SmolLM2 on this machine: model + f32 head + llama.cpp buffers, well under 2 GB
    assert plan.fits and plan.vram_need == 0 and 300e6 < plan.ram_need < 2e9
    monkeypatch.setattr(lcprobe.files.plan, "machine_ram", lambda: (200 * 2**20, 100 * 2**20))
    with pytest.raises(LcprobeError, match="does not fit"):
        open_model(smollm2, ProbeOptions())
    with open_model(smollm2, ProbeOptions(memory_check=False, n_ctx=256)) as model:
        assert model.engine.n_ctx == 256


def test_cli_plan_json_and_exit_code(llama70b, capsys):
    assert main(["plan", "-m", str(llama70b), "-ngl", "99", "-c", "4096", "--ram", "64", "--vram", "48",
                 "--unified", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["gpu_layers"] == 80 and data["max_gpu_layers"] == 81
    assert data["kv_gpu"] == 1_342_177_280
    assert main(["plan", "-m", str(llama70b), "-ngl", "99", "-c", "4096", "--ram", "64", "--vram", "48",
                 "--unified", "--json", "--lens-backend", "ggml"]) == 0
    ggml = json.loads(capsys.readouterr().out)
    q6_head = _nbytes(Q.Q6_K, N_VOCAB * N_EMBD)
    assert ggml["lens_head"] == q6_head and ggml["ram_need"] == data["ram_need"] - data["lens_head"] + q6_head
    assert main(["plan", "-m", str(llama70b), "--ram", "16", "--vram", "0"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "weights" in out and "KV cache" in out


def test_tied_head_is_copied_to_the_gpu(smollm2):
    from lcprobe.files.modelfile import open_reader

    total = sum(int(t.n_bytes) for t in open_reader(smollm2).tensors)
    embd = next(int(t.n_bytes) for t in open_reader(smollm2).tensors if t.name == "token_embd.weight")
    cpu = make_plan(smollm2, 0, ram_bytes=8 * GB, vram_bytes=0)
    assert cpu.weights_cpu == total
    gpu = make_plan(smollm2, 99, ram_bytes=8 * GB, vram_bytes=8 * GB, unified=False)
    assert gpu.weights_cpu == embd  # token_embd stays, its copy serves as the head on the GPU
    # blocks and output_norm move, plus the copy of token_embd: as many bytes as the file holds
    assert gpu.weights_gpu == total


def _llama_log_sizes(log: Path) -> dict[str, float]:
    text = log.read_text()
    out = {}
    for key, pat in (("kv", r"CPU KV buffer size =\s+([\d.]+) MiB"),
                     ("compute", r"CPU compute buffer size =\s+([\d.]+) MiB")):
        found = re.findall(pat, text)
        out[key] = float(found[-1]) * (1 << 20)
    return out


@pytest.mark.parametrize("n_ctx,n_ubatch,fa", [(1000, 256, "off"), (4096, 128, "off"), (4096, 256, "on")])
def test_kv_and_compute_match_llama_cpp(tmp_path, n_ctx, n_ubatch, fa):
    from synth import SynthSpec, write_llama_gguf

    from lcprobe.llama.engine import Engine, EngineConfig, set_llama_log
    from lcprobe.files.modelfile import read_model_info

    path = tmp_path / "m.gguf"
    write_llama_gguf(path, SynthSpec(n_layer=2, n_embd=128, n_head=8, n_head_kv=2, n_ff=256, ctx=8192))
    log = tmp_path / "llama.log"
    set_llama_log(log)
    info = read_model_info(path)
    with Engine(info, EngineConfig(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, n_seq_max=4,
                                   n_threads=2, flash_attn=fa)):
        pass
    set_llama_log(None)
    logged = _llama_log_sizes(log)
    plan = make_plan(path, 0, n_ctx=n_ctx, n_batch=n_ubatch, ram_bytes=8 * GB, vram_bytes=0, flash_attn=fa)
    assert plan.n_ctx == 1024 if n_ctx == 1000 else plan.n_ctx == n_ctx  # padded to 256
    assert plan.kv_cpu == logged["kv"]
    assert plan.compute_cpu == pytest.approx(logged["compute"], rel=0.05)
