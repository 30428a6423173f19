"""The one way to open a model: validate, plan memory, route llama.cpp's log, load head and engine.

Every command and :func:`lcprobe.load` go through :func:`open_model`, so the
checks made before loading (options, the memory plan) and what is freed on
``close()`` are the same everywhere.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lcprobe.analysis.lens import LENS_BACKENDS, Unembed
from lcprobe.errors import LcprobeError
from lcprobe.files.catalog import resolve_model
from lcprobe.files.download import file_sha256
from lcprobe.files.modelfile import ModelInfo, forget_readers, read_model_info
from lcprobe.files.plan import Plan, check_fits, make_plan
from lcprobe.llama.engine import (Engine, EngineConfig, default_log_path, gpu_offload_supported, resolve_gpu_layers,
                                  set_llama_log)
from lcprobe.sites import parse_layers

if TYPE_CHECKING:
    from lcprobe.probing.session import ProbeOptions


@dataclass(frozen=True)
class LoadOptions:
    """How to open a model. ``lens_backend=None`` loads no head (commands that need no lens)."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int | None = None  # default: n_batch
    n_seq_max: int = 64
    n_gpu_layers: int = 0  # or "auto": every layer on a GPU build, 0 on a CPU-only one
    n_threads: int | None = None
    kv_type: str = "f16"
    flash_attn: str = "off"
    lens_backend: str | None = "numpy"
    memory_check: bool = True  # refuse, with the plan's numbers, a model that does not fit
    use_mmap: bool = True  # False keeps the weights in writable memory (in-place weight swaps)
    layers: str | None = None  # the layers a capture will hold, as --layers (sizes the plan's buffers)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers, "host:port" (lcprobe.llama.rpc)
    tensor_split: tuple[float, ...] = ()  # share of the offloaded layers per device
    kv_unified: bool = True  # False: a KV stream per sequence (see EngineConfig)
    repack: bool = True  # False: no CPU weight repacking (row-independent kernels)

    def __post_init__(self) -> None:
        # -ngl auto is decided here, once, so every later comparison sees a number
        object.__setattr__(self, "n_gpu_layers", resolve_gpu_layers(self.n_gpu_layers))

    def engine_config(self) -> EngineConfig:
        return EngineConfig(n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch or self.n_batch,
                            n_seq_max=self.n_seq_max, n_gpu_layers=self.n_gpu_layers, n_threads=self.n_threads,
                            kv_type=self.kv_type, flash_attn=self.flash_attn, rpc=tuple(self.rpc),
                            tensor_split=tuple(self.tensor_split), use_mmap=self.use_mmap,
                            kv_unified=self.kv_unified, repack=self.repack)

    def validate(self) -> None:
        """Refuse values llama.cpp would reject or abort on, naming the flag (before anything loads)."""
        if self.lens_backend is not None and self.lens_backend not in LENS_BACKENDS:
            raise LcprobeError(f"unknown lens backend '{self.lens_backend}' (choose from {', '.join(LENS_BACKENDS)})")
        if self.n_threads is not None and self.n_threads < 1:
            raise LcprobeError(f"-t/--threads must be at least 1, got {self.n_threads}")
        if self.n_gpu_layers < 0:
            raise LcprobeError(f"-ngl/--n-gpu-layers cannot be negative, got {self.n_gpu_layers}")
        self.engine_config().validate()


@dataclass
class LoadedModel:
    """A model ready to probe: header, file hash, head (or None) and a llama.cpp engine."""

    info: ModelInfo
    sha256: str
    unembed: Unembed | None
    engine: Engine
    seconds_load: float
    options: LoadOptions = LoadOptions()

    def close(self) -> None:
        """Free the context, the capture state and the head; safe to call twice."""
        self.engine.close()
        if self.unembed is not None:
            self.unembed.close()

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
    vram = None if config.n_gpu_layers > 0 and gpu_offload_supported() else 0
    if config.rpc:
        from lcprobe.llama.rpc import device_memory

        # the servers' memory stands in for a GPU's (per server: lcprobe plan --rpc)
        vram = sum(device_memory(ep)[0] for ep in config.rpc)
    return make_plan(info, n_gpu_layers=config.gpu_layers, n_ctx=config.n_ctx, n_batch=config.n_batch,
                     n_ubatch=config.n_ubatch, vram_bytes=vram, kv_type=config.kv_type,
                     flash_attn=config.flash_attn, n_layers_probed=n_layers_probed, lens_backend=lens_backend,
                     repack=config.repack)


def check_memory(info: ModelInfo, config: EngineConfig, n_layers_probed: int | None = None,
                 lens_backend: str | None = "numpy") -> None:
    """Refuse, before anything is loaded, a model that does not fit (the plan's numbers in the error)."""
    check_fits(memory_plan(info, config, n_layers_probed, lens_backend))


def open_model(model: str | os.PathLike, options: "LoadOptions | ProbeOptions" = LoadOptions(),
               log_path: str | os.PathLike | None = None) -> LoadedModel:
    """Open a GGUF path or catalog name.

    llama.cpp's log goes to ``log_path`` (default: lcprobe's cache directory),
    never to the terminal. Everything checkable is checked before the weights
    are touched: the options, the header, and the memory plan.
    """
    t0 = time.perf_counter()
    if not isinstance(options, LoadOptions):
        options = options.load_options()
    options.validate()
    info = read_model_info(resolve_model(str(model)))
    if options.memory_check:
        check_memory(info, options.engine_config(), len(parse_layers(options.layers, info.n_layer)),
                     options.lens_backend)
    log = Path(log_path) if log_path is not None else default_log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    set_llama_log(log)
    config = options.engine_config()
    # the device lens goes where llama.cpp will put the output layer with this offload
    unembed = (Unembed.from_model(info, backend=options.lens_backend, n_threads=options.n_threads,
                                  n_gpu_layers=config.gpu_layers, rpc=config.rpc, tensor_split=config.tensor_split)
               if options.lens_backend is not None else None)
    sha = file_sha256(info.path)
    release_load_memory()
    try:
        engine = Engine(info, config)
    except BaseException:
        if unembed is not None:
            unembed.close()
        raise
    return LoadedModel(info, sha, unembed, engine, time.perf_counter() - t0, options)
