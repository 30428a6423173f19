"""``lcprobe sites``: the named tensors a model's llama.cpp graph computes.

Decodes one token with node tracing on and lists every name, per-layer names
folded into ``name-{0..N-1}``. This is how a user finds out what can be
captured (and which names the residual sites map to) for a new architecture.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from lcprobe.cli.common import add_model_args, load_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sites", help="list the tensors a model's llama.cpp graph names (capturable sites)",
                       description="Decode one token and list the graph's named tensors, per-layer names folded.")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="also list unnamed nodes, views and KV-cache tensors")


def fold(names: list[str]) -> list[tuple[str, list[int]]]:
    """``['l_out-0', 'l_out-1', 'norm']`` -> ``[('l_out', [0, 1]), ('norm', [])]``, first-seen order."""
    out: dict[str, set[int]] = {}
    for n in names:
        m = re.fullmatch(r"(.+)-(\d+)", n)
        key, layer = (m.group(1), int(m.group(2))) if m else (n, None)
        s = out.setdefault(key, set())
        if layer is not None:
            s.add(layer)
    return [(k, sorted(v)) for k, v in out.items()]


def run(args: argparse.Namespace) -> int:
    from lcprobe.llama.loader import open_model

    # no head: the trace needs only the graph
    with open_model(args.model, load_options(args, n_ctx=64, n_batch=8, n_seq_max=1, lens_backend=None,
                                             layers="-1")) as model:
        info, eng = model.info, model.engine
        eng.set_sites([])
        eng.capture.trace(True)
        eng.decode_sequence(eng.tokenize("a", add_special=False)[:1])
        names = eng.capture.trace(False)
        dropped = eng.capture.trace_dropped
    if not args.all:
        # unnamed nodes, views and cache writes are not useful capture sites
        names = [n for n in names if not (n.startswith(("node_", "cache_")) or " (" in n)]
    folded = fold(names)
    spec = info.spec
    mapping = {"resid_pre (layer 1)": spec.embed, "resid_mid": f"{spec.mid}-N" if spec.mid else None,
               "resid_post": "l_out-N"}
    if args.json:
        print(json.dumps({"architecture": info.arch, "n_layer": info.n_layer,
                          "sites": [{"name": k, "layers": v} for k, v in folded], "residual": mapping,
                          "trace_dropped": dropped}, indent=1))
        return 0
    print(f"{info.name} ({info.arch}, {info.n_layer} layers): {len(folded)} distinct tensor names")
    if dropped:
        print(f"  (the trace buffer was full: {dropped} later node names are not listed)")
    for k, v in folded:
        layers = f"-{{{v[0]}..{v[-1]}}}" if v else ""
        print(f"  {k}{layers}")
    print("residual sites: " + ", ".join(f"{k} = {v}" for k, v in mapping.items() if v))
    return 0
