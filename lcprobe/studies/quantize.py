"""Quantized copies of a model with llama.cpp's own quantizer, and what each copy really holds.

``llama_model_quantize`` from the installed libllama does the work (no extra
binary). A file type such as Q2_K is a recipe, not a guarantee: llama.cpp
picks a type per tensor and falls back to a legacy type where a row length is
not a multiple of the K-quant block (256), so a small model's "Q2_K" can be
mostly Q4_0. :func:`type_mix` reads the output's real tensor types so every
caller can show that, and :func:`coverage_warning` says when it matters.

Quiet like the rest of the core: progress is a callback; llama.cpp's own log
goes to a file (``log_path``), which is also where failure reasons are read.
"""

from __future__ import annotations

import ctypes
import difflib
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from lcprobe.errors import LcprobeError, ModelError
from lcprobe.files.modelfile import ModelInfo, open_reader, read_model_info


class QuantizeError(LcprobeError):
    """A quantization type, source or importance matrix the quantizer cannot use."""


# name -> (llama_ftype value, the ggml type llama.cpp uses for most weights of
# that file type: llama_ftype_get_default_type in src/llama-quant.cpp).
QUANT_TYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"),
    "F16": (1, "F16"),
    "BF16": (32, "BF16"),
    "Q8_0": (7, "Q8_0"),
    "Q6_K": (18, "Q6_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_1": (9, "Q5_1"),
    "Q5_0": (8, "Q5_0"),
    "Q4_K_M": (15, "Q4_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_1": (3, "Q4_1"),
    "Q4_0": (2, "Q4_0"),
    "Q3_K_L": (13, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q2_K": (10, "Q2_K"),
    "Q2_K_S": (21, "Q2_K"),
    "IQ4_NL": (25, "IQ4_NL"),
    "IQ4_XS": (30, "IQ4_XS"),
    "IQ3_M": (27, "IQ3_S"),
    "IQ3_S": (26, "IQ3_S"),
    "IQ3_XS": (22, "IQ3_S"),
    "IQ3_XXS": (23, "IQ3_XXS"),
    "IQ2_M": (29, "IQ2_S"),
    "IQ2_S": (28, "IQ2_XS"),
    "IQ2_XS": (20, "IQ2_XS"),
    "IQ2_XXS": (19, "IQ2_XXS"),
    "IQ1_M": (31, "IQ1_M"),
    "IQ1_S": (24, "IQ1_S"),
}

FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})

# llama.cpp refuses several of these without an importance matrix and the rest
# lose most of their point without one, so lcprobe asks for one for all of them.
IMATRIX_TYPES = frozenset(t for t in QUANT_TYPES if t.startswith("IQ")) | {"Q2_K_S"}

K_BLOCK = 256  # row length K-quants and IQ types need (QK_K)

# Below this share of the weights in the requested type, a file is reported as mostly something else.
LOW_COVERAGE = 0.5

_TYPE_SUFFIX = re.compile(r"[.\-_](" + "|".join(sorted(QUANT_TYPES, key=len, reverse=True)) + r")$", re.I)
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FAILED_LINE = re.compile(rb"failed to quantize: ([^\n]*)")


def parse_types(spec: str | Sequence[str]) -> list[str]:
    """Canonical type names from ``"q8_0,Q4_K_M"`` (or a list), in order, without repeats."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    out: list[str] = []
    for raw in parts:
        name = raw.strip().upper()
        if not name:
            continue
        if name not in QUANT_TYPES:
            close = difflib.get_close_matches(name, list(QUANT_TYPES), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise QuantizeError(f"unknown quantization type '{raw.strip()}'{hint} "
                                f"(valid: {', '.join(QUANT_TYPES)})")
        if name not in out:
            out.append(name)
    if not out:
        raise QuantizeError(f"no quantization type given (valid: {', '.join(QUANT_TYPES)})")
    return out


def base_stem(path: str | os.PathLike) -> str:
    """The file's stem without a trailing type tag: ``llama-2-7b.F16.gguf`` -> ``llama-2-7b``."""
    stem = Path(path).name.removesuffix(".gguf")
    return _TYPE_SUFFIX.sub("", stem) or stem


def output_path(src: str | os.PathLike, out_dir: str | os.PathLike, qtype: str) -> Path:
    return Path(out_dir) / f"{base_stem(src)}-{qtype}.gguf"


@dataclass(frozen=True)
class TypeMix:
    """The ggml types a file's weights really have, largest share first."""

    shares: list[tuple[str, int, float]]  # (ggml type, parameters, fraction of all parameters)
    base_type: str | None  # what the requested/declared file type aims for (None: unknown)
    base_fraction: float | None  # share of the parameters stored in base_type
    bits_per_weight: float
    size_bytes: int

    def describe(self, top: int = 4, min_share: float = 0.005) -> str:
        parts = [f"{t} {f:.0%}" for t, _, f in self.shares[:top] if f >= min_share]
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "types": {t: {"params": n, "fraction": round(f, 6)} for t, n, f in self.shares},
            "base_type": self.base_type,
            "base_fraction": None if self.base_fraction is None else round(self.base_fraction, 6),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "size_bytes": self.size_bytes,
        }


def type_mix(info: ModelInfo, qtype: str | None = None) -> TypeMix:
    """Tensor types of ``info``'s file; ``qtype`` (default: the declared file type) sets the base type."""
    total = sum(info.tensor_types.values())
    shares = sorted(((t, n, n / total if total else 0.0) for t, n in info.tensor_types.items()),
                    key=lambda s: (-s[1], s[0]))
    name = (qtype or info.file_type).upper()
    base = QUANT_TYPES[name][1] if name in QUANT_TYPES else None
    frac = None
    if base is not None:
        frac = sum(f for t, _, f in shares if t == base)
        if base == "F16" or base == "BF16":
            # norms and other 1-D tensors stay F32 by design; they do not dilute a float file
            frac += sum(f for t, _, f in shares if t == "F32")
    return TypeMix(shares, base, frac, info.bits_per_weight(), info.size_bytes)


def coverage_warning(info: ModelInfo, qtype: str | None = None) -> str | None:
    """A sentence when less than half of the weights are in the requested type's base type."""
    mix = type_mix(info, qtype)
    if mix.base_fraction is None or mix.base_fraction >= LOW_COVERAGE:
        return None
    name = (qtype or info.file_type).upper()
    why = ""
    if QUANT_TYPES[name][1].endswith("_K") or name.startswith("IQ"):
        if info.n_embd % K_BLOCK:
            why = (f": n_embd {info.n_embd} is not a multiple of {K_BLOCK}, so llama.cpp fell back to other "
                   f"types for most tensors")
    return (f"{info.path.name}: only {mix.base_fraction:.0%} of the weights are {mix.base_type} "
            f"(the file holds {mix.describe()}){why}; results describe this mix, not {name} as a "
            f"larger model would get it")


def source_precision(info: ModelInfo) -> str | None:
    """The source's quantized file type when its weights are already quantized, else None."""
    weight_types = {t for t in info.tensor_types if t not in FLOAT_TYPES}
    return info.file_type if weight_types else None


def requantize_warning(info: ModelInfo) -> str | None:
    q = source_precision(info)
    if q is None:
        return None
    return (f"{info.path.name} is already quantized ({q}): every output is re-quantized from {q} weights, "
            f"so the most precise reference is the source's precision ({q}) and an F32/F16 output is an exact "
            f"copy of the {q} model, not of the original")


# --- importance matrices ----------------------------------------------------------


def load_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per-tensor importance (mean squared activation per input column) from an imatrix file.

    Reads both formats llama-imatrix writes: GGUF (``<tensor>.in_sum2`` and
    ``<tensor>.counts``, normalised per expert as llama-quantize does) and the
    legacy ``.dat`` (values already averaged over calls, divided by ``ncall``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuantizeError(f"no such imatrix file: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    data = _load_gguf_imatrix(p) if magic == b"GGUF" else _load_legacy_imatrix(p)
    if not data:
        raise QuantizeError(f"{p} holds no importance data")
    for name, v in data.items():
        if not np.all(np.isfinite(v)):
            raise QuantizeError(f"{p}: importance data for {name} contains NaN or infinite values")
    return data


def _load_gguf_imatrix(p: Path) -> dict[str, np.ndarray]:
    try:
        reader = open_reader(p)
    except ModelError as exc:
        raise QuantizeError(f"{p} is not a readable imatrix: {exc}") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, dest in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type.name != "F32":
                    raise QuantizeError(f"{p}: {t.name} must be F32, not {t.tensor_type.name}")
                dest[t.name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float32).ravel()
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))
        raise QuantizeError(f"{p}: sums and counts do not match for {', '.join(odd[:3])}")
    out = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float64)
        ne0 = s.size // c.size
        per = s.reshape(c.size, ne0).astype(np.float64)
        # an expert never routed to gets neutral importance, as in llama-quantize
        val = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1.0)
        out[name] = val.astype(np.float32).ravel()
    return out


def _load_legacy_imatrix(p: Path) -> dict[str, np.ndarray]:
    raw = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise QuantizeError(f"{p} is neither a GGUF imatrix nor a complete legacy imatrix file")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise QuantizeError(f"{p} is neither a GGUF imatrix nor a legacy imatrix file")
    out = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        if n <= 0 or n > 4096:
            raise QuantizeError(f"{p}: corrupt tensor name length {n}")
        name = take(f"<{n}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise QuantizeError(f"{p}: entry {name} has no values")
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        out[name] = vals / ncall if ncall > 0 else vals
    return out


class _ImatrixArray:
    """The NULL-terminated llama_model_imatrix_data array; owns the buffers it points into."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        import llama_cpp

        self._keep = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in data.items()]
        arr = (llama_cpp.llama_model_imatrix_data * (len(self._keep) + 1))()
        for i, (name, v) in enumerate(self._keep):
            arr[i].name = name
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(self._keep)].name = None
        self.array = arr


# --- quantizing ------------------------------------------------------------------


@dataclass
class QuantProgress:
    tensors_done: int = 0
    tensors_total: int = 0
    tensor: str = ""


def quantize_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    qtype: str,
    imatrix: dict[str, np.ndarray] | None = None,
    nthread: int | None = None,
    log_path: str | os.PathLike | None = None,
    progress: Callable[[QuantProgress], None] | None = None,
    check_source: bool = True,
) -> float:
    """Write ``dst`` as ``qtype`` from ``src``; returns the seconds it took.

    The file appears under its name only when complete (written as
    ``dst.part`` first). With ``log_path``, llama.cpp's log is appended there,
    per-tensor progress is read back from it for ``progress``, and a failure's
    reason is taken from it. ``check_source=False`` skips re-reading a
    source the caller has already checked (reading a GGUF's vocabulary takes
    seconds).
    """
    import llama_cpp

    from lcprobe.llama.engine import set_llama_log

    name = parse_types(qtype)[0]
    if name in IMATRIX_TYPES and not imatrix:
        raise QuantizeError(f"{name} needs an importance matrix: pass --imatrix FILE "
                            "(made with llama.cpp's llama-imatrix)")
    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    if check_source:
        read_model_info(src_p)  # a missing/corrupt/foreign source is a clear error before llama.cpp sees it
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    part = dst_p.with_name(dst_p.name + ".part")
    part.unlink(missing_ok=True)
    log = Path(log_path) if log_path is not None else None
    offset = 0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        set_llama_log(log)
        offset = log.stat().st_size if log.exists() else 0

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[name][0]
    params.nthread = nthread or 0  # 0: llama.cpp uses every hardware thread
    params.allow_requantize = True
    holder = _ImatrixArray(imatrix) if imatrix else None
    if holder is not None:
        params.imatrix = ctypes.cast(holder.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

    result: dict[str, int | BaseException] = {}

    def work() -> None:
        try:
            result["rc"] = llama_cpp.llama_model_quantize(os.fsencode(src_p), os.fsencode(part),
                                                          ctypes.byref(params))
        except BaseException as exc:  # surfaced in the calling thread
            result["error"] = exc

    t0 = time.perf_counter()
    # A worker thread lets the caller's progress run while the C call (GIL
    # released by ctypes) works; without a log there is nothing to report.
    if progress is not None and log is not None:
        worker = threading.Thread(target=work, name="lcprobe-quantize", daemon=True)
        worker.start()
        state = QuantProgress()
        while worker.is_alive():
            worker.join(0.2)
            _read_progress(log, offset, state)
            progress(state)
    else:
        work()
    seconds = time.perf_counter() - t0
    del holder  # the C side copied the importance data during the call
    if "error" in result:
        part.unlink(missing_ok=True)
        raise result["error"]  # type: ignore[misc]
    if result.get("rc") != 0 or not part.exists():
        part.unlink(missing_ok=True)
        reason = _failure_reason(log, offset) if log is not None else None
        where = f" (llama.cpp log: {log})" if log is not None else ""
        raise QuantizeError(f"llama.cpp could not quantize {src_p.name} to {name}: "
                            f"{reason or 'see the llama.cpp log'}{where}")
    part.replace(dst_p)
    return seconds


def _new_log_bytes(log: Path, offset: int) -> bytes:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except OSError:
        return b""


def _read_progress(log: Path, offset: int, state: QuantProgress) -> None:
    matches = _TENSOR_LINE.findall(_new_log_bytes(log, offset))
    if matches:
        done, total, tensor = matches[-1]
        state.tensors_done, state.tensors_total = int(done), int(total)
        state.tensor = tensor.decode("utf-8", "replace")


def _failure_reason(log: Path, offset: int) -> str | None:
    m = _FAILED_LINE.findall(_new_log_bytes(log, offset))
    return m[-1].decode("utf-8", "replace").strip() if m else None


@dataclass
class QuantResult:
    qtype: str
    path: Path
    reused: bool
    seconds: float
    info: ModelInfo
    mix: TypeMix
    warning: str | None = None


@dataclass
class QuantPlan:
    """What :func:`quantize_all` will do, known before any file is written."""

    source: ModelInfo
    types: list[str]
    outputs: dict[str, Path] = field(default_factory=dict)
    requantize_warning: str | None = None


def plan_quantize(src: str | os.PathLike, out_dir: str | os.PathLike, types: str | Sequence[str],
                  imatrix_path: str | os.PathLike | None = None) -> QuantPlan:
    """Check everything that can be checked without quantizing: source, types, imatrix need."""
    info = read_model_info(src)
    names = parse_types(types)
    need = [t for t in names if t in IMATRIX_TYPES]
    if need and imatrix_path is None:
        verb = "needs" if len(need) == 1 else "need"
        raise QuantizeError(f"{', '.join(need)} {verb} an importance matrix: pass --imatrix FILE "
                            "(made with llama.cpp's llama-imatrix)")
    outputs = {t: output_path(info.path, out_dir, t) for t in names}
    return QuantPlan(info, names, outputs, requantize_warning(info))


def quantize_all(
    plan: QuantPlan,
    imatrix_path: str | os.PathLike | None = None,
    force: bool = False,
    nthread: int | None = None,
    log_path: str | os.PathLike | None = None,
    progress: Callable[[str, QuantProgress], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[QuantResult]:
    """Quantize the plan's types one after another, reusing finished outputs unless ``force``.

    An existing output is reused only when it reads as a GGUF of the same file
    type; anything else under that name is an error unless ``force``.
    """
    imatrix = load_imatrix(imatrix_path) if imatrix_path is not None else None
    for qtype in plan.types:
        if should_stop():
            return
        dst = plan.outputs[qtype]
        reused = False
        seconds = 0.0
        info: ModelInfo | None = None
        if dst.exists() and dst.resolve() == plan.source.path:
            if plan.source.file_type != qtype:
                raise QuantizeError(f"{dst} is the source itself and is {plan.source.file_type}, not {qtype}; "
                                    "choose another -o/--output directory")
            reused = True  # never overwrite the source, even with --force
        elif dst.exists() and not force:
            try:
                have = read_model_info(dst)
            except ModelError as exc:
                raise QuantizeError(f"{dst} exists but is not a usable GGUF ({exc}); use --force") from exc
            if have.file_type != qtype:
                raise QuantizeError(f"{dst} exists but is {have.file_type}, not {qtype}; use --force to replace it")
            reused, info = True, have
        else:
            seconds = quantize_model(plan.source.path, dst, qtype, imatrix=imatrix, nthread=nthread,
                                     log_path=log_path,
                                     progress=(lambda s, q=qtype: progress(q, s)) if progress else None,
                                     check_source=False)
        if info is None:
            info = plan.source if dst.resolve() == plan.source.path else read_model_info(dst)
        yield QuantResult(qtype, dst, reused, seconds, info, type_mix(info, qtype), coverage_warning(info, qtype))
