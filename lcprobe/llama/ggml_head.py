"""The stored (quantized) output head multiplied by ggml's CPU kernels: ``--lens-backend ggml``."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from lcprobe.llama.native import extension, ggml_lens_addresses


class GgmlHead:
    """The head as stored in the GGUF (quantized), multiplied by ggml's CPU kernels.

    This is llama.cpp's own computation of its logits (activations quantized
    to the head's dot-product type), so it reproduces llama.cpp's last layer
    and runs the integer kernels instead of a float32 product.
    """

    def __init__(self, raw: np.ndarray, ggml_type: int, n_embd: int, n_rows: int, n_threads: int | None = None) -> None:
        self._ext = extension()
        self._lens = self._ext.lens_new(ggml_lens_addresses(), raw, ggml_type, n_embd, n_rows)
        self.n_rows = n_rows
        self.n_threads = n_threads or os.cpu_count() or 1
        self._digest = hashlib.sha256(raw.data).hexdigest()

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.n_rows), np.float32)
        if self._lens is None:
            raise ValueError("the ggml head was closed")
        if len(x):
            self._ext.lens_logits(self._lens, x, out, self.n_threads)
        return out

    def close(self) -> None:
        """Free ggml's copy of the head now rather than at garbage collection."""
        self._lens = None
