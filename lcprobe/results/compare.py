"""A comparison directory's files: compare.json and the long table compare.csv.

A ``--shard I/N`` comparison also writes ``compare-sums.npz``: for each task and
compared model, the float64 per-item sums of the representation measures
(``t<i>.m<k>.ids``, ``.rows``, ``.sums`` of shape ``(items, 4, layers)`` in the
order kl, cosine, rel_l2, top1). compare.json keeps only 6-digit means, so
``lcprobe merge`` re-adds these sums in the unsharded run's item order instead.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic

COMPARE_JSON = "compare.json"
COMPARE_CSV = "compare.csv"
COMPARE_SUMS = "compare-sums.npz"
DEFAULT_MAX_ROWS = 2000  # reference rows kept on disk per task
DEFAULT_KL_THRESHOLD = 0.1  # nats: what a verdict calls a divergence
ALPHA = 0.05  # significance level of the paired tests, recorded in compare.json
CSV_COLUMNS = ("task", "model", "label", "quant", "reference", "layer", "rel_depth", "ref_layer",
               "metric_name", "metric", "ref_metric", "delta", "mcnemar_p", "flips_gained", "flips_lost",
               "kl", "cosine", "rel_l2", "top1")


def compare_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The long table behind compare.csv: one dict per task x model x layer."""
    out = []
    for task, tr in result["tasks"].items():
        for m in tr["models"]:
            for r in m["layers"]:
                out.append({"task": task, "model": m["path"], "label": m["label"], "quant": m["quant"],
                            "reference": m["reference"], "metric_name": tr["metric"], **r})
    return out


def write_compare(out_dir: Path, result: dict[str, Any]) -> None:
    write_atomic(out_dir / COMPARE_JSON, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in compare_rows(result):
        w.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    write_atomic(out_dir / COMPARE_CSV, buf.getvalue())



def read_compare(out_dir: str | Path) -> dict[str, Any]:
    p = Path(out_dir) / COMPARE_JSON
    if not p.exists():
        raise LcprobeError(f"{out_dir} has no {COMPARE_JSON} (run 'lcprobe compare -o {out_dir}' first)")
    return json.loads(p.read_text(encoding="utf-8"))


def sums_key(task_index: int, model_index: int) -> str:
    """The prefix of one task x model's arrays in compare-sums.npz."""
    return f"t{task_index}.m{model_index}"


def write_sums(out_dir: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """A shard's per-item representation sums, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(out_dir) / COMPARE_SUMS
    write_atomic(path, buf.getvalue())
    return path


def read_sums(out_dir: str | Path) -> dict[str, np.ndarray] | None:
    """compare-sums.npz of ``out_dir``, or None when it has none (a shard written before it existed)."""
    p = Path(out_dir) / COMPARE_SUMS
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LcprobeError(f"{p}: not readable ({exc})") from None
