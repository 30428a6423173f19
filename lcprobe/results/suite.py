"""A suite directory's files: suite.json (models x tasks, per-layer values) and suite.csv."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic

#: One task per family of Chen et al. (a suite without -T runs these).
DEFAULT_TASKS = ("calc", "mps-cal", "xmps-cal-zh", "reclor", "truthfulqa-mc", "lama")
SUITE_JSON = "suite.json"
SUITE_CSV = "suite.csv"
SUITE_VERSION = 1
CSV_COLUMNS = ("model", "task", "layer", "relative_depth", "metric", "value")


def suite_rows(suite: dict[str, Any]) -> list[tuple[Any, ...]]:
    """suite.csv's rows: one per model, task and layer, the task's own metric."""
    rows = []
    for m in suite["models"]:
        for name, e in m["tasks"].items():
            for layer, depth, value in zip(e["layers"], e["relative_depth"], e["values"]):
                rows.append((m["model"], name, layer, depth, e["metric"], "" if value is None else value))
    return rows


def write_suite(out_dir: Path, suite: dict[str, Any]) -> None:
    """suite.json and suite.csv, each replaced atomically."""
    write_atomic(out_dir / SUITE_JSON, json.dumps(suite, indent=1, ensure_ascii=False) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(suite_rows(suite))
    write_atomic(out_dir / SUITE_CSV, buf.getvalue())



def read_suite(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / SUITE_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LcprobeError(f"{path} not found: not a suite directory") from None
    except ValueError as exc:
        raise LcprobeError(f"{path} is not valid JSON ({exc})") from None
