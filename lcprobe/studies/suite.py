"""A suite: several tasks on several models, one model in memory at a time.

Layout of a suite directory::

    DIR/<model-stem>/<task>/items.jsonl, summary.json, run.json   (as ``lcprobe run``)
    DIR/<model-stem>/llama.log
    DIR/suite.json   per model, per task: metric, best/last layer values, per-layer values
    DIR/suite.csv    long format: model, task, layer, relative_depth, metric, value

Every task and model is checked before the first model is loaded, so a
missing data file or a mistyped model fails in a second, not after an hour.
``suite.json`` is rewritten after every task: an interrupted suite leaves a
valid (incomplete) one behind, and ``resume=True`` continues where it stopped.
Quiet like :mod:`lcprobe.probing.session`: the terminal display is a
:class:`~lcprobe.probing.progress.StudyListener`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lcprobe.analysis import metrics
from lcprobe.files.catalog import resolve_model
from lcprobe.errors import LcprobeError
from lcprobe.files.download import file_sha256
from lcprobe.files.modelfile import ModelInfo, read_model_info
from lcprobe.results.run import RUN, SUMMARY
from lcprobe.results.suite import DEFAULT_TASKS, SUITE_VERSION, write_suite
from lcprobe.probing.progress import StudyListener
from lcprobe.llama.loader import LoadedModel, open_model
from lcprobe.results.lock import locks_output
from lcprobe.probing.session import ProbeOptions, run_key, run_task
from lcprobe.tasks.task import Item, Task, load_task

#: One representative task per family of Chen et al. ``calc`` mixes every op,
#: number type and digit range. Chinese stands for the cross-lingual family:
#: a widely used language in a non-Latin script, so it tests transfer away
#: from English rather than near-copies (French, Spanish) or a language that
#: small models barely tokenize (Thai); all four stay available with -T.



def parse_task_list(spec: str | Sequence[str] | None) -> list[str]:
    """``"calc,lama"`` (or repeated -T values) -> ``["calc", "lama"]``; None -> the default set."""
    if spec is None:
        return list(DEFAULT_TASKS)
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        for name in part.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise LcprobeError("-T/--tasks names no task")
    return names


def load_tasks(names: Sequence[str]) -> list[Task]:
    """Every task, loaded now: a missing data file fails before any model is loaded."""
    tasks = [load_task(n) for n in names]
    seen: dict[str, str] = {}
    for spec, t in zip(names, tasks):
        if t.name in seen:
            raise LcprobeError(f"tasks {seen[t.name]!r} and {spec!r} are both named {t.name!r}; "
                               "their results would share a directory")
        seen[t.name] = spec
    return tasks


@dataclass
class SuiteModel:
    spec: str  # as given on the command line
    info: ModelInfo

    @property
    def stem(self) -> str:
        return self.info.stem

    @property
    def label(self) -> str:
        return self.info.stem


def plan_models(specs: Sequence[str]) -> list[SuiteModel]:
    """Resolve and read every model file (headers only); refuse two models with one stem."""
    if not specs:
        raise LcprobeError("no model given (-m)")
    models = [SuiteModel(s, read_model_info(resolve_model(s))) for s in specs]
    stems: dict[str, str] = {}
    for m in models:
        if m.stem in stems:
            raise LcprobeError(f"models {stems[m.stem]!r} and {m.spec!r} have the same file stem "
                               f"{m.stem!r}; their results would share a directory")
        stems[m.stem] = m.spec
    return models


@dataclass
class SuiteOutcome:
    suite: dict[str, Any]  # the content of suite.json
    out_dir: Path
    interrupted: bool
    seconds: float
    loaded: list[str] = field(default_factory=list)  # stems of the models actually loaded


def task_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """suite.json's record of one task on one model, from its summary.json."""
    metric = summary["metric"]
    rows = summary["layers"]
    layers = [r["layer"] for r in rows]
    n_layer = summary["n_layer"]
    timing = summary.get("timing", {})
    return {
        "task": summary["task"],
        "metric": metric,
        "n_items": summary["n_items"],
        "n_skipped": summary.get("n_skipped", 0),
        "complete": bool(summary.get("complete", False)),
        "best_layer": summary.get("best_layer"),
        "best_value": summary.get("best_value"),
        "last_layer": layers[-1] if layers else None,
        "last_value": summary.get("last_value"),
        "seconds": timing.get("seconds_probe"),
        "layers": layers,
        "relative_depth": [round(layer / n_layer, 6) for layer in layers],
        "values": [r.get(metric) for r in rows],
        "metrics": {m: [r.get(m) for r in rows] for m in metrics.METRICS if m in rows[0]} if rows else {},
    }


_MISSING = object()


def _compare_key(run_dir: Path, expected: dict[str, Any], options: ProbeOptions) -> tuple[list[str], bool] | None:
    """Compare run_dir's run.json with this run: (keys that differ, whether every key was understood).

    A key is understood when it is in ``expected`` or is an option of the same
    name; None when there is no readable run.json.
    """
    try:
        key = json.loads((run_dir / RUN).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(key, dict):
        return None
    want = json.loads(json.dumps(expected))
    diff, understood = [], all(k in key for k in want)
    for k, v in key.items():
        ref = want[k] if k in want else getattr(options, k, _MISSING)
        if ref is _MISSING:
            understood = False
        elif json.loads(json.dumps(ref)) != v:
            diff.append(k)
    return sorted(diff), understood


def finished_summary(run_dir: Path, expected: dict[str, Any], options: ProbeOptions) -> dict[str, Any] | None:
    """The summary of a complete run in ``run_dir`` made with exactly these settings, else None.

    Only used to skip loading a model whose tasks are all finished: any doubt
    answers None, and then run_task, which owns the key, decides.
    """
    cmp = _compare_key(run_dir, expected, options)
    if cmp is None or cmp[0] or not cmp[1]:
        return None
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("complete") else None


def resume_conflicts(run_dir: Path, expected: dict[str, Any], options: ProbeOptions) -> list[str]:
    """Settings of the run saved in ``run_dir`` that certainly differ from this one's."""
    cmp = _compare_key(run_dir, expected, options)
    return [] if cmp is None else cmp[0]


@locks_output("out_dir")
def run_suite(
    models: Sequence[SuiteModel],
    tasks: Sequence[Task],
    out_dir: str | Path,
    options: ProbeOptions,
    resume: bool = False,
    listener: StudyListener | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> SuiteOutcome:
    """Run every task on every model, writing the suite layout into ``out_dir``.

    With ``resume``, finished tasks are kept, unfinished ones continue from
    their items.jsonl, and a model whose tasks are all finished is not loaded.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listener = listener or StudyListener()
    items: dict[str, list[Item]] = {t.name: t.items(limit=options.limit, seed=options.seed) for t in tasks}
    for t in tasks:
        if not items[t.name]:
            raise LcprobeError(f"task {t.name} has no items")
    suite: dict[str, Any] = {
        "suite_version": SUITE_VERSION,
        "tasks": [t.name for t in tasks],
        "options": dataclasses.asdict(options),
        "models": [],
        "complete": False,
    }
    if resume:
        # A run of other settings in the way is the user's mistake, not one
        # task's problem: say so before loading anything.
        for model in models:
            sha = file_sha256(model.info.path)
            for task in tasks:
                run_dir = out / model.stem / task.name
                diff = resume_conflicts(run_dir, run_key(sha, model.info, task, options, len(items[task.name])), options)
                if diff:
                    raise LcprobeError(f"{run_dir} holds a run with a different {', '.join(diff)}; "
                                       "use another -o/--output directory or drop --resume")
    interrupted = False
    loaded: list[str] = []

    def save(record: dict[str, Any]) -> None:
        # keep the task order of the command line whatever finished first
        record["tasks"] = {t.name: record["tasks"][t.name] for t in tasks if t.name in record["tasks"]}
        write_suite(out, suite)

    for index, model in enumerate(models):
        listener.model_start(model, index)
        sha = file_sha256(model.info.path)
        record = {"model": model.stem, "name": model.info.general_name, "path": str(model.info.path), "sha256": sha,
                  "architecture": model.info.arch, "quantization": model.info.file_type,
                  "n_layer": model.info.n_layer, "tasks": {}, "errors": {}}
        suite["models"].append(record)
        model_dir = out / model.stem
        todo: list[Task] = []
        for task in tasks:
            done = finished_summary(model_dir / task.name, run_key(sha, model.info, task, options,
                                                                    len(items[task.name])), options) if resume else None
            if done is not None:
                record["tasks"][task.name] = task_entry(done)
                listener.task_done(model, task, record["tasks"][task.name])
            else:
                todo.append(task)
        if todo:
            with open_model(model.info.path, options, log_path=model_dir / "llama.log") as lm:
                loaded.append(model.stem)
                listener.model_loaded(model, lm.seconds_load)
                interrupted = _run_model_tasks(lm, model, todo, items, model_dir, options, resume,
                                               listener, should_stop, record, lambda: save(record))
        save(record)
        if interrupted:
            break
    suite["complete"] = not interrupted and len(suite["models"]) == len(models) and all(
        len(m["tasks"]) == len(tasks) and all(e["complete"] for e in m["tasks"].values()) for m in suite["models"]
    )
    suite["seconds"] = round(time.perf_counter() - t0, 3)
    write_suite(out, suite)
    return SuiteOutcome(suite, out, interrupted, time.perf_counter() - t0, loaded)


def _run_model_tasks(lm: LoadedModel, model: SuiteModel, tasks: list[Task], items: dict[str, list[Item]],
                     model_dir: Path, options: ProbeOptions, resume: bool, listener: StudyListener,
                     should_stop: Callable[[], bool], record: dict[str, Any], save: Callable[[], None]) -> bool:
    for task in tasks:
        listener.task_start(model, task, len(items[task.name]))
        try:
            outcome = run_task(lm, task, model_dir / task.name, options, resume=resume, items=items[task.name],
                               progress=listener.task_progress, should_stop=should_stop)
        except LcprobeError as exc:
            # One task that cannot run on this model (e.g. an item longer than
            # the context) should not cost the hours the other tasks need.
            record["errors"][task.name] = str(exc)
            save()
            listener.task_failed(model, task, str(exc))
            continue
        record["tasks"][task.name] = task_entry(outcome.summary)
        save()
        listener.task_done(model, task, record["tasks"][task.name])
        if outcome.interrupted:
            return True
        if should_stop():
            # a stop between tasks: nothing of the next task is started
            return True
    return False
