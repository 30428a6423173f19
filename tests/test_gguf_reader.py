"""The GGUF header reader's lazy long arrays against gguf-py's own reader."""

from __future__ import annotations

import time

import gguf
import numpy as np

from lcprobe.files.modelfile import _BoundedReader


def test_lazy_arrays_read_like_gguf_py(smollm2):
    t0 = time.perf_counter()
    fast = _BoundedReader(smollm2, "r")
    t_fast = time.perf_counter() - t0
    ref = gguf.GGUFReader(smollm2, "r")
    assert list(fast.fields) == list(ref.fields)
    lazy = 0
    for key, f in ref.fields.items():
        g = fast.fields[key]
        lazy += not isinstance(g.parts, list)
        assert (g.offset, g.name, list(g.data), list(g.types)) == (f.offset, f.name, list(f.data), list(f.types)), key
        assert g.contents() == f.contents(), key
        assert len(g.parts) == len(f.parts), key
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(g.parts, f.parts)), key
    assert lazy >= 2  # the vocabulary's tokens and merges at least
    assert [(t.name, t.data_offset) for t in fast.tensors] == [(t.name, t.data_offset) for t in ref.tensors]
    print(f"header: {t_fast:.2f} s")
