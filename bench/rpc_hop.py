#!/usr/bin/env python
"""What capturing through llama.cpp's RPC backend costs: the network hop per captured row.

Starts two `lcprobe rpc-server` processes on 127.0.0.1 (or uses --rpc), opens the
model locally and split over the servers, and decodes lcprobe's own batches for
the same calc items with and without capture, interleaved, --repeat times (the
minimum counts). The capture's extra time over RPC minus its extra time locally,
divided by the rows captured (tokens x layers), is the hop's cost per row; with
the number of capture points (layers x ubatches) it is also given per point,
since each asked-for node ends a graph split and costs a round trip.

    .venv/bin/python bench/rpc_hop.py --limit 8 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(n: int, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    exe = Path(sys.executable).with_name("lcprobe")
    procs, eps = [], []
    for _ in range(n):
        port = _port()
        procs.append(subprocess.Popen([str(exe), "rpc-server", "--port", str(port), "-t", str(threads)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        eps.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"rpc-server on port {port} did not start")
                time.sleep(0.1)
    return procs, eps


def measure(model: str, items, rpc: tuple[str, ...], threads: int, repeat: int) -> dict:
    from speed import decode_batches

    from lcprobe.analysis.lens import Lens
    from lcprobe.llama.loader import open_model
    from lcprobe.probing.batching import build_units, common_prefix_length, group_units, layout_group
    from lcprobe.probing.runner import Prober
    from lcprobe.probing.session import ProbeOptions
    from lcprobe.sites import parse_layers

    options = ProbeOptions(n_threads=threads, n_batch=64, rpc=rpc)
    with open_model(model, options) as m:
        eng, info = m.engine, m.info
        layers = parse_layers(None, info.n_layer)
        prober = Prober(eng, Lens(m.unembed, info.n_layer), layers)
        reqs, _ = prober.encode(items)
        k = common_prefix_length(reqs)
        units = build_units(reqs, k, eng.n_seq_max - 1)
        groups = group_units(units, k, eng.n_ctx, eng.n_batch, eng.n_seq_max - 1, prober.max_rows)
        batches = [layout_group(g, k) for g in groups]
        prefix = list(reqs[0].context[:k])
        floor, cap = [], []
        for _ in range(repeat):
            floor.append(decode_batches(eng, prefix, batches, [])[0])
            cap.append(decode_batches(eng, prefix, batches, prober.sites)[0])
        rows = sum(int(b.outputs.sum()) for b in batches) * len(layers)
        ubatches = sum(-(-len(b.tokens) // eng.n_ubatch) for b in batches)
    return {"floor": min(floor), "capture": min(cap), "rows": rows, "points": ubatches * len(layers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--rpc", default=None, help="servers to use instead of starting two on loopback")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=1)
    args = p.parse_args(argv)
    from lcprobe.llama.rpc import parse_endpoints
    from lcprobe.tasks.task import load_task

    items = load_task("calc").items(limit=args.limit)
    procs: list[subprocess.Popen] = []
    eps = parse_endpoints(args.rpc) if args.rpc else ()
    if not eps:
        procs, started = start_servers(2, args.threads)
        eps = tuple(started)
    try:
        load0 = os.getloadavg()[0]
        local = measure(args.model, items, (), args.threads, args.repeat)
        remote = measure(args.model, items, eps, args.threads, args.repeat)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    extra_local = local["capture"] - local["floor"]
    extra_rpc = remote["capture"] - remote["floor"]
    hop = extra_rpc - extra_local
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; {len(items)} calc items, {local['rows']} captured "
          f"rows (tokens x layers) at {local['points']} capture points (layers x ubatches)")
    print(f"local: decode {local['floor']:.3f} s, with capture {local['capture']:.3f} s (+{extra_local:.3f})")
    print(f"RPC over {', '.join(eps)}: decode {remote['floor']:.3f} s, with capture {remote['capture']:.3f} s "
          f"(+{extra_rpc:.3f})")
    print(f"network hop: {hop / local['rows'] * 1e6:.1f} us per captured row, "
          f"{hop / local['points'] * 1e3:.3f} ms per capture point")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
