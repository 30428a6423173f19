"""Captured activations of one prompt, indexed the TransformerLens way: ``acts["resid_post", 5]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.sites import check_site, layer_index


@dataclass
class Activations:
    """Residual-stream rows of one token sequence at (site, layer) pairs.

    ``acts[site, layer]`` is float32 ``(n_tokens, n_embd)``; layers are 1-based
    and -1 is the last. ``logits`` holds llama.cpp's own logits
    ``(n_tokens, n_vocab)`` when the capture asked for them.
    """

    tokens: list[int]
    n_layer: int
    rows: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    text: str | None = None
    logits: np.ndarray | None = None

    def __getitem__(self, key: tuple[str, int]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(f"index activations with (site, layer), e.g. acts['resid_post', 5]; got {key!r}")
        site, layer = key
        check_site(site)
        layer = layer_index(int(layer), self.n_layer)
        try:
            return self.rows[site, layer]
        except KeyError:
            have = ", ".join(f"{s}:{ls}" for s, ls in self.layers_by_site().items()) or "nothing"
            raise LcprobeError(f"({site!r}, {layer}) was not captured (captured: {have})") from None

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, LcprobeError):
            return False
        return True

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def sites(self) -> list[str]:
        return sorted({s for s, _ in self.rows})

    def layers(self, site: str = "resid_post") -> list[int]:
        return sorted(layer for s, layer in self.rows if s == site)

    def layers_by_site(self) -> dict[str, list[int]]:
        return {s: self.layers(s) for s in self.sites}

    def stack(self, site: str = "resid_post") -> np.ndarray:
        """All captured layers of ``site`` as ``(n_layers, n_tokens, n_embd)``, in layer order."""
        layers = self.layers(check_site(site))
        if not layers:
            raise LcprobeError(f"no layer of {site!r} was captured (captured sites: {', '.join(self.sites)})")
        return np.stack([self.rows[site, layer] for layer in layers])
