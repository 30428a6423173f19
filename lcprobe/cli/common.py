"""What every command shares: the model and probe option blocks, Ctrl-C handling, the console.

Commands are modules of this package, each with ``add_parser(subparsers)`` and
``run(args) -> int``; they import the library lazily so ``lcprobe --help`` and
``lcprobe report`` never load llama.cpp.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lcprobe.llama.loader import LoadOptions
    from lcprobe.probing.session import ProbeOptions

DEFAULT_MODEL = "smollm2-135m"


class Interrupt:
    """First Ctrl-C/SIGTERM asks the run to stop after the current group; the second raises
    KeyboardInterrupt at once (both leave a resumable directory: items are fsynced per group)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker)
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nlcprobe: stopping after the current batch (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def gpu_layers(text: str) -> int | str:
    """-ngl: a layer count or 'auto' (resolved by the loader, which knows the build)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'auto', got '{text}'") from None


def add_model_args(p: argparse.ArgumentParser, loads: bool = True) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"a .gguf path or a catalog name (default: {DEFAULT_MODEL}; see 'lcprobe models list')")
    if loads:
        p.add_argument("-ngl", "--n-gpu-layers", type=gpu_layers, default=0,
                       help="layers to offload to the GPU (CUDA/Metal builds of llama-cpp-python; 99 = all); "
                            "auto: all on a GPU build, none on a CPU-only one (a number > 0 on a CPU-only "
                            "build is refused)")
    else:  # `plan` plans for a GPU it may not have: a number only
        p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                       help="layers to offload to the GPU (99 = all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="KV cache cells shared by the prompt prefix and the items decoded together (default 2048)")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="tokens per llama_decode (default 512)")
    p.add_argument("--lens-backend", choices=("numpy", "ggml", "device"), default="numpy",
                   help="numpy: float32 product with the dequantized head (default; what transformers "
                        "would compute on the dequantized GGUF); ggml: the stored (quantized) head through "
                        "ggml's CPU kernels, exactly llama.cpp's own logits; device: the float32 head and the "
                        "log-softmax on the device that holds the output layer (GPU, RPC server; the CPU at "
                        "-ngl 0), only the scored log-probabilities come back")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="llama.cpp RPC servers ('lcprobe rpc-server' or llama.cpp's rpc-server) whose devices hold "
                        "the offloaded layers (every layer unless -ngl says fewer); trusted networks only")
    p.add_argument("--tensor-split", default=None, metavar="S1,S2,...",
                   help="share of the offloaded layers per device, local GPUs first, then the --rpc servers' "
                        "(e.g. 3,1; default: by each device's free memory, as llama.cpp)")
    if not loads:  # `plan` only reads the header
        return
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="load even when 'lcprobe plan' says the model does not fit this machine's RAM/GPU "
                        "memory (by default such a run is refused before loading, with the plan's numbers)")



def add_probe_args(p: argparse.ArgumentParser) -> None:
    """Which items, layers, lens and site: the same block on run, suite and compare."""
    p.add_argument("--limit", type=int, default=None,
                   help="score N items: data tasks take a seeded random subset (kept in file order, --seed), "
                        "generated tasks their first N (default: all)")
    p.add_argument("--layers", default=None, help="layers to score, 1-based: e.g. 1:10,20,-1 (default: all)")
    p.add_argument("--lens", choices=("final-norm", "raw"), default="final-norm",
                   help="final-norm: final norm + head at every layer (logit lens, default); "
                        "raw: head only below the last layer (Chen et al.'s code)")
    p.add_argument("--site", choices=("resid_post", "resid_mid"), default="resid_post",
                   help="resid_post: block output (default); resid_mid: residual after attention")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for generated tasks and for the --limit subset of data tasks (default 0)")


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)``: the second of four parts (1-based); None stays None."""
    from lcprobe.errors import LcprobeError

    if spec is None:
        return None
    parts = spec.split("/")
    try:
        i, n = (int(p) for p in parts)
    except ValueError:
        raise LcprobeError(f"--shard {spec!r}: expected I/N, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise LcprobeError(f"--shard {spec!r}: I must be between 1 and N")
    return i, n


def add_shard_arg(p: argparse.ArgumentParser, what: str = "items") -> None:
    """``--shard I/N`` (kept as a string; read it with parse_shard)."""
    p.add_argument("--shard", default=None, metavar="I/N",
                   help=f"run only part I of N of the {what} (deterministic, independent of threads and "
                        "machines); join the N output directories with 'lcprobe merge'")


def parse_tensor_split(spec: str | None) -> tuple[float, ...]:
    """``"3,1"`` -> ``(3.0, 1.0)``; None -> ``()`` (llama.cpp splits by free memory)."""
    from lcprobe.errors import LcprobeError

    if not spec:
        return ()
    try:
        shares = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise LcprobeError(f"--tensor-split {spec!r}: expected comma-separated numbers, e.g. 3,1") from None
    if any(not x >= 0 for x in shares) or not sum(shares) > 0:
        raise LcprobeError(f"--tensor-split {spec!r}: shares must be non-negative and not all zero")
    return shares


def rpc_options(args: argparse.Namespace) -> dict[str, Any]:
    """``rpc`` and ``tensor_split`` for LoadOptions/ProbeOptions from --rpc and --tensor-split."""
    spec = getattr(args, "rpc", None)
    rpc: tuple[str, ...] = ()
    if spec:
        from lcprobe.llama.rpc import parse_endpoints

        rpc = parse_endpoints(spec)
    return {"rpc": rpc, "tensor_split": parse_tensor_split(getattr(args, "tensor_split", None))}


def make_console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=False, quiet=quiet, highlight=False)


def load_options(args: argparse.Namespace, **changes: Any) -> "LoadOptions":
    """The loader's options from the model flags (add_model_args), with per-command changes."""
    from lcprobe.llama.loader import LoadOptions

    base = dict(n_ctx=args.ctx_size, n_batch=args.batch_size, n_gpu_layers=args.n_gpu_layers,
                n_threads=args.threads, lens_backend=getattr(args, "lens_backend", "numpy"),
                memory_check=getattr(args, "memory_check", True), **rpc_options(args))
    return LoadOptions(**{**base, **changes})


def resolve_model(spec: str) -> Path:
    from lcprobe.files.catalog import resolve_model as resolve

    return resolve(spec)


def probe_options(args: argparse.Namespace) -> ProbeOptions:
    from lcprobe.probing.session import ProbeOptions

    return ProbeOptions(
        layers=getattr(args, "layers", None), lens=getattr(args, "lens", "final-norm"),
        site=getattr(args, "site", "resid_post"), limit=getattr(args, "limit", None),
        seed=getattr(args, "seed", 0), n_ctx=args.ctx_size, n_batch=args.batch_size,
        n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
        lens_backend=getattr(args, "lens_backend", "numpy"),
        memory_check=getattr(args, "memory_check", True),
        shard=parse_shard(getattr(args, "shard", None)), **rpc_options(args),
    )


def resume_hint(args: argparse.Namespace) -> str:
    """The command that continues this run: the arguments given to main, plus --resume."""
    argv = [a for a in getattr(args, "argv", sys.argv[1:]) if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["lcprobe", *argv, "--resume"])


