"""The logit lens: final norm + output head applied to captured residual rows.

Pure numpy, float32 throughout, bounded memory: rows go through the head in
chunks sized so that one chunk of logits stays under ``budget_bytes``, and
only the requested tokens' log-probabilities leave a chunk (never a full
rows x vocab array in float64).

Modes (``Lens.mode``):
- ``final-norm``: norm then head at every layer, the usual logit lens;
- ``raw``: the head alone on layers 1..N-1 and norm + head on layer N, which
  is what Chen et al.'s code computes (their last hidden state is already
  normed by the framework).

Backends (``Unembed.backend``): ``numpy`` (the float32 dequantized head, here),
``ggml`` (the stored head through ggml's CPU kernels, full logits back) and
``device`` (the head on the device holding the output layer; the
log-softmax and the pick of the scored tokens run there too, so
:meth:`Lens.token_log_probs` gets a few floats per row: docs/lens-device.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from typing import TYPE_CHECKING

from lcprobe.files.modelfile import ModelInfo, read_head, read_head_raw

if TYPE_CHECKING:
    from lcprobe.llama.device_head import DeviceHead
    from lcprobe.llama.ggml_head import GgmlHead

LENS_MODES = ("final-norm", "raw")
LENS_BACKENDS = ("numpy", "ggml", "device")

DEFAULT_BUDGET = 32 << 20


@dataclass
class Unembed:
    """Final norm and output head of one model.

    ``head`` is the dequantized float32 head (numpy backend) or None when a
    :class:`GgmlHead` evaluates the stored head instead, or a
    :class:`DeviceHead` holds the head on a ggml-backend device.
    """

    norm_weight: np.ndarray  # (n_embd,)
    head: np.ndarray | None  # (n_vocab, n_embd)
    eps: float
    norm: str = "rms"
    norm_bias: np.ndarray | None = None
    softcap: float = 0.0
    scale: float = 1.0
    ggml: "GgmlHead | None" = None
    vocab_size: int = 0
    device: "DeviceHead | None" = None

    @classmethod
    def from_model(cls, info: ModelInfo, backend: str = "numpy", n_threads: int | None = None, *,
                   n_gpu_layers: int = 0, rpc: tuple[str, ...] = (),
                   tensor_split: tuple[float, ...] = ()) -> "Unembed":
        """The model's final norm and head for ``backend``. The device backend places the head where
        llama.cpp puts the output layer for this ``n_gpu_layers`` / ``rpc`` / ``tensor_split``
        (the engine's values: ``EngineConfig.gpu_layers`` etc.; the defaults mean the CPU)."""
        if backend not in LENS_BACKENDS:
            raise ValueError(f"unknown lens backend '{backend}' ({', '.join(LENS_BACKENDS)})")
        w = read_head(info.path, info, head=backend == "numpy")
        ggml = device = None
        if backend == "ggml":
            raw, ggml_type, rows = read_head_raw(info.path, info)
            from lcprobe.llama.ggml_head import GgmlHead  # native parts of the lens load only when asked for

            ggml = GgmlHead(raw, ggml_type, info.n_embd, rows, n_threads)
        elif backend == "device":
            from lcprobe.llama.device_head import DeviceHead

            device = DeviceHead.from_model(info, n_threads, n_gpu_layers=n_gpu_layers, rpc=rpc,
                                           tensor_split=tensor_split)
        return cls(
            norm_weight=w["norm_weight"],
            head=w.get("head"),
            eps=info.norm_eps,
            norm=info.spec.norm,
            norm_bias=w.get("norm_bias"),
            softcap=info.logit_softcap,
            scale=info.logit_scale,
            ggml=ggml,
            vocab_size=info.n_vocab,
            device=device,
        )

    @property
    def backend(self) -> str:
        if self.device is not None:
            return "device"
        return "ggml" if self.ggml is not None else "numpy"

    @property
    def can_pick(self) -> bool:
        """Whether :meth:`pick_log_probs` computes the picks itself (never the full rows on the host)."""
        return self.device is not None

    def close(self) -> None:
        """Free the ggml or device copy of the head now rather than at garbage collection."""
        if self.ggml is not None:
            self.ggml.close()
        if self.device is not None:
            self.device.close()

    @property
    def n_vocab(self) -> int:
        return int(self.head.shape[0]) if self.head is not None else self.vocab_size

    def digest(self) -> str:
        """sha256 of the norm and head as used; stored with results to tie them to it."""
        h = hashlib.sha256()
        for arr in (self.norm_weight, self.head, self.norm_bias):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).data)
        if self.ggml is not None:
            h.update(self.ggml._digest.encode())
        if self.device is not None:
            h.update(self.device.digest.encode())
        h.update(f"{self.norm}:{self.eps}:{self.softcap}:{self.scale}:{self.backend}".encode())
        return h.hexdigest()

    def normalize(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, dtype=np.float32)
        if self.norm == "layer":
            h = h - h.mean(-1, keepdims=True)
        # mean of squares in float64 to keep the norm exact for wide rows
        ms = np.mean(np.square(h, dtype=np.float64), axis=-1, keepdims=True)
        out = (h / np.sqrt(ms + self.eps).astype(np.float32)) * self.norm_weight
        if self.norm_bias is not None:
            out += self.norm_bias
        return out.astype(np.float32, copy=False)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Head (and any logit scale / soft-cap) on already-normed rows.

        The device backend computes the full rows on its device (scale and
        soft-cap included) and copies them back: what logit_lens and
        top_tokens need; scoring goes through :meth:`pick_log_probs`.
        """
        if self.device is not None:
            return self.device.logits(x, 1.0 / self.scale, self.softcap)
        if self.ggml is not None:
            z = self.ggml.matmul(x)
            if z.shape[1] != self.n_vocab:
                z = np.ascontiguousarray(z[:, : self.n_vocab])
        else:
            z = np.asarray(x, dtype=np.float32) @ self.head.T
        if self.scale != 1.0:
            z *= np.float32(1.0 / self.scale)  # llama.cpp divides by f_logit_scale
        if self.softcap:
            z /= self.softcap
            np.tanh(z, out=z)
            z *= self.softcap
        return z

    def pick_log_probs(self, x: np.ndarray, rows: np.ndarray, tokens: np.ndarray,
                       chunk_rows: int | None = None) -> np.ndarray:
        """``log_softmax(logits(x[rows[i]]))[tokens[i]]`` per pair, computed where the head is
        (only with :attr:`can_pick`); ``chunk_rows`` bounds the rows of one device graph."""
        if self.device is None:
            raise ValueError(f"the {self.backend} lens backend computes full rows; use logits()")
        return self.device.pick(x, rows, tokens, 1.0 / self.scale, self.softcap, chunk_rows)


class Lens:
    """Maps residual rows at a 1-based layer to vocabulary log-probabilities."""

    def __init__(self, unembed: Unembed, n_layer: int, mode: str = "final-norm",
                 budget_bytes: int = DEFAULT_BUDGET) -> None:
        if mode not in LENS_MODES:
            raise ValueError(f"unknown lens '{mode}' (choose from {', '.join(LENS_MODES)})")
        self.unembed = unembed
        self.n_layer = n_layer
        self.mode = mode
        self.budget_bytes = budget_bytes

    def transform(self, h: np.ndarray, layer: int) -> np.ndarray:
        if self.mode == "raw" and layer < self.n_layer:
            return np.asarray(h, dtype=np.float32)
        return self.unembed.normalize(h)

    def _chunk_rows(self) -> int:
        # at least 64 rows: below that BLAS loses efficiency faster than memory is saved
        return max(64, self.budget_bytes // (4 * self.unembed.n_vocab))

    def log_probs(self, h: np.ndarray, layer: int) -> np.ndarray:
        """Full log-softmax rows ``(n, vocab)``; the caller bounds ``n``."""
        z = self.unembed.logits(self.transform(h, layer))
        return log_softmax(z, out=z)

    def token_log_probs(self, hs: np.ndarray, layers: list[int], targets: list[np.ndarray]) -> np.ndarray:
        """Log-probabilities of selected tokens at each row and layer.

        ``hs`` is ``(n_layers, n_rows, n_embd)``; ``targets[r]`` lists the token
        ids wanted from row ``r``. Returns ``(n_layers, n_pairs)`` in the order
        of ``np.concatenate(targets)``.
        """
        n_layers, n_rows, _ = hs.shape
        counts = np.array([len(t) for t in targets], dtype=np.int64)
        tok = np.concatenate(targets).astype(np.int64) if n_rows else np.zeros(0, np.int64)
        # Stack every layer's rows so BLAS sees one tall matrix per chunk.
        x = np.concatenate([self.transform(hs[li], layer) for li, layer in enumerate(layers)])
        if self.unembed.can_pick:
            # row li * n_rows + r asks for targets[r]: pairs come back layer by layer, in tok's order
            rows = np.repeat(np.arange(len(x)), np.tile(counts, n_layers))
            picked = self.unembed.pick_log_probs(x, rows, np.tile(tok, n_layers), self._chunk_rows())
            return picked.reshape(n_layers, len(tok))
        starts = np.concatenate([[0], np.cumsum(counts)])
        out = np.empty(n_layers * len(tok), np.float32)
        step = self._chunk_rows()
        for r0 in range(0, len(x), step):
            r1 = min(len(x), r0 + step)
            z = self.unembed.logits(x[r0:r1])
            rows = np.arange(r0, r1)
            li, r = np.divmod(rows, n_rows)
            n_pick = counts[r]
            local = np.repeat(rows - r0, n_pick)
            offset = np.arange(len(local)) - np.repeat(np.cumsum(n_pick) - n_pick, n_pick)
            pair = np.repeat(starts[r], n_pick) + offset
            dest = np.repeat(li, n_pick) * len(tok) + pair
            picked = z[local, tok[pair]]
            out[dest] = picked - logsumexp(z, scratch=True)[local]
            del z  # else the next chunk's logits are allocated while these are alive: 2x the budget
        return out.reshape(n_layers, len(tok))


def logsumexp(z: np.ndarray, scratch: bool = False) -> np.ndarray:
    """Log-sum-exp over the last axis in float32 with a float64 accumulator.

    With ``scratch`` the exponentials are computed in place, overwriting z:
    for a chunk of rows x vocab that saves a second array of the same size
    and most of the memory traffic.
    """
    m = z.max(axis=-1)
    t = z if scratch else np.empty_like(z)
    np.subtract(z, m[..., None], out=t)
    np.exp(t, out=t)
    s = t.sum(axis=-1, dtype=np.float64)
    return (m + np.log(s)).astype(np.float32)


def log_softmax(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Log-probabilities over the last axis; ``out=z`` overwrites the logits instead of copying them."""
    return np.subtract(z, logsumexp(z)[..., None], out=out)


def kl_rows(logp: np.ndarray, logq: np.ndarray, p: np.ndarray | None = None) -> np.ndarray:
    """KL(p || q) over the last axis of two log-probability arrays, float64, clamped at 0.

    ``p`` is ``exp(logp)`` when the caller already has it (one distribution
    against many), which saves an exponential pass over the vocabulary.
    """
    d = np.subtract(logp, logq)
    d *= np.exp(logp) if p is None else p
    return np.maximum(d.sum(axis=-1, dtype=np.float64), 0.0)
