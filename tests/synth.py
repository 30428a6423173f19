"""Tiny synthetic LLaMA-architecture GGUF models with a numpy reference forward pass.

Tests use these to check lcprobe's captures against ground truth without
downloading a real model: `write_llama_gguf` writes a sub-megabyte GGUF with
random F32 weights that llama.cpp loads as an ordinary LLaMA model,
`reference_forward` recomputes every intermediate llama.cpp names in its graph
(embedding, attn_out, ffn_inp, ffn_out, l_out, result_norm, logits) in float64,
and `load_weights` reads back any GGUF (including quantized copies made with
`quantize`) so the reference can run on exactly the weights llama.cpp sees.

The semantics follow llama.cpp's LLM_ARCH_LLAMA graph (src/models/llama.cpp):
pre-norm RMSNorm blocks, RoPE in LLAMA_ROPE_TYPE_NORM mode (rotating adjacent
pairs), grouped-query attention with a causal mask and 1/sqrt(head_dim) scale,
and a SwiGLU FFN.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import gguf

from lcprobe.files.gguf_writer import TensorOut, write_gguf

# SentencePiece marks a preceding space with U+2581; llama.cpp's SPM tokenizer
# replaces ' ' with it and prepends one to the text (add_space_prefix).
SPIECE_SPACE = "\u2581"

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3
N_BYTE_TOKENS = 256
FIRST_NORMAL_ID = N_SPECIAL + N_BYTE_TOKENS

# Token types as llama.cpp's llama_token_type enum numbers them.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_BYTE = 6

_WORDS = (
    "the a an is are was were be of and or not to in on at for with by from as "
    "it this that what who where when how why which yes no I you he she we they "
    "What Who Where When How Why Which The A An It This Q answer question capital "
    "city country France Paris Germany Berlin Italy Rome Spain Madrid plus minus "
    "times equals sum number color sky blue red green sun moon day night one two "
    "three four five six seven eight nine ten hello world"
).split()


@lru_cache(maxsize=1)
def build_vocab() -> tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...]]:
    """Return (tokens, scores, token_types) of the synthetic SentencePiece vocab.

    The SPM tokenizer only merges two adjacent symbols when their concatenation
    is itself a token, so every multi-character token comes with all of its
    prefixes; that guarantees whole words and numbers are reachable by merges.
    Anything else (e.g. '\\n', non-ASCII) falls back to the byte tokens.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(N_BYTE_TOKENS)]
    types += [TOKEN_TYPE_BYTE] * N_BYTE_TOKENS

    pieces: list[str] = [SPIECE_SPACE]
    # Printable ASCII except the space, which SPM never emits as itself.
    pieces += [chr(c) for c in range(0x21, 0x7F)]
    words = list(_WORDS) + [str(n) for n in range(100)]
    for w in words:
        for piece in (SPIECE_SPACE + w, w):
            for end in range(2, len(piece) + 1):
                pieces.append(piece[:end])
    seen: set[str] = set()
    normal: list[str] = []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            normal.append(p)
    tokens += normal
    types += [TOKEN_TYPE_NORMAL] * len(normal)

    # Real SPM scores are log-probabilities (higher merges first); a decreasing
    # ramp keeps the tokenizer deterministic without favouring any path.
    scores = [0.0] * FIRST_NORMAL_ID + [-float(i) for i in range(len(normal))]
    return tuple(tokens), tuple(scores), tuple(types)


def vocab_size() -> int:
    return len(build_vocab()[0])


@dataclass
class SynthSpec:
    """Hyperparameters of a synthetic model; n_vocab follows from `build_vocab`."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    ctx: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-5
    seed: int = 0
    tied: bool = False
    arch: str = "llama"
    n_vocab: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_vocab = vocab_size()
        if self.arch != "llama":
            raise ValueError(f"only arch='llama' is supported, got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _make_weights(spec: SynthSpec) -> dict[str, np.ndarray]:
    """Random weights in gguf-py's numpy layout: (out_features, in_features).

    Scales are gain/sqrt(fan_in) so activations stay O(1) whatever the sizes.
    Q/K get a larger gain so attention is far from uniform (which makes RoPE and
    the causal mask actually matter); the output head gets a larger gain so the
    logit lens sees a peaked distribution.
    """
    rng = np.random.default_rng(spec.seed)
    d, hd = spec.n_embd, spec.head_dim
    n_q, n_kv = spec.n_head * hd, spec.n_head_kv * hd

    def mat(rows: int, cols: int, gain: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * (gain / np.sqrt(cols))).astype(np.float32)

    def norm_w() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    # Embeddings at rms 0.5 leave room for each layer to move the residual
    # visibly (rms grows to ~1.6 over two layers) yet give a tied head logits
    # of std ~0.5 * sqrt(n_embd).
    w["token_embd.weight"] = (0.5 * rng.standard_normal((spec.n_vocab, d))).astype(np.float32)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm_w()
        w[p + "attn_q.weight"] = mat(n_q, d, 1.6)
        w[p + "attn_k.weight"] = mat(n_kv, d, 1.6)
        w[p + "attn_v.weight"] = mat(n_kv, d, 1.0)
        w[p + "attn_output.weight"] = mat(d, n_q, 1.0)
        w[p + "ffn_norm.weight"] = norm_w()
        w[p + "ffn_gate.weight"] = mat(spec.n_ff, d, 1.0)
        w[p + "ffn_up.weight"] = mat(spec.n_ff, d, 1.0)
        w[p + "ffn_down.weight"] = mat(d, spec.n_ff, 1.5)
    w["output_norm.weight"] = norm_w()
    if not spec.tied:
        w["output.weight"] = mat(spec.n_vocab, d, 4.0)
    return w


def padded_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """The synthetic vocabulary followed by filler tokens no text produces, ``n_vocab`` tokens in all."""
    tokens, scores, types = (list(x) for x in build_vocab())
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab {n_vocab} < the synthetic vocabulary ({len(tokens)})")
    extra = n_vocab - len(tokens)
    return (tokens + [f"<filler{i}>" for i in range(extra)], scores + [-1e9] * extra,
            types + [TOKEN_TYPE_NORMAL] * extra)


def llama_tensor_shapes(spec: SynthSpec, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Name and numpy shape of every tensor of an untied LLaMA of ``spec``'s shape, in file order."""
    d, hd = spec.n_embd, spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, d))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (spec.n_head * hd, d)),
                (p + "attn_k.weight", (spec.n_head_kv * hd, d)), (p + "attn_v.weight", (spec.n_head_kv * hd, d)),
                (p + "attn_output.weight", (d, spec.n_head * hd)), (p + "ffn_norm.weight", (d,)),
                (p + "ffn_gate.weight", (spec.n_ff, d)), (p + "ffn_up.weight", (spec.n_ff, d)),
                (p + "ffn_down.weight", (d, spec.n_ff))]
    return out + [("output_norm.weight", (d,)), ("output.weight", (n_vocab, d))]


def llama_metadata(spec: SynthSpec, name: str, file_type: gguf.LlamaFileType,
                   vocab: tuple[Sequence[str], Sequence[float], Sequence[int]] | None = None,
                   ) -> Callable[[gguf.GGUFWriter], None]:
    """The key/values of a LLaMA GGUF of ``spec``'s shape, for :func:`write_gguf`.

    The tokenizer is the synthetic vocabulary, or ``vocab`` (tokens, scores,
    types) when given, e.g. padded to a larger size.
    """
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_block_count(spec.n_layer)
        writer.add_context_length(spec.ctx)
        writer.add_embedding_length(spec.n_embd)
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_layer_norm_rms_eps(spec.eps)
        writer.add_rope_freq_base(spec.rope_base)
        # llama.cpp rejects LLaMA files whose n_rot differs from head_dim.
        writer.add_rope_dimension_count(spec.head_dim)
        add_tokenizer(writer, vocab)

    return add


def add_tokenizer(writer: gguf.GGUFWriter,
                  vocab: tuple[Sequence[str], Sequence[float], Sequence[int]] | None = None) -> None:
    """The vocabulary size and the SentencePiece tokenizer keys of the synthetic
    vocabulary (or ``vocab``): any architecture's writer can add them."""
    tokens, scores, types = vocab if vocab is not None else build_vocab()
    writer.add_vocab_size(len(tokens))

    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_llama_gguf(path: str | os.PathLike[str], spec: SynthSpec) -> dict[str, np.ndarray]:
    """Write a synthetic F32 LLaMA GGUF to `path` and return its weights as written."""
    weights = _make_weights(spec)
    write_gguf(path, spec.arch, llama_metadata(spec, "lcprobe-synth", gguf.LlamaFileType.ALL_F32),
               [TensorOut.from_array(name, arr) for name, arr in weights.items()])
    return weights


def load_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of a GGUF as float32 numpy in (rows, cols) layout.

    Quantized tensors are dequantized with gguf-py, which reproduces the values
    llama.cpp's own dequantization yields, so a reference run on these weights
    isolates the error llama.cpp adds on top (activation quantization).
    """
    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # ggml ne is innermost-first; numpy wants the reverse.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.asarray(arr, dtype=np.float32).reshape(shape)
    return out


def _field_value(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def read_spec(path: str | os.PathLike[str]) -> SynthSpec:
    """Rebuild the SynthSpec of a (possibly quantized) synthetic GGUF from its metadata.

    The seed is not stored in the file, so it comes back as the default.
    """
    reader = gguf.GGUFReader(str(path))
    arch = str(_field_value(reader, "general.architecture"))
    spec = SynthSpec(
        n_layer=int(_field_value(reader, f"{arch}.block_count")),
        n_embd=int(_field_value(reader, f"{arch}.embedding_length")),
        n_head=int(_field_value(reader, f"{arch}.attention.head_count")),
        n_head_kv=int(_field_value(reader, f"{arch}.attention.head_count_kv")),
        n_ff=int(_field_value(reader, f"{arch}.feed_forward_length")),
        ctx=int(_field_value(reader, f"{arch}.context_length")),
        rope_base=float(_field_value(reader, f"{arch}.rope.freq_base")),
        eps=float(_field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tied=not any(t.name == "output.weight" for t in reader.tensors),
        arch=arch,
    )
    return spec


def load_weight_types(path: str | os.PathLike[str]) -> dict[str, gguf.GGMLQuantizationType]:
    """Storage type of every tensor, the input `reference_forward` needs to emulate
    the activation rounding llama.cpp applies for each matmul."""
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


_Q = gguf.GGMLQuantizationType

# ggml's CPU backend converts a matmul's activations to the weight type's
# vec_dot_type before the dot products (ggml-cpu.c type_traits_cpu). Only the
# types a synthetic model can actually hold are listed: K-quants need rows that
# are multiples of 256, which the default sizes never have.
_VEC_DOT_TYPE: dict[gguf.GGMLQuantizationType, str] = {
    _Q.F32: "f32",
    _Q.F16: "f16",
    _Q.BF16: "bf16",
    _Q.Q4_0: "q8_0",
    _Q.Q5_0: "q8_0",
    _Q.Q8_0: "q8_0",
    _Q.IQ4_NL: "q8_0",
    # Q4_1/Q5_1 are absent on purpose: their Q8_1 activations carry an f16
    # block sum that multiplies the weight minimum, which dequantized weights
    # cannot reproduce.
}


def _round_activations(x: np.ndarray, kind: str) -> np.ndarray:
    """Round activations the way ggml does before a matmul of the given vec_dot type."""
    if kind == "f32":
        return x
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "f16":
        return x32.astype(np.float16).astype(np.float64)
    if kind == "bf16":
        # Round-to-nearest-even on the upper 16 bits, as ggml_compute_fp32_to_bf16.
        u = x32.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    if kind == "q8_0":
        if x32.shape[-1] % 32:
            raise ValueError("Q8_0 activations need rows that are multiples of 32")
        blocks = x32.reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        # Mirrors the x86 quantize_row_q8_0: scale by 127/amax in float32,
        # round half to even, keep the block scale as f16.
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.round(blocks * inv)
        d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float64)
        return (q * d).reshape(x32.shape)
    raise ValueError(f"unknown activation rounding {kind!r}")


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_norm(x: np.ndarray, base: float) -> np.ndarray:
    """LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1) of each head.

    x: (T, n_heads, head_dim), positions 0..T-1. This is GGUF's layout for
    LLaMA q/k (convert_hf_to_gguf permutes HF weights into it), not the NEOX
    half-split layout.
    """
    t, _, hd = x.shape
    inv_freq = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    theta = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_forward(
    weights: dict[str, np.ndarray],
    spec: SynthSpec,
    tokens: list[int],
    *,
    weight_types: Mapping[str, gguf.GGMLQuantizationType] | None = None,
    kv_cache: str = "f32",
) -> dict[str, Any]:
    """Float64 forward pass of one sequence at positions 0..T-1.

    Keys mirror llama.cpp's graph names: "embed" (inp_embd), per-layer lists
    "attn_norm", "attn_out" (after wo), "ffn_inp" (residual + attn_out),
    "ffn_norm", "ffn_out" (after ffn_down, before the residual add), "l_out"
    (ffn_inp + ffn_out), then "norm" (result_norm) and "logits" (result_output).

    By default this is the exact math. To follow llama.cpp's CPU numerics
    instead, pass `weight_types` (from `load_weight_types`) so each matmul's
    activations are rounded like ggml's vec_dot conversion (Q8_0 blocks for
    Q4_0/Q5_0/Q8_0/IQ4_NL weights, f16/bf16 for F16/BF16 weights), and
    kv_cache="f16" for llama.cpp's default F16 KV cache, which stores K/V in
    f16 and therefore also rounds Q and the softmax probabilities to f16 in the
    non-flash attention matmuls. With Q8_0-style rounding most positions then
    match to ~1e-6; the rest differ by an occasional value that float64-vs-
    float32 noise pushed across a rounding boundary. f16 rounding is so fine
    that such flips are common, so the f16 emulations only shrink the gap.
    """
    if len(tokens) == 0:
        raise ValueError("need at least one token")
    if kv_cache not in ("f32", "f16"):
        raise ValueError("kv_cache must be 'f32' or 'f16'")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= spec.n_vocab:
        raise ValueError("token id out of range")
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    head_name = "output.weight" if "output.weight" in w else "token_embd.weight"
    types = dict(weight_types or {})
    act_kind: dict[str, str] = {}
    for name, qtype in types.items():
        if qtype not in _VEC_DOT_TYPE:
            raise NotImplementedError(f"no activation emulation for {name} stored as {qtype.name}")
        act_kind[name] = _VEC_DOT_TYPE[qtype]

    def mm(x: np.ndarray, name: str) -> np.ndarray:
        return _round_activations(x, act_kind.get(name, "f32")) @ w[name].T

    kv_round = "f16" if kv_cache == "f16" else "f32"
    t = len(ids)
    hd = spec.head_dim
    group = spec.n_head // spec.n_head_kv
    scale = 1.0 / np.sqrt(hd)
    causal = np.triu(np.ones((t, t), dtype=bool), k=1)  # True above the diagonal = future

    h = w["token_embd.weight"][ids]
    res: dict[str, Any] = {"embed": h.copy()}
    for key in ("attn_norm", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"):
        res[key] = []

    for i in range(spec.n_layer):
        p = f"blk.{i}."
        x = _rms_norm(h, w[p + "attn_norm.weight"], spec.eps)
        q = mm(x, p + "attn_q.weight").reshape(t, spec.n_head, hd)
        k = mm(x, p + "attn_k.weight").reshape(t, spec.n_head_kv, hd)
        v = mm(x, p + "attn_v.weight").reshape(t, spec.n_head_kv, hd)
        q = _round_activations(_rope_norm(q, spec.rope_base), kv_round)
        k = _round_activations(_rope_norm(k, spec.rope_base), kv_round)
        v = _round_activations(v, kv_round)
        # Query head j reads KV head j // group, as ggml's mul_mat broadcast does.
        k_full = np.repeat(k, group, axis=1)
        v_full = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k_full) * scale
        scores = np.where(causal[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        probs = _round_activations(probs, kv_round)
        ctx = np.einsum("hqk,khd->qhd", probs, v_full).reshape(t, spec.n_head * hd)
        attn = mm(ctx, p + "attn_output.weight")
        ffn_inp = h + attn

        y = _rms_norm(ffn_inp, w[p + "ffn_norm.weight"], spec.eps)
        gate = mm(y, p + "ffn_gate.weight")
        up = mm(y, p + "ffn_up.weight")
        ffn_out = mm(_silu(gate) * up, p + "ffn_down.weight")
        h = ffn_inp + ffn_out

        res["attn_norm"].append(x)
        res["attn_out"].append(attn)
        res["ffn_inp"].append(ffn_inp)
        res["ffn_norm"].append(y)
        res["ffn_out"].append(ffn_out)
        res["l_out"].append(h.copy())

    norm = _rms_norm(h, w["output_norm.weight"], spec.eps)
    res["norm"] = norm
    res["logits"] = mm(norm, head_name)
    return res


def _ftype_value(ftype_name: str) -> int:
    import llama_cpp

    name = ftype_name.upper()
    for prefix in ("LLAMA_FTYPE_", "MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for candidate in (f"LLAMA_FTYPE_MOSTLY_{name}", f"LLAMA_FTYPE_ALL_{name}"):
        if hasattr(llama_cpp, candidate):
            return int(getattr(llama_cpp, candidate))
    raise ValueError(f"unknown llama ftype {ftype_name!r}")


def quantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype_name: str, nthread: int = 2
) -> None:
    """Quantize `src` into `dst` with llama.cpp's own quantizer ("Q8_0", "Q4_0", "F16", ...)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype_value(ftype_name)
    params.nthread = nthread
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(
        os.fsencode(Path(src)), os.fsencode(Path(dst)), ctypes.byref(params)
    )
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype_name}) returned {rc}")
