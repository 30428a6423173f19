"""Figures for ``lcprobe kld`` results (kld.json): per-layer KLD of each model on relative depth.

Called by ``lcprobe report DIR``; draws from the saved JSON only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError
from lcprobe.results.kld import read_kld


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise LcprobeError("figures need matplotlib: pip install 'lcprobe[plot]'") from exc
    return plt


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if r.get(key) is None else float(r[key]) for r in rows]


def _label(model: dict[str, Any]) -> str:
    bpw = model.get("bpw")
    return f"{model['quant']} ({bpw:.2f} bpw)" if isinstance(bpw, (int, float)) else str(model["quant"])


def draw_kld(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """``figures/kld-layers.png``: lens KLD (mean, and 99th percentile dashed) and the residual's relative
    L2 error after attention and after the block, per layer on relative depth, one colour per model; the
    final llama.cpp KLD is marked at depth 1."""
    root = Path(root)
    data = read_kld(root)
    models = [m for m in data["models"] if m.get("layers")]
    if not models:
        return []
    out = Path(out_dir) if out_dir else root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    n_layer = data["base"].get("n_layer")
    for i, m in enumerate(models):
        rows = m["layers"]
        depth_of = m.get("n_layer") or n_layer
        x = [r["layer"] / depth_of for r in rows]
        color = f"C{i % 10}"
        axes[0].plot(x, _values(rows, "kld_mean"), marker=".", color=color, label=_label(m))
        axes[0].plot(x, _values(rows, "kld_p99"), linestyle="--", color=color, alpha=0.5)
        final = (m.get("final") or {}).get("kld_mean")
        if final is not None and final > 0:
            axes[0].plot([1.0], [final], marker="*", markersize=11, color=color, linestyle="none")
        axes[1].plot(x, _values(rows, "rel_l2_mid"), marker="x", linestyle=":", color=color)
        axes[1].plot(x, _values(rows, "rel_l2"), marker=".", color=color, label=_label(m))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("relative depth (layer / n_layer)")
    axes[0].set_ylabel("KL(base || quantized), nats")
    axes[0].set_title("logit-lens KLD per layer (dashed: 99%; ★ llama.cpp output)")
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("relative depth (layer / n_layer)")
    axes[1].set_ylabel("||h_q - h_base|| / ||h_base||")
    axes[1].set_title("residual error: after attention (x, dotted), after the block (•)")
    axes[1].legend(fontsize=8)
    tx = data.get("text", {})
    fig.suptitle(f"lcprobe kld vs {Path(data['base']['path']).name}: {tx.get('chunks')} chunks of "
                 f"{tx.get('n_ctx')} tokens", fontsize=10)
    fig.tight_layout()
    path = out / "kld-layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
