"""Terminal output with rich: live progress while probing or running a study, per-layer tables after.

Only the CLI imports this module; the core stays quiet and usable as a library.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from lcprobe.probing.progress import StudyListener, StudyModel
from lcprobe.probing.runner import ProbeStats
from lcprobe.tasks.task import Task


class RunProgress:
    """Live display: items done/total, ETA, tokens/s and the best layer so far."""

    def __init__(self, console: Console, title: str, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("items"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[best]}"),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._task = self._progress.add_task(title, total=None, rate="", best="")
        self._t0 = time.perf_counter()
        self._best = ""

    def __enter__(self) -> "RunProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def set_best(self, layer: int | None, value: float | None, metric: str) -> None:
        if layer is not None and value is not None:
            self._best = f"best so far: layer {layer} ({metric} {value:.3f})"

    def update(self, stats: ProbeStats) -> None:
        secs = max(stats.seconds_decode + stats.seconds_lens, 1e-9)
        rate = f"{stats.tokens_decoded / secs:,.0f} tok/s" if stats.tokens_decoded else ""
        self._progress.update(
            self._task, total=stats.items_total, completed=stats.items_done, rate=rate, best=self._best
        )


def best_note(entry: dict[str, Any], metric: str) -> str:
    """``best layer L (metric v)`` of a finished task's entry."""
    value = entry.get("best_value")
    return f"best layer {entry.get('best_layer')} ({metric} {'—' if value is None else f'{value:.3f}'})"


class StudyDisplay(StudyListener):
    """One rich Progress for a suite or a comparison: every item of every model and task, and the current task.

    ``describe(entry, task)`` says what the overall line shows about the last
    finished task (default: its best layer).
    """

    def __init__(self, console: Console, title: str, n_models: int, n_tasks: int, enabled: bool = True,
                 describe: Callable[[dict[str, Any], Task], str] | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}", justify="left"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("items"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console, transient=False, disable=not enabled, refresh_per_second=4,
        )
        self.n_models, self.n_tasks = n_models, n_tasks
        self.describe = describe or (lambda entry, task: best_note(entry, task.metric))
        self.overall = self.progress.add_task(title, total=None, note="")
        self.current = self.progress.add_task("", total=None, note="", visible=False)
        self.planned: dict[str, int] = {}
        self.base = 0  # items of the tasks already finished
        self.tasks_done = 0

    def __enter__(self) -> "StudyDisplay":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def plan(self, planned: dict[str, int]) -> None:
        """Items per task (the same for every model): sets the overall total."""
        self.planned = planned
        self.progress.update(self.overall, total=sum(planned.values()) * self.n_models)

    def model_start(self, model: StudyModel, index: int) -> None:
        self.progress.update(self.current, description=f"  {model.label} ({index + 1}/{self.n_models}): loading",
                             visible=True, completed=0, total=None, note="")

    def model_loaded(self, model: StudyModel, seconds: float) -> None:
        self.progress.update(self.current, note=f"loaded in {seconds:.1f} s")

    def task_start(self, model: StudyModel, task: Task, n_items: int) -> None:
        self.progress.reset(self.current, total=n_items, description=f"  {model.label} · {task.name}", note="")

    def task_progress(self, stats: ProbeStats, best: dict[str, Any] | None) -> None:
        secs = max(stats.seconds_decode + stats.seconds_lens, 1e-9)
        note = f"{stats.tokens_decoded / secs:,.0f} tok/s" if stats.tokens_decoded else ""
        if best:
            note += f"  best so far: layer {best['layer']} ({best['metric']} {best['value']:.3f})"
        self.progress.update(self.current, total=stats.items_total, completed=stats.items_done, note=note)
        self.progress.update(self.overall, completed=self.base + stats.items_done)

    def task_done(self, model: StudyModel, task: Task, entry: dict[str, Any]) -> None:
        self._finished(task)
        self.progress.update(self.overall, note=f"{self.tasks_done}/{self.n_models * self.n_tasks} tasks; last: "
                                                f"{model.label} · {task.name} {self.describe(entry, task)}")

    def task_failed(self, model: StudyModel, task: Task, message: str) -> None:
        self._finished(task)
        self.progress.console.print(f"[red]{model.label} · {task.name} failed[/]: {message}")

    def _finished(self, task: Task) -> None:
        self.tasks_done += 1
        self.base += self.planned.get(task.name, 0)
        self.progress.update(self.overall, completed=self.base)


def bar(value: float, width: int = 30) -> str:
    value = min(max(value, 0.0), 1.0)
    full = int(value * width)
    frac = value * width - full
    partial = " ▏▎▍▌▋▊▉"[int(frac * 8)] if full < width else ""
    return ("█" * full + partial).ljust(width)


def layer_table(summary: dict[str, Any], title: str | None = None, bar_width: int = 24) -> Table:
    """One row per layer: the task metric with a bar, the best layer highlighted.

    Beside the task's metric: mc2 (probability mass on true answers) and
    length-normalised accuracy, the two that most often tell a different story.
    """
    metric = summary["metric"]
    best = summary.get("best_layer")
    table = Table(title=title or f"{summary.get('task')} · {metric} per layer", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("", no_wrap=True, min_width=bar_width)
    others = [m for m in ("mc2", "acc_per_byte") if m != metric]
    headers = {"mc2": "mc2", "acc_per_byte": "acc/byte"}
    for m in others:
        table.add_column(headers[m], justify="right", style="dim")
    for row in summary["layers"]:
        v = row.get(metric)
        is_best = row["layer"] == best
        cells = [
            str(row["layer"]),
            "—" if v is None else f"{v:.3f}",
            Text(bar(v or 0.0, bar_width), style="green" if is_best else "cyan"),
        ]
        cells += ["—" if row.get(m) is None else f"{row[m]:.3f}" for m in others]
        table.add_row(*cells, style="bold green" if is_best else None)
    return table


def final_line(summary: dict[str, Any]) -> str:
    t = summary.get("timing", {})
    per_item = t.get("seconds_per_item")
    speed = f", {per_item:.3f} s/item" if per_item is not None else ""
    def num(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    return (
        f"{summary.get('task')} on {summary.get('model_label') or summary.get('model_name', summary.get('model'))}: best layer "
        f"{summary.get('best_layer')}/{summary.get('n_layer')} {summary['metric']}={num(summary.get('best_value'))}"
        f" (last layer {num(summary.get('last_value'))}), {summary.get('n_items')} items{speed}"
    )
