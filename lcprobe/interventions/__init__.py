"""Interventions on llama.cpp's forward pass: steering vectors, activation patching, layer skips.

:class:`ControlVector` reads and writes llama.cpp's control-vector GGUF files
and needs no llama.cpp; :func:`resolve` checks the keywords every entry point
takes (see :mod:`lcprobe.interventions.plan`).
"""

from lcprobe.interventions.cvec import ControlVector
from lcprobe.interventions.plan import Interventions, NodeEdit, resolve

__all__ = ["ControlVector", "Interventions", "NodeEdit", "resolve"]
