"""ggml's own quantizer through ctypes, and GGUF files with a chosen type per tensor.

``llama_model_quantize`` picks the type of every tensor itself; a recipe needs
to pick them. The bytes come from the same function llama.cpp calls
(``ggml_quantize_chunk`` in the libggml-base that llama-cpp-python loaded), so
a tensor written here is byte-identical to llama-quantize's for the same type
and importance data; values are read back with ggml's own ``to_float``.
gguf-py writes the file: the source's metadata is copied as stored.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

import gguf

from lcprobe.errors import LcprobeError


class QuantizerError(LcprobeError):
    """A type or tensor ggml's quantizer cannot handle."""


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    import llama_cpp

    from lcprobe.llama.native import _ggml_base_library

    lib = ctypes.CDLL(str(_ggml_base_library(Path(llama_cpp.__file__).resolve().parent / "lib")))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return lib


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    """The ggml tensor type called ``name`` (``"Q4_0"``, ``"f16"``)."""
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise QuantizerError(f"unknown ggml tensor type '{name}'") from None


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    return int(gguf.GGML_QUANT_SIZES[qtype][0])


def row_size(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` elements (ggml_row_size)."""
    return int(_lib().ggml_row_size(int(qtype), int(n_per_row)))


def bits_per_weight(qtype: gguf.GGMLQuantizationType) -> float:
    blck, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * size / blck


def requires_imatrix(qtype: gguf.GGMLQuantizationType) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def can_hold(qtype: gguf.GGMLQuantizationType, n_per_row: int) -> bool:
    """Whether rows of ``n_per_row`` elements split into whole blocks of ``qtype``."""
    return n_per_row % block_size(qtype) == 0


def quantize(values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None,
             threads: int = 1) -> np.ndarray:
    """``values`` (..., n_per_row) float32 as ``qtype`` bytes, shape (..., row bytes).

    ``imatrix`` holds one importance per column, or one set per 2-D slice of a
    3-D (expert) tensor, as llama-quantize passes them.
    """
    x = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = int(x.shape[-1])
    if not can_hold(qtype, n_per_row):
        raise QuantizerError(f"rows of {n_per_row} are not a multiple of {qtype.name}'s block of "
                             f"{block_size(qtype)}")
    if requires_imatrix(qtype) and imatrix is None:
        raise QuantizerError(f"{qtype.name} needs an importance matrix")
    rsize = row_size(qtype, n_per_row)
    slices = x.reshape(-1, *x.shape[-2:]) if x.ndim >= 2 else x.reshape(1, 1, -1)
    out = np.empty(slices.shape[:2] + (rsize,), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imat.size not in (n_per_row, n_per_row * slices.shape[0]):
            raise QuantizerError(f"importance data of {imat.size} values do not fit rows of {n_per_row}")
    lib = _lib()
    nrows = slices.shape[1]
    # Contiguous row ranges per thread: ggml quantizes each row on its own, so
    # the bytes do not depend on the split (llama-quantize splits the same way).
    per = max(1, -(-nrows // max(1, threads)))
    jobs = []
    for s in range(slices.shape[0]):
        w = None
        if imat is not None:
            w = imat[s * n_per_row:(s + 1) * n_per_row] if imat.size > n_per_row else imat
        for r0 in range(0, nrows, per):
            jobs.append((s, r0, min(per, nrows - r0), w))

    def work(job: tuple) -> int:
        s, r0, n, w = job
        src = slices[s]
        dst = out[s]
        return int(lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, r0 * n_per_row, n,
                                           n_per_row, None if w is None else w.ctypes.data))

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(work, jobs))
    else:
        written = sum(map(work, jobs))
    if written != out.size:
        raise QuantizerError(f"ggml wrote {written} bytes for {qtype.name}, expected {out.size}")
    return out.reshape(x.shape[:-1] + (rsize,))


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """Rows of ``qtype`` bytes back to float32 with ggml's own ``to_float`` (shape (..., n_per_row))."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(-1, n_per_row).copy()
    traits = _lib().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise QuantizerError(f"ggml cannot convert {qtype.name} to float")
    n = raw.size // row_size(qtype, n_per_row) * n_per_row
    out = np.empty(n, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out.reshape(-1, n_per_row)


def tensor_values(t: "gguf.ReaderTensor") -> np.ndarray:
    """A reader tensor's values as float32 rows (n_rows, ne0)."""
    ne0 = int(t.shape[0])
    return dequantize(np.asarray(t.data), t.tensor_type, ne0)


def round_trip(values: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix: np.ndarray | None = None,
               threads: int = 1) -> np.ndarray:
    """What ``values`` become after quantizing to ``qtype`` and back (float32, same shape)."""
    n = int(values.shape[-1])
    return dequantize(quantize(values, qtype, imatrix, threads), qtype, n).reshape(values.shape)


# --- writing files ------------------------------------------------------------------

# general.file_type for a file whose weights are mostly of one ggml type (llama_ftype)
_FTYPE_OF = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
             "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "BF16": 32}


def _field_value(field: "gguf.ReaderField") -> object:
    """A metadata value as stored: strings stay bytes so nothing is re-encoded."""
    def item(part: np.ndarray, vtype: gguf.GGUFValueType) -> object:
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part)
        if vtype == gguf.GGUFValueType.BOOL:
            return bool(part[0])
        return part[0].item()

    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        return [item(field.parts[i], field.types[-1]) for i in field.data]
    return item(field.parts[field.data[0]], main)


def write_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    types: Mapping[str, str | gguf.GGMLQuantizationType],
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write ``dst``: the tensors of ``src``, those named in ``types`` converted to that type.

    Every other tensor, and all metadata, are copied as stored (only
    ``general.file_type`` follows the most common weight type). The file
    appears under its name only when complete.
    """
    from lcprobe.files.modelfile import open_reader

    reader = open_reader(src)
    wanted = {name: (t if isinstance(t, gguf.GGMLQuantizationType) else ggml_type(t)) for name, t in types.items()}
    missing = sorted(set(wanted) - {t.name for t in reader.tensors})
    if missing:
        raise QuantizerError(f"{Path(src).name} has no tensor {missing[0]}")
    nthreads = threads or os.cpu_count() or 1
    final: dict[str, gguf.GGMLQuantizationType] = {t.name: wanted.get(t.name, t.tensor_type) for t in reader.tensors}
    for t in reader.tensors:
        q = final[t.name]
        if q != t.tensor_type and not can_hold(q, int(t.shape[0])):
            raise QuantizerError(f"{t.name}: rows of {int(t.shape[0])} do not fit {q.name} blocks of {block_size(q)}")
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) >= 2:
            counts[final[t.name].name] = counts.get(final[t.name].name, 0) + int(t.n_elements)
    main_type = max(counts, key=counts.get) if counts else None

    arch = _field_value(reader.fields["general.architecture"])
    dst_p = Path(dst).expanduser()
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    part = dst_p.with_name(dst_p.name + ".part")
    writer = gguf.GGUFWriter(part, arch.decode() if isinstance(arch, bytes) else str(arch))
    writer.data_alignment = int(reader.alignment)
    writer.kv_data[0].clear()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        value = _field_value(field)
        if name == "general.file_type" and main_type in _FTYPE_OF:
            value = _FTYPE_OF[main_type]
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        q = final[t.name]
        shape = tuple(int(d) for d in reversed(t.shape))
        nbytes = row_size(q, int(t.shape[0])) * (int(t.n_elements) // int(t.shape[0]))
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=q)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(reader.tensors)
        for i, t in enumerate(reader.tensors):
            q = final[t.name]
            if q == t.tensor_type:
                data = np.asarray(t.data).view(np.uint8).reshape(-1)
            else:
                values = tensor_values(t).reshape(tuple(int(d) for d in reversed(t.shape)))
                w = imatrix.get(t.name) if imatrix is not None else None
                data = quantize(values, q, w, nthreads).reshape(-1)
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, total, t.name)
        writer.close()
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    part.replace(dst_p)
    return dst_p
