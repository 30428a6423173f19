"""Running a task on a loaded model into a result directory.

``run``, ``suite``, ``compare`` and :meth:`lcprobe.Model.run_task` all go
through here: load once with :func:`lcprobe.llama.loader.open_model`, then
:func:`run_task` per task. Quiet by design: progress
and stop requests are callbacks, so the CLI can draw and a library user can
ignore them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcprobe import __version__

from lcprobe.analysis import metrics
from lcprobe.llama.engine import EngineConfig, check_sites_exist, llama_cpp_version, resolve_gpu_layers
from lcprobe.llama.loader import LoadedModel, LoadOptions
from lcprobe.errors import LcprobeError
from lcprobe.analysis.lens import Lens
from lcprobe.files.modelfile import ModelInfo
from lcprobe.interventions.apply import active_record
from lcprobe.results.lock import locks_output
from lcprobe.results.run import RunWriter, breakdown, item_line, read_items, write_summary
from lcprobe.probing.runner import ItemResult, ProbeStats, Prober
from lcprobe.sites import parse_layers
from lcprobe.tasks.task import Item, Task


@dataclass
class ProbeOptions:
    layers: str | None = None  # e.g. "1:10,20,-1"
    lens: str = "final-norm"
    lens_backend: str = "numpy"
    site: str = "resid_post"
    limit: int | None = None
    seed: int = 0
    n_ctx: int = 2048
    n_batch: int = 512
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_seq_max: int = 64
    kv_type: str = "f16"
    flash_attn: str = "off"
    memory_check: bool = True  # refuse, with the plan's numbers, a model that does not fit
    shard: tuple[int, int] | None = None  # (i, n): score only the i-th of n parts; 'lcprobe merge' joins them
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers holding the offloaded layers ("host:port")
    tensor_split: tuple[float, ...] = ()  # share of the offloaded layers per device

    def __post_init__(self) -> None:
        self.n_gpu_layers = resolve_gpu_layers(self.n_gpu_layers)  # "auto" -> a number, once

    def load_options(self) -> LoadOptions:
        return LoadOptions(n_ctx=self.n_ctx, n_batch=self.n_batch, n_seq_max=self.n_seq_max,
                           n_gpu_layers=self.n_gpu_layers, n_threads=self.n_threads, kv_type=self.kv_type,
                           flash_attn=self.flash_attn, lens_backend=self.lens_backend,
                           memory_check=self.memory_check, layers=self.layers, rpc=tuple(self.rpc),
                           tensor_split=tuple(self.tensor_split))

    def engine_config(self) -> EngineConfig:
        return self.load_options().engine_config()


@dataclass
class RunOutcome:
    summary: dict[str, Any]
    out_dir: Path
    interrupted: bool
    stats: ProbeStats
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def items(self) -> list[dict[str, Any]]:
        """The items.jsonl records, as written."""
        return self.records


def versions() -> dict[str, str]:
    return {"lcprobe": __version__, "llama_cpp_python": llama_cpp_version()}


def run_key(sha256: str, info: ModelInfo, task: Task, options: ProbeOptions, n_items: int) -> dict[str, Any]:
    """What identifies a run directory (its run.json): ``--resume`` refuses one whose key differs."""
    return {
        "model_sha256": sha256, "task": task.name, "task_hash": task.hash(), "lens": options.lens,
        "lens_backend": options.lens_backend,
        "site": options.site, "layers": parse_layers(options.layers, info.n_layer), "limit": options.limit,
        "seed": options.seed, "n_ctx": options.n_ctx, "n_batch": options.n_batch, "n_items": n_items,
        # the attention kernels decide the layout (aligned KV cells without flash attention)
        "flash_attn": options.flash_attn,
    } | ({"shard": list(options.shard)} if options.shard else {})


@locks_output("out_dir")
def run_task(
    model: LoadedModel,
    task: Task,
    out_dir: str | Path,
    options: ProbeOptions,
    resume: bool = False,
    items: Sequence[Item] | None = None,
    progress: Callable[[ProbeStats, dict[str, Any] | None], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_rows: Callable[[list[ItemResult], np.ndarray], None] | None = None,
) -> RunOutcome:
    """Probe ``task`` on a loaded model, writing items.jsonl and summary.json into ``out_dir``.

    ``progress(stats, best)`` is called after every decode group with the best
    layer so far (``{"layer", "value", "metric"}``); ``should_stop()`` is
    polled between groups; a stopped run is marked incomplete and can be
    resumed with ``resume=True``. ``out_dir`` is locked for the run: a second
    writer, in this or another process, is refused.
    """
    t_start = time.perf_counter()
    info = model.info
    items = list(items) if items is not None else task.items(limit=options.limit, seed=options.seed)
    if not items:
        raise LcprobeError(f"task {task.name} has no items")
    layers = parse_layers(options.layers, info.n_layer)
    out = Path(out_dir)
    # steering or patching installed around this run (Model.run_task, `lcprobe steer eval`): a run
    # under other edits is another run, so it is part of the key; plain runs' files stay as they were
    intervention = active_record(model.engine)
    key = run_key(model.sha256, info, task, options, len(items))
    if intervention is not None:
        key["intervention"] = intervention
    writer = RunWriter(out, key, resume)
    lens = Lens(model.unembed, info.n_layer, options.lens)
    # Overlapping the lens with decoding pays when they use different
    # hardware (GPU decode, CPU lens); on CPU alone they share the cores.
    prober = Prober(model.engine, lens, layers, options.site, overlap=options.n_gpu_layers > 0)
    model.engine.set_sites(prober.sites)
    check_sites_exist(model.engine)
    per_item = [metrics.item_metrics(np.asarray(r["logprobs"]), r["correct"], r["n_tokens"], r["n_bytes"])
                for r in writer.done]
    stats = ProbeStats()
    interrupted = False

    def best_so_far() -> dict[str, Any] | None:
        if not per_item:
            return None
        vals = metrics.aggregate(per_item)[task.metric]
        b = metrics.best_layer(vals)
        return {"layer": layers[b], "value": float(vals[b]), "metric": task.metric}

    t_probe = time.perf_counter()
    try:
        for results in prober.run(items, done=writer.done_ids, stats=stats,
                                  progress=(lambda s: progress(s, best_so_far())) if progress else None,
                                  on_rows=on_rows, shard=options.shard):
            writer.write(results)
            per_item.extend(metrics.item_metrics(r.scores, r.correct, r.n_tokens, r.n_bytes) for r in results)
            if progress:
                progress(stats, best_so_far())
            if should_stop():
                interrupted = True
                break
    finally:
        writer.close()
    probe_seconds = time.perf_counter() - t_probe
    records = read_items(writer.items_path)
    # a stop that arrives after the last batch was written loses nothing
    interrupted = interrupted and len(records) < stats.items_total
    new_items = len(records) - len(writer.done)
    header = {
        "model": str(info.path), "model_name": info.general_name, "model_label": info.name, "sha256": model.sha256, "architecture": info.arch,
        "quantization": info.file_type, "head_type": info.head_type, "n_layer": info.n_layer,
        "n_embd": info.n_embd, "task": task.name, "task_hash": task.hash(), "task_source": task.source,
        "fewshot_ids": task.fewshot_ids(), "lens": options.lens, "lens_backend": model.unembed.backend,
        "site": options.site,
        "unembed_sha256": model.unembed.digest(),
    }
    extra: dict[str, Any] = {
        "n_skipped": stats.items_skipped,
        "complete": not interrupted and len(records) == stats.items_total,
        "timing": {
            "seconds_total": round(time.perf_counter() - t_start + model.seconds_load, 3),
            "seconds_load": round(model.seconds_load, 3),
            "seconds_probe": round(probe_seconds, 3),
            "seconds_per_item": round(probe_seconds / new_items, 4) if new_items > 0 else None,
            "seconds_decode": round(stats.seconds_decode, 3),
            "seconds_lens": round(stats.seconds_lens, 3),
            "tokens_decoded": stats.tokens_decoded,
            "tokens_unique": stats.tokens_unique,
            "tokens_padding": stats.tokens_padding,
            "lens_rows": stats.lens_rows,
        },
        "tokenization_split_mismatches": stats.split_mismatches,
        "versions": versions(),
    }
    if intervention is not None:
        extra["intervention"] = intervention
    if options.shard:
        extra["shard"] = shard_record(options.shard, stats)
    keys = sorted({k for r in records for k in r.get("meta", {})} & {"op", "type", "digits"})
    if keys:
        extra["breakdown"] = breakdown(records, keys)
    summary = write_summary(out, header, layers, task.metric, records, extra)
    return RunOutcome(summary, out, interrupted, stats, records)


def shard_record(shard: tuple[int, int], stats: ProbeStats) -> dict[str, Any]:
    """summary.json's "shard": which part this is and which items it holds, for 'lcprobe merge'."""
    from lcprobe.results.merge import to_ranges

    return {"index": shard[0], "count": shard[1], "items_fit": stats.items_fit_total,
            "positions": to_ranges(stats.shard_positions or [])}


def record_of(result: ItemResult) -> dict[str, Any]:
    """The items.jsonl record of a result, exactly as written."""
    return json.loads(item_line(result))
