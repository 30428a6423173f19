"""Run directories: items.jsonl written as items finish, summary.json derived from it.

``items.jsonl`` is the source of truth: one line per item with the raw
per-layer log-likelihood of every choice. Every metric in ``summary.json`` is
recomputed from it, so a resumed run and an uninterrupted one agree, and any
metric can be recomputed later without the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import metrics
from .errors import LcprobeError
from .runner import ItemResult

ITEMS = "items.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"


def item_line(r: ItemResult) -> str:
    rec = {
        "id": r.id,
        "choices": r.choices,
        "correct": r.correct,
        "logprobs": [[float(np.float32(v)) for v in row] for row in r.scores],
        "n_tokens": r.n_tokens,
        "n_bytes": r.n_bytes,
    }
    if r.meta:
        rec["meta"] = r.meta
    return json.dumps(rec, ensure_ascii=False) + "\n"


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete lines of an items.jsonl (a torn last line from a crash is ignored)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            out.append(json.loads(line))
    return out


class RunWriter:
    """Appends items to ``DIR/items.jsonl``, resuming only a run of the same key."""

    def __init__(self, out_dir: str | os.PathLike, run_key: dict[str, Any], resume: bool) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items_path = self.dir / ITEMS
        run_path = self.dir / RUN
        self.done: list[dict[str, Any]] = []
        if resume and run_path.exists():
            old = json.loads(run_path.read_text())
            if old != run_key:
                diff = sorted(k for k in set(old) | set(run_key) if old.get(k) != run_key.get(k))
                raise LcprobeError(
                    f"{self.dir} holds a run with a different {', '.join(diff)}; "
                    "use another -o/--output directory or drop --resume"
                )
            self.done = read_items(self.items_path)
            self._truncate_to_complete_lines()
        elif self.items_path.exists() and self.items_path.stat().st_size and not resume:
            # A fresh run replaces the old one; keep nothing stale around.
            self.items_path.unlink()
            (self.dir / SUMMARY).unlink(missing_ok=True)
        elif resume and not run_path.exists() and self.items_path.exists():
            raise LcprobeError(f"{self.dir} has items but no {RUN}; cannot resume it safely")
        run_path.write_text(json.dumps(run_key, indent=1, sort_keys=True) + "\n")
        self._fh = open(self.items_path, "a", encoding="utf-8")

    def _truncate_to_complete_lines(self) -> None:
        if not self.items_path.exists():
            return
        data = self.items_path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.items_path, "r+b") as fh:
                fh.truncate(keep)

    @property
    def done_ids(self) -> set[str]:
        return {d["id"] for d in self.done}

    def write(self, results: Iterable[ItemResult]) -> None:
        for r in results:
            self._fh.write(item_line(r))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


@dataclass
class LayerTable:
    values: dict[str, np.ndarray]  # metric -> (n_layers,)
    n_items: int


def layer_metrics(records: list[dict[str, Any]], n_layers: int) -> LayerTable:
    """Per-layer mean of every metric over items.jsonl records."""
    per_item = []
    for rec in records:
        scores = np.asarray(rec["logprobs"], dtype=np.float64)
        per_item.append(metrics.item_metrics(scores, rec["correct"], rec["n_tokens"], rec["n_bytes"]))
    if per_item:
        values = metrics.aggregate(per_item)
    else:
        values = {m: np.full(n_layers, np.nan) for m in metrics.METRICS}
    return LayerTable(values=values, n_items=len(records))


def breakdown(records: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, list[float]]]:
    """Per-layer accuracy for each value of each meta key (e.g. calc's op/type/digits)."""
    out: dict[str, dict[str, list[float]]] = {}
    for key in keys:
        groups: dict[str, list[dict]] = {}
        for rec in records:
            v = rec.get("meta", {}).get(key)
            if v is not None:
                groups.setdefault(str(v), []).append(rec)
        if groups:
            out[key] = {
                v: [round(float(x), 6) for x in layer_metrics(recs, 0).values["acc"]]
                for v, recs in sorted(groups.items())
            }
    return out


def write_summary(out_dir: str | os.PathLike, header: dict[str, Any], layers: list[int],
                  metric: str, records: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    table = layer_metrics(records, len(layers))
    rows = []
    for i, layer in enumerate(layers):
        row: dict[str, Any] = {"layer": layer}
        for m in metrics.METRICS:
            v = float(table.values[m][i])
            row[m] = None if np.isnan(v) else round(v, 6)
        rows.append(row)
    values = table.values[metric]
    best = metrics.best_layer(values) if records else 0
    summary = dict(header)
    summary.update(
        {
            "layers": rows,
            "metric": metric,
            "best_layer": layers[best] if records else None,
            "best_value": round(float(values[best]), 6) if records else None,
            "last_value": round(float(values[-1]), 6) if records else None,
            "n_items": table.n_items,
        }
    )
    summary.update(extra)
    path = Path(out_dir) / SUMMARY
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return summary
