"""What a display is told while a study runs several tasks on several models.

:func:`lcprobe.studies.suite.run_suite` and :func:`lcprobe.studies.compare.run_compare`
report through one :class:`StudyListener`; the CLI's rich display implements
it, and the core stays quiet.
"""

from __future__ import annotations

from typing import Any, Protocol

from lcprobe.probing.runner import ProbeStats
from lcprobe.tasks.task import Task


class StudyModel(Protocol):
    """A model as a study names it on screen."""

    @property
    def label(self) -> str: ...


class StudyListener:
    """Hooks called in order model_start, model_loaded, then per task task_start,
    task_progress (repeatedly), task_done or task_failed; every method is optional."""

    def model_start(self, model: StudyModel, index: int) -> None: ...

    def model_loaded(self, model: StudyModel, seconds: float) -> None: ...

    def task_start(self, model: StudyModel, task: Task, n_items: int) -> None: ...

    def task_progress(self, stats: ProbeStats, best: dict[str, Any] | None) -> None: ...

    def task_done(self, model: StudyModel, task: Task, entry: dict[str, Any]) -> None: ...

    def task_failed(self, model: StudyModel, task: Task, message: str) -> None: ...


__all__ = ["StudyListener", "StudyModel"]
