"""Tiny random GGUF models of every architecture lcprobe accepts, as llama.cpp's loader wants them.

Each writer produces the architecture's real tensor set and the hyper-parameter
keys its loader reads (vendor/llama.cpp/src/models/<arch>.cpp in
llama-cpp-python 0.3.36): biases, fused QKV, q/k norms, post-norms, soft-caps,
sliding windows, tied or untied heads. The weights are random (seeded), so the
files say nothing about language; they exist so that a test can load each
architecture through lcprobe and compare the capture and the lens with
llama.cpp's own logits. The tokenizer is tests/synth.py's.

Sizes are tiny (n_embd 64, 3 layers, a vocabulary of ~1000 tokens): a file is
well under a megabyte and loads in milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lcprobe.files.gguf_writer import TensorOut, write_gguf

try:
    import synth
except ImportError:  # tests/ imported as a package
    from tests import synth  # type: ignore[no-redef]

_F32 = np.float32


@dataclass(frozen=True)
class ArchModel:
    """A written model: ``embed_scale`` is what llama.cpp multiplies the embedding
    rows by before block 1 (Gemma's sqrt(n_embd), Granite's embedding_scale)."""

    arch: str
    path: Path
    embed_scale: float = 1.0


@dataclass
class Shape:
    """Hyper-parameters of one tiny model. ``head_dim`` may differ from
    n_embd / n_head (Qwen3, Gemma 3), which then needs attention.key_length."""

    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 128
    ctx: int = 256
    eps: float = 1e-6
    rope_base: float = 10000.0

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass
class _Model:
    """Tensors and extra keys being assembled for one file."""

    arch: str
    shape: Shape
    seed: int
    dtype: type = _F32  # the matrices' storage; vectors stay float32 as convert_hf_to_gguf keeps them
    embed_scale: float = 1.0
    tensors: dict[str, TensorOut] = field(default_factory=dict)
    keys: list[Callable[[gguf.GGUFWriter], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def put(self, name: str, arr: np.ndarray) -> None:
        self.tensors[name] = TensorOut.from_array(name, arr)

    def mat(self, name: str, rows: int, cols: int, gain: float = 1.0) -> None:
        # gain / sqrt(fan_in) keeps every activation O(1) whatever the sizes
        self.put(name, (self.rng.standard_normal((rows, cols)) * (gain / np.sqrt(cols))).astype(self.dtype))

    def vec(self, name: str, n: int, mean: float = 1.0, std: float = 0.1) -> None:
        self.put(name, (mean + std * self.rng.standard_normal(n)).astype(_F32))

    def q8_0(self, name: str, arr: np.ndarray) -> None:
        """Store ``arr`` quantized to Q8_0 (the bytes gguf-py's quantizer makes)."""
        q = gguf.quants.quantize(np.asarray(arr, _F32), gguf.GGMLQuantizationType.Q8_0)
        self.tensors[name] = TensorOut(name, tuple(q.shape), q.dtype, int(q.nbytes), lambda: q,
                                       gguf.GGMLQuantizationType.Q8_0)

    # -- the pieces most architectures share ------------------------------------------
    def embed(self, std: float = 0.5) -> None:
        self.put("token_embd.weight",
                 (std * self.rng.standard_normal((synth.vocab_size(), self.shape.n_embd))).astype(self.dtype))

    def head(self, gain: float = 4.0, q8_0: bool = False) -> None:
        self.vec("output_norm.weight", self.shape.n_embd)
        w = (self.rng.standard_normal((synth.vocab_size(), self.shape.n_embd))
             * (gain / np.sqrt(self.shape.n_embd))).astype(_F32)
        if q8_0:
            self.q8_0("output.weight", w)
        else:
            self.put("output.weight", w.astype(self.dtype))

    def attention(self, i: int, *, fused: bool = False, bias: bool = False, qk_norm: str | None = None) -> None:
        """Q/K/V (separate or fused attn_qkv) and the output projection of block ``i``.

        ``qk_norm``: "head" (one weight of head_dim, Qwen3/Gemma 3) or "full"
        (over all heads, OLMo 2)."""
        s, p = self.shape, f"blk.{i}."
        if fused:
            self.mat(p + "attn_qkv.weight", s.q_dim + 2 * s.kv_dim, s.n_embd, 1.3)
        else:
            # larger Q/K gains make attention far from uniform, so masks and windows matter
            self.mat(p + "attn_q.weight", s.q_dim, s.n_embd, 1.6)
            self.mat(p + "attn_k.weight", s.kv_dim, s.n_embd, 1.6)
            self.mat(p + "attn_v.weight", s.kv_dim, s.n_embd, 1.0)
        if bias:
            for name, n in (("attn_q", s.q_dim), ("attn_k", s.kv_dim), ("attn_v", s.kv_dim)):
                self.vec(p + name + ".bias", n, mean=0.0, std=0.3)
        if qk_norm == "head":
            self.vec(p + "attn_q_norm.weight", s.head_dim)
            self.vec(p + "attn_k_norm.weight", s.head_dim)
        elif qk_norm == "full":
            self.vec(p + "attn_q_norm.weight", s.q_dim)
            self.vec(p + "attn_k_norm.weight", s.kv_dim)
        self.mat(p + "attn_output.weight", s.n_embd, s.q_dim, 1.0)

    def gated_ffn(self, i: int, down_gain: float = 1.5) -> None:
        s, p = self.shape, f"blk.{i}."
        self.mat(p + "ffn_gate.weight", s.n_ff, s.n_embd, 1.0)
        self.mat(p + "ffn_up.weight", s.n_ff, s.n_embd, 1.0)
        self.mat(p + "ffn_down.weight", s.n_embd, s.n_ff, down_gain)

    def pre_norms(self, i: int) -> None:
        self.vec(f"blk.{i}.attn_norm.weight", self.shape.n_embd)
        self.vec(f"blk.{i}.ffn_norm.weight", self.shape.n_embd)

    def post_norms(self, i: int, mean: float = 1.0) -> None:
        # the branch's rms after its post-norm is about ``mean``
        self.vec(f"blk.{i}.post_attention_norm.weight", self.shape.n_embd, mean=mean)
        self.vec(f"blk.{i}.post_ffw_norm.weight", self.shape.n_embd, mean=mean)

    def tied_head(self, norm_mean: float = 1.0) -> None:
        """Only the final norm: the head is token_embd. Its logits have std about
        norm_mean * sqrt(n_embd) * the embedding's std."""
        self.vec("output_norm.weight", self.shape.n_embd, mean=norm_mean, std=0.1 * norm_mean)

    def write(self, path: str | os.PathLike[str], file_type: gguf.LlamaFileType) -> ArchModel:
        s = self.shape

        def metadata(w: gguf.GGUFWriter) -> None:
            # not the architecture: llama.cpp sets token attributes by model name
            # ("phi3" looks up an <|endoftext|> token this vocabulary lacks)
            w.add_name("lcprobe-tiny")
            w.add_file_type(int(file_type))
            w.add_block_count(s.n_layer)
            w.add_context_length(s.ctx)
            w.add_embedding_length(s.n_embd)
            w.add_feed_forward_length(s.n_ff)
            w.add_head_count(s.n_head)
            w.add_head_count_kv(s.n_head_kv)
            w.add_layer_norm_rms_eps(s.eps)
            w.add_rope_freq_base(s.rope_base)
            w.add_rope_dimension_count(s.head_dim)
            if s.q_dim != s.n_embd:
                w.add_key_length(s.head_dim)
                w.add_value_length(s.head_dim)
            for add in self.keys:
                add(w)
            synth.add_tokenizer(w)

        write_gguf(path, self.arch, metadata, list(self.tensors.values()))
        return ArchModel(self.arch, Path(path), self.embed_scale)


# -- one writer per architecture ------------------------------------------------------------
# Each takes the output path and a seed and writes the file.

def _llama(path: Path, seed: int) -> ArchModel:
    # SmolLM2's shape: tied head, GQA
    m = _Model("llama", Shape(), seed)
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.gated_ffn(i)
    m.tied_head()
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _mistral3(path: Path, seed: int) -> ArchModel:
    # Ministral 3: a LLaMA block with Llama 4's attention temperature tuning
    # (which needs the original context length); untied head, stored as Q8_0
    m = _Model("mistral3", Shape(), seed)
    m.keys.append(lambda w: (w.add_attn_temperature_scale(0.1), w.add_rope_scaling_orig_ctx_len(64)))
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.gated_ffn(i)
    m.head(q8_0=True)
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _granite(path: Path, seed: int) -> ArchModel:
    # Granite 3: embedding (12, Granite's), residual, attention and logit scales;
    # tied head. llama.cpp divides the logits by logit_scale, which the lens must
    # too. A small embedding and a large final norm keep the blocks, not the
    # scaled input row, in charge of the prediction.
    m = _Model("granite", Shape(), seed, embed_scale=12.0)
    m.keys.append(lambda w: (w.add_logit_scale(4.0), w.add_embedding_scale(m.embed_scale),
                             w.add_residual_scale(0.5), w.add_attention_scale(0.3)))
    m.embed(std=0.035)
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.gated_ffn(i)
    m.tied_head(55.0)
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _qwen2(path: Path, seed: int) -> ArchModel:
    # Qwen2/2.5: q/k/v biases, tied head (the small ones)
    m = _Model("qwen2", Shape(), seed)
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i, bias=True)
        m.gated_ffn(i)
    m.tied_head()
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _qwen3(path: Path, seed: int) -> ArchModel:
    # Qwen3: per-head q/k RMS norms, head_dim * n_head != n_embd; F16 weights, untied head
    m = _Model("qwen3", Shape(head_dim=32), seed, dtype=np.float16)
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i, qk_norm="head")
        m.gated_ffn(i)
    m.head()
    return m.write(path, gguf.LlamaFileType.MOSTLY_F16)


def _olmo2(path: Path, seed: int) -> ArchModel:
    # OLMo 2: no pre-norms; q/k norms over all heads; norms after attention and
    # after the FFN, inside the residual branch; untied head (required)
    m = _Model("olmo2", Shape(), seed)
    m.embed()
    for i in range(m.shape.n_layer):
        m.attention(i, qk_norm="full")
        m.gated_ffn(i)
        m.post_norms(i)
    m.head()
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _phi3(path: Path, seed: int) -> ArchModel:
    # Phi-3: fused attn_qkv, fused gate+up (ffn_up of 2 x n_ff, SwiGLU), LongRoPE
    # factors, a sliding window llama.cpp ignores; untied head
    s = Shape()
    m = _Model("phi3", s, seed)
    m.keys.append(lambda w: w.add_sliding_window(16))
    m.embed()
    for i in range(s.n_layer):
        m.pre_norms(i)
        m.attention(i, fused=True)
        m.mat(f"blk.{i}.ffn_up.weight", 2 * s.n_ff, s.n_embd, 1.0)
        m.mat(f"blk.{i}.ffn_down.weight", s.n_embd, s.n_ff, 1.5)
    m.vec("rope_factors_long.weight", s.head_dim // 2, std=0.2)
    m.vec("rope_factors_short.weight", s.head_dim // 2, std=0.05)
    m.head()
    return m.write(path, gguf.LlamaFileType.ALL_F32)


# Gemma scales the embedding by sqrt(n_embd) (8 here) and ties the head: with
# the usual embedding the residual would stay mostly the input token's row and
# every position would predict its own token. A smaller embedding, a larger
# final norm and strong blocks keep the top token a real contest.
_GEMMA_EMBED_STD = 0.2
_GEMMA_NORM = 2.5


def _gemma(path: Path, seed: int) -> ArchModel:
    # Gemma: embedding scaled by sqrt(n_embd), GELU FFN, multi-query attention,
    # always tied (an output.weight would be an unexpected tensor)
    m = _Model("gemma", Shape(n_head_kv=1), seed)
    m.embed_scale = float(np.sqrt(m.shape.n_embd))
    m.embed(std=_GEMMA_EMBED_STD)
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.gated_ffn(i, down_gain=8.0)
    m.tied_head(_GEMMA_NORM)
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def write_gemma2(path: Path, seed: int = 0, final_softcap: float | None = 15.0) -> ArchModel:
    """Gemma 2: post-norms, attention and final logit soft-capping, sliding window
    on every other layer; tied. The final soft-cap (15) bends the top logits;
    ``final_softcap=None`` leaves the key out (llama.cpp then caps at 30)."""
    m = _Model("gemma2", Shape(), seed)
    m.keys.append(lambda w: (w.add_attn_logit_softcapping(50.0), w.add_sliding_window(8)))
    if final_softcap is not None:
        m.keys.append(lambda w: w.add_final_logit_softcapping(final_softcap))
    m.embed_scale = float(np.sqrt(m.shape.n_embd))
    m.embed(std=_GEMMA_EMBED_STD)
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.post_norms(i, mean=4.0)
        m.gated_ffn(i)
    m.tied_head(_GEMMA_NORM)
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def _gemma3(path: Path, seed: int) -> ArchModel:
    # Gemma 3: per-head q/k norms, post-norms, interleaved sliding-window
    # attention with its own RoPE base, head_dim * n_head != n_embd; tied
    m = _Model("gemma3", Shape(head_dim=32, n_head_kv=1, rope_base=1e6), seed)
    m.keys.append(lambda w: (w.add_sliding_window(8), w.add_sliding_window_pattern(2),
                             w.add_rope_freq_base_swa(10000.0)))
    m.embed_scale = float(np.sqrt(m.shape.n_embd))
    m.embed(std=_GEMMA_EMBED_STD)
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i, qk_norm="head")
        m.post_norms(i, mean=4.0)
        m.gated_ffn(i)
    m.tied_head(_GEMMA_NORM)
    return m.write(path, gguf.LlamaFileType.ALL_F32)


WRITERS: dict[str, Callable[[Path, int], ArchModel]] = {
    "llama": _llama,
    "mistral3": _mistral3,
    "granite": _granite,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "olmo2": _olmo2,
    "phi3": _phi3,
    "gemma": _gemma,
    "gemma2": write_gemma2,
    "gemma3": _gemma3,
}


def write_arch_model(arch: str, path: str | os.PathLike[str], seed: int = 0) -> ArchModel:
    """Write a tiny random model of ``arch`` to ``path``; KeyError for an architecture without a writer."""
    return WRITERS[arch](Path(path), seed)


def write_llama_like(arch: str, path: str | os.PathLike[str], seed: int = 0,
                     extra_keys: Callable[[gguf.GGUFWriter], None] | None = None) -> ArchModel:
    """LLaMA's tensor set under ``arch``'s name (another architecture: a file lcprobe
    must refuse by its header), with ``extra_keys`` added to the header."""
    m = _Model(arch, Shape(), seed)
    if extra_keys is not None:
        m.keys.append(extra_keys)
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i)
        m.gated_ffn(i)
    m.tied_head()
    return m.write(path, gguf.LlamaFileType.ALL_F32)


def write_qwen2_with_output_bias(path: str | os.PathLike[str], seed: int = 0) -> ArchModel:
    """A Qwen2 model whose head has a bias (output.bias), which llama.cpp's qwen2 graph adds."""
    m = _Model("qwen2", Shape(), seed)
    m.embed()
    for i in range(m.shape.n_layer):
        m.pre_norms(i)
        m.attention(i, bias=True)
        m.gated_ffn(i)
    m.head()
    m.vec("output.bias", synth.vocab_size(), mean=0.0, std=1.0)
    return m.write(path, gguf.LlamaFileType.ALL_F32)
