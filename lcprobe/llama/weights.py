"""Overwrite a loaded model's weight tensors in place, and put them back.

llama.h has no getter for a model's tensors, but the graph knows them: every
weight is a source of some node (``mul_mat``, ``get_rows``). One token decoded
in a throw-away context with an eval callback that only *asks* (it never
requests data, so nothing is synchronised or copied) collects those
pointers by name. Writes go through ``ggml_backend_tensor_set``, so they work
for every backend buffer: plain CPU memory, CPU repacked layouts (the buffer
repacks on write) and GPU memory.

The model must be loaded with ``use_mmap=False``: with mmap, llama.cpp's CPU
weights are read-only pages of the file and a write would crash the process.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Iterable

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.llama.engine import Engine

import llama_cpp  # noqa: E402


class WeightsError(LcprobeError):
    """A weight tensor cannot be found or written."""


class _GgmlTensor(ctypes.Structure):
    # struct ggml_tensor in ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    # GGML_MAX_NAME 64); checked against ggml_get_name / ggml_nbytes at run time.
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    from lcprobe.llama.native import _ggml_base_library

    lib = ctypes.CDLL(str(_ggml_base_library(Path(llama_cpp.__file__).resolve().parent / "lib")))
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_set.restype = None
    return lib


def find_weight_tensors(engine: Engine, names: Iterable[str]) -> dict[str, int]:
    """``ggml_tensor*`` addresses of the named weights of ``engine``'s model."""
    wanted = set(names)
    found: dict[str, int] = {}
    lib = _ggml()
    layout_ok: list[bool] = []

    def on_node(t: int, ask: bool, user_data: int) -> bool:
        try:
            if not ask or not t:
                return False
            node = _GgmlTensor.from_address(t)
            if not layout_ok:
                layout_ok.append(node.name == lib.ggml_get_name(t))
            for src in node.src:
                if src:
                    name = _GgmlTensor.from_address(src).name.decode("utf-8", "replace")
                    if name in wanted:
                        found[name] = src
        except BaseException:  # never raise into C
            layout_ok.append(False)
        return False  # asked only: no node's data is needed

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 16
    cparams.n_batch = cparams.n_ubatch = 1
    cparams.n_seq_max = 1
    cparams.no_perf = True
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(engine._model, cparams)  # same package: the engine's model handle
    if not ctx:
        raise WeightsError("llama.cpp could not create a context to find the weight tensors")
    batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(_any_token(engine)), 1)
    try:
        rc = llama_cpp.llama_decode(ctx, batch)
    finally:
        llama_cpp.llama_free(ctx)
    if rc != 0:
        raise WeightsError(f"llama_decode failed with code {rc} while looking for the weight tensors")
    if not layout_ok or not all(layout_ok):
        raise WeightsError("this ggml's tensor layout differs from the one lcprobe knows; cannot find weights")
    return found


def _any_token(engine: Engine) -> int:
    bos = llama_cpp.llama_vocab_bos(engine._vocab)
    return int(bos) if bos >= 0 else 0


class Weights:
    """Named weight tensors of a loaded model that can be overwritten and restored."""

    def __init__(self, engine: Engine, names: Iterable[str]) -> None:
        if engine.config.use_mmap:
            raise WeightsError("weights can only be replaced in a model loaded without mmap (use_mmap=False)")
        self.engine = engine
        wanted = list(names)
        self._tensors = find_weight_tensors(engine, wanted)
        absent = [n for n in wanted if n not in self._tensors]
        if absent:
            raise WeightsError(f"llama.cpp's graph does not use {absent[0]}"
                               + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """ggml's ne (row length first) of a found tensor."""
        t = _GgmlTensor.from_address(self._tensors[name])
        return tuple(int(n) for n in t.ne)

    def ggml_type(self, name: str) -> int:
        return int(_GgmlTensor.from_address(self._tensors[name]).type)

    def nbytes(self, name: str) -> int:
        return int(_ggml().ggml_nbytes(self._tensors[name]))

    def set(self, name: str, data: np.ndarray) -> None:
        """Overwrite tensor ``name`` with ``data``: its bytes in the tensor's own type, all of them."""
        if self.engine._model is None:
            raise WeightsError("the model is closed")
        raw = np.ascontiguousarray(data)
        t = self._tensors[name]
        size = self.nbytes(name)
        if raw.nbytes != size:
            raise WeightsError(f"{name}: {raw.nbytes} bytes given, the tensor holds {size}")
        _ggml().ggml_backend_tensor_set(t, raw.ctypes.data, 0, size)
