"""llama.cpp behind one object: load, tokenize, decode batches with capture.

Everything that touches ``llama_cpp`` lives here. An :class:`Engine` owns the
model, the context, one reusable batch and the native capture state; it is a
context manager, and :meth:`close` frees the llama.cpp objects.

The context always uses a unified KV cache. That is what lets many sequences
share the cells of a common prefix (``seq_cp``), and it makes llama.cpp split
a batch into ubatches of consecutive tokens, which the capture relies on.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lcprobe.llama.capture import Capture, Site
from lcprobe.errors import CaptureError, LcprobeError, ModelError, PromptTooLongError
from lcprobe.files.modelfile import ModelInfo
from lcprobe.files.resources import cache_dir

import llama_cpp  # noqa: E402  (after our modules: errors above read better)

# ggml_type values for the KV cache
_KV_TYPES = {"f32": 0, "f16": 1}
# enum llama_flash_attn_type
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

# llama.cpp's own limit on sequences in one context (LLAMA_MAX_SEQ).
MAX_SEQ = 256
# ggml's GGML_MAX_N_THREADS: its CPU threadpool keeps per-thread arrays of this size.
MAX_THREADS = 512
# n_ctx is a uint32 that llama.cpp rounds up to a multiple of 256; far below
# that overflow, and far above any model's training context.
MAX_CTX = 1 << 24

_log_lock = threading.Lock()
_log_state: dict[str, object] = {}


def set_llama_log(path: str | os.PathLike | None) -> None:
    """Send llama.cpp's log to ``path`` (append), or discard it when None.

    The terminal belongs to lcprobe's own display; llama.cpp's chatter is kept
    in a file for when something goes wrong.
    """
    with _log_lock:
        old = _log_state.get("file")
        fh = open(path, "a", encoding="utf-8", errors="replace") if path else None

        def _write(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            nonlocal fh
            if fh is not None and text:
                try:
                    fh.write(text.decode("utf-8", "replace"))
                    fh.flush()
                except (OSError, ValueError):
                    # Disk full or closed: the log is a convenience; an exception
                    # here would only print a traceback from inside llama.cpp.
                    fh = None

        cb = llama_cpp.llama_log_callback(_write)
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
        _log_state["cb"] = cb  # ctypes callbacks must outlive their registration
        _log_state["file"] = fh
        if old is not None:
            old.close()


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 64
    n_gpu_layers: int = 0
    n_threads: int | None = None
    # KV cache precision: llama.cpp's default f16, or f32 for exact comparisons
    kv_type: str = "f16"
    # Flash attention: "off" by default because llama.cpp's CPU flash
    # attention picks its kernel by ubatch size and accumulates V in f16, so a
    # row's numbers would depend on -b (see KV_CELL_ALIGN); "off" with an f32
    # cache also reproduces a float32 forward pass to ~1e-6. "auto" or "on" is
    # llama.cpp's choice (faster on GPUs with long contexts).
    flash_attn: str = "off"
    # Cut the graph after the last block when llama.cpp's logits are not
    # wanted (see Engine.decode); False runs llama.cpp's full graph every time.
    skip_head: bool = True
    # False reads the weights into memory llama.cpp owns instead of mapping the
    # file read-only: needed to overwrite weights in place (lcprobe.llama.weights).
    use_mmap: bool = True
    # llama.cpp RPC servers ("host:port") whose devices hold the offloaded
    # layers (lcprobe.llama.rpc); -ngl 0 then means every layer.
    rpc: tuple[str, ...] = ()
    # share of the offloaded layers per device (local GPUs first, then the
    # servers' devices); empty: llama.cpp splits by free memory
    tensor_split: tuple[float, ...] = ()
    # One KV cache shared by every sequence (the prober's shared prefix needs
    # it); False gives each sequence its own stream of n_ctx / n_seq_max cells,
    # at cells 0.. as if decoded alone (the exact patching sweep).
    kv_unified: bool = True
    # llama.cpp's CPU weight repacking (Q4_0, Q4_K, IQ4_NL on AVX2/NEON): its
    # kernels tile rows in fours, so a row's numbers depend on the rest of its
    # batch; False keeps the stored layout (slower, row-independent).
    repack: bool = True

    @property
    def gpu_layers(self) -> int:
        """-ngl as llama.cpp gets it: with RPC servers and no -ngl, every layer goes to the devices."""
        return int(self.n_gpu_layers) or (ALL_GPU_LAYERS if self.rpc else 0)

    @property
    def n_batch_effective(self) -> int:
        """llama.cpp's n_batch: never more than the context asked for (it is
        taken before llama.cpp rounds n_ctx up to a multiple of 256)."""
        return min(self.n_ctx, self.n_batch)

    @property
    def n_seq_effective(self) -> int:
        """Sequences the context gets: llama.cpp reserves one output row per
        sequence in an output buffer of n_batch rows and aborts
        (GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)) when they do not fit."""
        return max(1, min(self.n_seq_max, MAX_SEQ, self.n_batch_effective))

    def validate(self) -> None:
        """Refuse, before llama.cpp sees them, values it would reject or abort on.

        Each message names the flag and the smallest (or largest) value that works.
        """
        if self.kv_type not in _KV_TYPES:
            raise LcprobeError(f"unknown KV cache type '{self.kv_type}' ({', '.join(_KV_TYPES)})")
        if self.flash_attn not in _FLASH_ATTN:
            raise LcprobeError(f"unknown flash attention mode '{self.flash_attn}' ({', '.join(_FLASH_ATTN)})")
        if not 1 <= self.n_seq_max <= MAX_SEQ:
            raise LcprobeError(f"n_seq_max must be between 1 and {MAX_SEQ} (llama.cpp's LLAMA_MAX_SEQ), "
                               f"got {self.n_seq_max}")
        # Probing decodes the shared prefix into sequence 0 and each choice
        # into a sequence of its own: at least two. One-sequence users (depth) need one.
        need = min(self.n_seq_max, 2)
        if self.n_ctx < need:
            raise LcprobeError(f"-c/--ctx-size must be at least {need}, got {self.n_ctx}")
        if self.n_ctx > MAX_CTX:
            raise LcprobeError(f"-c/--ctx-size must be at most {MAX_CTX}, got {self.n_ctx}")
        if self.n_batch < need:
            raise LcprobeError(f"-b/--batch-size must be at least {need}, got {self.n_batch}")
        if self.n_batch > MAX_CTX:
            raise LcprobeError(f"-b/--batch-size must be at most {MAX_CTX}, got {self.n_batch}")
        if self.n_ubatch < 1:
            raise LcprobeError(f"n_ubatch must be at least 1, got {self.n_ubatch}")
        if self.n_threads is not None and not 1 <= self.n_threads <= MAX_THREADS:
            raise LcprobeError(f"-t/--threads must be between 1 and {MAX_THREADS} (ggml's GGML_MAX_N_THREADS), "
                               f"got {self.n_threads}")
        if self.n_gpu_layers < 0:
            raise LcprobeError(f"-ngl/--n-gpu-layers cannot be negative, got {self.n_gpu_layers} "
                               "(0 = CPU only, auto = every layer when the build has GPU support)")
        if any(not x >= 0 for x in self.tensor_split) or (self.tensor_split and not sum(self.tensor_split) > 0):
            raise LcprobeError(f"--tensor-split {','.join(map(str, self.tensor_split))}: shares must be "
                               "non-negative and not all zero")
        if self.n_gpu_layers > 0 and not self.rpc and not gpu_offload_supported():
            raise LcprobeError(
                f"-ngl/--n-gpu-layers {self.n_gpu_layers}: this llama-cpp-python build has no GPU support "
                "(CPU only); use -ngl 0, -ngl auto, or install a CUDA/Metal build (see README: GPU builds)"
            )


#: Without flash attention, ggml's CPU kernels sum a query's attention over
#: the KV cells in SIMD lanes keyed by the cell index (llamafile's tinyBLAS,
#: which takes the attention-times-V product: lanes of 8 floats on AVX2, 16 on
#: AVX-512; llama.cpp pads the cells viewed to a multiple of 32, so there is
#: no scalar tail). A sequence whose cells start at the same residue modulo 16
#: therefore gets bit-identical attention sums wherever its batch put it. The
#: prober lays each item's cells out from such a cell, which makes scores
#: independent of -b and of the other items in the batch (measured: 8 and 16
#: give the same scores as 32 on AVX2, with half or a quarter of the pads).
KV_CELL_ALIGN = 16


class Engine:
    """A loaded model plus a context set up for capture."""

    #: Interventions: called per decode with the batch's positions and sequence ids, returns the
    #: capture's edits for exactly that batch (set by lcprobe.interventions.apply.intervening).
    edit_hook: Callable[[np.ndarray, Sequence[Sequence[int]]], list] | None = None

    def __init__(self, info: ModelInfo, config: EngineConfig = EngineConfig()) -> None:
        self.info = info
        self.config = config
        self._model = None
        self._ctx = None
        self._batch = None
        self.tokens_decoded = 0
        config.validate()
        self.capture = Capture()  # fails early, before loading, if the ABI is wrong
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.gpu_layers
        self._devices = self._split = None  # ctypes arrays llama.cpp borrows while loading
        if config.rpc:
            from lcprobe.llama import rpc

            devices = rpc.local_gpu_devices() + rpc.server_devices(config.rpc)
            self._devices = rpc.device_array(devices)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p).value
            rpc.exit_on_abort("an RPC server stopped or failed; finished items are saved: start the server "
                              "again and rerun the same command with --resume")
        if config.tensor_split:
            n_max = int(llama_cpp.llama_max_devices())
            if len(config.tensor_split) > n_max:
                raise LcprobeError(f"--tensor-split has {len(config.tensor_split)} shares; llama.cpp takes {n_max}")
            self._split = (ctypes.c_float * n_max)(*config.tensor_split)
            mparams.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
        mparams.use_extra_bufts = bool(config.repack)
        if not config.use_mmap:
            # llama.h 0.3.36 has load_mode, not use_mmap: LLAMA_LOAD_MODE_NONE reads into owned buffers
            mparams.load_mode = 0
        model = llama_cpp.llama_model_load_from_file(str(info.path).encode(), mparams)
        if not model:
            raise ModelError(f"llama.cpp could not load {info.path} (see the llama.cpp log for why)")
        self._model = model
        n_seq = config.n_seq_effective
        n_batch = config.n_batch_effective
        n_ubatch = min(int(config.n_ubatch), n_batch)
        threads = config.n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = int(config.n_ctx)
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = bool(config.kv_unified)
        cparams.swa_full = True  # sliding-window models keep every cell a shared prefix needs
        cparams.no_perf = True
        cparams.type_k = cparams.type_v = _KV_TYPES[config.kv_type]
        cparams.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        cparams.cb_eval = ctypes.cast(
            self.capture.callback_address, llama_cpp.ggml_backend_sched_eval_callback
        )
        cparams.cb_eval_user_data = ctypes.c_void_p(self.capture.user_data)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ModelError(
                f"llama.cpp could not create a context (n_ctx={config.n_ctx}, "
                f"n_batch={n_batch}); try a smaller -c/--ctx-size"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(ctx)
        self.n_seq_max = n_seq
        self.kv_unified = bool(config.kv_unified)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(ctx)  # cells per sequence's stream (n_ctx when unified)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.n_seq_max)
        self._last_block = info.site_name("resid_post", info.n_layer)
        self.skip_head = bool(config.skip_head)

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        """Free the batch, the context and the model, in that order; calling it again does nothing.

        The native capture state is not freed here: it belongs to ``self.capture``
        and goes with this object, after the context that holds its address.
        """
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS when the model asks for it."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, False)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def token_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    # -- KV cache -----------------------------------------------------------
    @property
    def cell_align(self) -> int:
        """KV cells a batch-invariant layout aligns each sequence's first cell to; 0: no such layout.

        With flash attention the CPU kernel itself depends on the ubatch size,
        so aligning cells cannot help and is not asked for.
        """
        return KV_CELL_ALIGN if self.config.flash_attn == "off" else 0

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def seq_copy(self, src: int, dst: int) -> None:
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def seq_remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, p1)

    # -- decode -------------------------------------------------------------
    def set_sites(self, sites: Sequence[Site]) -> None:
        self.capture.set_sites(list(sites))

    def decode(
        self,
        tokens: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        seq_ids: Sequence[Sequence[int]],
        outputs: Sequence[bool] | np.ndarray,
        want_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode one batch; return captured rows of the output tokens.

        Returns ``(rows, logits)``: rows is ``(n_sites, n_outputs, n_embd)``
        float32 in output order; logits (llama.cpp's own, ``(n_outputs,
        n_vocab)``) only when ``want_logits``.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("empty batch")
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        b = self._batch
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = np.asarray(tokens, dtype=np.int32)
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = np.asarray(positions, dtype=np.int32)
        out = np.asarray(outputs, dtype=bool)
        np.ctypeslib.as_array(b.logits, shape=(n,))[:] = out.astype(np.int8)
        n_seq = np.ctypeslib.as_array(b.n_seq_id, shape=(n,))
        for i, seqs in enumerate(seq_ids):
            if not 0 < len(seqs) <= self.n_seq_max:
                raise ValueError(f"token {i} has {len(seqs)} sequence ids")
            n_seq[i] = len(seqs)
            row = b.seq_id[i]
            for j, s in enumerate(seqs):
                if not 0 <= s < self.n_seq_max:
                    raise ValueError(f"sequence id {s} outside 0..{self.n_seq_max - 1}")
                row[j] = s
        b.n_tokens = n
        # Unless the caller wants llama.cpp's logits, the graph stops after the
        # last block: the lens recomputes the head on exactly the rows it needs.
        stop = self._last_block if self.skip_head and not want_logits else None
        if self.edit_hook is not None:
            self.capture.set_edits(self.edit_hook(np.asarray(positions, dtype=np.int64), seq_ids))
        self.capture.begin(out, self.n_ubatch, stop)
        try:
            rc = llama_cpp.llama_decode(self._ctx, b)
        except BaseException:
            self.capture.abort()
            raise
        if rc != 0:
            self.capture.abort()
            if rc == 1:
                raise PromptTooLongError(
                    f"the KV cache is full ({self.n_ctx} cells); raise -c/--ctx-size or lower -b/--batch-size"
                )
            raise LcprobeError(f"llama_decode failed with code {rc} (see the llama.cpp log)")
        rows = self.capture.finish()
        self.tokens_decoded += n
        logits = None
        if want_logits:
            n_out = int(out.sum())
            ptr = llama_cpp.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()
        return rows, logits

    def decode_sequence(
        self, tokens: Sequence[int], outputs: Sequence[bool] | None = None, want_logits: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode one sequence from an empty cache (seq 0), in n_batch chunks."""
        if len(tokens) > self.n_ctx:
            raise PromptTooLongError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        outs = np.ones(len(tokens), bool) if outputs is None else np.asarray(outputs, bool)
        self.clear()
        rows, logits = [], []
        for start in range(0, len(tokens), self.n_batch):
            stop = min(start + self.n_batch, len(tokens))
            r, lg = self.decode(
                tokens[start:stop], range(start, stop), [[0]] * (stop - start), outs[start:stop], want_logits
            )
            rows.append(r)
            if lg is not None:
                logits.append(lg)
        self.clear()
        return np.concatenate(rows, axis=1), (np.concatenate(logits) if want_logits else None)


def check_sites_exist(engine: Engine) -> None:
    """Decode one token to see that every requested site fires; raises CaptureError."""
    engine.clear()
    try:
        engine.decode([engine.tokenize("a", add_special=False)[0]], [0], [[0]], [True])
    except CaptureError as exc:
        raise CaptureError(
            f"{engine.info.arch}: {exc}. lcprobe needs the per-layer tensors 'l_out-N' in "
            "llama.cpp's graph"
        ) from exc
    finally:
        engine.clear()


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def llama_cpp_version() -> str:
    return getattr(llama_cpp, "__version__", "unknown")


def gpu_offload_supported() -> bool:
    """Whether this machine has a GPU llama.cpp can use."""
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    if not llama_cpp.llama_supports_rpc():
        return True
    # an RPC build answers yes on any machine (remote devices could take layers): ask for a local GPU
    from lcprobe.llama.rpc import local_gpu_devices

    return bool(local_gpu_devices())


# llama.cpp clamps a layer count above the model's to "all layers and the output".
ALL_GPU_LAYERS = 999


def resolve_gpu_layers(value: int | str) -> int:
    """``-ngl`` as llama.cpp takes it: ``auto`` is every layer on a GPU build, 0 on a CPU-only one."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return ALL_GPU_LAYERS if gpu_offload_supported() else 0
        try:
            return int(text)
        except ValueError:
            raise LcprobeError(f"-ngl/--n-gpu-layers takes a number of layers or 'auto', got '{value}'") from None
    return int(value)


def default_log_path() -> Path:
    return cache_dir() / "llama.log"
