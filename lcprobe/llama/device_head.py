"""The lens head on the device that holds the model's output layer: ``--lens-backend device``.

The head goes once into a buffer of that device (a GPU, an RPC server, or
the CPU when nothing is offloaded; :mod:`lcprobe.llama.output_device`), and
per chunk of rows native/device_lens.c runs the head product, logit scale /
soft-cap and log-softmax there; only the scored log-probabilities come back.

By default the head is uploaded dequantized to float32, from the same
dequantizer the numpy lens uses, so the device lens computes the numpy lens'
numbers (to float32 summation order) wherever it runs; the file's bytes are
read and converted in row blocks, so the host never holds a float32 copy
(unless the device is the CPU, whose buffers are host memory). ``stored=True``
keeps the head's own (quantized) type on the device instead: a quarter of
the memory for Q8_0, llama.cpp's kernels, and llama.cpp's rounding (its
activations are quantized too), so it no longer matches the numpy lens.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

import gguf

from lcprobe.files.modelfile import ModelInfo, read_head_raw
from lcprobe.llama.native import device_lens_addresses, extension
from lcprobe.llama.output_device import OutputDevice, output_device

GGML_TYPE_F32 = 0

# Head bytes converted and copied per call: bounds the host memory the upload
# needs (one block of float32 rows) and keeps each GIL-free copy short.
UPLOAD_BLOCK_BYTES = 32 << 20

# Device kernels index one chunk's logits with int32.
MAX_CHUNK_LOGITS = 2**31 - 1


class DeviceHead:
    """The output head in a buffer of one ggml-backend device, with log-softmax picks computed there."""

    def __init__(self, raw: np.ndarray, ggml_type: int, n_embd: int, n_vocab: int, device: OutputDevice,
                 n_threads: int | None = None, stored: bool = False) -> None:
        raw = np.asarray(raw).view(np.uint8).reshape(-1)
        n_rows = raw.size // ggml_row_bytes(ggml_type, n_embd) if raw.size else 0
        if n_rows < n_vocab:
            raise ValueError(f"the head has {n_rows} rows of type {ggml_type}, the vocabulary {n_vocab}")
        rows = raw[: n_vocab * ggml_row_bytes(ggml_type, n_embd)].reshape(n_vocab, -1)
        self._ext = extension()
        self.device = device
        self.n_embd = n_embd
        self.n_vocab = n_vocab
        self.stored = stored
        self.head_type = ggml_type if stored else GGML_TYPE_F32
        self.n_threads = n_threads or os.cpu_count() or 1
        self._lens = self._ext.device_lens_new(device_lens_addresses(), device.handle, self.head_type, n_embd,
                                               n_vocab, self.n_threads)
        try:
            self._upload(rows, ggml_type)
        except BaseException:
            self.close()
            raise
        self.digest = hashlib.sha256(rows.data).hexdigest() + (":stored" if stored else ":f32")

    @classmethod
    def from_model(cls, info: ModelInfo, n_threads: int | None = None, *, n_gpu_layers: int = 0,
                   rpc: Sequence[str] = (), tensor_split: Sequence[float] = (), stored: bool = False) -> "DeviceHead":
        """The head of ``info`` on the device llama.cpp gives its output layer when loaded this way."""
        raw, ggml_type, _ = read_head_raw(info.path, info)
        device = output_device(info.n_layer, n_gpu_layers, rpc, tensor_split)
        return cls(raw, ggml_type, info.n_embd, info.n_vocab, device, n_threads, stored)

    def _upload(self, rows: np.ndarray, ggml_type: int) -> None:
        out_row = 4 * self.n_embd if not self.stored else rows.shape[1]
        step = max(1, UPLOAD_BLOCK_BYTES // out_row)
        offset = 0
        for r0 in range(0, self.n_vocab, step):
            block = rows[r0: r0 + step]
            if not self.stored:
                # gguf-py's dequantizer, as the numpy lens uses it: the same float32 values
                block = np.ascontiguousarray(gguf.quants.dequantize(block, ggml_type), dtype=np.float32)
                if not np.isfinite(block).all():
                    raise ValueError(f"the head holds NaN or infinite weights in rows {r0}..{r0 + len(block)}")
            else:
                block = np.ascontiguousarray(block)
            self._ext.device_lens_set(self._handle(), offset, block)
            offset += block.nbytes

    def _handle(self) -> object:
        if self._lens is None:
            raise ValueError("the device head was closed")
        return self._lens

    @property
    def info(self) -> dict:
        """The backend's name and the bytes the head takes on the device."""
        return dict(self._ext.device_lens_info(self._handle()))

    def max_rows(self, chunk_rows: int | None = None) -> int:
        limit = max(1, MAX_CHUNK_LOGITS // self.n_vocab)
        return max(1, min(chunk_rows or limit, limit))

    def logits(self, x: np.ndarray, inv_scale: float = 1.0, softcap: float = 0.0,
               chunk_rows: int | None = None) -> np.ndarray:
        """Full logits ``(n, n_vocab)``, scale and soft-cap applied, computed on the device."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.n_embd)
        out = np.empty((len(x), self.n_vocab), np.float32)
        step = self.max_rows(chunk_rows)
        for r0 in range(0, len(x), step):
            r1 = min(len(x), r0 + step)
            self._ext.device_lens_logits(self._handle(), x[r0:r1], out[r0:r1], float(inv_scale), float(softcap))
        return out

    def pick(self, x: np.ndarray, rows: np.ndarray, tokens: np.ndarray, inv_scale: float = 1.0,
             softcap: float = 0.0, chunk_rows: int | None = None) -> np.ndarray:
        """``log_softmax(logits(x[rows[i]]))[tokens[i]]`` for every i, float32, in the order given.

        Rows no pair asks for are never computed; per chunk of rows the device
        gets a (rows, k) index matrix, k the most pairs of any row in it.
        """
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.n_embd)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if rows.shape != tokens.shape:
            raise ValueError(f"{rows.size} rows for {tokens.size} tokens")
        out = np.empty(rows.size, np.float32)
        if not rows.size:
            return out
        if rows.min() < 0 or rows.max() >= len(x):
            raise ValueError(f"row index out of range for {len(x)} rows")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range for a vocabulary of {self.n_vocab}")
        order = np.argsort(rows, kind="stable")
        used, local, counts = np.unique(rows[order], return_inverse=True, return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)])
        within = np.arange(rows.size) - starts[local]  # position of each pair inside its row
        tok = tokens[order].astype(np.int32)
        picked = np.empty(rows.size, np.float32)
        step = self.max_rows(chunk_rows)
        for u0 in range(0, len(used), step):
            u1 = min(len(used), u0 + step)
            a, b = starts[u0], starts[u1]
            k = int(counts[u0:u1].max())
            r = local[a:b] - u0
            # padding repeats a real token of the row: a valid index, whose value is dropped
            idx = np.repeat(tok[starts[u0:u1]][:, None], k, axis=1)
            idx[r, within[a:b]] = tok[a:b]
            res = np.empty((u1 - u0, k), np.float32)
            self._ext.device_lens_pick(self._handle(), x[used[u0:u1]], idx, res, float(inv_scale), float(softcap))
            picked[a:b] = res[r, within[a:b]]
        out[order] = picked
        return out

    def close(self) -> None:
        """Free the device's copy of the head now rather than at garbage collection."""
        if self._lens is not None:
            lens, self._lens = self._lens, None
            self._ext.device_lens_close(lens)


def ggml_row_bytes(ggml_type: int, n_embd: int) -> int:
    """Bytes of one stored row of ``n_embd`` values of a ggml type."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    if n_embd % block:
        raise ValueError(f"{n_embd} values are not whole blocks of ggml type {ggml_type} ({block})")
    return n_embd // block * size
