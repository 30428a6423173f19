"""Steering vectors in llama.cpp's control-vector GGUF format.

The format is what ``common_control_vector_load`` (llama.cpp common/common.cpp)
reads and ``cvector-generator`` writes: ``general.architecture =
controlvector``, ``controlvector.model_hint``, ``controlvector.layer_count``,
and one 1-D float32 tensor ``direction.K`` per layer, K >= 1. llama.cpp adds
``direction.K`` to the output of block K counted from 0 (``build_cvec`` runs
just before ``l_out-K`` is named), so in lcprobe's 1-based layers it lands on
``resid_post`` of layer K + 1; no direction can reach layer 1. Tensors that
repeat an index are summed, as llama.cpp does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from lcprobe.errors import LcprobeError

ARCH = "controlvector"


class ControlVector:
    """One direction per layer, keyed by llama.cpp's control-vector index K (``direction.K``).

    ``layers()`` gives the same directions keyed by the lcprobe layer they are
    added to (K + 1); :meth:`from_layers` builds one from that view.
    """

    def __init__(self, directions: Mapping[int, np.ndarray], model_hint: str = "") -> None:
        if not directions:
            raise LcprobeError("a control vector needs at least one direction")
        out: dict[int, np.ndarray] = {}
        width = None
        for k, v in directions.items():
            k = int(k)
            if k < 1:
                raise LcprobeError(f"control-vector index {k}: llama.cpp's directions start at 1")
            a = np.ascontiguousarray(v, dtype=np.float32)
            if a.ndim != 1:
                raise LcprobeError(f"direction.{k} must be one vector, got shape {a.shape}")
            if width is not None and a.shape[0] != width:
                raise LcprobeError(f"direction.{k} has {a.shape[0]} values, the others {width}")
            width = a.shape[0]
            out[k] = a
        self.directions = dict(sorted(out.items()))
        self.model_hint = model_hint

    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    def __repr__(self) -> str:
        ks = list(self.directions)
        return f"<ControlVector n_embd={self.n_embd} directions {ks[0]}..{ks[-1]} ({len(ks)}) {self.model_hint!r}>"

    @classmethod
    def from_layers(cls, layers: Mapping[int, np.ndarray], model_hint: str = "") -> "ControlVector":
        """From ``{lcprobe layer: vector}`` (1-based, the layer whose output receives it); layer 1 has no
        control-vector slot in llama.cpp."""
        if any(int(L) < 2 for L in layers):
            raise LcprobeError("llama.cpp's control vectors cannot reach layer 1 (its index 0 is never applied)")
        return cls({int(L) - 1: v for L, v in layers.items()}, model_hint)

    def layers(self) -> dict[int, np.ndarray]:
        """The directions keyed by the 1-based lcprobe layer whose output they are added to."""
        return {k + 1: v for k, v in self.directions.items()}

    def scaled(self, scale: float) -> "ControlVector":
        return ControlVector({k: v * np.float32(scale) for k, v in self.directions.items()}, self.model_hint)

    def data(self, n_layer: int) -> np.ndarray:
        """The flat buffer ``llama_set_adapter_cvec`` takes: n_embd floats per layer from index 1."""
        buf = np.zeros((max(n_layer - 1, 1), self.n_embd), np.float32)
        for k, v in self.directions.items():
            if k <= n_layer - 1:
                buf[k - 1] = v
        return buf.reshape(-1)

    # -- files --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "ControlVector":
        import gguf

        p = Path(path)
        if not p.is_file():
            raise LcprobeError(f"no control vector at {p}")
        try:
            reader = gguf.GGUFReader(p)
        except Exception as exc:  # gguf-py raises ValueError/struct errors on a bad file
            raise LcprobeError(f"{p} is not a GGUF file: {exc}") from None
        hint = ""
        f = reader.fields.get(f"{ARCH}.model_hint")
        if f is not None:
            hint = str(f.contents())
        dirs: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            head, _, idx = t.name.partition(".")
            if head != "direction" or not idx.isdigit() or int(idx) == 0:
                raise LcprobeError(f"{p}: tensor '{t.name}' is not a control-vector direction (direction.K, K >= 1)")
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise LcprobeError(f"{p}: direction '{t.name}' is {t.tensor_type.name}, llama.cpp wants F32")
            v = np.asarray(t.data, dtype=np.float32).reshape(-1)
            k = int(idx)
            if k not in dirs:
                dirs[k] = v.copy()
            elif dirs[k].shape != v.shape:
                raise LcprobeError(f"{p}: direction '{t.name}' repeats an index with another width")
            else:
                dirs[k] = dirs[k] + v
        if not dirs:
            raise LcprobeError(f"{p} holds no direction tensors")
        return cls(dirs, hint)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file llama.cpp's ``--control-vector`` loads (atomically)."""
        import gguf

        from lcprobe.files.atomic import write_atomic

        p = Path(path)
        tmp = p.with_name(p.name + ".part")
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_string(f"{ARCH}.model_hint", self.model_hint)
        w.add_int32(f"{ARCH}.layer_count", len(self.directions))
        for k, v in self.directions.items():
            w.add_tensor(f"direction.{k}", v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = tmp.read_bytes()
        tmp.unlink()
        write_atomic(p, data)
        return p
