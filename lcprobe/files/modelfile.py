"""What a GGUF file says about its model, read with gguf-py (no weights loaded).

This is the one place that knows GGUF keys and llama.cpp's graph tensor names
per architecture. Everything is checked before llama.cpp sees the file, so a
missing, truncated or foreign file is a one-line :class:`ModelError` rather
than a failure deep inside the loader.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Callable
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lcprobe.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """How an architecture's residual stream is named in llama.cpp's graph.

    ``embed`` is the layer-1 input (after any architecture scaling, e.g.
    Gemma's sqrt(n_embd)); ``mid`` is the residual after the attention
    sublayer (None when the graph has no such node).

    The head's extras are read only where the graph applies them: llama.cpp
    ignores a ``final_logit_softcapping`` or ``logit_scale`` key of any other
    architecture, and so must the lens. ``softcap`` is the soft-cap llama.cpp
    assumes when the key is absent (None: this graph never soft-caps).
    """

    norm: str = "rms"  # final norm: "rms" or "layer"
    embed: str = "embd"  # the get_rows node of the token embedding
    mid: str | None = "ffn_inp"
    softcap: float | None = None
    logit_scale: bool = False  # the logits are divided by {arch}.logit_scale (Granite)


# Architectures whose final norm and head lcprobe reproduces and whose graph
# names were read from llama.cpp's model builders (src/models/*.cpp); each is
# checked against llama.cpp's own logits on a tiny random model of its real
# tensor set (tests/test_architectures.py).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral3": ArchSpec(),
    "granite": ArchSpec(logit_scale=True),  # embedding_scale is inside the "embd" node
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
    "olmo2": ArchSpec(),
    "phi3": ArchSpec(mid=None),  # the residual after attention has no name in its graph
    "gemma": ArchSpec(embed="inp_scaled", mid="sa_out"),
    # gemma2's graph always soft-caps, at 30 unless the header says otherwise
    "gemma2": ArchSpec(embed="inp_scaled", mid="sa_out", softcap=30.0),
    "gemma3": ArchSpec(embed="inp_scaled", mid="sa_out", softcap=0.0),
}

#: llama.cpp's LLAMA_FTYPE values, as written in ``general.file_type``.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    arch: str
    general_name: str  # the header's general.name, as written by whoever converted the model
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    file_type: str
    add_bos: bool
    logit_softcap: float
    logit_scale: float
    head_tensor: str  # "output.weight" or the tied "token_embd.weight"
    head_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # type -> parameter count
    size_bytes: int = 0

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.arch]

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(".gguf")

    @property
    def quant(self) -> str:
        """llama.cpp's file type (Q4_1, Q4_K_M, ...)."""
        return self.file_type

    @property
    def name(self) -> str:
        """A readable name: the catalog name of a pulled catalog model, else the file stem
        (general.name is often unreadable, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2")."""
        from lcprobe.files.catalog import catalog_name

        return catalog_name(self.path) or self.stem

    @property
    def label(self) -> str:
        return self.name

    def bits_per_weight(self) -> float:
        params = sum(self.tensor_types.values())
        return 8.0 * self.size_bytes / params if params else float("nan")

    def site_name(self, site: str, layer: int) -> str:
        """llama.cpp's node name for a residual site at 1-based ``layer``.

        ``resid_post`` of layer i is the block's output ``l_out-(i-1)``;
        ``resid_mid`` is the residual after attention; ``resid_pre`` of layer 1
        is the (scaled) embedding, of layer i > 1 the previous block's output.
        """
        if not 1 <= layer <= self.n_layer:
            raise ValueError(f"layer {layer} is outside 1..{self.n_layer}")
        if site == "resid_post":
            return f"l_out-{layer - 1}"
        if site == "resid_mid":
            if self.spec.mid is None:
                raise ModelError(f"architecture '{self.arch}' has no named residual after attention")
            return f"{self.spec.mid}-{layer - 1}"
        if site == "resid_pre":
            return self.spec.embed if layer == 1 else f"l_out-{layer - 2}"
        raise ValueError(f"unknown site '{site}' (resid_pre, resid_mid, resid_post)")


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except UnicodeDecodeError:
        raise ModelError(f"{Path(reader.data.filename or '?')}: metadata {key} is not valid UTF-8 text") from None


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader for ``path``, or a :class:`ModelError` that says what is wrong.

    Parsing a header walks the whole vocabulary (seconds for a 262k-token
    vocab), so readers are cached per file version (path, size, mtime); the
    tensor data stay memory-mapped, not read.
    """
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return _cached_reader(str(p.resolve()), st.st_size, st.st_mtime_ns)
    return _open_reader(p)


def forget_readers() -> None:
    """Drop cached readers: gguf-py keeps a numpy object per vocabulary entry
    (~150 MB for a 49k vocabulary), which a long run must not carry."""
    _cached_reader.cache_clear()


@functools.lru_cache(maxsize=8)
def _cached_reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return _open_reader(Path(path))


def _open_reader(p: Path) -> gguf.GGUFReader:
    if not p.exists():
        raise ModelError(f"no such model file: {p}")
    if p.is_dir():
        raise ModelError(f"{p} is a directory, not a GGUF file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        # a damaged offset overflows gguf-py's uint64 sums: checked below, not worth a warning
        with np.errstate(over="ignore"):
            reader = _BoundedReader(p, "r")
    except Exception as exc:  # gguf raises ValueError/struct/numpy errors on damage
        if isinstance(exc, _BadTensor):
            raise ModelError(f"{p}: {exc}") from None
        raise ModelError(f"{p} is truncated or corrupt: {_reader_problem(exc)}") from None
    return reader


class _PastEnd(ValueError):
    pass


class _BadTensor(ValueError):
    pass


class _LazyParts(Sequence):
    """A long array field's parts (numpy views, as gguf-py lays them out), made when first read."""

    def __init__(self, build: Callable[[], list]) -> None:
        self._build: Callable[[], list] | None = build
        self._parts: list | None = None

    def _all(self) -> list:
        if self._parts is None:
            assert self._build is not None
            self._parts, self._build = self._build(), None
        return self._parts

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]

    def __len__(self) -> int:
        return len(self._all())


class _BoundedReader(gguf.GGUFReader):
    """gguf-py's reader, stopped at the end of the file.

    gguf-py slices its memory map, which silently yields fewer items past the
    end; a damaged array length (2**40 items) then loops for hours over empty
    reads. (Any other read past the end fails on its own with an IndexError.)
    """

    def _get_field_parts(self, orig_offs, raw_type):  # type: ignore[override]
        # an array's items are read one by one: refuse a length the rest of the file cannot hold
        if raw_type == _ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            n_items = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(item_type)
            least = np.dtype(scalar).itemsize if scalar is not None else 8  # a string's or an array's length
            if n_items * least > len(self.data) - orig_offs - 12:
                raise _PastEnd(_PAST_END)
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_fields(self, offs, count):  # type: ignore[override]
        # gguf-py makes a numpy view per array item: 12 s for Gemma 3's 262k-token
        # vocabulary (three arrays). Long arrays are measured here by one pass over
        # their string lengths and their parts made on first use, as gguf-py would.
        for _ in range(count):
            orig_offs = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            head = [klen, kdata, raw_type]
            lazy = self._lazy_array(offs, int(raw_type[0]), head)
            if lazy is not None:
                size, parts, data, types = lazy
            else:
                size, fparts, idxs, types = self._get_field_parts(offs, raw_type[0])
                parts, data = head + fparts, [i + len(head) for i in idxs]
            self._push_field(gguf.ReaderField(orig_offs, str(bytes(kdata), encoding="utf-8"), parts, data, types),
                             skip_sum=True)
            offs += size
        return offs

    def _lazy_array(self, offs: int, raw_type: int, head: list):
        """(size, parts, data, types) of a long string or scalar array, its parts built on first use."""
        if raw_type != _ARRAY or self.byte_order != "I" or sys.byteorder != "little":
            return None
        item_type = int(self._get(offs, np.uint32)[0])
        n_items = int(self._get(offs + 4, np.uint64)[0])
        scalar = self.gguf_scalar_to_np.get(item_type)
        if n_items < _LAZY_ITEMS or (scalar is None and item_type != _STRING):
            return None
        start = offs + 12
        if n_items * (np.dtype(scalar).itemsize if scalar is not None else 8) > len(self.data) - start:
            raise _PastEnd(_PAST_END)
        if scalar is not None:
            size = 12 + n_items * np.dtype(scalar).itemsize
            data = list(range(len(head) + 2, len(head) + 2 + n_items))
        else:
            end, buf, pos = len(self.data), memoryview(self.data), start
            for _ in range(n_items):
                if pos + 8 > end:
                    raise _PastEnd(_PAST_END)
                pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
            if pos > end:
                raise _PastEnd(_PAST_END)
            size = pos - offs
            data = list(range(len(head) + 3, len(head) + 2 + 2 * n_items, 2))
        build = functools.partial(self._array_parts, offs, head)
        return size, _LazyParts(build), data, [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(item_type)]

    def _array_parts(self, offs: int, head: list) -> list:
        return head + gguf.GGUFReader._get_field_parts(self, offs, _ARRAY)[1]

    def _build_tensors(self, start_offs, fields):  # type: ignore[override]
        for f in fields:
            _check_tensor_info(f, int(start_offs), len(self.data), self.alignment)
        super()._build_tensors(start_offs, fields)


def _check_tensor_info(f, data_start: int, size: int, alignment: int) -> None:
    """What llama.cpp would refuse, or abort on, said (naming the tensor) before gguf-py or llama.cpp
    trip over it."""
    _name_len, name_data, _n_dims, dims_data, type_data, offset_data = f.parts
    name = bytes(name_data).decode("utf-8", "replace")
    dims = [int(d) for d in dims_data]
    if not 1 <= len(dims) <= _MAX_DIMS:
        raise _BadTensor(f"tensor {name} has {len(dims)} dimensions (ggml allows 1..{_MAX_DIMS}): corrupt file")
    if any(d <= 0 or d >= 2**62 for d in dims):
        raise _BadTensor(f"tensor {name} has impossible dimensions {dims}: corrupt file")
    try:
        ggml_type = gguf.GGMLQuantizationType(int(type_data[0]))
    except ValueError:
        raise _BadTensor(f"tensor {name} has unknown ggml type {int(type_data[0])} "
                         "(a corrupt file, or one from a newer llama.cpp)") from None
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block:
        raise _BadTensor(f"tensor {name} has rows of {dims[0]} values, not a multiple of "
                         f"{ggml_type.name}'s block of {block}: corrupt file")
    offset = int(offset_data[0])
    if offset % alignment:
        raise _BadTensor(f"tensor {name} starts at offset {offset}, not a multiple of the file's "
                         f"alignment {alignment}: corrupt file")
    n = 1
    for d in dims:
        n *= d
    end = data_start + offset + n // block * type_size
    if end > size:
        raise _BadTensor(f"tensor {name} ends past the end of the file ({end} > {size} bytes): "
                         "truncated download?")


_ARRAY = int(gguf.GGUFValueType.ARRAY)
_STRING = int(gguf.GGUFValueType.STRING)
_LAZY_ITEMS = 1024  # arrays at least this long are read lazily (vocabularies, merges)
_PAST_END = "the header or the tensor data run past the end of the file (truncated download?)"


# ggml's GGML_MAX_DIMS: llama.cpp rejects (or worse, aborts on) more.
_MAX_DIMS = 4


def _reader_problem(exc: Exception) -> str:
    """gguf-py's exception in the user's terms where it is a known kind of damage."""
    msg = str(exc)
    number = re.search(r"(\d+)\)? is not a valid", msg)  # "np.uint32(99) is not a valid ..."
    if isinstance(exc, _PastEnd):
        return msg
    if "GGMLQuantizationType" in msg and number:
        return f"a tensor has unknown ggml type {number[1]} (a corrupt file, or one from a newer llama.cpp)"
    if "GGUFValueType" in msg and number:
        return f"a metadata value has unknown type {number[1]}"
    if isinstance(exc, UnicodeDecodeError):
        return "a key or tensor name is not valid UTF-8"
    if "dimension" in msg:
        return "a tensor has impossible dimensions"
    if any(s in msg for s in ("reshape", "out of bounds", "out of range", "mmap", "larger than", "larger dtype")):
        return _PAST_END
    return msg


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    p = Path(path).expanduser().resolve()
    reader = open_reader(p)
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ModelError(f"{p} has no general.architecture key")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"architecture '{arch}' is not supported by lcprobe "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    spec = ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}
    n_layer = _field(reader, f"{arch}.block_count")
    n_embd = _field(reader, f"{arch}.embedding_length")
    if n_layer is None or n_embd is None:
        raise ModelError(f"{p} lacks {arch}.block_count or {arch}.embedding_length")
    for key in ("block_count", "embedding_length", "attention.head_count"):
        _check_count(p, f"{arch}.{key}", _field(reader, f"{arch}.{key}"), least=1)
    # per-layer lists may hold 0 (a layer without attention or FFN)
    for key in ("attention.head_count_kv", "feed_forward_length", "context_length"):
        _check_count(p, f"{arch}.{key}", _field(reader, f"{arch}.{key}"), least=0)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if head not in tensors or "output_norm.weight" not in tensors:
        raise ModelError(f"{p} has no output head (output.weight / token_embd.weight) or output_norm")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else int(tensors[head].shape[-1])
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        eps = _field(reader, f"{arch}.attention.layer_norm_epsilon", 1e-5)
    # llama.cpp asserts (aborts) on a negative epsilon; NaN or huge ones give NaN scores
    _check_real(p, "layer norm epsilon", eps, 0.0, 1.0)
    for key in ("rope.freq_base", "rope.scale_linear", "rope.scaling.factor", "final_logit_softcapping",
                "logit_scale", "attention.scale", "embedding_scale", "residual_scale"):
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            # a zero RoPE base makes infinite angles
            _check_real(p, f"{arch}.{key}", value, 1e-6 if key == "rope.freq_base" else 0.0, 1e12)
    ftype = _field(reader, "general.file_type")
    types: Counter[str] = Counter()
    for t in reader.tensors:
        types[t.tensor_type.name] += int(t.n_elements)
    # gguf's reader may pad the vocab dimension; the head's own row count wins.
    n_vocab = min(n_vocab, int(tensors[head].shape[-1])) if tokens is not None else n_vocab
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    return ModelInfo(
        path=p,
        arch=arch,
        general_name=str(_field(reader, "general.name", p.stem)),
        n_layer=int(n_layer),
        n_embd=int(n_embd),
        n_vocab=int(n_vocab),
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 0) or 0),
        norm_eps=float(eps),
        file_type=FILE_TYPES.get(ftype, f"type{ftype}") if ftype is not None else types.most_common(1)[0][0],
        add_bos=bool(add_bos) if add_bos is not None else True,
        logit_softcap=_logit_softcap(reader, arch),
        logit_scale=float(_field(reader, f"{arch}.logit_scale", 1.0) or 1.0) if spec.logit_scale else 1.0,
        head_tensor=head,
        head_type=tensors[head].tensor_type.name,
        tensor_types=dict(types),
        size_bytes=p.stat().st_size,
    )


def _logit_softcap(reader: gguf.GGUFReader, arch: str) -> float:
    """The final soft-cap llama.cpp's graph applies (0: none)."""
    default = ARCHITECTURES[arch].softcap
    if default is None:
        return 0.0
    return float(_field(reader, f"{arch}.final_logit_softcapping", default) or 0.0)


def _check_real(p: Path, key: str, value, least: float, most: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value <= most:
        raise ModelError(f"{p}: metadata {key} = {value!r} is not a number in {least:g}..{most:g}: corrupt file")


def _check_count(p: Path, key: str, value, least: int) -> None:
    """A hyperparameter llama.cpp and lcprobe divide and allocate by: a sane count (or one per layer)."""
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and least <= v < 2**31 for v in values):
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise ModelError(f"{p}: metadata {key} = {shown} is not a count >= {least}: corrupt file")


def vocab_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the tokenizer's token list: equal for models that share a vocabulary."""
    reader = open_reader(path)
    f = reader.fields.get("tokenizer.ggml.tokens")
    h = hashlib.sha256()
    if f is not None:
        for idx in f.data:
            h.update(bytes(f.parts[idx]))
            h.update(b"\0")
    return h.hexdigest()


_DEQUANT_BLOCK_BYTES = 16 << 20  # float32 bytes per dequantized block
_PARALLEL_DEQUANT_BYTES = 512 << 20


def read_head(path: str | os.PathLike, info: ModelInfo, head: bool = True) -> dict[str, np.ndarray]:
    """The final norm and (unless ``head`` is False) the output head, dequantized to float32 (vocab, n_embd)."""
    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    if "output.bias" in tensors:
        # llama.cpp adds it to the logits (qwen2's loader reads one); the lens has no term for it
        raise ModelError(f"{path}: the output head has a bias (output.bias), which lcprobe's lens "
                         "does not apply; load it with lens_backend=None to capture without a lens")

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        shape = [int(x) for x in reversed(t.shape.tolist())]
        data = t.data.reshape(shape[0], -1) if len(shape) == 2 else t.data
        if len(shape) != 2:
            # a copy: an F32 tensor comes back as a view that would keep the whole file mapped
            vec = np.array(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)
            _check_finite(path, name, vec)
            return vec
        # Row blocks into one float32 array: dequantizing a whole head at once
        # makes several head-sized temporaries, which set the run's peak RSS.
        # gguf-py's numpy kernels release the GIL, so blocks of a big head go to
        # a few threads (a 128k x 2048 Q6_K head: 5.4 s on one, 3.3 s on two).
        out = np.empty(shape, np.float32)
        step = max(64, _DEQUANT_BLOCK_BYTES // (4 * shape[1]))

        def fill(r0: int) -> None:
            r1 = min(shape[0], r0 + step)
            out[r0:r1] = gguf.quants.dequantize(data[r0:r1], t.tensor_type)
            _check_finite(path, name, out[r0:r1])

        starts = range(0, shape[0], step)
        # Threads only for big heads: each keeps a malloc arena of freed blocks
        # (+30-60 MB RSS measured for SmolLM2's 113 MB head, which loads in 0.3 s anyway).
        big = out.nbytes >= _PARALLEL_DEQUANT_BYTES
        workers = min(4, os.cpu_count() or 1, len(starts)) if big else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fill, starts))
        else:
            for r0 in starts:
                fill(r0)
        return out

    out = {"norm_weight": load("output_norm.weight").reshape(-1)}
    if head:
        out["head"] = load(info.head_tensor)[: info.n_vocab]
    if "output_norm.bias" in tensors:
        out["norm_bias"] = load("output_norm.bias").reshape(-1)
    return out


def _check_finite(path: str | os.PathLike, name: str, values: np.ndarray) -> None:
    # NaN weights make NaN scores, which every metric refuses far from the cause
    if not np.isfinite(values).all():
        raise ModelError(f"{path}: tensor {name} holds NaN or infinite weights: corrupt file")


def read_head_raw(path: str | os.PathLike, info: ModelInfo) -> tuple[np.ndarray, int, int]:
    """The output head's bytes as stored (quantized), its ggml type and its row count."""
    reader = open_reader(path)
    t = next(t for t in reader.tensors if t.name == info.head_tensor)
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
    return raw, int(t.tensor_type), int(t.shape[-1])
