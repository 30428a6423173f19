"""Installing interventions on an engine for the duration of a ``with`` block.

On exit the edits and skips are cleared whatever happened, so the next plain
decode is the unmodified model's. While the block runs, :func:`active_record`
says what is installed, so a task run under it (``Model.run_task``, ``lcprobe
steer eval``) records it in summary.json and its resume key.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.interventions.plan import Interventions

if TYPE_CHECKING:
    from lcprobe.llama.engine import Engine

Hook = Callable[[np.ndarray, Sequence[Sequence[int]]], list]

# engine -> the record of what `intervening` installed on it (absent: nothing)
_active: "weakref.WeakKeyDictionary[Engine, dict[str, Any]]" = weakref.WeakKeyDictionary()


def active_record(engine: "Engine") -> dict[str, Any] | None:
    """The installed intervention's :meth:`Interventions.record`, ``{"hook": True}`` for a custom
    hook, or None when the engine runs the plain model."""
    return _active.get(engine)


@contextlib.contextmanager
def intervening(engine: "Engine", iv: Interventions | None = None, hook: Hook | None = None) -> Iterator[None]:
    """Apply ``iv`` (the same edits to every sequence) or a custom per-batch ``hook`` to every decode."""
    if iv is not None and hook is not None:
        raise ValueError("pass interventions or a hook, not both")
    if iv is None and hook is None:
        yield
        return
    if engine.edit_hook is not None or engine.capture.edits:
        raise LcprobeError("interventions are already active on this model (they do not nest)")
    if iv is not None:
        hook = (lambda positions, seq_ids: iv.edits_for(positions)) if iv.edits else None
        patches = list(iv.patches)
    else:
        patches = []
    try:
        engine.edit_hook = hook
        engine.capture.set_patches(patches)
        if iv is None:
            _active[engine] = {"hook": True}  # edits nobody can describe: never resumed as another run
        elif iv:
            _active[engine] = iv.record()
        yield
    finally:
        _active.pop(engine, None)
        engine.edit_hook = None
        engine.capture.set_edits([])
        engine.capture.set_patches([])
