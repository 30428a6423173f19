"""Python side of the row capture: which tensors, which rows, and checks.

A :class:`Capture` owns the native state the eval callback writes into. Per
``llama_decode`` the engine calls :meth:`begin` with the batch's output flags
and :meth:`finish` afterwards; :meth:`finish` raises :class:`CaptureError` if
the callback reported a problem or a site did not fire once per ubatch, and
returns the rows as a float32 array ``(n_sites, n_outputs, width)``.

Interventions, applied inside llama.cpp's forward pass as each node finishes:

* :meth:`Capture.set_edits` takes :class:`Edit` s: ``x += v`` (``"add"``) or
  ``x = v`` (``"set"``) on chosen rows of a node's output. ``rows`` has one
  entry per token of each following batch, in batch order: an index into
  ``values``, or -1 to leave that token's row alone. Only rows with an index
  are read and written. On the last layer llama.cpp keeps only the output
  rows, so there only output tokens' entries matter. Edits run before the
  capture: a captured node shows the edited values, and so does every node
  computed after it. A bad plan (wrong dtype or shape, an index out of range,
  ``rows`` not matching the batch) raises :class:`CaptureError` before the
  decode; a node of another width or type, or one that never fires, raises it
  from :meth:`finish`.
* :meth:`Capture.set_patches`: ``dst := src``, both nodes of the same ubatch
  (layer skipping). A captured patch target shows the value before the patch.

Thread contract: between :meth:`begin` and :meth:`finish`/:meth:`abort` (the
``llama_decode`` call, which runs with the GIL released) the native state
refuses every call that would change what the callback reads (sites,
patches, edits, a second begin) or read what it writes; such a call raises
:class:`CaptureError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lcprobe.errors import CaptureError
from lcprobe.llama.native import extension, ggml_addresses


@dataclass(frozen=True)
class Site:
    """One graph tensor to capture, e.g. ``Site("l_out-3", 576)``."""

    name: str
    width: int


_EDIT_MODES = {"add": 0, "set": 1}


@dataclass(frozen=True)
class Edit:
    """An intervention on one graph node's output (see the module docstring).

    ``node`` is the graph tensor name (``"l_out-11"``, 0-based as llama.cpp
    names it); ``values`` float32 ``(n_values, width)``; ``rows`` int32, one
    entry per token of the next batch: an index into ``values`` or -1.
    """

    node: str
    mode: str
    values: np.ndarray
    rows: np.ndarray


def _edit_args(edit: Edit) -> tuple:
    if edit.mode not in _EDIT_MODES:
        raise CaptureError(f"edit on '{edit.node}': mode must be 'add' or 'set', not {edit.mode!r}")
    values, rows = np.asarray(edit.values), np.asarray(edit.rows)
    if values.dtype != np.float32 or values.ndim != 2 or 0 in values.shape:
        raise CaptureError(
            f"edit on '{edit.node}': values must be a non-empty float32 (n_values, width) array, "
            f"got {values.dtype} {values.shape}"
        )
    if rows.dtype != np.int32 or rows.ndim != 1:
        raise CaptureError(f"edit on '{edit.node}': rows must be a 1-D int32 array, got {rows.dtype} {rows.shape}")
    if rows.size and (rows.min() < -1 or rows.max() >= len(values)):
        bad = rows[(rows < -1) | (rows >= len(values))][0]
        raise CaptureError(f"edit on '{edit.node}': row index {bad} outside -1..{len(values) - 1}")
    if not np.isfinite(values).all():
        raise CaptureError(f"edit on '{edit.node}': values contain NaN or infinity")
    return (
        edit.node,
        _EDIT_MODES[edit.mode],
        np.ascontiguousarray(values).tobytes(),
        int(values.shape[0]),
        int(values.shape[1]),
        np.ascontiguousarray(rows).tobytes(),
    )


class Capture:
    """Owner of the native capture state (the callback's ``user_data``)."""

    def __init__(self) -> None:
        self._ext = extension()
        self._state = self._ext.new(ggml_addresses())
        self._sites: tuple[Site, ...] = ()
        self._patches: tuple[tuple[str, str], ...] = ()
        self._edits: tuple[Edit, ...] = ()
        self._n_outputs = 0
        self._n_ubatches = 0
        self.callback_calls = 0
        #: rows each edit changed in the last decode
        self.edited_rows: tuple[int, ...] = ()
        #: node names the last :meth:`trace` could not keep (its buffer is bounded)
        self.trace_dropped = 0

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
        self._call(self._ext.set_sites, [(s.name, s.width) for s in sites])
        self._sites = tuple(sites)

    def set_patches(self, patches: list[tuple[str, str]]) -> None:
        """Interventions as ``(dst, src)``: ``dst`` is overwritten by ``src``."""
        self._call(self._ext.set_patches, list(patches))
        self._patches = tuple(patches)

    def set_edits(self, edits: Sequence[Edit]) -> None:
        """Edits applied in every following decode until changed; ``[]`` clears."""
        args = [_edit_args(e) for e in edits]
        self._call(self._ext.set_edits, args)
        self._edits = tuple(edits)

    @property
    def edits(self) -> tuple[Edit, ...]:
        return self._edits

    def _call(self, fn, *args):
        # The extension raises ValueError for a bad argument and RuntimeError
        # for a call during a decode; both are the caller's mistake, one line.
        try:
            return fn(self._state, *args)
        except (ValueError, RuntimeError) as exc:
            raise CaptureError(str(exc)) from None

    def begin(self, outputs: np.ndarray, n_ubatch: int, stop: str | None = None) -> None:
        """Arm for one decode; ``stop`` names a node after which the graph is cut
        (the last block's output, when llama.cpp's own logits are not wanted)."""
        flags = np.ascontiguousarray(outputs, dtype=np.uint8)
        for e in self._edits:
            if len(e.rows) != len(flags):
                raise CaptureError(
                    f"edit on '{e.node}' has {len(e.rows)} rows but the batch has {len(flags)} tokens"
                )
        self._call(self._ext.begin, flags.tobytes(), int(n_ubatch), stop)
        self._n_outputs = int(flags.sum())
        self._n_ubatches = -(-len(flags) // n_ubatch) if len(flags) else 0

    def trace(self, on: bool) -> list[str]:
        """Node names the scheduler offered since the last call; tracing on/off after.

        The native buffer is bounded (4 MiB of names); :attr:`trace_dropped`
        says how many names past it were lost."""
        names, self.trace_dropped = self._call(self._ext.trace, on)
        return names

    def abort(self) -> None:
        """Disarm after a failed decode without checking anything."""
        self._ext.end(self._state)

    def finish(self) -> np.ndarray:
        err, seen, applied, edited, calls = self._ext.end(self._state)
        self.callback_calls = calls
        self.edited_rows = tuple(n for _, n in edited)
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
        for edit, (n, _rows) in zip(self._edits, edited):
            if n != self._n_ubatches:
                raise CaptureError(
                    f"edit on '{edit.node}' ran {n} times for {self._n_ubatches} ubatches; "
                    "no graph node has that name (or the graph was cut before it)"
                )
        width = self._sites[0].width if self._sites else 0
        out = np.empty((len(self._sites), self._n_outputs, width), np.float32)
        self._call(self._ext.read, out)
        return out
