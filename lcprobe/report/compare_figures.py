"""Figures of a ``lcprobe compare`` directory (matplotlib, imported only here).

:func:`draw_compare` reads ``DIR/compare.json`` and writes, one panel per task:

- ``compare_kl.png``: KL(reference lens || model lens) over layers, one line per model (log scale);
- ``compare_cosine.png``: cosine similarity of the hidden states over layers, one line per model;
- ``compare_kl_heatmap.png``: layer x model heatmap of KL (log colour scale);
- ``compare_metric.png``: the task metric over layers per model with the reference in black,
  layers where McNemar's p < 0.05 marked.

Models of another depth are drawn on relative depth (layer / n_layer) in the
metric figure and left out of the representation figures, which they lack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError


def _matplotlib() -> Any:
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as exc:  # the optional 'plot' extra
        raise LcprobeError("drawing figures needs matplotlib: pip install 'lcprobe[plot]' "
                           "(or pip install matplotlib)") from exc
    return Figure, LogNorm


def draw_compare(dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the comparison figures of ``dir`` into ``out_dir`` (default ``dir/figures``); returns their paths."""
    import numpy as np

    from lcprobe.results.compare import ALPHA, read_compare

    Figure, LogNorm = _matplotlib()
    result = read_compare(dir)
    tasks = [(name, tr) for name, tr in result["tasks"].items() if len(tr["models"]) >= 2]
    if not tasks:
        raise LcprobeError(f"{dir}/compare.json has no task with a compared model")
    out = Path(out_dir) if out_dir is not None else Path(dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ref_n_layer = tasks[0][1]["models"][0]["n_layer"]
    mixed = any(m["n_layer"] != ref_n_layer for _, tr in tasks for m in tr["models"])
    colours = _colours([m["label"] for m in tasks[0][1]["models"][1:]])

    def panels(title: str, ylabel: str) -> tuple[Any, list[Any]]:
        n = len(tasks)
        fig = Figure(figsize=(7.5, 3.2 * n), layout="constrained")
        axes = [fig.add_subplot(n, 1, i + 1) for i in range(n)]
        fig.suptitle(title)
        for ax in axes:
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("relative depth (layer / n_layer)" if mixed else "layer")
        return fig, axes

    def x_of(m: dict[str, Any]) -> list[float]:
        return [r["rel_depth"] if mixed else r["layer"] for r in m["layers"]]

    # KL and cosine over layers
    for key, title, ylabel, log in (("kl", "KL(reference lens || model lens) on the scored rows", "KL (nats)", True),
                                    ("cosine", "cosine similarity of hidden states with the reference",
                                     "cosine", False)):
        fig, axes = panels(title, ylabel)
        drawn = False
        for ax, (name, tr) in zip(axes, tasks):
            ax.set_title(f"{name} ({tr['rows_compared']} rows of {tr['items_with_rows']} items)", fontsize=10)
            for m in tr["models"][1:]:
                pts = [(x, r[key]) for x, r in zip(x_of(m), m["layers"]) if r[key] is not None]
                if log:
                    pts = [(x, v) for x, v in pts if v > 0]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=m["label"], color=colours[m["label"]])
                    drawn = True
            if log and ax.has_data():
                ax.set_yscale("log")
            if ax.has_data():
                ax.legend(fontsize=8)
        if drawn:
            written.append(_save(fig, out / f"compare_{'kl' if key == 'kl' else 'cosine'}.png"))

    # layer x model heatmap of KL
    fig = Figure(figsize=(7.5, 2.2 + 0.4 * len(tasks) * len(colours)), layout="constrained")
    drawn = False
    for i, (name, tr) in enumerate(tasks):
        models = [m for m in tr["models"][1:] if any(r["kl"] is not None for r in m["layers"])]
        if not models:
            continue
        grid = np.array([[r["kl"] if r["kl"] else np.nan for r in m["layers"]] for m in models], dtype=float)
        positive = grid[np.isfinite(grid) & (grid > 0)]
        if positive.size == 0:
            continue
        ax = fig.add_subplot(len(tasks), 1, i + 1)
        norm = LogNorm(vmin=max(positive.min(), 1e-6), vmax=positive.max())
        layers = [r["layer"] for r in models[0]["layers"]]
        im = ax.imshow(grid, aspect="auto", norm=norm, cmap="magma_r", interpolation="nearest",
                       extent=(layers[0] - 0.5, layers[-1] + 0.5, len(models) - 0.5, -0.5))
        ax.set_yticks(range(len(models)), [m["label"] for m in models])
        ax.set_xlabel("layer")
        ax.set_title(f"{name}: KL per layer and model (nats)", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9)
        drawn = True
    if drawn:
        written.append(_save(fig, out / "compare_kl_heatmap.png"))

    # task metric over layers, reference included
    fig, axes = panels("task metric over layers (reference in black; o: p < 0.05 vs reference)", "metric")
    for ax, (name, tr) in zip(axes, tasks):
        ax.set_title(f"{name}: {tr['metric']} ({tr['n_items']} items)", fontsize=10)
        ref = tr["models"][0]
        ax.plot(x_of(ref), [r["metric"] for r in ref["layers"]], color="black", linewidth=2,
                label=f"{ref['label']} (reference)")
        for m in tr["models"][1:]:
            xs, ys = x_of(m), [r["metric"] for r in m["layers"]]
            ax.plot(xs, ys, label=m["label"], color=colours[m["label"]], linewidth=1)
            sig = [(x, y) for x, y, r in zip(xs, ys, m["layers"])
                   if r["mcnemar_p"] is not None and r["mcnemar_p"] < ALPHA]
            if sig:
                ax.scatter(*zip(*sig), color=colours[m["label"]], s=18, zorder=3)
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "compare_metric.png"))
    return written


def _colours(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(1, len(labels) - 1)
    # dark = listed first (usually the most bits, closest to the reference), light = last
    return {label: cmap(0.85 * i / n) for i, label in enumerate(labels)}


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path

