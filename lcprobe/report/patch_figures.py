"""The causal-tracing figure of ``lcprobe patch`` (patch.json): restored fraction, layers x positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lcprobe.report.depth_figures import _plt


def draw_patch(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    root = Path(root)
    src = root / "patch.json"
    if not src.is_file():
        return []
    data = json.loads(src.read_text())
    out = Path(out_dir) if out_dir else root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    sites = data["sites"]
    labels = [repr(t)[1:-1] for t in data["tokens"]]
    layers = data["layers"]
    fig, axes = plt.subplots(1, len(sites), figsize=(1.2 + 0.55 * len(labels) * len(sites) + 1.5 * len(sites),
                                                    1.5 + 0.18 * len(layers)), squeeze=False)
    for ax, (site, grid) in zip(axes[0], sites.items()):
        a = np.asarray(grid, dtype=float)
        lim = max(1.0, float(np.nanmax(np.abs(a))) if a.size else 1.0)
        im = ax.imshow(a, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        step = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), step), [str(v) for v in layers[::step]], fontsize=8)
        ax.set_xlabel("position (corrupted prompt's tokens)")
        ax.set_ylabel("layer")
        ax.set_title(site)
        fig.colorbar(im, ax=ax, label="restored fraction of the logit difference")
    fig.suptitle(f"activation patching: {data.get('answer')!r} vs {data.get('wrong')!r} "
                 f"(clean {data['clean_diff']:.2f}, corrupt {data['corrupt_diff']:.2f})", fontsize=10)
    fig.tight_layout()
    path = out / "patch.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
