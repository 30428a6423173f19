"""User-facing error types.

Anything a user can cause (a bad path, a malformed task file, a layer spec out
of range) raises a subclass of :class:`LcprobeError`; the CLI prints its message
on one line and exits non-zero without a traceback. Anything else is a bug.
"""

from __future__ import annotations


class LcprobeError(Exception):
    """An error caused by input the user can fix; its message is shown as is."""


class ModelError(LcprobeError):
    """The model file is missing, corrupt, or of an unsupported architecture."""


class TaskError(LcprobeError):
    """A task file or its data is malformed."""


class CaptureError(LcprobeError):
    """llama.cpp did not produce the tensors or rows the capture expected."""


class PromptTooLongError(LcprobeError):
    """A prompt plus its continuation does not fit in the context."""
