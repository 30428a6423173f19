"""Write GGUF files with gguf-py: the metadata, then the tensors one at a time.

Used to cut a block out of a model (:func:`lcprobe.studies.depth.remove_block`)
and by the tests and benchmarks that build synthetic models. Tensor data are
produced only when written, so a copy of a 40 GB model holds one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write. ``shape`` is numpy's (rows last-but-one, columns last);
    for a quantized ``ggml_type`` it is the shape of the stored bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    data: Callable[[], np.ndarray]
    ggml_type: gguf.GGMLQuantizationType | None = None

    @classmethod
    def from_array(cls, name: str, arr: np.ndarray) -> "TensorOut":
        return cls(name, tuple(arr.shape), arr.dtype, int(arr.nbytes), lambda: arr)

    @classmethod
    def from_reader(cls, t: gguf.ReaderTensor, name: str | None = None) -> "TensorOut":
        """A tensor of an open GGUFReader, as stored (quantized bytes stay quantized)."""
        return cls(name or t.name, tuple(t.data.shape), t.data.dtype, int(t.data.nbytes), lambda: t.data,
                   t.tensor_type)


def copy_fields(writer: gguf.GGUFWriter, reader: gguf.GGUFReader,
                edit: Callable[[str, Any], Any] | None = None) -> None:
    """Copy every key/value of ``reader`` into ``writer`` (``edit(key, value)`` may change a value).

    The keys gguf-py writes itself (the architecture, the GGUF.* header) are
    skipped; a ``general.alignment`` also sets the writer's data alignment.
    """
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if edit is not None:
            value = edit(f.name, value)
        if f.name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(f.name, value, vtype, sub_type=sub)


def write_gguf(path: str | os.PathLike[str], arch: str, metadata: Callable[[gguf.GGUFWriter], None],
               tensors: Sequence[TensorOut], endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
               data_endianess: gguf.GGUFEndian | None = None) -> None:
    """Write a GGUF: ``metadata(writer)`` adds the key/values, then each tensor's data is made and written.

    ``data_endianess`` is the byte order of the tensors' data (default: this machine's).
    """
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    try:
        metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data(), tensor_endianess=data_endianess)
    finally:
        writer.close()


__all__ = ["TensorOut", "copy_fields", "write_gguf"]
