"""Joining the run directories of ``--shard I/N`` runs into the one an unsharded run writes.

Reads files only. A shard's summary.json carries ``"shard": {"index", "count",
"items_fit", "positions"}``: ``positions`` are the item indices (into the
task's item list, as ``[start, stop)`` ranges) of its items.jsonl lines, in
order. The merge checks that the shards are parts of one run (run.json equal
apart from the shard, each part present once, each complete, the positions
disjoint and covering every item that fits the context), then writes
items.jsonl from the shards' own lines in item order (so byte-identical to an
unsharded run, whose batches the shards decoded unchanged) and summary.json
recomputed from them through :func:`write_summary`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lcprobe.errors import LcprobeError
from lcprobe.files.atomic import write_atomic
from lcprobe.results.run import ITEMS, RUN, SUMMARY, breakdown, write_summary


class MergeError(LcprobeError):
    """The directories given to merge are not the parts of one run."""


def to_ranges(positions: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 2, 7, 8]`` -> ``[[0, 3], [7, 9]]`` (half-open, in the given order)."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def from_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [p for a, b in ranges for p in range(a, b)]


def shard_range(total: int, index: int, count: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` (1-based) of ``count`` contiguous parts of ``total`` units.

    Depends on nothing but the three numbers, so every machine cuts the same
    parts; they differ in size by at most one unit, and one is empty only when
    ``count > total``.
    """
    return (index - 1) * total // count, index * total // count


def check_indices(parts: Sequence[tuple[Path, int, int]]) -> None:
    """Raise unless ``(dir, index, count)`` are every part of one count, each once."""
    if not parts:
        raise MergeError("nothing to merge")
    d0, _, n0 = parts[0]
    for d, _, n in parts[1:]:
        if n != n0:
            raise MergeError(f"{d} is a shard of {n}, {d0} of {n0}")
    seen: dict[int, Path] = {}
    for d, i, n in parts:
        if i in seen:
            raise MergeError(f"shard {i}/{n} given twice: {seen[i]} and {d}")
        seen[i] = d
    missing = sorted(set(range(1, n0 + 1)) - set(seen))
    if missing:
        raise MergeError(f"shard(s) {', '.join(f'{i}/{n0}' for i in missing)} missing")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{path} not found: not a finished run directory") from None
    except ValueError as exc:
        raise MergeError(f"{path} is not valid JSON ({exc})") from None


class Shard:
    """One shard's files, read and checked for internal consistency."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.key: dict[str, Any] = _read_json(self.dir / RUN)
        self.summary: dict[str, Any] = _read_json(self.dir / SUMMARY)
        info = self.summary.get("shard")
        if not isinstance(info, dict) or "shard" not in self.key:
            raise MergeError(f"{self.dir} is not a shard (run without --shard I/N)")
        self.index, self.count = int(info["index"]), int(info["count"])
        self.items_fit = int(info["items_fit"])
        self.positions = from_ranges(info["positions"])
        if not self.summary.get("complete"):
            raise MergeError(f"shard {self.index}/{self.count} in {self.dir} is incomplete; "
                             "finish it with the same command plus --resume")
        raw = (self.dir / ITEMS).read_bytes() if (self.dir / ITEMS).exists() else b""
        if raw and not raw.endswith(b"\n"):
            raise MergeError(f"{self.dir / ITEMS} ends in a torn line; finish the shard with --resume")
        self.lines = raw.splitlines(keepends=True)
        if len(self.lines) != len(self.positions):
            raise MergeError(f"{self.dir / ITEMS} has {len(self.lines)} items, its summary.json lists "
                             f"{len(self.positions)}")

    @property
    def base_key(self) -> dict[str, Any]:
        return {k: v for k, v in self.key.items() if k != "shard"}


def check_partition(shards: Sequence[Shard]) -> None:
    """Raise unless the shards are every part of one run, once each, disjoint and complete."""
    if not shards:
        raise MergeError("nothing to merge")
    first = shards[0]
    for s in shards[1:]:
        if s.base_key != first.base_key:
            diff = sorted(k for k in set(s.base_key) | set(first.base_key)
                          if s.base_key.get(k) != first.base_key.get(k))
            raise MergeError(f"{s.dir} and {first.dir} are not shards of one run: different {', '.join(diff)}")
        if s.count != first.count:
            raise MergeError(f"{s.dir} is a shard of {s.count}, {first.dir} of {first.count}")
        if s.items_fit != first.items_fit:
            raise MergeError(f"{s.dir} and {first.dir} disagree on the number of items ({s.items_fit} vs "
                             f"{first.items_fit})")
    check_indices([(s.dir, s.index, s.count) for s in shards])
    owner: dict[int, Path] = {}
    for s in shards:
        for p in s.positions:
            if p in owner:
                raise MergeError(f"item {p} is in two shards ({owner[p]} and {s.dir})")
            owner[p] = s.dir
    if len(owner) != first.items_fit:
        raise MergeError(f"the shards hold {len(owner)} items, the run has {first.items_fit}")


def merged_timing(shards: Sequence[Shard], n_items: int) -> dict[str, Any]:
    """Seconds and tokens summed over the shards (machine time, not wall time)."""
    out: dict[str, Any] = {}
    for s in shards:
        for k, v in s.summary.get("timing", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    for k, v in out.items():
        if isinstance(v, float):
            out[k] = round(v, 3)
    if "seconds_per_item" in out:
        probe = out.get("seconds_probe")
        out["seconds_per_item"] = round(probe / n_items, 4) if probe and n_items else None
    out["shards"] = len(shards)
    return out


def merge_run(dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge shard run directories into ``out_dir``; return the merged summary."""
    out = Path(out_dir)
    shards = sorted((Shard(d) for d in dirs), key=lambda s: s.index)
    if any(out.resolve() == s.dir.resolve() for s in shards):
        raise MergeError(f"-o {out} is one of the shards; write the merge elsewhere")
    check_partition(shards)
    lines = sorted((p, line) for s in shards for p, line in zip(s.positions, s.lines))
    records = [json.loads(line) for _, line in lines]
    summary = shards[0].summary
    keys = list(summary)
    if "layers" not in keys or "n_items" not in keys:
        raise MergeError(f"{shards[0].dir / SUMMARY} lacks 'layers' or 'n_items'")
    header = {k: summary[k] for k in keys[: keys.index("layers")]}
    layers = [row["layer"] for row in summary["layers"]]
    extra: dict[str, Any] = {}
    for k in keys[keys.index("n_items") + 1:]:
        if k == "shard":
            continue
        if k == "timing":
            extra[k] = merged_timing(shards, len(records))
        elif k == "breakdown":
            names = sorted({name for s in shards for name in s.summary.get("breakdown", {})})
            extra[k] = breakdown(records, names)
        else:
            extra[k] = summary[k]
    extra["complete"] = True
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ITEMS, b"".join(line for _, line in lines))
    write_atomic(out / RUN, json.dumps(shards[0].base_key, indent=1, sort_keys=True) + "\n")
    return write_summary(out, header, layers, summary["metric"], records, extra)
