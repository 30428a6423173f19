"""The vocabulary of activation sites and layer selections, shared by the CLI and the API.

Layers are 1-based block outputs (``resid_post`` of layer i is block i's
output, llama.cpp's ``l_out-(i-1)``); negative layers count from the end, so
-1 is the last. Sites follow TransformerLens's names: ``resid_pre`` (the block
input; for layer 1 the scaled embedding), ``resid_mid`` (after attention) and
``resid_post`` (after the block). Which llama.cpp node each maps to is the
architecture table's business (:meth:`lcprobe.files.modelfile.ModelInfo.site_name`).
"""

from __future__ import annotations

from typing import Iterable

from lcprobe.errors import LcprobeError

#: Residual-stream sites every supported architecture can capture (resid_mid where declared).
SITES = ("resid_pre", "resid_mid", "resid_post")


def check_site(site: str) -> str:
    if site not in SITES:
        raise LcprobeError(f"unknown site '{site}' (choose from {', '.join(SITES)})")
    return site


def layer_index(layer: int, n_layer: int) -> int:
    """A 1-based layer, negatives from the end (-1 = last), checked against the model's depth."""
    v = n_layer + 1 + layer if layer < 0 else layer
    if not 1 <= v <= n_layer:
        raise LcprobeError(f"layer {layer} is out of range: this model has layers 1..{n_layer} (or -1..-{n_layer})")
    return v


def select_layers(layers: str | int | Iterable[int] | None, n_layer: int) -> list[int]:
    """A ``--layers`` string, one layer, or a list of layers -> sorted 1-based layers."""
    if layers is None or isinstance(layers, str):
        return parse_layers(layers, n_layer)
    if isinstance(layers, int):
        return [layer_index(layers, n_layer)]
    out = sorted({layer_index(int(v), n_layer) for v in layers})
    if not out:
        raise LcprobeError("no layer selected")
    return out


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
    """Layer selection like ``1:10,20,-1`` (1-based, inclusive ranges, negatives from the end)."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(1, n_layer + 1))

    def one(tok: str) -> int:
        try:
            v = int(tok)
        except ValueError:
            raise LcprobeError(f"bad layer '{tok}' in --layers '{spec}' (use e.g. 1:10,20,-1)") from None
        if v < 0:
            v = n_layer + 1 + v
        if not 1 <= v <= n_layer:
            raise LcprobeError(f"layer {tok} in --layers is out of range: this model has layers 1..{n_layer}")
        return v

    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            a, _, b = part.partition(":")
            lo = one(a) if a.strip() else 1
            hi = one(b) if b.strip() else n_layer
            if lo > hi:
                raise LcprobeError(f"empty layer range '{part}' in --layers")
            out.update(range(lo, hi + 1))
        elif part:
            out.add(one(part))
    if not out:
        raise LcprobeError(f"--layers '{spec}' selects no layer")
    return sorted(out)
