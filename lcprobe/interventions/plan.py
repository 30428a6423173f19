"""The intervention keywords (``add``, ``scale``, ``patch``, ``positions``, ``skip``) checked once and
turned into the capture's edits for each batch.

Every entry point (capture, score, run_task, the studies) resolves its keywords
with :func:`resolve` before anything is decoded, so an impossible intervention
is a one-line :class:`~lcprobe.errors.LcprobeError`. The result is applied
through :meth:`lcprobe.llama.engine.Engine.intervening`: per decode the engine
asks :meth:`Interventions.edits` for the batch's edit rows, which follow each
token's position in its sequence, so a shared prefix, a batch of many
sequences and a one-token step of generation all get the same addition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.interventions.cvec import ControlVector
from lcprobe.sites import check_site, layer_index

if TYPE_CHECKING:
    from lcprobe.files.modelfile import ModelInfo
    from lcprobe.llama.capture import Edit


@dataclass(frozen=True)
class NodeEdit:
    """One node's edit: ``values`` rows by position (``per_position``) or one row for every position."""

    node: str
    mode: str  # "add" or "set"
    values: np.ndarray  # float32 (n, width)
    per_position: bool
    label: str  # what the user wrote, for messages
    layer: int = 0  # the 1-based layer it edits


@dataclass
class Interventions:
    """Resolved interventions for one model: node edits, layer skips, the positions they touch."""

    edits: list[NodeEdit] = field(default_factory=list)
    patches: list[tuple[str, str]] = field(default_factory=list)  # (dst, src): layer skips
    positions: np.ndarray | None = None  # sorted token positions edited; None = all
    scale: float = 1.0
    skip: list[int] = field(default_factory=list)  # the skipped layers, 1-based
    # sha256 of every vector and patched row as given (before ``scale``), in resolve's order
    values_sha256: str = field(default_factory=lambda: hashlib.sha256().hexdigest())

    def __bool__(self) -> bool:
        return bool(self.edits or self.patches)

    def record(self) -> dict[str, Any]:
        """What a result directory keeps of the intervention (summary.json, the resume key):
        equal records mean the same edits, so a resume cannot mix two interventions."""
        return {
            "sha256": self.values_sha256,
            "add_layers": [e.layer for e in self.edits if e.mode == "add"],
            "scale": self.scale,
            "patch": any(e.mode == "set" for e in self.edits),
            "patch_layers": [e.layer for e in self.edits if e.mode == "set"],
            "skip": list(self.skip),
            "positions": None if self.positions is None else [int(p) for p in self.positions],
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for result files)."""
        return {
            "edits": [{"node": e.node, "mode": e.mode, "what": e.label,
                       "norm": float(np.linalg.norm(e.values, axis=1).max())} for e in self.edits],
            "skip": [dst for dst, _ in self.patches],
            "positions": None if self.positions is None else [int(p) for p in self.positions],
        }

    def edits_for(self, positions: np.ndarray) -> list["Edit"]:
        """The capture's edits for one batch whose tokens sit at ``positions`` (in batch order)."""
        from lcprobe.llama.capture import Edit

        pos = np.asarray(positions, dtype=np.int64)
        keep = np.ones(len(pos), bool) if self.positions is None else np.isin(pos, self.positions)
        out = []
        for e in self.edits:
            if e.per_position:
                ok = keep & (pos < len(e.values))
                rows = np.where(ok, pos, -1)
            else:
                rows = np.where(keep, 0, -1)
            out.append(Edit(e.node, e.mode, e.values, rows.astype(np.int32)))
        return out


def _vector_rows(v: Any, width: int, what: str) -> tuple[np.ndarray, bool]:
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        raise LcprobeError(f"{what}: expected a vector of {width} numbers") from None
    if a.ndim == 1 and a.shape[0] == width:
        return np.ascontiguousarray(a[None]), False
    if a.ndim == 2 and a.shape[1] == width and a.shape[0] >= 1:
        return np.ascontiguousarray(a), True
    raise LcprobeError(f"{what}: expected ({width},) or (n_tokens, {width}) values, got shape {a.shape}")


def _finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise LcprobeError(f"{what}: the values contain NaN or infinity")


def resolve(
    info: "ModelInfo",
    add: Mapping[int, Any] | ControlVector | None = None,
    scale: float = 1.0,
    patch: Mapping[tuple[str, int], Any] | None = None,
    positions: Sequence[int] | None = None,
    skip: Sequence[int] | int | None = None,
    n_tokens: int | None = None,
) -> Interventions:
    """Check the keywords against the model (and the prompt's ``n_tokens`` when known).

    ``add``: ``{layer: vector}`` (1-based layers, negatives from the end; the
    vector is added to that layer's output, ``resid_post``) with vectors of
    n_embd or ``(n_tokens, n_embd)`` per position, or a :class:`ControlVector`
    (its direction.K is added where llama.cpp adds it: layer K + 1).
    ``scale`` multiplies every addition. ``patch``: ``{(site, layer):
    Activations or (n_tokens, n_embd) array}``, the site's rows replaced by
    those. ``positions`` restricts every edit to those token positions
    (negatives from the end need ``n_tokens``). ``skip``: layers whose block
    is bypassed (output := input).
    """
    width, n_layer = info.n_embd, info.n_layer
    iv = Interventions()
    digest = hashlib.sha256()
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise LcprobeError(f"scale must be a number, got {scale!r}") from None
    if not np.isfinite(s):
        raise LcprobeError(f"scale must be finite, got {scale!r}")
    iv.scale = s
    if positions is not None:
        iv.positions = _positions(positions, n_tokens)
    if isinstance(add, ControlVector):
        if add.n_embd != width:
            raise LcprobeError(f"the control vector has {add.n_embd} values per layer, this model's n_embd is {width}")
        far = [k for k in add.directions if k > n_layer - 1]
        if far:
            raise LcprobeError(f"the control vector has direction.{far[0]}, past this model's last index "
                               f"{n_layer - 1} ({n_layer} layers)")
        add = add.layers()
    if add is not None:
        if not isinstance(add, Mapping):
            raise LcprobeError("add takes {layer: vector} or a ControlVector")
        for layer, v in sorted(add.items(), key=lambda kv: int(kv[0])):
            L = _layer(layer, n_layer, "add")
            vals, per = _vector_rows(v, width, f"add[{layer}]")
            _finite(vals, f"add[{layer}]")
            if per and n_tokens is not None and len(vals) != n_tokens:
                raise LcprobeError(f"add[{layer}] has {len(vals)} rows for a prompt of {n_tokens} tokens")
            _digest(digest, f"add[{L}]", vals)
            iv.edits.append(NodeEdit(info.site_name("resid_post", L), "add", vals * np.float32(s), per, f"add[{L}]",
                                     L))
    if patch is not None:
        if not isinstance(patch, Mapping):
            raise LcprobeError("patch takes {(site, layer): Activations or array}")
        sets = []
        for key, src in patch.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise LcprobeError(f"patch keys are (site, layer) pairs, e.g. ('resid_post', 8); got {key!r}")
            site, layer = check_site(str(key[0])), _layer(key[1], n_layer, "patch")
            vals = _patch_rows(src, site, layer, width)
            if n_tokens is not None and len(vals) != n_tokens:
                raise LcprobeError(f"patch ({site!r}, {layer}) has {len(vals)} rows for a prompt of {n_tokens} "
                                   "tokens; patch between prompts of the same length")
            if iv.positions is not None and iv.positions.size and iv.positions.max() >= len(vals):
                raise LcprobeError(f"position {int(iv.positions.max())} is past the {len(vals)} patched rows")
            try:
                node = info.site_name(site, layer)
            except ValueError as exc:
                raise LcprobeError(str(exc)) from None
            _digest(digest, f"patch[{site},{layer}]", vals)
            sets.append(NodeEdit(node, "set", vals, True, f"patch[{site},{layer}]", layer))
        # A patch replaces the row; an addition on the same node goes on top of it.
        iv.edits = sets + iv.edits
    if skip is not None:
        layers = [skip] if isinstance(skip, (int, np.integer)) else list(skip)
        for layer in sorted({_layer(v, n_layer, "skip") for v in layers}):
            # the same patch as `lcprobe depth --skip`: the block's output := its input
            iv.patches.append((info.site_name("resid_post", layer), info.site_name("resid_pre", layer)))
            iv.skip.append(layer)
        # The capture copies a skipped block's input over its output after the edits ran, so an
        # edit there would be silently lost: refuse it rather than guess an order.
        clash = sorted({dst for dst, _ in iv.patches} & {e.node for e in iv.edits})
        if clash:
            e = next(e for e in iv.edits if e.node == clash[0])
            raise LcprobeError(f"{e.label} edits the output of a skipped layer ({clash[0]}); "
                               "edit the layer before it instead (a skipped block's output is its input)")
    iv.values_sha256 = digest.hexdigest()
    return iv


def _digest(h: Any, label: str, vals: np.ndarray) -> None:
    # the label and shape too: the same numbers added at another layer are another intervention
    h.update(f"{label}{vals.shape}".encode())
    h.update(np.ascontiguousarray(vals, np.float32).tobytes())


def _layer(layer: Any, n_layer: int, what: str) -> int:
    try:
        v = int(layer)
    except (TypeError, ValueError):
        raise LcprobeError(f"{what}: layer {layer!r} is not a number") from None
    try:
        return layer_index(v, n_layer)
    except LcprobeError as exc:
        raise LcprobeError(f"{what}: {exc}") from None


def _positions(positions: Sequence[int] | int, n_tokens: int | None) -> np.ndarray:
    vals = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
    out = []
    for p in vals:
        q = int(p)
        if q < 0:
            if n_tokens is None:
                raise LcprobeError(f"position {q} counts from the end, which needs one prompt (use capture)")
            q += n_tokens
        if q < 0 or (n_tokens is not None and q >= n_tokens):
            raise LcprobeError(f"position {p} is outside the prompt's {n_tokens} tokens")
        out.append(q)
    # an empty list is allowed: patching nothing must reproduce the unpatched run
    return np.array(sorted(set(out)), np.int64)


def _patch_rows(src: Any, site: str, layer: int, width: int) -> np.ndarray:
    from lcprobe.probing.activations import Activations

    if isinstance(src, Activations):
        rows = src[site, layer]
    else:
        rows = src
    vals, per = _vector_rows(rows, width, f"patch ({site!r}, {layer})")
    if not per:
        raise LcprobeError(f"patch ({site!r}, {layer}) needs (n_tokens, {width}) rows, one per position")
    _finite(vals, f"patch ({site!r}, {layer})")
    return vals
