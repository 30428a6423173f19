"""A comparison directory's files: compare.json and the long table compare.csv."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic

COMPARE_JSON = "compare.json"
COMPARE_CSV = "compare.csv"
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
