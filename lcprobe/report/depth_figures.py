"""Figures for ``lcprobe depth`` results (depth.json, skip.json, map.json).

Called by ``lcprobe report DIR``; draws from the saved JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise LcprobeError("figures need matplotlib: pip install 'lcprobe[plot]'") from exc
    return plt


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def _mark_transition(ax: Any, data: dict[str, Any]) -> None:
    t = data.get("transition_layer")
    if t:
        ax.axvline(t - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(t - 0.4, ax.get_ylim()[1], " second half", va="top", fontsize=8, color="grey")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


def draw_depth(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    root = Path(root)
    out = Path(out_dir) if out_dir else root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written: list[Path] = []
    depth = root / "depth.json"
    if depth.is_file():
        data = json.loads(depth.read_text())
        rows = data["layers"]
        layers = [r["layer"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for key, label in (("attn_rel", "||a|| / ||h||"), ("mlp_rel", "||m|| / ||mid||"),
                           ("layer_rel", "||a+m|| / ||h||")):
            axes[0].plot(layers, _series(rows, key), marker=".", label=label)
        axes[0].set_yscale("log")
        axes[0].set_title("relative contribution of each sublayer")
        for key, label in (("attn_cos", "cos(a, h)"), ("mlp_cos", "cos(m, mid)")):
            axes[1].plot(layers, _series(rows, key), marker=".", label=label)
        axes[1].axhline(0, color="black", linewidth=0.5)
        axes[1].set_title("cosine with the residual (<0 erases, >0 amplifies)")
        axes[2].plot(layers, _series(rows, "lens_kl"), marker=".", color="C3", label="KL(final || layer)")
        axes[2].set_ylabel("KL (nats)")
        twin = axes[2].twinx()
        twin.plot(layers, _series(rows, "lens_top5"), marker=".", color="C2", label="top-5 overlap")
        twin.set_ylim(0, 1)
        twin.set_ylabel("top-5 overlap with the final prediction")
        axes[2].set_title("logit lens against the final layer")
        for ax in axes:
            ax.set_xlabel("layer")
            ax.legend(loc="best", fontsize=8)
            _mark_transition(ax, data)
        fig.suptitle(f"{Path(str(data.get('model', root.name))).name}: how the layers use the residual stream "
                     f"({data.get('n_tokens')} tokens)")
        written.append(_save(plt, fig, out / "depth.png"))
    skip = root / "skip.json"
    if skip.is_file():
        data = json.loads(skip.read_text())
        import numpy as np

        mat = np.array([[np.nan if v is None else v for v in row] for row in data["later_change_mean"]])
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        im = axes[0].imshow(mat, aspect="auto", cmap="viridis", origin="lower",
                            extent=(0.5, mat.shape[1] + 0.5, 0, len(data["skipped"])))
        axes[0].set_yticks(np.arange(len(data["skipped"])) + 0.5, [str(s) for s in data["skipped"]])
        axes[0].set_xlabel("later layer l")
        axes[0].set_ylabel("skipped layer S")
        axes[0].set_title("relative change of layer l's contribution (mean over positions)")
        fig.colorbar(im, ax=axes[0])
        axes[1].plot(data["skipped"], data["output_kl_current"], marker="o", label="current token")
        axes[1].plot(data["skipped"], data["output_kl_future"], marker="o", label="future tokens")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("skipped layer S")
        axes[1].set_ylabel("KL(normal || skipped)")
        axes[1].set_title("effect of skipping a layer on the output")
        axes[1].legend()
        written.append(_save(plt, fig, out / "skip.png"))
    mp = root / "map.json"
    if mp.is_file():
        import numpy as np

        data = json.loads(mp.read_text())
        r2 = np.array([[np.nan if v is None else v for v in row] for row in data["r2"]])
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(r2.T, origin="lower", aspect="auto", vmin=max(0.0, np.nanmin(r2)), vmax=1.0,
                       extent=(0.5, r2.shape[0] + 0.5, 0.5, r2.shape[1] + 0.5))
        ax.set_xlabel("layer i of model A")
        ax.set_ylabel("layer j of model B")
        ax.set_title("R² of a linear map from A's layer i to B's layer j")
        fig.colorbar(im, ax=ax)
        written.append(_save(plt, fig, out / "map.png"))
    return written
