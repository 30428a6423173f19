"""Memory plan for a model on this machine, from the GGUF header alone (no weights are read).

Where llama.cpp puts weights, KV cache and compute buffers, and the formulas used: docs/memory-plan.md.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Sequence

from lcprobe.errors import LcprobeError
from lcprobe.files.modelfile import ModelInfo, open_reader, read_model_info

GB = 1e9
MIB = 1 << 20

# Python, numpy, gguf and llama-cpp-python imported, before llama.cpp's
# libraries load a model (measured: 49 MB RSS on Linux x86-64 with
# llama-cpp-python 0.3.36; scipy is imported only where a test needs it).
RUNTIME_BYTES = 100 * MIB

# The head is dequantized in row blocks into its float32 array, so loading it
# costs the array plus the file pages read (measured 153 MB for SmolLM2's
# 113 MB head: 1.35x).
HEAD_LOAD_FACTOR = 1.35

# gguf-py's reader holds numpy objects per vocabulary entry while the header is
# parsed (measured 157 MB for SmolLM2's 49152 tokens); lcprobe drops it once
# the head is loaded.
READER_BYTES_PER_TOKEN = 3300

# Captured rows exist about four times at once: the extension's buffer, the
# array returned per decode, the group's concatenation and the lens' normed stack.
CAPTURE_COPIES = 4

# The device lens converts and uploads its head in blocks of this many bytes
# (lcprobe.llama.device_head.UPLOAD_BLOCK_BYTES; not imported: planning loads no llama.cpp).
DEVICE_UPLOAD_BLOCK = 32 * MIB

# Above this share of RAM the float32 head is worth storing as float16.
LENS_F16_SHARE = 0.10

# Apple GPUs may wire about this share of unified memory by default
# (recommendedMaxWorkingSetSize; raise it with sysctl iogpu.wired_limit_mb).
METAL_WORKING_SET = 0.75

_KV_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class Shape:
    """What the plan needs from a GGUF header."""

    path: Path
    name: str
    arch: str
    file_type: str
    file_bytes: int
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ff: int
    n_head: int
    kv_widths: tuple[int, ...]  # per layer: n_head_kv * (key_length + value_length)
    layer_bytes: tuple[int, ...]  # per layer: sum of blk.N.* tensor bytes
    input_bytes: int  # token_embd and anything not in a block or the output layer
    output_bytes: int  # output_norm (+ output.weight when the head is not tied)
    head_copy_bytes: int  # a tied head: token_embd's copy on the GPU when the output layer goes there
    head_bytes: int = 0  # the output head as stored (output.weight, or the tied token_embd)
    # per layer / output layer: weights llama.cpp's CPU backend repacks on this CPU (CPU_REPACK)
    repack_layer_bytes: tuple[int, ...] = ()
    repack_output_bytes: int = 0


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _per_layer(value, n_layer: int, what: str) -> list[int]:
    if value is None:
        raise LcprobeError(f"the GGUF header has no {what}")
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise LcprobeError(f"{what} lists {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def read_shape(info_or_path: ModelInfo | str | os.PathLike) -> Shape:
    """Sizes and hyperparameters from the header (no tensor data is read)."""
    info = info_or_path if isinstance(info_or_path, ModelInfo) else read_model_info(info_or_path)
    reader = open_reader(info.path)
    arch, n_layer = info.arch, info.n_layer
    n_head = _per_layer(_field(reader, f"{arch}.attention.head_count"), n_layer, "attention.head_count")
    n_head_kv_raw = _field(reader, f"{arch}.attention.head_count_kv")
    n_head_kv = _per_layer(n_head_kv_raw, n_layer, "attention.head_count_kv") if n_head_kv_raw is not None else n_head
    head_dim = info.n_embd // max(n_head)
    k_len = int(_field(reader, f"{arch}.attention.key_length", head_dim) or head_dim)
    v_len = int(_field(reader, f"{arch}.attention.value_length", head_dim) or head_dim)
    n_ff = max(_per_layer(_field(reader, f"{arch}.feed_forward_length", 4 * info.n_embd), n_layer,
                          "feed_forward_length"))
    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    block = re.compile(r"blk\.(\d+)\.")
    names = set()
    for t in reader.tensors:
        names.add(t.name)
        nb = int(t.n_bytes)
        m = block.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += nb
        elif t.name.startswith("output"):
            output_bytes += nb
        else:
            input_bytes += nb
    # llama.cpp duplicates token_embd as the head onto the output layer's device
    # when that is not the CPU (TENSOR_DUPLICATED)
    head_copy = 0 if "output.weight" in names else next(
        int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    return Shape(
        path=info.path, name=info.general_name, arch=arch, file_type=info.file_type, file_bytes=info.size_bytes,
        n_layer=n_layer, n_embd=info.n_embd, n_vocab=info.n_vocab, n_ff=n_ff, n_head=max(n_head),
        kv_widths=tuple(h * (k_len + v_len) for h in n_head_kv), layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes, output_bytes=output_bytes, head_copy_bytes=head_copy,
        head_bytes=next(int(t.n_bytes) for t in reader.tensors if t.name == info.head_tensor),
        **_repack_bytes(reader, n_layer),
    )


def cpu_repack_types() -> frozenset[str]:
    """Weight types llama.cpp's CPU backend repacks into interleaved copies on this CPU
    (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type; x86 and Arm)."""
    machine = platform.machine().lower()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        if platform.system() == "Darwin" and machine == "arm64":
            flags = {"asimddp"}  # every Apple silicon core has dot product
    types: set[str] = set()
    if "avx2" in flags:
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if "avx512f" in flags:
        types.add("Q2_K")
    if "asimddp" in flags or "i8mm" in flags:
        types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}
    return frozenset(types)


def _repack_bytes(reader, n_layer: int) -> dict:
    """Bytes of the matmul weights the CPU backend would repack (all rows a multiple of 8; never token_embd)."""
    types = cpu_repack_types()
    per_layer, output = [0] * n_layer, 0
    block = re.compile(r"blk\.(\d+)\.")
    for t in reader.tensors:
        if (t.tensor_type.name not in types or len(t.shape) < 2 or int(t.shape[1]) % 8
                or t.name.startswith("token_embd")):
            continue
        m = block.match(t.name)
        if m and int(m.group(1)) < n_layer:
            per_layer[int(m.group(1))] += int(t.n_bytes)
        elif t.name.startswith("output"):
            output += int(t.n_bytes)
    return {"repack_layer_bytes": tuple(per_layer), "repack_output_bytes": output}


# -- this machine ---------------------------------------------------------------

def machine_ram() -> tuple[int, int]:
    """(total, available) RAM in bytes; available is MemAvailable on Linux."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = total
    try:
        text = Path("/proc/meminfo").read_text()
        m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
        if m:
            available = int(m.group(1)) * 1024
    except OSError:
        pass  # macOS: no /proc; the whole RAM is the budget
    return total, available


def machine_vram() -> tuple[int, str] | None:
    """(bytes, description) of GPU memory: free memory of NVIDIA GPUs (summed), or
    the Metal working set of Apple silicon's unified memory; None without a GPU."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        gpus = [line.rsplit(",", 2) for line in out.strip().splitlines() if line.count(",") >= 2]
        if gpus:
            free = sum(int(float(g[2])) for g in gpus) * MIB
            names = ", ".join(f"{g[0].strip()} ({int(float(g[1])) / 1024:.0f} GiB)" for g in gpus)
            return free, f"nvidia-smi: {names}, free memory"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = 0
        try:
            limit = int(subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True,
                                       text=True, timeout=5).stdout.strip() or 0) * MIB
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        return (limit or int(total * METAL_WORKING_SET)), "Metal working set of unified memory"
    return None


# -- the plan -------------------------------------------------------------------

@dataclass
class Plan:
    """Bytes per component and device, the verdict, and why."""

    model: str
    arch: str
    file_type: str
    file_bytes: int
    n_layer: int
    n_embd: int
    n_vocab: int
    n_gpu_layers: int  # as requested (-ngl)
    gpu_layers: int  # repeating blocks on the GPU
    output_on_gpu: bool
    n_ctx: int  # as llama.cpp pads it
    n_batch: int
    n_ubatch: int
    kv_type: str
    flash_attn: bool
    weights_cpu: int
    weights_gpu: int
    kv_cpu: int
    kv_gpu: int
    compute_cpu: int
    compute_gpu: int
    output_buffer: int  # llama.cpp's host logits buffer
    lens_head: int  # the lens' head: float32 (numpy backend) or a copy of the stored bytes (ggml)
    lens_scratch: int  # one chunk of logits (two for the device lens: logits and softmax)
    lens_load_peak: int  # while the lens' head is made from the file
    capture: int
    runtime: int
    ram_need: int
    vram_need: int
    ram_bytes: int | None
    vram_bytes: int | None
    unified: bool
    fits: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_gpu_layers: int | None = None  # largest -ngl that fits (None: nothing fits)
    ram_source: str = ""
    vram_source: str = ""
    lens_backend: str | None = "numpy"
    # The CPU backend's repacked copies of CPU-resident weights (anonymous
    # memory), and the peak RSS expected with them: the file's pages they were
    # read from stay resident too while memory is free (reclaimable, so not
    # counted in ram_need).
    repack_cpu: int = 0
    peak_rss: int = 0
    # the device lens' float32 head and chunk buffers on the output layer's GPU / RPC device
    lens_device: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def refusal(self) -> str:
        """One paragraph for ``lcprobe run`` to raise when the plan does not fit."""
        fix = ""
        if self.max_gpu_layers is not None and self.max_gpu_layers != self.n_gpu_layers:
            fix = f"; -ngl {self.max_gpu_layers} fits"
        return f"{self.model} does not fit: " + "; ".join(self.reasons) + fix + " (details: lcprobe plan)"


def _kv_bytes(shape: Shape, layers: range, n_ctx: int, kv_type: str) -> int:
    per = _KV_BYTES.get(kv_type)
    if per is None:
        raise LcprobeError(f"unknown KV cache type '{kv_type}' ({', '.join(_KV_BYTES)})")
    return int(n_ctx * sum(shape.kv_widths[i] for i in layers) * per)


def _compute_parts(shape: Shape, n_ctx: int, n_ubatch: int, flash_attn: bool) -> tuple[int, int, int, int]:
    """(base, logits, ffn, attention) bytes of one ubatch's graph."""
    base = 4 * n_ubatch * 8 * shape.n_embd
    logits = 4 * n_ubatch * shape.n_vocab
    ffn = 4 * n_ubatch * 2 * shape.n_ff
    attn = 2 * n_ubatch * n_ctx if flash_attn else 4 * n_ubatch * n_ctx * (shape.n_head + 1)
    return base, logits, ffn, attn


def _layout(shape: Shape, ngl: int, n_ctx: int, n_ubatch: int, kv_type: str, flash_attn: bool,
            has_gpu: bool) -> dict[str, int | bool]:
    """Where weights, KV cache and compute buffers go for -ngl ``ngl``."""
    n = shape.n_layer
    ngl = max(0, min(ngl, n + 1)) if has_gpu else 0
    output_on_gpu = ngl >= 1
    gpu_layers = max(0, ngl - 1)
    first_gpu = n - gpu_layers
    cpu_range, gpu_range = range(0, first_gpu), range(first_gpu, n)
    output = shape.output_bytes + shape.head_copy_bytes
    weights_gpu = sum(shape.layer_bytes[i] for i in gpu_range) + (output if output_on_gpu else 0)
    weights_cpu = sum(shape.layer_bytes[i] for i in cpu_range) + shape.input_bytes + (
        0 if output_on_gpu else shape.output_bytes)
    base, logits, ffn, attn = _compute_parts(shape, n_ctx, n_ubatch, flash_attn)
    full = base + max(logits, ffn, attn)
    if output_on_gpu:
        compute_gpu = full
        # the CPU still runs the input layer and any blocks left on it
        compute_cpu = base + (max(ffn, attn) if len(cpu_range) else 0)
    else:
        compute_gpu, compute_cpu = 0, full
    return {
        "gpu_layers": gpu_layers, "output_on_gpu": output_on_gpu,
        "weights_cpu": weights_cpu, "weights_gpu": weights_gpu,
        "kv_cpu": _kv_bytes(shape, cpu_range, n_ctx, kv_type), "kv_gpu": _kv_bytes(shape, gpu_range, n_ctx, kv_type),
        "compute_cpu": compute_cpu, "compute_gpu": compute_gpu,
        "repack_cpu": sum(shape.repack_layer_bytes[i] for i in cpu_range if i < len(shape.repack_layer_bytes))
        + (0 if output_on_gpu else shape.repack_output_bytes),
    }


def _host_parts(shape: Shape, n_batch: int, n_probe: int, lens_backend: str | None = "numpy",
                output_on_gpu: bool = False) -> dict[str, int]:
    """lcprobe's own memory: output buffer, lens, capture; ``lens_device`` is the part on a GPU.

    The numpy lens holds the head dequantized to float32; the ggml lens a
    copy of its stored (quantized) bytes in its own ggml context
    (native/ggml_lens.c); the device lens a float32 head and two chunks of
    logits (logits, softmax) in buffers of the output layer's device: host
    memory when that is the CPU, else GPU memory, the host then holding only
    one upload block (native/device_lens.c); None: no lens at all.
    """
    from lcprobe.analysis.lens import DEFAULT_BUDGET
    from lcprobe.probing.runner import ROW_BUDGET_BYTES

    if lens_backend == "numpy":
        head = 4 * shape.n_vocab * shape.n_embd
        load = HEAD_LOAD_FACTOR * head
    elif lens_backend == "ggml":
        head = shape.head_bytes
        load = head + shape.head_bytes  # the copy and the file pages it is read from
    elif lens_backend == "device":
        head = 4 * shape.n_vocab * shape.n_embd
        # file pages and one converted block; the CPU device's buffer is host memory too
        load = shape.head_bytes + DEVICE_UPLOAD_BLOCK + (0 if output_on_gpu else head)
    else:
        head = load = 0
    row_bytes = 4 * shape.n_embd * n_probe
    rows = min(n_batch, max(64, ROW_BUDGET_BYTES // row_bytes))
    scratch = min(max(DEFAULT_BUDGET, 4 * shape.n_vocab * 64), 4 * shape.n_vocab * rows * n_probe)
    device = 0
    if lens_backend == "device":
        scratch *= 2
        if output_on_gpu:
            device, head, scratch = head + scratch, 0, 0
    return {
        "output_buffer": 4 * shape.n_vocab * n_batch,
        "lens_head": head,
        "lens_scratch": scratch,
        "lens_load_peak": int(load + READER_BYTES_PER_TOKEN * shape.n_vocab),
        "capture": CAPTURE_COPIES * rows * row_bytes,
        "runtime": RUNTIME_BYTES,
        "lens_device": device,
    }


def _needs(lay: dict, host: dict, unified: bool) -> tuple[int, int]:
    gpu = int(lay["weights_gpu"] + lay["kv_gpu"] + lay["compute_gpu"] + host.get("lens_device", 0))
    running = (lay["weights_cpu"] + lay["kv_cpu"] + lay["compute_cpu"] + host["output_buffer"]
               + host["lens_head"] + host["lens_scratch"] + host["capture"] + host["runtime"])
    # lcprobe dequantizes the head before llama.cpp loads the model
    ram = int(max(running, host["lens_load_peak"] + host["runtime"]))
    if unified:
        ram += gpu
    return ram, gpu


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    if abs(n) >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.0f} MB"


def make_plan(
    info_or_path: ModelInfo | str | os.PathLike,
    n_gpu_layers: int = 0,
    n_ctx: int = 2048,
    n_batch: int = 512,
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
    *,
    n_ubatch: int | None = None,
    kv_type: str = "f16",
    flash_attn: str = "off",
    n_layers_probed: int | None = None,
    unified: bool | None = None,
    lens_backend: str | None = "numpy",
    repack: bool = True,
) -> Plan:
    """The memory plan for running lcprobe on this model with these settings.

    ``ram_bytes`` / ``vram_bytes`` default to this machine (MemAvailable;
    free NVIDIA memory or the Metal working set); ``vram_bytes=0`` means no GPU.
    ``unified`` (Apple silicon; default: detected) counts GPU bytes against RAM
    too. ``flash_attn`` defaults to lcprobe's "off" (batch-invariant scores);
    "auto" is planned as on (what llama.cpp picks on CPU, CUDA and Metal).
    ``n_layers_probed`` (default all) sizes the capture; ``repack`` False
    plans no CPU weight repacking (the patching sweep's engine).
    """
    shape = read_shape(info_or_path)
    ram_source = vram_source = "given"
    if ram_bytes is None:
        total, ram_bytes = machine_ram()
        ram_source = f"MemAvailable of {fmt_bytes(total)}"
    if unified is None:
        unified = platform.system() == "Darwin" and platform.machine() == "arm64"
    if vram_bytes is None:
        detected = machine_vram()
        vram_bytes, vram_source = (detected if detected else (0, "no GPU found"))
    has_gpu = vram_bytes > 0
    n_ctx_padded = -(-int(n_ctx) // 256) * 256
    n_ubatch = min(int(n_ubatch or n_batch), int(n_batch))
    fa = flash_attn != "off"
    n_probe = int(n_layers_probed or shape.n_layer)
    def verdict(ngl: int) -> tuple[dict, int, int, bool]:
        lay = _layout(shape, ngl, n_ctx_padded, n_ubatch, kv_type, fa, has_gpu)
        if not repack:
            lay["repack_cpu"] = 0
        ram, gpu = _needs(lay, parts(lay), unified)
        return lay, ram, gpu, ram <= ram_bytes and gpu <= vram_bytes

    def parts(lay: dict) -> dict[str, int]:
        # the device lens follows the output layer, so its share depends on the offload
        return _host_parts(shape, int(n_batch), n_probe, lens_backend, bool(lay["output_on_gpu"]))

    lay, ram_need, vram_need, fits = verdict(n_gpu_layers)
    host = parts(lay)
    fitting = [k for k in range(shape.n_layer + 2 if has_gpu else 1) if verdict(k)[3]]
    max_ngl = max(fitting) if fitting else None

    reasons, notes = [], []
    if ram_need > ram_bytes:
        what = "unified memory" if unified else "RAM"
        reasons.append(f"needs {fmt_bytes(ram_need)} of {what}, {fmt_bytes(ram_bytes)} available "
                       f"(weights on CPU {fmt_bytes(lay['weights_cpu'])}, KV cache {fmt_bytes(lay['kv_cpu'])}, "
                       f"lens head {fmt_bytes(host['lens_head'])})")
    if vram_need > vram_bytes:
        reasons.append(f"needs {fmt_bytes(vram_need)} of GPU memory for -ngl {n_gpu_layers}, "
                       f"{fmt_bytes(vram_bytes)} available")
    if n_gpu_layers > 0 and not has_gpu:
        notes.append("no GPU: -ngl has no effect, everything runs on the CPU")
    if n_gpu_layers > shape.n_layer + 1:
        notes.append(f"-ngl {n_gpu_layers} offloads everything ({shape.n_layer} blocks + the output layer)")
    if lens_backend == "numpy" and host["lens_head"] > LENS_F16_SHARE * ram_bytes:
        notes.append(f"the lens head in float32 ({fmt_bytes(host['lens_head'])}) is over "
                     f"{LENS_F16_SHARE:.0%} of RAM: --lens-backend ggml keeps the head as stored instead "
                     f"({fmt_bytes(shape.head_bytes)})")
    if lens_backend == "device":
        where = "the output layer's GPU" if host["lens_device"] else "the CPU (host memory)"
        notes.append(f"the device lens holds its float32 head ({fmt_bytes(4 * shape.n_vocab * shape.n_embd)}) "
                     f"and two chunks of logits on {where}, where the output layer is")
    if lay["repack_cpu"]:
        notes.append(f"llama.cpp repacks {fmt_bytes(lay['repack_cpu'])} of the CPU's weights for this CPU (CPU_REPACK) "
                     f"into memory of its own; the file pages they came from stay cached while RAM is free: "
                     f"peak RSS about {fmt_bytes(ram_need + lay['repack_cpu'])}")
    notes.append("weights are memory-mapped: page cache (RssFile once touched, dropped and re-read under "
                 "pressure), counted against RAM because a model larger than free RAM is re-read every decode")
    return Plan(
        model=shape.name, arch=shape.arch, file_type=shape.file_type, file_bytes=shape.file_bytes,
        n_layer=shape.n_layer, n_embd=shape.n_embd, n_vocab=shape.n_vocab,
        n_gpu_layers=int(n_gpu_layers), gpu_layers=int(lay["gpu_layers"]), output_on_gpu=bool(lay["output_on_gpu"]),
        n_ctx=n_ctx_padded, n_batch=int(n_batch), n_ubatch=n_ubatch, kv_type=kv_type, flash_attn=fa,
        weights_cpu=int(lay["weights_cpu"]), weights_gpu=int(lay["weights_gpu"]),
        kv_cpu=int(lay["kv_cpu"]), kv_gpu=int(lay["kv_gpu"]),
        compute_cpu=int(lay["compute_cpu"]), compute_gpu=int(lay["compute_gpu"]),
        ram_need=ram_need, vram_need=vram_need, ram_bytes=int(ram_bytes), vram_bytes=int(vram_bytes),
        unified=bool(unified), fits=fits, reasons=reasons, notes=notes, max_gpu_layers=max_ngl,
        ram_source=ram_source, vram_source=vram_source, lens_backend=lens_backend, **host,
        repack_cpu=int(lay["repack_cpu"]), peak_rss=int(ram_need + lay["repack_cpu"]),
    )


def check_fits(plan: Plan) -> None:
    """Raise :class:`LcprobeError` with the plan's numbers when it does not fit."""
    if not plan.fits:
        raise LcprobeError(plan.refusal())


def device_split(info_or_path: ModelInfo | str | os.PathLike, n_gpu_layers: int, shares: Sequence[float],
                 n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int | None = None, kv_type: str = "f16",
                 flash_attn: str = "off") -> list[dict]:
    """Per offload device (e.g. each ``--rpc`` server): its blocks and the bytes they bring.

    llama.cpp's rule (llama_model::load_tensors): the last ``n_gpu_layers``
    of the blocks plus the output layer are offloaded, block ``il`` going to
    the first device whose cumulative share exceeds ``(il - first) / n``.
    """
    shape = read_shape(info_or_path)
    if not shares or not sum(shares) > 0:
        raise LcprobeError("no device shares to split the layers by")
    total = float(sum(shares))
    cuts = list(accumulate(s / total for s in shares))
    n = shape.n_layer
    act = min(int(n_gpu_layers), n + 1)
    first = max(n + 1 - int(n_gpu_layers), 0)
    n_ctx_padded = -(-int(n_ctx) // 256) * 256
    ub = min(int(n_ubatch or n_batch), int(n_batch))
    base, logits, ffn, attn = _compute_parts(shape, n_ctx_padded, ub, flash_attn != "off")
    devices = [{"share": s / total, "layers": [], "output": False, "weights": 0, "kv_cache": 0, "compute": 0}
               for s in shares]
    for il in range(first, n + 1):
        d = devices[min(bisect_right(cuts, (il - first) / act), len(devices) - 1)]
        if il == n:
            d["output"] = True
            d["weights"] += shape.output_bytes + shape.head_copy_bytes
        else:
            d["layers"].append(il + 1)
            d["weights"] += shape.layer_bytes[il]
            d["kv_cache"] += _kv_bytes(shape, range(il, il + 1), n_ctx_padded, kv_type)
    for d in devices:
        if d["layers"] or d["output"]:
            d["compute"] = base + max(ffn, attn, logits if d["output"] else 0)
        d["total"] = d["weights"] + d["kv_cache"] + d["compute"]
    return devices
