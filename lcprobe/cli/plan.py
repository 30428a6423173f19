"""``lcprobe plan``: will this model run here, and with which -ngl? (GGUF header only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lcprobe.cli.common import add_model_args


# what the lens holds of the head, per --lens-backend: (table row, how it is counted)
_LENS_HEAD = {
    "numpy": ("lens head (float32)", "vocab x n_embd x 4"),
    "ggml": ("lens head (as stored)", "a copy of the head's quantized bytes"),
    "device": ("lens head (float32, on the output layer's device)", "vocab x n_embd x 4 + two chunks of logits"),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="memory plan from the GGUF header: weights, KV cache, lens, fit, largest -ngl",
        description="Read the GGUF header (no weights) and plan memory for the given offload, context and "
                    "batch: weights on CPU and GPU, KV cache, compute buffers, lens head, capture buffers, "
                    "the total against this machine's RAM and GPU memory, and the largest -ngl that fits. "
                    "Exits 1 when the plan does not fit.",
    )
    add_model_args(p, loads=False)
    p.add_argument("--ram", type=float, default=None, metavar="GB",
                   help="RAM to plan for, in GB (default: this machine's available memory)")
    p.add_argument("--vram", type=float, default=None, metavar="GB",
                   help="GPU memory to plan for, in GB; 0 = no GPU (default: nvidia-smi's free memory, "
                        "or the Metal working set on Apple silicon)")
    p.add_argument("--unified", action="store_true", default=None,
                   help="GPU and CPU share memory (Apple silicon; detected on a Mac)")
    p.add_argument("--layers-probed", type=int, default=None, metavar="N",
                   help="layers captured per row (sizes the capture buffers; default: all)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="KV cache precision (default f16)")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off",
                   help="flash attention as the run will use it (default off, what lcprobe's commands use; "
                        "auto = on)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")


def run(args: argparse.Namespace) -> int:
    from lcprobe.files.catalog import resolve_model
    from lcprobe.files.plan import fmt_bytes, make_plan

    gb = 1e9
    vram = None if args.vram is None else int(args.vram * gb)
    cpu_build = False
    if vram is None:
        from lcprobe.llama.engine import gpu_offload_supported

        # a GPU this llama-cpp-python build cannot use does not count
        cpu_build = not gpu_offload_supported()
        vram = 0 if cpu_build else None
    plan = make_plan(
        resolve_model(args.model), n_gpu_layers=args.n_gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
        ram_bytes=None if args.ram is None else int(args.ram * gb), vram_bytes=vram,
        kv_type=args.kv_type, flash_attn=args.flash_attn, n_layers_probed=args.layers_probed, unified=args.unified,
        lens_backend=args.lens_backend,
    )
    if cpu_build:
        plan.vram_source = "this llama-cpp-python build cannot offload (CPU only); --vram GB plans for a GPU"
    servers = _servers(args, plan) if getattr(args, "rpc", None) else None
    if args.json:
        print(json.dumps(plan.as_dict() | ({"devices": servers} if servers is not None else {}), indent=1))
        return 0 if plan.fits else 1

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    where = "GPU" if plan.unified is False else "GPU (unified)"
    off = (f"-ngl {plan.n_gpu_layers}: {plan.gpu_layers} of {plan.n_layer} blocks"
           f"{' + output layer' if plan.output_on_gpu else ''} on the GPU")
    console.print(f"[bold]{plan.model}[/] ({plan.arch}, {plan.file_type}, {fmt_bytes(plan.file_bytes)}, "
                  f"{plan.n_layer} layers, n_embd {plan.n_embd}, vocab {plan.n_vocab})")
    console.print(f"{off}; -c {plan.n_ctx} (padded to 256), -b {plan.n_batch}, KV {plan.kv_type}, "
                  f"flash attention {'on' if plan.flash_attn else 'off'}")
    table = Table(title_justify="left")
    table.add_column("component")
    table.add_column("CPU / RAM", justify="right")
    table.add_column(where, justify="right")
    table.add_column("how it is counted", style="dim")
    head_name, head_how = _LENS_HEAD.get(plan.lens_backend, ("lens head", "no lens"))
    rows = [
        ("weights", plan.weights_cpu, plan.weights_gpu, "memory-mapped on the CPU (page cache); copied on a GPU"),
        ("weights repacked", plan.repack_cpu, 0, "llama.cpp's interleaved copy for this CPU (in peak RSS only)"),
        ("KV cache", plan.kv_cpu, plan.kv_gpu, "n_ctx x layers x n_head_kv x head_dim x 2 (K,V) x bytes"),
        ("compute buffers", plan.compute_cpu, plan.compute_gpu, "largest of logits / FFN / attention per ubatch"),
        ("llama.cpp logits", plan.output_buffer, 0, "n_batch x vocab x 4"),
        (head_name, plan.lens_head, plan.lens_device, head_how),
        ("lens scratch", plan.lens_scratch, 0, "one chunk of logits"),
        ("capture buffers", plan.capture, 0, "rows x layers x n_embd x 4, four copies"),
        ("runtime", plan.runtime, 0, "Python, numpy, llama.cpp libraries"),
    ]
    for name, cpu, gpu, how in rows:
        table.add_row(name, fmt_bytes(cpu), fmt_bytes(gpu) if gpu else "-", how)
    ram_what = "unified memory" if plan.unified else "RAM"
    table.add_row("[bold]total needed[/]", f"[bold]{fmt_bytes(plan.ram_need)}[/]",
                  f"[bold]{fmt_bytes(plan.vram_need)}[/]" if plan.vram_need else "-",
                  f"{ram_what}: the larger of the run and the head's load peak ({fmt_bytes(plan.lens_load_peak)})")
    table.add_row("available", fmt_bytes(plan.ram_bytes), fmt_bytes(plan.vram_bytes) if plan.vram_bytes else "no GPU",
                  f"{plan.ram_source}; {plan.vram_source}")
    console.print(table)
    if plan.fits:
        console.print("[green]fits[/]", end="")
    else:
        console.print("[red]does not fit[/]: " + "; ".join(plan.reasons), end="")
    if plan.max_gpu_layers is None:
        console.print("; nothing fits, even without offload")
    elif plan.vram_bytes:
        console.print(f"; largest -ngl that fits: {plan.max_gpu_layers} (of {plan.n_layer + 1})")
    else:
        console.print("")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")
    if servers is not None:
        console.print(_server_table(servers))
    return 0 if plan.fits else 1


def _servers(args: argparse.Namespace, plan: Any) -> list[dict[str, Any]]:
    """Per --rpc server: the blocks llama.cpp will put there and the bytes they need, against its free memory."""
    from lcprobe.cli.common import rpc_options
    from lcprobe.files.catalog import resolve_model
    from lcprobe.files.plan import device_split
    from lcprobe.llama.engine import ALL_GPU_LAYERS
    from lcprobe.llama.rpc import device_memory

    opts = rpc_options(args)
    endpoints = opts["rpc"]
    memory = [device_memory(ep) for ep in endpoints]
    shares = opts["tensor_split"] or tuple(float(free) for free, _ in memory)
    if len(shares) != len(endpoints):
        from lcprobe.errors import LcprobeError

        raise LcprobeError(f"--tensor-split gives {len(shares)} shares for {len(endpoints)} --rpc servers")
    devices = device_split(resolve_model(args.model), args.n_gpu_layers or ALL_GPU_LAYERS, shares,
                           n_ctx=args.ctx_size, n_batch=args.batch_size, kv_type=args.kv_type,
                           flash_attn=args.flash_attn)
    for d, ep, (free, total) in zip(devices, endpoints, memory):
        d.update(endpoint=ep, free=free, memory_total=total, fits=d["total"] <= free)
    return devices


def _server_table(servers: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from lcprobe.files.plan import fmt_bytes

    table = Table(title="per RPC server (llama.cpp's layer split)", title_justify="left")
    for col in ("server", "share", "blocks", "weights", "KV cache", "compute", "total", "free", ""):
        table.add_column(col, justify="left" if col in ("server", "blocks", "") else "right")
    for d in servers:
        blocks = f"{d['layers'][0]}-{d['layers'][-1]}" if d["layers"] else "-"
        if d["output"]:
            blocks += " + output"
        table.add_row(d["endpoint"], f"{d['share']:.2f}", blocks, fmt_bytes(d["weights"]), fmt_bytes(d["kv_cache"]),
                      fmt_bytes(d["compute"]), fmt_bytes(d["total"]), fmt_bytes(d["free"]),
                      "[green]fits[/]" if d["fits"] else "[red]does not fit[/]")
    return table
