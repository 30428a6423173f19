"""A loaded model (engine + lens) and running tasks into result directories.

``run``, ``suite`` and ``compare`` all go through here: load once with
:func:`open_model`, then :func:`run_task` per task. Quiet by design: progress
and stop requests are callbacks, so the CLI can draw and a library user can
ignore them.
"""

from __future__ import annotations

import ctypes

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__, metrics
from .engine import Engine, EngineConfig, check_sites_exist, llama_cpp_version, set_llama_log
from .errors import LcprobeError
from .lens import Lens, Unembed
from .modelfile import ModelInfo, file_sha256, forget_readers, read_model_info
from .plan import Plan, check_fits, make_plan
from .results import RunWriter, breakdown, item_line, read_items, write_summary
from .runner import ItemResult, ProbeStats, Prober, parse_layers
from .tasks import Item, Task


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
    flash_attn: str = "auto"
    memory_check: bool = True  # refuse, with the plan's numbers, a model that does not fit

    def engine_config(self) -> EngineConfig:
        return EngineConfig(n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                            n_seq_max=self.n_seq_max, n_gpu_layers=self.n_gpu_layers,
                            n_threads=self.n_threads, kv_type=self.kv_type, flash_attn=self.flash_attn)


@dataclass
class LoadedModel:
    info: ModelInfo
    sha256: str
    unembed: Unembed
    engine: Engine
    seconds_load: float

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def release_load_memory() -> None:
    """Drop what loading needed and the run does not: gguf-py's cached readers
    and, on glibc, the freed pages the reader and the dequantizer left in
    malloc's heap (they would count in RSS for the whole run: 27 MB for SmolLM2)."""
    forget_readers()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to do


def memory_plan(info: ModelInfo, config: EngineConfig, n_layers_probed: int | None = None,
                lens_backend: str | None = "numpy") -> Plan:
    """``lcprobe plan`` for an engine configuration on this machine (a CPU-only
    build plans no GPU); ``lens_backend`` None for commands that load no head."""
    from .engine import gpu_offload_supported

    vram = None if config.n_gpu_layers > 0 and gpu_offload_supported() else 0
    return make_plan(info, n_gpu_layers=config.n_gpu_layers, n_ctx=config.n_ctx, n_batch=config.n_batch,
                     n_ubatch=config.n_ubatch, vram_bytes=vram, kv_type=config.kv_type,
                     flash_attn=config.flash_attn, n_layers_probed=n_layers_probed, lens_backend=lens_backend)


def check_memory(info: ModelInfo, config: EngineConfig, n_layers_probed: int | None = None,
                 lens_backend: str | None = "numpy") -> None:
    """Refuse, before anything is loaded, a model that does not fit (the plan's numbers in the error)."""
    check_fits(memory_plan(info, config, n_layers_probed, lens_backend))


def open_model(path: str | Path, options: ProbeOptions, log_path: str | Path | None = None) -> LoadedModel:
    t0 = time.perf_counter()
    info = read_model_info(path)
    if options.memory_check:
        check_memory(info, options.engine_config(), len(parse_layers(options.layers, info.n_layer)),
                     options.lens_backend)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        set_llama_log(log_path)
    unembed = Unembed.from_model(info, backend=options.lens_backend, n_threads=options.n_threads)
    sha = file_sha256(info.path)
    release_load_memory()
    engine = Engine(info, options.engine_config())
    return LoadedModel(info, sha, unembed, engine, time.perf_counter() - t0)


@dataclass
class RunOutcome:
    summary: dict[str, Any]
    out_dir: Path
    interrupted: bool
    stats: ProbeStats
    records: list[dict[str, Any]] = field(default_factory=list)


def versions() -> dict[str, str]:
    return {"lcprobe": __version__, "llama_cpp_python": llama_cpp_version()}


def run_key(sha256: str, info: ModelInfo, task: Task, options: ProbeOptions, n_items: int) -> dict[str, Any]:
    """What identifies a run directory (its run.json): ``--resume`` refuses one whose key differs."""
    return {
        "model_sha256": sha256, "task": task.name, "task_hash": task.hash(), "lens": options.lens,
        "lens_backend": options.lens_backend,
        "site": options.site, "layers": parse_layers(options.layers, info.n_layer), "limit": options.limit,
        "seed": options.seed, "n_ctx": options.n_ctx, "n_batch": options.n_batch, "n_items": n_items,
    }


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
    resumed with ``resume=True``.
    """
    t_start = time.perf_counter()
    info = model.info
    items = list(items) if items is not None else task.items(limit=options.limit, seed=options.seed)
    if not items:
        raise LcprobeError(f"task {task.name} has no items")
    layers = parse_layers(options.layers, info.n_layer)
    out = Path(out_dir)
    writer = RunWriter(out, run_key(model.sha256, info, task, options, len(items)), resume)
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
                                  on_rows=on_rows):
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
        "model": str(info.path), "model_name": info.name, "sha256": model.sha256, "architecture": info.arch,
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
            "lens_rows": stats.lens_rows,
        },
        "tokenization_split_mismatches": stats.split_mismatches,
        "versions": versions(),
    }
    keys = sorted({k for r in records for k in r.get("meta", {})} & {"op", "type", "digits"})
    if keys:
        extra["breakdown"] = breakdown(records, keys)
    summary = write_summary(out, header, layers, task.metric, records, extra)
    return RunOutcome(summary, out, interrupted, stats, records)


def record_of(result: ItemResult) -> dict[str, Any]:
    """The items.jsonl record of a result, exactly as written."""
    return json.loads(item_line(result))
