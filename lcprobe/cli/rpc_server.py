"""``lcprobe rpc-server``: serve this machine's backend to lcprobe (or llama.cpp) runs elsewhere."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

EPILOG = """\
examples:
  lcprobe rpc-server                                   # 127.0.0.1:50052, this machine only
  lcprobe rpc-server --host 10.0.0.2 --port 50052 -t 8 # on a private network you trust
  lcprobe run -m llama-2-13b.Q4_0.gguf --rpc 10.0.0.2:50052,10.0.0.3:50052 -T calc

The server is llama.cpp's own (ggml_backend_rpc_start_server, as in its rpc-server
binary): it offers this machine's GPUs, or its CPU when it has none. Clients put
layers on it with --rpc; --tensor-split sets the share of each device.

WARNING: the RPC protocol has no authentication and no encryption. Anyone who can
reach the port can use this machine's backend and read or write its memory. It binds
127.0.0.1 unless told otherwise; never expose it to an untrusted network.
"""


def add_parser(sub: Any) -> None:
    from lcprobe.llama.rpc import DEFAULT_PORT

    p = sub.add_parser("rpc-server", help="serve this machine's backend to remote runs (llama.cpp RPC)",
                       description="Serve this machine's devices with llama.cpp's RPC server.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); no authentication!")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads when serving the CPU (default: half the cores, as llama.cpp's rpc-server)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache tensors received from clients in DIR, so a reload skips the transfer")


def run(args: argparse.Namespace) -> int:
    from lcprobe.errors import LcprobeError
    from lcprobe.llama import rpc

    if not 0 < args.port < 65536:
        raise LcprobeError(f"--port must be between 1 and 65535, got {args.port}")
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise LcprobeError(f"-t/--threads must be at least 1, got {threads}")
    if not rpc.available():
        raise rpc.RpcError(rpc._missing().args[0])
    cache = None
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        cache = os.path.abspath(args.cache)
    loud = args.host not in ("127.0.0.1", "localhost", "::1")
    print(f"lcprobe rpc-server: protocol {'.'.join(map(str, rpc.PROTOCOL))} on {args.host}:{args.port}, "
          f"{threads} thread(s)", file=sys.stderr)
    print(f"{'WARNING' if loud else 'note'}: {rpc.WARNING}", file=sys.stderr, flush=True)
    # llama.cpp's server loop never returns to Python: let Ctrl-C and SIGTERM end the process directly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rpc.serve(args.host, args.port, threads, cache)
    # only reached when llama.cpp could not start (it printed why, e.g. the port is taken)
    raise LcprobeError(f"the RPC server could not listen on {args.host}:{args.port} (port in use?)")
