"""Run directories: items.jsonl written as items finish, summary.json derived from it.

``items.jsonl`` is the source of truth: one line per item with the raw
per-layer log-likelihood of every choice. Every metric in ``summary.json`` is
recomputed from it, so a resumed run and an uninterrupted one agree, and any
metric can be recomputed later without the model.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lcprobe.analysis import metrics
from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic

ITEMS = "items.jsonl"
SUMMARY = "summary.json"
RUN = "run.json"


@dataclass
class ItemResult:
    id: str
    choices: list[str]
    correct: list[int]
    scores: np.ndarray  # (n_choices, n_layers): summed continuation log-probs
    n_tokens: list[int]
    n_bytes: list[int]
    meta: dict = field(default_factory=dict)


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


# Fault injection for tests/test_faults.py: LCPROBE_FAULT names the point where
# the process SIGKILLs itself (before-items, after-group:N, torn-line:N, summary).
FAULT_ENV = "LCPROBE_FAULT"


def _fault(point: str) -> bool:
    return os.environ.get(FAULT_ENV) == point


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def write_error(path: Path, exc: OSError, n_saved: int | None = None) -> LcprobeError:
    """One line for a failed write: what, why, and that --resume continues."""
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    kept = f"; the {n_saved} finished items are kept" if n_saved is not None else ""
    hint = " (free some space, then rerun with --resume)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
        " (make it writable, then rerun with --resume)" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        else "")
    return LcprobeError(f"cannot write {path}: {why}{kept}{hint}")


def _discard(path: Path) -> None:
    """Remove a half-written temporary file (it would hold on to the space that ran out)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _complete_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of an items.jsonl up to its first torn or unparsable line, and their byte length.

    A crash or a full disk can leave the last line cut short (no newline) or,
    after a power loss, garbage; that line is dropped, never parsed into a
    result. A bad line followed by good ones is not a crash artefact: refused.
    """
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out, 0
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            rec = json.loads(data[pos:end].decode("utf-8"))
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not an item record")
        except ValueError:
            if data.find(b"\n", end + 1) >= 0:
                line = data.count(b"\n", 0, pos) + 1
                raise LcprobeError(f"{path} line {line} is not a valid item record") from None
            break
        out.append(rec)
        pos = end + 1
    return out, pos


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete lines of an items.jsonl (a torn last line from a crash is ignored)."""
    return _complete_records(Path(path))[0]


class RunWriter:
    """Appends items to ``DIR/items.jsonl``, resuming only a run of the same key."""

    def __init__(self, out_dir: str | os.PathLike, run_key: dict[str, Any], resume: bool) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items_path = self.dir / ITEMS
        run_path = self.dir / RUN
        self.done: list[dict[str, Any]] = []
        if resume and run_path.exists():
            try:
                old = json.loads(run_path.read_text())
            except (ValueError, UnicodeDecodeError):
                raise LcprobeError(f"{run_path} is unreadable, so the run cannot be resumed; drop --resume") from None
            if old != run_key:
                diff = sorted(k for k in set(old) | set(run_key) if old.get(k) != run_key.get(k))
                raise LcprobeError(
                    f"{self.dir} holds a run with a different {', '.join(diff)}; "
                    "use another -o/--output directory or drop --resume"
                )
            self.done, keep = _complete_records(self.items_path)
            self._truncate(keep)
        elif resume and not run_path.exists() and self.items_path.exists():
            raise LcprobeError(f"{self.dir} has items but no {RUN}; cannot resume it safely")
        try:
            if not resume and self.items_path.exists():
                # A fresh run replaces the old one; keep nothing stale around.
                self.items_path.unlink()
                (self.dir / SUMMARY).unlink(missing_ok=True)
            write_atomic(run_path, json.dumps(run_key, indent=1, sort_keys=True) + "\n")
            self._fh = open(self.items_path, "ab")
        except OSError as exc:
            _discard(run_path.with_name(run_path.name + ".tmp"))
            raise write_error(self.dir, exc) from exc
        self._size = self._fh.tell()
        self._n = len(self.done)
        self._groups = 0
        if _fault("before-items"):
            _die()

    def _truncate(self, keep: int) -> None:
        if self.items_path.exists() and self.items_path.stat().st_size != keep:
            with open(self.items_path, "r+b") as fh:
                fh.truncate(keep)

    @property
    def done_ids(self) -> set[str]:
        return {d["id"] for d in self.done}

    def write(self, results: Iterable[ItemResult]) -> None:
        """Append a group's items and fsync them: once this returns they survive any crash.

        On a failed write (disk full, file system gone read-only) the file is
        cut back to the last complete item and a one-line error is raised.
        """
        data = b"".join(item_line(r).encode("utf-8") for r in results)
        n = data.count(b"\n")
        self._groups += 1
        if _fault(f"torn-line:{self._groups}"):
            self._fh.write(data[: max(1, len(data.split(b"\n", 1)[0]) // 2)])
            self._fh.flush()
            os.fsync(self._fh.fileno())
            _die()
        try:
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._recover(exc)
        self._size += len(data)
        self._n += n
        if _fault(f"after-group:{self._groups}"):
            _die()

    def _recover(self, exc: OSError) -> None:
        # The buffer may still hold part of the group: drop it, then cut the
        # file back to the items that were complete before this group.
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            fd = os.open(self.items_path, os.O_WRONLY)
            try:
                os.ftruncate(fd, self._size)
            finally:
                os.close(fd)
        except OSError:
            pass  # resume drops a torn tail anyway
        self._fh = None
        raise write_error(self.items_path, exc, self._n) from exc

    def close(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            fh.close()
        except OSError as exc:
            raise write_error(self.items_path, exc, self._n) from exc


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
    text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    path = Path(out_dir) / SUMMARY
    if _fault("summary"):
        with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as fh:
            fh.write(text[: len(text) // 2])
        _die()
    try:
        write_atomic(path, text)
    except OSError as exc:
        _discard(path.with_name(path.name + ".tmp"))
        raise write_error(path, exc, len(records)) from exc
    return summary
