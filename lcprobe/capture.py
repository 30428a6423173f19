"""Python side of the row capture: which tensors, which rows, and checks.

A :class:`Capture` owns the native state the eval callback writes into. Per
``llama_decode`` the engine calls :meth:`begin` with the batch's output flags
and :meth:`finish` afterwards; :meth:`finish` raises :class:`CaptureError` if
the callback reported a problem or a site did not fire once per ubatch, and
returns the rows as a float32 array ``(n_sites, n_outputs, width)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CaptureError
from .native import extension, ggml_addresses


@dataclass(frozen=True)
class Site:
    """One graph tensor to capture, e.g. ``Site("l_out-3", 576)``."""

    name: str
    width: int


class Capture:
    """Owner of the native capture state (the callback's ``user_data``)."""

    def __init__(self) -> None:
        self._ext = extension()
        self._state = self._ext.new(*ggml_addresses())
        self._sites: tuple[Site, ...] = ()
        self._patches: tuple[tuple[str, str], ...] = ()
        self._n_outputs = 0
        self._n_ubatches = 0
        self.callback_calls = 0

    @property
    def callback_address(self) -> int:
        return self._ext.callback_address()

    @property
    def user_data(self) -> int:
        return self._ext.state_address(self._state)

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    def set_sites(self, sites: list[Site] | tuple[Site, ...]) -> None:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate capture sites: {names}")
        if len({s.width for s in sites}) > 1:
            # Every residual-stream site is n_embd wide; one width keeps the
            # returned array rectangular.
            raise ValueError("all capture sites must have the same width")
        self._ext.set_sites(self._state, [(s.name, s.width) for s in sites])
        self._sites = tuple(sites)

    def set_patches(self, patches: list[tuple[str, str]]) -> None:
        """Interventions as ``(dst, src)``: ``dst`` is overwritten by ``src``."""
        self._ext.set_patches(self._state, list(patches))
        self._patches = tuple(patches)

    def begin(self, outputs: np.ndarray, n_ubatch: int, stop: str | None = None) -> None:
        """Arm for one decode; ``stop`` names a node after which the graph is cut
        (the last block's output, when llama.cpp's own logits are not wanted)."""
        flags = np.ascontiguousarray(outputs, dtype=np.uint8)
        self._ext.begin(self._state, flags.tobytes(), int(n_ubatch), stop)
        self._n_outputs = int(flags.sum())
        self._n_ubatches = -(-len(flags) // n_ubatch) if len(flags) else 0

    def trace(self, on: bool) -> list[str]:
        """Node names the scheduler offered since the last call; tracing on/off after."""
        return self._ext.trace(self._state, on)

    def abort(self) -> None:
        """Disarm after a failed decode without checking anything."""
        self._ext.end(self._state)

    def finish(self) -> np.ndarray:
        err, seen, applied, calls = self._ext.end(self._state)
        self.callback_calls = calls
        if err is not None:
            raise CaptureError(f"capture failed: {err}")
        for site, (n_seen, n_copied) in zip(self._sites, seen):
            if n_seen != self._n_ubatches:
                raise CaptureError(
                    f"graph tensor '{site.name}' was computed {n_seen} times for "
                    f"{self._n_ubatches} ubatches; this model's graph does not name its "
                    "layers the way lcprobe expects"
                )
            if n_copied != self._n_outputs:
                raise CaptureError(
                    f"captured {n_copied} of {self._n_outputs} rows of '{site.name}'"
                )
        for (dst, _src), n in zip(self._patches, applied):
            if n != self._n_ubatches:
                raise CaptureError(f"intervention on '{dst}' ran {n} times, expected {self._n_ubatches}")
        width = self._sites[0].width if self._sites else 0
        out = np.empty((len(self._sites), self._n_outputs, width), np.float32)
        self._ext.read(self._state, out)
        return out
