"""lcprobe: layer-wise probing of quantized GGUF models through llama.cpp.

>>> import lcprobe
>>> with lcprobe.load("smollm2-135m") as model:          # doctest: +SKIP
...     acts = model.capture("The capital of France is")
...     acts["resid_post", 5].shape
(6, 576)

Importing lcprobe loads neither llama.cpp nor the C extension: the names
below are resolved on first use, so reading results (``read_dump``, the
report) works on a machine without a llama.cpp build.
"""

from __future__ import annotations

import importlib
from typing import Any

from lcprobe.errors import CaptureError, LcprobeError, ModelError, PromptTooLongError, TaskError

__version__ = "0.1.0"

#: Public name -> module that defines it, imported when the name is first used.
_LAZY = {
    "load": "lcprobe.model",
    "Model": "lcprobe.model",
    "Activations": "lcprobe.probing.activations",
    "ControlVector": "lcprobe.interventions.cvec",
    "SITES": "lcprobe.sites",
    "load_task": "lcprobe.tasks.task",
    "Task": "lcprobe.tasks.task",
    "Item": "lcprobe.tasks.task",
    "read_items": "lcprobe.results.run",
    "read_dump": "lcprobe.results.dump",
    "ModelInfo": "lcprobe.files.modelfile",
    "read_model_info": "lcprobe.files.modelfile",
}

__all__ = ["CaptureError", "LcprobeError", "ModelError", "PromptTooLongError", "TaskError", "__version__",
           *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lcprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
