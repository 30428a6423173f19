"""Figures of ``lcprobe steer eval`` (steer.json): per-layer metric by scale, and KL by scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lcprobe.report.depth_figures import _plt


def draw_steer(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    root = Path(root)
    src = root / "steer.json"
    if not src.is_file():
        return []
    data = json.loads(src.read_text())
    out = Path(out_dir) if out_dir else root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    rows = sorted(data["rows"], key=lambda r: r["scale"])
    metric = rows[0].get("metric") or "acc"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    cmap = plt.get_cmap("coolwarm")
    smax = max(abs(r["scale"]) for r in rows) or 1.0
    for r in rows:
        layers = [la["layer"] for la in r["layers"]]
        vals = [np.nan if la.get(metric) is None else la[metric] for la in r["layers"]]
        color = "black" if r["scale"] == 0 else cmap(0.5 + 0.5 * r["scale"] / smax)
        ax.plot(layers, vals, color=color, label=f"scale {r['scale']:g}", linewidth=1.6 if r["scale"] == 0 else 1.1)
        sig = [(layer, v) for layer, v, t in zip(layers, vals, r["mcnemar_vs_0"]) if t["p"] < 0.05]
        if sig and r["scale"] != 0:
            ax.scatter(*zip(*sig), color=color, s=14, zorder=3)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_title(f"{data['task']}: {metric} per layer (dots: McNemar p < 0.05 against scale 0)")
    ax.legend(fontsize=8)
    ax2.plot([r["scale"] for r in rows], [r["kl"] for r in rows], marker="o")
    ax2.set_xlabel("scale")
    ax2.set_ylabel("KL(unsteered || steered), nats")
    ax2.set_title("final-layer KL on the prompts")
    fig.tight_layout()
    path = out / "steer.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
