"""``lcprobe info``: what lcprobe reads from a GGUF header (no weights loaded)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lcprobe.cli.common import DEFAULT_MODEL, resolve_model


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="what lcprobe knows about a model file (no weights loaded)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from lcprobe.files.modelfile import read_model_info

    info = read_model_info(resolve_model(args.model))
    data = {
        "path": str(info.path), "name": info.general_name, "label": info.name, "architecture": info.arch, "n_layer": info.n_layer,
        "n_embd": info.n_embd, "n_vocab": info.n_vocab, "quantization": info.file_type,
        "head": info.head_tensor, "head_type": info.head_type, "bits_per_weight": round(info.bits_per_weight(), 3),
        "tensor_types": info.tensor_types, "norm_eps": info.norm_eps, "add_bos": info.add_bos,
    }
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        for k, v in data.items():
            print(f"{k:>16}: {v}")
    return 0


