"""Figures and a Markdown summary from saved results; never runs a model.

Reads what ``lcprobe run`` and ``lcprobe suite`` wrote (summary.json for the
per-layer metrics, items.jsonl for chance levels and the calc grids) and
draws PNGs with matplotlib's Agg backend into ``DIR/figures``, then writes
``DIR/report.md``. Directories written by ``lcprobe compare`` / ``lcprobe
depth`` are handed to their own figure modules when those are installed.

matplotlib is an optional extra (``lcprobe[plot]``) and is imported only
inside the drawing functions, so the rest of lcprobe works without it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lcprobe.analysis import metrics
from lcprobe.errors import LcprobeError
from lcprobe.results.run import ITEMS, SUMMARY, layer_metrics, read_items
from lcprobe.results.suite import SUITE_JSON

FIGURES = "figures"
REPORT_MD = "report.md"
MC_METRICS = ("acc", "mc1", "mc2", "mc3")


# --- loading saved results --------------------------------------------------------


@dataclass
class RunResult:
    """One task on one model, as saved."""

    model: str  # the model file's stem
    task: str
    metric: str
    n_layer: int
    layers: list[int]
    values: dict[str, np.ndarray]  # metric -> (n_layers,), NaN where undefined
    best_layer: int | None
    best_value: float | None
    last_value: float | None
    n_items: int
    run_dir: Path
    summary: dict[str, Any]
    _records: list[dict[str, Any]] | None = field(default=None, repr=False)
    _bands: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def relative_depth(self) -> np.ndarray:
        return np.asarray(self.layers, dtype=float) / self.n_layer

    @property
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = read_items(self.run_dir / ITEMS)
        return self._records

    @functools.cached_property
    def chance(self) -> dict[str, float]:
        return chance_levels(self.records)

    def band(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        """95% percentile-bootstrap band of the per-layer mean (items resampled), None without items."""
        if metric not in self._bands:
            self._bands[metric] = self._bootstrap(metric)
        return self._bands[metric]

    def _bootstrap(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        per_item = []
        for r in self.records:
            m = metrics.item_metrics(np.asarray(r["logprobs"]), r["correct"], r["n_tokens"], r.get("n_bytes"))
            per_item.append(m[metric])
        x = np.asarray(per_item, dtype=float)
        if not len(x) or x.shape[1] != len(self.layers) or not np.isfinite(x).all():
            return None
        return metrics.bootstrap_ci(x, n_boot=1000, seed=0)

    @property
    def multi_true(self) -> bool:
        """Whether some item has several true answers (then mc2/mc3 say more than mc1)."""
        return any(len(r["correct"]) > 1 for r in self.records)


def chance_levels(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Expected metric of a scorer that ranks choices at random, averaged over items.

    With k true and f false choices out of n: acc = k/n (the top choice is
    true), mc1 = 1/(f+1) (the best true answer beats every false one), mc3 =
    1/(f+1) too (each true answer, in expectation), mc2 = k/n (equal scores
    give every choice the same mass). With one true answer all four are 1/n.
    """
    if not records:
        return {m: math.nan for m in MC_METRICS}
    acc, mc1 = [], []
    for r in records:
        n, k = len(r["choices"]), len(r["correct"])
        acc.append(k / n)
        mc1.append(1.0 / (n - k + 1))
    return {"acc": float(np.mean(acc)), "mc1": float(np.mean(mc1)), "mc2": float(np.mean(acc)),
            "mc3": float(np.mean(mc1))}


def _run_from_dir(run_dir: Path, model: str | None = None) -> RunResult:
    try:
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
        rows = summary["layers"]
        metric = summary["metric"]
        values = {m: np.array([np.nan if r.get(m) is None else r[m] for r in rows], dtype=float)
                  for m in rows[0] if m != "layer"} if rows else {}
        return RunResult(
            model=model or summary.get("model_label") or Path(summary["model"]).stem, task=summary["task"], metric=metric,
            n_layer=int(summary["n_layer"]), layers=[int(r["layer"]) for r in rows], values=values,
            best_layer=summary.get("best_layer"), best_value=summary.get("best_value"),
            last_value=summary.get("last_value"), n_items=int(summary.get("n_items", 0)), run_dir=run_dir,
            summary=summary,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise LcprobeError(f"{run_dir / SUMMARY}: not a readable lcprobe summary ({exc})") from None


def find_runs(root: str | Path) -> list[RunResult]:
    """Every saved run under ``root``: a suite (suite.json order), one run dir, or run dirs below it."""
    root = Path(root)
    if not root.is_dir():
        raise LcprobeError(f"{root} is not a directory")
    if (root / SUITE_JSON).is_file():
        try:
            suite = json.loads((root / SUITE_JSON).read_text(encoding="utf-8"))
            order = [(m["model"], t) for m in suite["models"] for t in m["tasks"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LcprobeError(f"{root / SUITE_JSON}: not a readable suite file ({exc})") from None
        return [_run_from_dir(root / m / t, m) for m, t in order if (root / m / t / SUMMARY).is_file()]
    if (root / SUMMARY).is_file():
        return [_run_from_dir(root)]
    # results/<model>/<task>/ as `lcprobe run` and `lcprobe compare` lay them
    # out: the directory names the model (two copies of one file stay apart)
    runs = [_run_from_dir(p.parent, p.parent.parent.name) for p in sorted(root.glob("*/*/" + SUMMARY))]
    runs += [_run_from_dir(p.parent) for p in sorted(root.glob("*/" + SUMMARY))]
    seen: set[tuple[str, str]] = set()
    for r in runs:
        if (r.model, r.task) in seen:  # e.g. results/<task>-a/, results/<task>-b/ of one model
            r.model = f"{r.model} ({r.run_dir.name})"
        seen.add((r.model, r.task))
    return runs


def _unique(seq: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(seq))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


# --- figures ------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise LcprobeError(
            "lcprobe report draws with matplotlib, which is not installed; "
            "install the plot extra: pip install 'lcprobe[plot]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_STYLE = {"figure.dpi": 110, "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
          "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def draw_task_lines(task: str, runs: Sequence[RunResult], path: Path) -> Path:
    """The task's metric over layers, one line per model; relative depth when models differ.

    For tasks with several true answers per item (TruthfulQA) mc1, mc2 and
    mc3 get a panel each, as the paper reports them.
    """
    plt = _pyplot()
    # models of different depths meet on relative depth, as in the paper's size comparison
    relative = len({r.n_layer for r in runs}) > 1
    first = runs[0]
    panels = [first.metric]
    if first.multi_true:
        panels += [m for m in ("mc2", "mc3") if m != first.metric and m in first.values]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.8), squeeze=False)
        for ax, metric in zip(axes[0], panels):
            for r in runs:
                x = r.relative_depth if relative else np.asarray(r.layers)
                y = r.values.get(metric)
                if y is None:
                    continue
                (line,) = ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.4,
                                  label=f"{r.model} ({r.n_layer} layers)")
                band = r.band(metric)
                if band is not None:  # how far the curve could move with other items of the task
                    ax.fill_between(x, band[0], band[1], color=line.get_color(), alpha=0.18, linewidth=0)
                if np.isfinite(y).any():
                    b = int(np.nanargmax(y))
                    ax.plot(x[b], y[b], marker="*", markersize=11, color=line.get_color(),
                            markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
            chance = [r.chance[metric] for r in runs if math.isfinite(r.chance.get(metric, math.nan))]
            if chance:
                c = float(np.mean(chance))
                ax.axhline(c, color="grey", linestyle="--", linewidth=1, label=f"chance ({c:.2f})")
            ax.set_ylim(0, 1)
            ax.set_xlabel("relative depth (layer / number of layers)" if relative else "layer")
            ax.set_ylabel(metric)
            if relative:
                ax.set_xlim(0, 1.02)
            ax.set_title(f"{task}: {metric} per layer" + (" (★ best layer)" if metric == panels[0] else ""))
            ax.legend(fontsize=7, loc="best")
        models = _unique(r.model for r in runs)
        fig.suptitle(f"{task} · {first.n_items} items · shaded: 95% bootstrap band over items"
                     + (f" · {models[0]}" if len(models) == 1 else ""), fontsize=10)
        fig.tight_layout()
        return _save(fig, path)


def draw_heatmap(model: str, runs: Sequence[RunResult], path: Path) -> Path:
    """Layer x task heatmap of one model, each task's own metric; best layer boxed."""
    plt = _pyplot()
    layers = runs[0].layers
    grid = np.full((len(runs), len(layers)), np.nan)
    for i, r in enumerate(runs):
        v = r.values[r.metric]
        grid[i, : len(v)] = v[: len(layers)]
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2.5), 0.55 * len(runs) + 1.6))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(runs)), [f"{r.task} ({r.metric})" for r in runs])
        step = max(1, math.ceil(len(layers) / 32))
        ticks = list(range(0, len(layers), step))
        ax.set_xticks(ticks, [str(layers[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("layer")
        if len(layers) <= 48:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                                color="black" if grid[i, j] > 0.6 else "white")
        for i, r in enumerate(runs):
            if np.isfinite(grid[i]).any():
                b = int(np.nanargmax(grid[i]))
                ax.add_patch(plt.Rectangle((b - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
        fig.colorbar(im, ax=ax, label="metric (0-1)", fraction=0.03, pad=0.02)
        ax.set_title(f"{model}: metric per layer and task (values x 100; red box: best layer)")
        fig.tight_layout()
        return _save(fig, path)


def draw_radar(runs: Sequence[RunResult], path: Path) -> Path:
    """Tasks as spokes: each model at its best layer (solid) and last layer (dashed), chance dotted."""
    plt = _pyplot()
    tasks = _unique(r.task for r in runs)
    models = _unique(r.model for r in runs)
    by = {(r.model, r.task): r for r in runs}
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False)
    closed = np.append(angles, angles[0])
    with plt.rc_context(_STYLE):
        fig = plt.figure(figsize=(6.8, 5.6))
        ax = fig.add_subplot(projection="polar")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, model in enumerate(models):
            color = colors[k % len(colors)]
            best, last = [], []
            for t in tasks:
                r = by.get((model, t))
                v = r.values[r.metric] if r is not None else None
                ok = v is not None and np.isfinite(v).any()
                best.append(float(np.nanmax(v)) if ok else np.nan)
                last.append(float(v[-1]) if ok else np.nan)
            ax.plot(closed, best + best[:1], color=color, linewidth=1.8, marker="o", markersize=3,
                    label=f"{model}: best layer")
            ax.fill(closed, best + best[:1], color=color, alpha=0.08)
            ax.plot(closed, last + last[:1], color=color, linewidth=1.4, linestyle="--", label=f"{model}: last layer")
        chance = []
        for t in tasks:
            rs = [by[(m, t)] for m in models if (m, t) in by]
            chance.append(float(np.mean([r.chance[r.metric] for r in rs])) if rs else np.nan)
        ax.plot(closed, chance + chance[:1], color="grey", linestyle=":", linewidth=1.2, label="chance")
        metric_of = {r.task: r.metric for r in runs}
        ax.set_xticks(angles, [f"{t}\n({metric_of[t]})" for t in tasks])
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7)
        ax.set_title("tasks at the best layer and at the last layer", pad=18)
        ax.legend(loc="upper left", bbox_to_anchor=(1.08, 1.05), fontsize=7)
        fig.tight_layout()
        return _save(fig, path)


def calc_grid(records: Sequence[dict[str, Any]], layer_index: int) -> dict[str, Any]:
    """Accuracy at one layer per (type, op, digits) cell, from items.jsonl records with calc meta."""
    cells: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        meta = r.get("meta", {})
        if not {"op", "type", "digits"} <= set(meta):
            continue
        scores = np.asarray(r["logprobs"], dtype=float)
        hit = float(int(np.argmax(scores[:, layer_index])) in r["correct"])
        cells.setdefault((str(meta["type"]), str(meta["op"]), str(meta["digits"])), []).append(hit)
    return {"cells": cells,
            "types": _order({k[0] for k in cells}, ("int", "float")),
            "ops": _order({k[1] for k in cells}, ("add", "sub", "mul", "div", "mix2", "mix3")),
            "digits": sorted({k[2] for k in cells}, key=lambda d: [int(x) for x in re.findall(r"\d+", d)] or [0])}


def _order(values: set[str], preferred: Sequence[str]) -> list[str]:
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def draw_calc_grid(run: RunResult, path: Path) -> Path | None:
    """Op x digits accuracy grids per number type, at the best layer and at the last layer."""
    records = run.records
    if not run.layers or not any({"op", "digits"} <= set(r.get("meta", {})) for r in records):
        return None
    plt = _pyplot()
    acc = run.values.get("acc")
    best_i = int(np.nanargmax(acc)) if acc is not None and np.isfinite(acc).any() else len(run.layers) - 1
    columns = [(best_i, f"best layer {run.layers[best_i]}")]
    if best_i != len(run.layers) - 1:
        columns.append((len(run.layers) - 1, f"last layer {run.layers[-1]}"))
    grids = [calc_grid(records, i) for i, _ in columns]
    types, ops, digits = grids[0]["types"], grids[0]["ops"], grids[0]["digits"]
    with plt.rc_context({**_STYLE, "axes.grid": False}):
        size = (3.2 + 1.1 * len(digits) * len(columns), 0.9 + 0.5 * len(ops) * len(types))
        fig, axes = plt.subplots(len(types), len(columns), squeeze=False, figsize=size)
        im = None
        for row, typ in enumerate(types):
            for col, ((_, label), grid) in enumerate(zip(columns, grids)):
                ax = axes[row][col]
                mat = np.full((len(ops), len(digits)), np.nan)
                counts = np.zeros((len(ops), len(digits)), dtype=int)
                for i, op in enumerate(ops):
                    for j, d in enumerate(digits):
                        hits = grid["cells"].get((typ, op, d))
                        if hits:
                            mat[i, j], counts[i, j] = float(np.mean(hits)), len(hits)
                im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, aspect="auto")
                for i in range(len(ops)):
                    for j in range(len(digits)):
                        text = "—" if counts[i, j] == 0 else f"{mat[i, j]:.2f}\nn={counts[i, j]}"
                        colour = "grey" if counts[i, j] == 0 else "black" if mat[i, j] > 0.6 else "white"
                        ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=colour)
                ax.set_xticks(range(len(digits)), [f"{d} digits" for d in digits], fontsize=7)
                ax.set_yticks(range(len(ops)), ops, fontsize=7)
                ax.set_title(f"{typ}, {label}", fontsize=8)
                if col == 0:
                    ax.set_ylabel("operation")
        fig.colorbar(im, ax=axes, label="accuracy", fraction=0.04, pad=0.03)
        fig.suptitle(f"{run.task} on {run.model}: accuracy by operation and operand digits "
                     f"(chance {run.chance['acc']:.2f})", fontsize=9)
        return _save(fig, path)


def draw_calc_breakdown(run: RunResult, path: Path) -> Path | None:
    """summary.json's breakdown: per-layer accuracy for each value of calc's op, type and digits
    (or of whichever of those keys another task's items carry)."""
    breakdown = run.summary.get("breakdown") or {}
    keys = [k for k in ("op", "type", "digits") if breakdown.get(k)]
    if not keys:
        return None
    plt = _pyplot()
    chance = run.chance["acc"]
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False, sharey=True)
        for ax, key in zip(axes[0], keys):
            groups = breakdown[key]
            names = _order(set(groups), ("add", "sub", "mul", "div", "mix2", "mix3", "int", "float"))
            for name in names:
                ax.plot(run.layers[: len(groups[name])], groups[name], linewidth=1.3, marker="o", markersize=2,
                        label=name)
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("layer")
            ax.set_title(f"accuracy by {key}")
            ax.legend(fontsize=7, ncol=2)
        axes[0][0].set_ylabel("accuracy")
        fig.suptitle(f"{run.task} on {run.model}: per-layer accuracy by item kind ({run.n_items} items)", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)


# --- figures owned by other commands ------------------------------------------------


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _as_paths(result: Any) -> list[Path]:
    if result is None:
        return []
    if isinstance(result, (str, Path)):
        return [Path(result)]
    try:
        return [Path(p) for p in result]
    except TypeError:
        return []


def other_figures(root: Path) -> list[Path]:
    """Figures of compare / depth directories, drawn by their own modules when installed."""
    out: list[Path] = []
    if (root / "compare.json").is_file() and _module_available("lcprobe.report.compare_figures"):
        out += _as_paths(importlib.import_module("lcprobe.report.compare_figures").draw_compare(root))
    if ((root / "depth.json").is_file() or (root / "skip.json").is_file() or (root / "map.json").is_file()) \
            and _module_available("lcprobe.report.depth_figures"):
        out += _as_paths(importlib.import_module("lcprobe.report.depth_figures").draw_depth(root))
    if (root / "patch.json").is_file():
        from lcprobe.report.patch_figures import draw_patch

        out += draw_patch(root)
    if (root / "steer.json").is_file():
        from lcprobe.report.steer_figures import draw_steer

        out += draw_steer(root)
    if (root / "kld.json").is_file():
        from lcprobe.report.kld_figures import draw_kld

        out += draw_kld(root)
    return out


# --- the report -----------------------------------------------------------------------


@dataclass
class ReportOutcome:
    markdown: Path
    figures: list[Path]
    runs: list[RunResult]
    notes: list[str]


def make_report(root: str | Path) -> ReportOutcome:
    """Draw every figure the saved results allow and write ``root/report.md``."""
    root = Path(root)
    runs = find_runs(root)
    extra_inputs = [n for n in ("compare.json", "depth.json", "skip.json", "map.json", "kld.json", "patch.json",
                                "steer.json") if (root / n).is_file()]
    if not runs and not extra_inputs:
        raise LcprobeError(f"no results in {root}: expected summary.json (a run), suite.json (a suite), "
                           "or compare.json / depth.json")
    _pyplot()  # fail with the install hint before anything is written
    figdir = root / FIGURES
    figures: dict[str, list[Path]] = {}
    notes: list[str] = []
    models = _unique(r.model for r in runs)
    tasks = _unique(r.task for r in runs)
    for task in tasks:
        rs = [r for r in runs if r.task == task]
        figures.setdefault("Per task, metric over layers", []).append(
            draw_task_lines(task, rs, figdir / f"task-{_slug(task)}.png"))
    for model in models:
        rs = [r for r in runs if r.model == model]
        if len(rs) > 1:
            figures.setdefault("Layer x task heatmaps", []).append(
                draw_heatmap(model, rs, figdir / f"heatmap-{_slug(model)}.png"))
    if len(tasks) >= 3:
        figures.setdefault("Best layer vs last layer", []).append(draw_radar(runs, figdir / "radar.png"))
    elif runs:
        notes.append("The radar chart needs at least 3 tasks; this directory has "
                     f"{len(tasks)}.")
    for r in runs:
        name = f"{_slug(r.model)}-{_slug(r.task)}.png"
        grid = draw_calc_grid(r, figdir / f"calc-grid-{name}")
        if grid is not None:
            calc = figures.setdefault("Calculation by operation, number type and digits", [])
            calc.append(grid)
            p = draw_calc_breakdown(r, figdir / f"calc-breakdown-{name}")
            if p is not None:
                calc.append(p)
        else:  # other tasks with a breakdown, e.g. TruthfulQA's adversarial / non-adversarial questions
            p = draw_calc_breakdown(r, figdir / f"breakdown-{name}")
            if p is not None:
                figures.setdefault("Accuracy by item kind", []).append(p)
    other = other_figures(root)
    if other:
        figures["Other figures"] = other
    md = root / REPORT_MD
    md.write_text(render_markdown(root, runs, figures, notes), encoding="utf-8")
    return ReportOutcome(md, [p for ps in figures.values() for p in ps], runs, notes)


def _cell(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(root: Path, runs: Sequence[RunResult], figures: dict[str, list[Path]],
                    notes: Sequence[str]) -> str:
    lines = [f"# lcprobe report: {root.name}", "",
             "Made by `lcprobe report` from saved results (summary.json and items.jsonl); no model was run. "
             "Layers are numbered 1..N; chance is the expected value of the metric when choices are ranked "
             "at random, averaged over the items.", ""]
    models = _unique(r.model for r in runs)
    if runs:
        lines += ["## Models", ""]
        seen = {}
        for r in runs:
            seen.setdefault(r.model, r.summary)
        lines += _md_table(("model", "architecture", "quantization", "layers", "lens", "site", "sha256"),
                           [(m, s.get("architecture"), s.get("quantization"), s.get("n_layer"), s.get("lens"),
                             s.get("site"), str(s.get("sha256", ""))[:12]) for m, s in seen.items()])
        lines += ["", "## Best layer, penultimate and last layer", ""]
        rows = []
        for r in runs:
            v = r.values[r.metric]
            pen = float(v[-2]) if len(v) > 1 and r.layers[-1] == r.n_layer and r.layers[-2] == r.n_layer - 1 else None
            rows.append((r.model, r.task, r.metric, r.n_items, f"{r.best_layer}/{r.n_layer}", r.best_value,
                         pen, r.last_value, r.chance.get(r.metric)))
        lines += _md_table(("model", "task", "metric", "items", "best layer", "best", "penultimate", "last",
                            "chance"), rows)
        for model in models:
            rs = [r for r in runs if r.model == model]
            layers = _unique(str(x) for r in rs for x in r.layers)
            lines += ["", f"### Per-layer values: {model}", ""]
            header = ["layer", "relative depth"] + [f"{r.task} ({r.metric})" for r in rs]
            table_rows = []
            n_layer = rs[0].n_layer
            for layer in (int(x) for x in layers):
                row: list[Any] = [layer, layer / n_layer]
                for r in rs:
                    i = r.layers.index(layer) if layer in r.layers else None
                    row.append(None if i is None else float(r.values[r.metric][i]))
                table_rows.append(row)
            lines += _md_table(header, table_rows)
            multi = [r for r in rs if r.metric != "mc2" and "mc2" in r.values and r.multi_true]
            for r in multi:
                lines += ["", f"{r.task} on {model}, all TruthfulQA-style metrics at the best and last layer:", ""]
                b = r.layers.index(r.best_layer) if r.best_layer in r.layers else len(r.layers) - 1
                lines += _md_table(("metric", f"layer {r.layers[b]}", f"layer {r.layers[-1]}", "chance"),
                                   [(m, float(r.values[m][b]), float(r.values[m][-1]), r.chance[m])
                                    for m in ("mc1", "mc2", "mc3") if m in r.values])
    for section, paths in figures.items():
        lines += ["", f"## {section}", ""]
        for p in paths:
            rel = p.relative_to(root) if p.is_relative_to(root) else p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def recompute(run: RunResult) -> dict[str, np.ndarray]:
    """Per-layer metrics recomputed from items.jsonl (a check that summary.json matches its items)."""
    return layer_metrics(run.records, len(run.layers)).values
