"""``lcprobe patch``: activation patching (causal tracing) inside llama.cpp's forward pass."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lcprobe.cli.common import add_model_args

EPILOG = """\
example:
  lcprobe patch -m smollm2-135m --clean "The Eiffel Tower is in the city of" \\
      --corrupt "The Colosseum is in the city of" --answer " Paris" --wrong " Rome" -o results/patch

For every (site, layer, position) the clean activation replaces the corrupted one; DIR/patch.json
holds the restored fraction of the logit difference answer - wrong at the last position,
(patched - corrupt) / (clean - corrupt), per site as [[per position] per layer]; `lcprobe report DIR`
draws the layers x positions heatmap. The prompts must tokenize to the same length. Each patched
run gives what it gives alone, bit for bit; the sweep sizes its own KV cache (-c is not used).
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("patch", help="activation patching: which layer and position carry the answer",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Patch clean activations into a corrupted run at every site, layer and "
                                   "position, and measure how much of the answer comes back.")
    add_model_args(p)
    p.add_argument("--clean", required=True, help="the prompt whose activations are patched in")
    p.add_argument("--corrupt", required=True, help="the prompt that receives them (same token count)")
    p.add_argument("--answer", required=True, help="the clean answer (its first token is scored)")
    p.add_argument("--wrong", default=None,
                   help="the competing answer (default: the corrupted run's most likely other token)")
    p.add_argument("--sites", default="resid_post", help="comma-separated: resid_post, resid_mid, resid_pre")
    p.add_argument("--layers", default=None, help="layers to patch, 1-based (default: all)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def run(args: argparse.Namespace) -> int:
    from lcprobe.cli.common import load_options, make_console, resolve_model
    from lcprobe.files.atomic import write_atomic
    from lcprobe.files.modelfile import read_model_info
    from lcprobe.llama.loader import open_model
    from lcprobe.sites import check_site, parse_layers
    from lcprobe.studies.patching import PATCH_JSON, run_patching, sweep_options

    console = make_console(args.quiet)
    sites = [check_site(s.strip()) for s in args.sites.split(",") if s.strip()]
    info = read_model_info(resolve_model(args.model))
    layers = parse_layers(args.layers, info.n_layer)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    # every patched run equal to that run alone, bit for bit (see lcprobe.studies.patching);
    # the sweep sizes its own KV cache, so -c is not used
    changes = sweep_options(info, args.corrupt, len(sites) * len(layers))
    opts = load_options(args, lens_backend=None, **changes)
    with open_model(info.path, opts, log_path=out / "llama.log") as lm:
        res = run_patching(lm.engine, args.clean, args.corrupt, args.answer, args.wrong, sites, layers)
    doc = {"model": str(info.path), "model_name": info.name, "sha256": lm.sha256, "n_layer": info.n_layer,
           "kv_type": "f32", "flash_attn": "off", "repack": changes["repack"], **res.to_json()}
    write_atomic(out / PATCH_JSON, json.dumps(doc, indent=1))
    for s, v in res.sites.items():
        li, p = divmod(int(abs(v).argmax()), v.shape[1]) if v.size else (0, 0)
        console.print(f"{s}: strongest at layer {res.layers[li]}, position {p} ({res.tokens[p]!r}): "
                      f"{v[li, p]:.3f} restored", soft_wrap=True)
    console.print(f"clean {res.clean_diff:.3f}, corrupt {res.corrupt_diff:.3f} ({res.answer!r} - {res.wrong!r}); "
                  f"{res.n_runs} patched runs in {res.n_decodes} decodes ({res.n_tokens} tokens), {res.seconds:.1f} s "
                  f"-> {out / PATCH_JSON}",
                  soft_wrap=True)
    return 0
