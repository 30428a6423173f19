"""``DIR/kld.json``: what ``lcprobe kld`` measured (layout in :mod:`lcprobe.studies.kld`).

A ``--shard I/N`` run also writes ``DIR/kld-values.npz``: the per-token values
its statistics come from (``m<k>.<name>`` for quantized model k's final
block, ``m<k>.l<j>.<name>`` for its j-th per-layer row). Medians and
percentiles need every value, and float sums are only reproducible from the
values themselves, so ``lcprobe merge`` recomputes the statistics from the
concatenated values rather than from the shards' summaries.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic

KLD_JSON = "kld.json"
KLD_VALUES = "kld-values.npz"
TEXT_KEYS = ("path", "sha256", "n_ctx", "chunks", "tokens_scored")
MODEL_KEYS = ("path", "quant", "bpw", "final", "layers")


def _clean(x: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_kld(out_dir: str | Path, result: dict[str, Any]) -> Path:
    path = Path(out_dir) / KLD_JSON
    write_atomic(path, json.dumps(_clean(result), indent=1, ensure_ascii=False) + "\n")
    return path


def read_kld(out_dir: str | Path) -> dict[str, Any]:
    """kld.json of ``out_dir``, checked for the keys the report and readers use."""
    p = Path(out_dir) / KLD_JSON
    if not p.is_file():
        raise LcprobeError(f"{out_dir} has no {KLD_JSON} (run 'lcprobe kld -o {out_dir}' first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcprobeError(f"{p}: not a readable kld.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or "text" not in data:
        raise LcprobeError(f"{p}: not a kld.json (no 'text' and 'models')")
    for m in data["models"]:
        missing = [k for k in MODEL_KEYS if k not in m]
        if missing:
            raise LcprobeError(f"{p}: a model entry lacks {', '.join(missing)}")
    return data


def write_values(out_dir: str | Path, values: dict[str, np.ndarray]) -> Path:
    """A shard's per-token values, written atomically (uncompressed: they are float noise)."""
    buf = io.BytesIO()
    np.savez(buf, **values)
    path = Path(out_dir) / KLD_VALUES
    write_atomic(path, buf.getvalue())
    return path


def read_values(out_dir: str | Path) -> dict[str, np.ndarray]:
    p = Path(out_dir) / KLD_VALUES
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise LcprobeError(f"{p} not found: the shard's per-token values are needed to merge it") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LcprobeError(f"{p}: not readable ({exc})") from None
